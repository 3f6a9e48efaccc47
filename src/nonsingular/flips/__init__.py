"""Bit flips in the integers of quantized weights: grids, attacks and certificates
(docs/quantization.md)."""

from .grid import Flip, Quantization, quantize, quantized

__all__ = ["Flip", "Quantization", "quantize", "quantized"]
