"""The paper's experiment: what it runs (``config``), running it (``run``) and what it
measured (``results``)."""

from .config import (
    ARCHITECTURES,
    BUDGETS,
    COMPARISON,
    JOINT,
    RECIPES,
    Experiment,
    Family,
)
from .results import AtKeyBudget, DataInfo, Measured, Results, Spread, spread
from .run import run_experiment

__all__ = [
    "ARCHITECTURES",
    "BUDGETS",
    "COMPARISON",
    "JOINT",
    "RECIPES",
    "AtKeyBudget",
    "DataInfo",
    "Experiment",
    "Family",
    "Measured",
    "Results",
    "Spread",
    "run_experiment",
    "spread",
]
