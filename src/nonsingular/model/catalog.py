"""Which operator stands for each torch.nn module (``functions.py``: each function and tensor
method).

``module_operator`` turns one traced module call into ``(op, args, kwargs)`` with the
arguments normalized for that operator (the input first, the module's tensors as ``Param``s,
options folded into the operator). A module not listed here runs as it is (``ModuleCall``):
attacks work through it, and certificates stop at it with an error naming it. With
``functions.py`` this is the one list of what is supported; the table in ``docs/models.md``
follows it (a test checks every module here is listed there).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from .graph import Param
from .operators.affine import Affine
from .operators.base import Operator
from .operators.call import PARAMETERS, ModuleCall
from .operators.elementwise import Elementwise
from .operators.linear import Identity, LinearMap
from .operators.normalization import BatchNorm, LayerNorm
from .operators.pooling import MaxPool
from .operators.relaxations import Activation

Built = tuple[Operator, tuple, dict[str, Any]]


# ------------------------------------------------------------------------------- modules
def _param(module: nn.Module, prefix: str, name: str) -> Param | None:
    tensor = getattr(module, name, None)
    if tensor is None:
        return None
    return Param(f"{prefix}{name}")


def conv_layout(
    padding: Any, reversed_pad: Any, mode: str, kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...] | None, str]:
    """``(conv padding, explicit pad or None, pad mode)`` equivalent to a convolution's padding
    option: numbers, ``"valid"``, ``"same"`` (asymmetric for even kernels) or a non-zeros mode."""
    dims = len(kernel)
    if mode != "zeros":
        return (0,) * dims, tuple(reversed_pad), mode
    if padding == "valid":
        return (0,) * dims, None, "constant"
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        left = [t // 2 for t in totals]
        if all(t % 2 == 0 for t in totals):
            return tuple(left), None, "constant"
        pad: list[int] = []
        for t, low in zip(reversed(totals), reversed(left), strict=True):
            pad += [low, t - low]
        return (0,) * dims, tuple(pad), "constant"
    return tuple(padding), None, "constant"


def _conv_module(m: nn.Module, name: str, label: str, x: Any) -> Built:
    kind = "conv1d" if isinstance(m, nn.Conv1d) else "conv2d"
    padding, pad, mode = conv_layout(
        m.padding, m._reversed_padding_repeated_twice, m.padding_mode, m.kernel_size, m.dilation
    )
    conv = {"stride": m.stride, "padding": padding, "dilation": m.dilation, "groups": m.groups}
    prefix = f"{name}." if name else ""
    op = Affine(
        kind,
        label,
        conv,
        pad,
        mode,
        f"{prefix}weight",
        f"{prefix}bias" if m.bias is not None else None,
    )
    return op, (x, Param(f"{prefix}weight"), _param(m, prefix, "bias")), {}


def _linear_module(m: nn.Module, name: str, label: str, x: Any) -> Built:
    prefix = f"{name}." if name else ""
    bias = _param(m, prefix, "bias")
    op = Affine(
        "linear", label, weight_name=f"{prefix}weight", bias_name=bias.name if bias else None
    )
    return op, (x, Param(f"{prefix}weight"), bias), {}


def _batch_norm_module(m: nn.Module, name: str, label: str, x: Any) -> Built:
    if m.running_mean is None or m.running_var is None:
        raise UnsupportedLayerError(
            f"layer '{name}' ({type(m).__name__}) has no running statistics "
            "(track_running_stats=False); its eval-mode function depends on the batch"
        )
    prefix = f"{name}." if name else ""
    args = (
        x,
        Param(f"{prefix}running_mean"),
        Param(f"{prefix}running_var"),
        _param(m, prefix, "weight"),
        _param(m, prefix, "bias"),
        _param(m, prefix, "num_batches_tracked"),
    )
    return BatchNorm(label, m.eps, m.momentum), args, {}


def _layer_norm_module(m: nn.Module, name: str, label: str, x: Any) -> Built:
    prefix = f"{name}." if name else ""
    op = LayerNorm(label, tuple(m.normalized_shape), m.eps)
    return op, (x, _param(m, prefix, "weight"), _param(m, prefix, "bias")), {}


def _activation_module(kind: str, **options: str) -> Callable[..., Built]:
    def build(m: nn.Module, name: str, label: str, x: Any) -> Built:
        values = {key: getattr(m, attr) for key, attr in options.items()}
        return Elementwise(Activation(kind, **values), label), (x,), {}

    return build


def _max_pool_module(m: nn.Module, name: str, label: str, x: Any) -> Built:
    dims = 1 if isinstance(m, nn.MaxPool1d) else 2
    options = {
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "dilation": m.dilation,
        "ceil_mode": m.ceil_mode,
    }
    return MaxPool(label, dims, options), (x,), {}


def _avg_pool_module(m: nn.Module, name: str, label: str, x: Any) -> Built:
    dims = 1 if isinstance(m, nn.AvgPool1d) else 2
    options = {
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "ceil_mode": m.ceil_mode,
        "count_include_pad": m.count_include_pad,
    }
    if dims == 2:
        options["divisor_override"] = m.divisor_override
    return avg_pool(dims, options, label), (x,), {}


def avg_pool(dims: int, options: dict[str, Any], label: str) -> LinearMap:
    """Average pooling: linear with coefficients of the divisor's sign (``divisor_override`` may
    be negative)."""
    fn = F.avg_pool1d if dims == 1 else F.avg_pool2d
    kernel = options["kernel_size"]
    size = math.prod(kernel) if isinstance(kernel, (tuple, list)) else kernel**dims
    divisor = options.get("divisor_override")
    sign = -1 if divisor is not None and divisor < 0 else 1
    return LinearMap(functools.partial(fn, **options), label, sign=sign, terms=size)


def _adaptive_avg_pool_module(m: nn.Module, name: str, label: str, x: Any) -> Built:
    dims = 1 if isinstance(m, nn.AdaptiveAvgPool1d) else 2
    fn = F.adaptive_avg_pool1d if dims == 1 else F.adaptive_avg_pool2d
    return adaptive_pool(fn, m.output_size, label), (x,), {}


def adaptive_pool(fn: Callable[..., Tensor], output_size: Any, label: str) -> LinearMap:
    # each output averages at most ceil(in / out) + 1 inputs per dimension: bounded by the input
    return LinearMap(functools.partial(fn, output_size=output_size), label, terms=-1)


def _flatten_module(m: nn.Module, name: str, label: str, x: Any) -> Built:
    fn = functools.partial(torch.flatten, start_dim=m.start_dim, end_dim=m.end_dim)
    return LinearMap(fn, label, reshape=True), (x,), {}


def _unflatten_module(m: nn.Module, name: str, label: str, x: Any) -> Built:
    fn = functools.partial(torch.unflatten, dim=m.dim, sizes=m.unflattened_size)
    return LinearMap(fn, label, reshape=True), (x,), {}


def _identity_module(m: nn.Module, name: str, label: str, x: Any) -> Built:
    return Identity(label, float(getattr(m, "p", 0.0))), (x,), {}


MODULES: dict[type[nn.Module], Callable[..., Built]] = {
    nn.Linear: _linear_module,
    nn.Conv1d: _conv_module,
    nn.Conv2d: _conv_module,
    nn.BatchNorm1d: _batch_norm_module,
    nn.BatchNorm2d: _batch_norm_module,
    nn.LayerNorm: _layer_norm_module,
    nn.ReLU: _activation_module("relu"),
    nn.LeakyReLU: _activation_module("leaky_relu", alpha="negative_slope"),
    nn.ELU: _activation_module("elu", alpha="alpha"),
    nn.GELU: _activation_module("gelu", approximate="approximate"),
    nn.SiLU: _activation_module("silu"),
    nn.Tanh: _activation_module("tanh"),
    nn.Sigmoid: _activation_module("sigmoid"),
    nn.Softplus: _activation_module("softplus", beta="beta", threshold="threshold"),
    nn.Hardtanh: _activation_module("hardtanh", min_val="min_val", max_val="max_val"),
    nn.ReLU6: _activation_module("relu6"),
    nn.MaxPool1d: _max_pool_module,
    nn.MaxPool2d: _max_pool_module,
    nn.AvgPool1d: _avg_pool_module,
    nn.AvgPool2d: _avg_pool_module,
    nn.AdaptiveAvgPool1d: _adaptive_avg_pool_module,
    nn.AdaptiveAvgPool2d: _adaptive_avg_pool_module,
    nn.Flatten: _flatten_module,
    nn.Unflatten: _unflatten_module,
    nn.Identity: _identity_module,
    nn.Dropout: _identity_module,
    nn.Dropout1d: _identity_module,
    nn.Dropout2d: _identity_module,
}


def module_operator(module: nn.Module, name: str, args: tuple, kwargs: dict[str, Any]) -> Built:
    """The operator for a call of ``module`` (qualified ``name``) on traced ``args``."""
    label = f"{name or 'the model'} ({type(module).__name__})"
    build = MODULES.get(type(module))
    if build is not None and getattr(module, "return_indices", False):
        build = None  # MaxPool returning indices: a tuple, run as it is
    if build is None or len(args) != 1 or kwargs:
        if getattr(module, "inplace", False) is True:  # its write is read by inplace.py
            module = copy.copy(module)  # a shallow copy: the user's module keeps inplace=True
            module.inplace = False
        prefix = f"{name}." if name else ""
        parameters = {
            n: Param(prefix + n) for n, _ in module.named_parameters(remove_duplicate=False)
        }
        return ModuleCall(module, label), args, {**kwargs, PARAMETERS: parameters}
    return build(module, name, label, args[0])
