"""nonsingular: adversarial robustness under joint input and weight perturbations."""

from ._version import __version__
from .attacks import AttackResult, attack
from .certificates import CertifyResult, certify
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
    "CertifyResult",
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
    "certify",
    "evaluate",
    "grid",
]
