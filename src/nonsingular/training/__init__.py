"""Training for non-singular robustness: ``nonsingular.train`` (docs/training.md)."""

from .config import TrainConfig
from .loop import TrainResult, accuracy, build_model, train
from .registry import METHODS, TrainingMethod

__all__ = [
    "METHODS",
    "TrainConfig",
    "TrainResult",
    "TrainingMethod",
    "accuracy",
    "build_model",
    "train",
]
