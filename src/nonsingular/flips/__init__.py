"""Bit flips in the integers of quantized weights: grids, attacks and certificates
(docs/quantization.md)."""

from .attack import FlipsTo, flip_attack, flips_to
from .grid import Flip, Quantization, quantize, quantized
from .result import FlipAttackResult

__all__ = [
    "Flip",
    "FlipAttackResult",
    "FlipsTo",
    "Quantization",
    "flip_attack",
    "flips_to",
    "quantize",
    "quantized",
]
