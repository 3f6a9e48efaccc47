"""Training for non-singular robustness (DESIGN section 5): ``nonsingular.train``."""

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
