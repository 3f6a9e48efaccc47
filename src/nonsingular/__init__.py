"""nonsingular: adversarial robustness under joint input and weight perturbations."""

from ._version import __version__
from .attacks import AttackResult, attack
from .certificates import BabResult, CertifyResult, bab, certify
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InputError,
    NonsingularError,
    QuantizationError,
    ThreatError,
    TrainingError,
    UnsupportedLayerError,
    UnsupportedModelError,
)
from .evaluation import EvaluationTable, evaluate
from .flips import FlipAttackResult, FlipsTo, Quantization, flips_to, quantize, quantized
from .threat import Threat, grid
from .training import TrainConfig, TrainResult, train

__all__ = [
    "__version__",
    "AttackResult",
    "CertifyResult",
    "BabResult",
    "CheckpointError",
    "ConfigError",
    "EvaluationTable",
    "DataError",
    "InputError",
    "NonsingularError",
    "FlipAttackResult",
    "FlipsTo",
    "Quantization",
    "QuantizationError",
    "Threat",
    "ThreatError",
    "TrainingError",
    "TrainConfig",
    "TrainResult",
    "UnsupportedLayerError",
    "UnsupportedModelError",
    "attack",
    "bab",
    "certify",
    "evaluate",
    "flips_to",
    "grid",
    "quantize",
    "quantized",
    "train",
]
