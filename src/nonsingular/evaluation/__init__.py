"""Robust accuracy over a grid of joint budgets, with the sanity checks of an honest evaluation.

``evaluate`` attacks (and certifies) every grid point on the whole data set and returns an
``EvaluationTable``. Like AutoAttack's checks, it looks for signs of a broken evaluation
(attacked above clean, an attack loss that never moved, accuracy rising with the budget, an
example certified that the attack broke) and reports them in the table.
"""

from .examples import ExampleSaver
from .outcomes import Outcomes
from .run import evaluate
from .table import EvaluationTable, Row, check

__all__ = ["EvaluationTable", "ExampleSaver", "Outcomes", "Row", "check", "evaluate"]
