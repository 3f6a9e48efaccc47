"""Training for non-singular robustness (DESIGN section 5): ``nonsingular.train``."""

from .config import METHODS, TrainConfig
from .loop import TrainResult, accuracy, build_model, train

__all__ = ["METHODS", "TrainConfig", "TrainResult", "accuracy", "build_model", "train"]
