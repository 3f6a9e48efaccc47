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
"""

from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype, device: torch.device | None = None) -> float:
    """Half the machine epsilon of ``dtype``; TF32's for float32 on CUDA when PyTorch may use
    it (``allow_tf32`` or a matmul precision below "highest")."""
    unit = torch.finfo(dtype).eps / 2
    if dtype == torch.float32 and device is not None and device.type == "cuda":
        tf32 = (
            torch.backends.cuda.matmul.allow_tf32
            or torch.backends.cudnn.allow_tf32
            or torch.get_float32_matmul_precision() != "highest"
        )
        if tf32:
            unit = 2.0**-11
    return unit
