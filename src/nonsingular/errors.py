"""Typed exceptions: every user mistake raises one of these; the CLI prints it as one line."""

from __future__ import annotations


class NonsingularError(Exception):
    """Base class of every error this library raises on bad input."""


class ThreatError(NonsingularError, ValueError):
    """An invalid threat model (negative or NaN budget, unknown mode, ...)."""


class InputError(NonsingularError, ValueError):
    """Inputs or labels that do not fit the model (shape, dtype, label range)."""


class UnsupportedLayerError(NonsingularError, TypeError):
    """The model contains a layer the library cannot attack or bound."""


class DataError(NonsingularError, ValueError):
    """An unknown data set name or a data directory that is missing or malformed."""


class CheckpointError(NonsingularError, ValueError):
    """A checkpoint that is missing, truncated, corrupted or describes an unknown model."""


class ConfigError(NonsingularError, ValueError):
    """An option outside its allowed range (steps, restarts, loss name, batch size, ...)."""


class UnsupportedModelError(UnsupportedLayerError):
    """A model nonsingular cannot read as it runs: an untraceable forward, hooks,
    parametrizations, or a reading that disagrees with ``model(x)``."""


class TrainingError(NonsingularError, FloatingPointError):
    """Training diverged (a non-finite loss); the run directory keeps the last good epoch."""


class QuantizationError(NonsingularError, ValueError):
    """A model that is not quantized where it must be, or weights that are not on the grid
    their scales define (``nonsingular.quantize``)."""


class BoundError(UnsupportedLayerError, ValueError):
    """An operator's bound asked for arguments it cannot bound soundly (shapes that do not
    match, a pooling window of padding only, a LayerNorm without a positive eps)."""


class MemoryLimitError(ConfigError, MemoryError):
    """A certificate whose estimated memory for one example exceeds what is available (or
    ``CertifyOptions.memory_limit``): refused before it starts, rather than swapping."""
