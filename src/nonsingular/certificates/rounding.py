"""The model's own floating-point arithmetic, so that a certificate never rests on a margin
inside the rounding error of the dtype the model runs in.

By backward error analysis, the output a model computes is the exact output of slightly
perturbed arithmetic: a dot product plus bias of ``n`` terms is exact with every term moved by
at most ``gamma(n + 1) = (n + 1) u / (1 - (n + 1) u)`` relatively, in any summation order
(Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1); an elementwise function is
exact up to a few units in the last place. Every operator states that error for inputs in a box
(``Operator.rounding``), and the bound passes carry it as one more small additive box per node,
propagated like a perturbation (CROWN keeps its cancellations). The bound computation's own
rounding is covered by adding its unit roundoff to the model's.

Both ends of the range are covered too. Near zero rounding is absolute: a result in the
subnormal range is off by half the smallest subnormal, or by up to the smallest normal
(``finfo.tiny``) where the CPU flushes denormals (results, or operands: DAZ); every operator adds
``tiny`` per rounding (and per operand that may be flushed). At the top, a value whose bound
reaches ``finfo.max`` (over a safety factor) may be ``inf`` or NaN as the model computes it:
the bound passes flag such examples and their margins come out ``-inf``, never certified.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import ConfigError
from ..model.operators.base import Unit

BOUND_DTYPES = (torch.float64, torch.float32)  # what bounds can be computed in
# a bounded value below the dtype's largest over this factor cannot overflow, its rounding and
# the bound computation's own (relative, far below a factor of 2) included
OVERFLOW_SAFETY = 4.0


def check_bound_dtype(dtype: object) -> None:
    """``dtype`` must be one the bound computation runs in (its rounding is accounted for)."""
    if dtype not in BOUND_DTYPES:
        raise ConfigError(f"dtype must be torch.float64 or torch.float32, got {dtype!r}")


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of ``dtype``."""
    return torch.finfo(dtype).eps / 2


def _new_api() -> bool:
    """Whether this PyTorch has the per-backend ``fp32_precision`` settings (2.9 and later),
    which reflect the legacy ones too; mixing the two raises, so only they are used then."""
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(
        torch.backends.cudnn, "conv"
    )


def _tf32(device: torch.device | None, dtype: torch.dtype) -> tuple[bool, bool]:
    """Whether PyTorch may run float32 matrix products and convolutions in TF32 on
    ``device``: ``(matmul, conv)``."""
    if dtype != torch.float32 or device is None or device.type != "cuda":
        return False, False
    if _new_api():
        top = getattr(torch.backends, "fp32_precision", "none")

        def tf32(value: str, default: str) -> bool:
            chosen = value if value != "none" else top if top != "none" else default
            return chosen != "ieee"  # anything but full float32 counts as TF32

        matmul = tf32(torch.backends.cuda.matmul.fp32_precision, "ieee")
        return matmul, tf32(torch.backends.cudnn.conv.fp32_precision, "tf32")
    matmul = torch.backends.cuda.matmul.allow_tf32 or (
        torch.get_float32_matmul_precision() != "highest"
    )
    return matmul, bool(torch.backends.cudnn.allow_tf32)


def certificate_unit(
    model_dtype: torch.dtype, device: torch.device | None, bound_dtype: torch.dtype
) -> Unit:
    """The unit roundoff the bounds account for: the model's arithmetic (with TF32 products
    where PyTorch may use them on ``device``) plus the bound computation's own, which
    ``exact_products`` keeps out of TF32. Its absolute error near zero is the smallest normal
    of both dtypes, and values from a quarter of the smaller largest finite value on may
    overflow (``Unit``)."""
    matmul, conv = _tf32(device, model_dtype)
    model, bound = torch.finfo(model_dtype), torch.finfo(bound_dtype)
    return Unit(
        unit_roundoff(model_dtype) + unit_roundoff(bound_dtype),
        matmul,
        conv,
        tiny=model.tiny + bound.tiny,
        largest=min(model.max, bound.max) / OVERFLOW_SAFETY,
    )


@contextlib.contextmanager
def exact_products() -> Iterator[None]:
    """Float32 matrix products and convolutions in full float32 (no TF32) for the bound
    computation, whose rounding ``certificate_unit`` covers at float32's unit; the settings
    are restored afterwards."""
    if _new_api():
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        saved = matmul.fp32_precision, conv.fp32_precision
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        torch.set_float32_matmul_precision(precision)
