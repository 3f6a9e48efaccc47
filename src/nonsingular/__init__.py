"""nonsingular: adversarial robustness under joint input and weight perturbations."""

from ._version import __version__
from .attacks import AttackOptions, AttackResult, attack
from .certificates import BabResult, CertifyOptions, CertifyResult, bab, certify
from .errors import (
    BoundError,
    CheckpointError,
    ConfigError,
    DataError,
    InputError,
    MemoryLimitError,
    NonsingularError,
    QuantizationError,
    ThreatError,
    TrainingError,
    UnsupportedLayerError,
    UnsupportedModelError,
)
from .evaluation import EvaluationTable, Outcomes, evaluate
from .flips import FlipAttackResult, FlipsTo, Quantization, flips_to, quantize, quantized
from .model.weights import WeightCoverage, weight_coverage
from .threat import Threat, grid
from .training import TrainConfig, TrainResult, train

__all__ = [
    "__version__",
    "AttackOptions",
    "AttackResult",
    "CertifyOptions",
    "CertifyResult",
    "BabResult",
    "BoundError",
    "CheckpointError",
    "ConfigError",
    "EvaluationTable",
    "DataError",
    "InputError",
    "MemoryLimitError",
    "NonsingularError",
    "FlipAttackResult",
    "FlipsTo",
    "Quantization",
    "QuantizationError",
    "Outcomes",
    "Threat",
    "ThreatError",
    "TrainingError",
    "TrainConfig",
    "TrainResult",
    "UnsupportedLayerError",
    "UnsupportedModelError",
    "WeightCoverage",
    "attack",
    "bab",
    "certify",
    "evaluate",
    "flips_to",
    "grid",
    "quantize",
    "quantized",
    "train",
    "weight_coverage",
]
