"""nonsingular: adversarial robustness under joint input and weight perturbations."""

from ._version import __version__
from .attacks import AttackResult, attack
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InputError,
    NonsingularError,
    ThreatError,
    UnsupportedLayerError,
)
from .evaluation import EvaluationTable, evaluate
from .threat import Threat, grid

__all__ = [
    "__version__",
    "AttackResult",
    "CheckpointError",
    "ConfigError",
    "EvaluationTable",
    "DataError",
    "InputError",
    "NonsingularError",
    "Threat",
    "ThreatError",
    "UnsupportedLayerError",
    "attack",
    "evaluate",
    "grid",
]
