"""Which operator stands for each torch.nn module, function and tensor method.

``module_operator`` and ``function_operator`` turn one traced call into ``(op, args, kwargs)``
with the arguments normalized for that operator (the tensor first, options folded into the
operator). Anything not listed here runs as it is (``Call``): attacks work through it, and
certificates stop at it with an error naming it. This is the one list of what is supported;
``docs/operations.md`` is written from it.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from .graph import Param, Ref
from .operators.affine import Affine
from .operators.base import Operator
from .operators.call import Call, ModuleCall
from .operators.elementwise import Elementwise
from .operators.linear import Arithmetic, Fill, Identity, LinearMap
from .operators.normalization import BatchNorm, LayerNorm, MaxPool
from .operators.relaxations import Activation

Built = tuple[Operator, tuple, dict[str, Any]]
Lookup = Callable[[Any], Tensor | None]  # a template argument -> its tensor, if it is a Param


# ------------------------------------------------------------------------------- modules
def _param(module: nn.Module, prefix: str, name: str) -> Param | None:
    tensor = getattr(module, name, None)
    if tensor is None:
        return None
    return Param(f"{prefix}{name}")


def _conv_layout(
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
    padding, pad, mode = _conv_layout(
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
    return _avg_pool(dims, options, label), (x,), {}


def _avg_pool(dims: int, options: dict[str, Any], label: str) -> LinearMap:
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
    return _adaptive(fn, m.output_size, label), (x,), {}


def _adaptive(fn: Callable[..., Tensor], output_size: Any, label: str) -> LinearMap:
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
        return ModuleCall(module, label), args, kwargs
    return build(module, name, label, args[0])


# ------------------------------------------------------------------------------- functions
def _bind(
    args: tuple, kwargs: dict[str, Any], names: tuple[str, ...], defaults: dict[str, Any]
) -> dict[str, Any]:
    """Positional and keyword arguments by name (the signature ``names``, with ``defaults``)."""
    bound = dict(defaults)
    bound.update(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


ACTIVATIONS: dict[Any, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    # function -> (kind, its option names after the input, their defaults)
    F.relu: ("relu", ("inplace",), {}),
    torch.relu: ("relu", (), {}),
    F.relu6: ("relu6", ("inplace",), {}),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace"), {"negative_slope": 0.01}),
    F.elu: ("elu", ("alpha", "inplace"), {"alpha": 1.0}),
    F.gelu: ("gelu", (), {"approximate": "none"}),
    F.silu: ("silu", ("inplace",), {}),
    F.softplus: ("softplus", ("beta", "threshold"), {"beta": 1.0, "threshold": 20.0}),
    F.hardtanh: ("hardtanh", ("min_val", "max_val", "inplace"), {"min_val": -1.0, "max_val": 1.0}),
    F.sigmoid: ("sigmoid", (), {}),
    torch.sigmoid: ("sigmoid", (), {}),
    F.tanh: ("tanh", (), {}),
    torch.tanh: ("tanh", (), {}),
}
_OPTION = {
    "negative_slope": "alpha",
    "alpha": "alpha",
    "approximate": "approximate",
    "beta": "beta",
    "threshold": "threshold",
    "min_val": "min_val",
    "max_val": "max_val",
}
METHOD_ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}

ARITHMETIC: dict[Any, str] = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    torch.sub: "sub",
    torch.subtract: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    torch.multiply: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    torch.div: "div",
    torch.true_divide: "div",
    operator.neg: "neg",
    torch.neg: "neg",
    torch.negative: "neg",
}
METHOD_ARITHMETIC = {
    "add": "add",
    "sub": "sub",
    "mul": "mul",
    "div": "div",
    "neg": "neg",
    "true_divide": "div",
    "subtract": "sub",
    "multiply": "mul",
}

# only move, copy or select values: boxes map through, and the adjoint is exact
RESHAPES = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
METHOD_RESHAPES = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "unflatten"}
SELECTIONS = {
    torch.permute,
    torch.transpose,
    torch.t,
    torch.movedim,
    torch.flip,
    torch.roll,
    torch.narrow,
    torch.select,
    torch.cat,
    torch.concat,
    torch.stack,
    torch.clone,
    torch.squeeze,
    operator.getitem,
}
METHOD_SELECTIONS = {
    "permute",
    "transpose",
    "t",
    "movedim",
    "flip",
    "roll",
    "narrow",
    "select",
    "expand",
    "repeat",
    "clone",
    "__getitem__",
}
FILLS = {torch.zeros_like, torch.ones_like, torch.full_like}
METHOD_FILLS = {"new_zeros", "new_ones", "new_full"}


def _method(name: str) -> Callable[..., Any]:
    return getattr(torch.Tensor, name)


def function_operator(
    target: Any, args: tuple, kwargs: dict[str, Any], label: str, lookup: Lookup, method: bool
) -> Built:
    """The operator for a traced call of a function (``method=False``) or a tensor method."""
    if method:
        name = str(target)
        if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
            name = name[:-1]  # in place -> out of place: never write into the caller's tensors
        if name in METHOD_ACTIVATIONS:
            target, method = METHOD_ACTIVATIONS[name], False
        elif name in METHOD_ARITHMETIC:
            target, method = getattr(torch, METHOD_ARITHMETIC[name]), False
        elif name in METHOD_RESHAPES:
            return LinearMap(_method(name), label, reshape=True), args, kwargs
        elif name in METHOD_SELECTIONS:
            return LinearMap(_method(name), label), args, kwargs
        elif name in ("mean", "sum"):
            return _reduction(_method(name), label), args, kwargs
        elif name in METHOD_FILLS:
            return Fill(_method(name), label), args, kwargs
        else:
            return Call(_method(name), label), args, kwargs
    if target in ACTIVATIONS:
        kind, names, defaults = ACTIVATIONS[target]
        options = _bind(args[1:], kwargs, names, defaults)
        options.pop("inplace", None)
        act = Activation(kind, **{_OPTION[k]: v for k, v in options.items()})
        return Elementwise(act, label), (args[0],), {}
    if target in ARITHMETIC:
        kind = ARITHMETIC[target]
        if kind == "div" and kwargs.get("rounding_mode") is not None:
            return Call(target, label), args, kwargs
        alpha = float(kwargs.get("alpha", 1.0))
        return Arithmetic(kind, label, alpha), tuple(args), {}
    if target in (F.linear, F.conv1d, F.conv2d):
        return _functional_affine(target, args, kwargs, label, lookup)
    if target in RESHAPES:
        return LinearMap(target, label, reshape=True), args, kwargs
    if target in SELECTIONS:
        return LinearMap(target, label), args, kwargs
    if target in (torch.mean, torch.sum):
        return _reduction(target, label), args, kwargs
    if target in FILLS:
        return Fill(target, label), args, kwargs
    if target in (F.avg_pool1d, F.avg_pool2d):
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
        if target is F.avg_pool2d:
            names += ("divisor_override",)
        options = _bind(args[1:], kwargs, names, {})
        return _avg_pool(1 if target is F.avg_pool1d else 2, options, label), (args[0],), {}
    if target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
        options = _bind(args[1:], kwargs, ("output_size",), {})
        return _adaptive(target, options["output_size"], label), (args[0],), {}
    if target in (F.max_pool1d, F.max_pool2d):
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        defaults = {
            "stride": None,
            "padding": 0,
            "dilation": 1,
            "ceil_mode": False,
            "return_indices": False,
        }
        options = _bind(args[1:], kwargs, names, defaults)
        if not options.pop("return_indices"):
            dims = 1 if target is F.max_pool1d else 2
            return MaxPool(label, dims, options), (args[0],), {}
    if target is F.pad:
        options = _bind(args[1:], kwargs, ("pad", "mode", "value"), {"mode": "constant"})
        offset = options["mode"] == "constant" and options.get("value") not in (None, 0, 0.0)
        return LinearMap(F.pad, label, offset=offset), (args[0],), options
    if target is F.dropout:
        options = _bind(
            args[1:], kwargs, ("p", "training", "inplace"), {"p": 0.5, "training": True}
        )
        if not options["training"]:
            return Identity(label), (args[0],), {}
    if target is F.layer_norm:
        options = _bind(
            args[1:],
            kwargs,
            ("normalized_shape", "weight", "bias", "eps"),
            {"weight": None, "bias": None, "eps": 1e-5},
        )
        op = LayerNorm(label, tuple(options["normalized_shape"]), float(options["eps"]))
        return op, (args[0], options["weight"], options["bias"]), {}
    if target is F.batch_norm:
        return _functional_batch_norm(args, kwargs, label)
    return Call(target, label), args, kwargs


def _reduction(fn: Callable[..., Tensor], label: str) -> LinearMap:
    return LinearMap(fn, label, terms=-1)


def _functional_affine(
    target: Any, args: tuple, kwargs: dict[str, Any], label: str, lookup: Lookup
) -> Built:
    if target is F.linear:
        bound = _bind(args, kwargs, ("input", "weight", "bias"), {"bias": None})
        kind, conv, pad = "linear", {}, None
    else:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = _bind(
            args,
            kwargs,
            names,
            {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
        )
        kind = "conv1d" if target is F.conv1d else "conv2d"
        weight = lookup(bound["weight"])
        dims = 1 if kind == "conv1d" else 2
        if weight is None and isinstance(bound["padding"], str):
            return Call(target, label), args, kwargs  # "same" needs the kernel's size
        kernel = tuple(weight.shape[2:]) if weight is not None else (1,) * dims

        def tup(v: Any) -> tuple[int, ...]:
            return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * dims

        padding = bound["padding"] if isinstance(bound["padding"], str) else tup(bound["padding"])
        padding, pad, _ = _conv_layout(padding, None, "zeros", kernel, tup(bound["dilation"]))
        conv = {
            "stride": tup(bound["stride"]),
            "padding": padding,
            "dilation": tup(bound["dilation"]),
            "groups": int(bound["groups"]),
        }
    if isinstance(bound["weight"], Ref) or isinstance(bound["bias"], Ref):
        # a weight computed in forward: still affine, but not a parameter a threat can move
        weight_name = bias_name = None
    else:
        weight_name = bound["weight"].name
        bias_name = bound["bias"].name if isinstance(bound["bias"], Param) else None
    op = Affine(kind, label, conv, pad, "constant", weight_name, bias_name)
    return op, (bound["input"], bound["weight"], bound["bias"]), {}


def _functional_batch_norm(args: tuple, kwargs: dict[str, Any], label: str) -> Built:
    names = (
        "input",
        "running_mean",
        "running_var",
        "weight",
        "bias",
        "training",
        "momentum",
        "eps",
    )
    bound = _bind(
        args,
        kwargs,
        names,
        {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
    )
    if bound["training"] or bound["running_mean"] is None or bound["running_var"] is None:
        return Call(F.batch_norm, label), args, kwargs
    op = BatchNorm(label, float(bound["eps"]), bound["momentum"])
    template = (
        bound["input"],
        bound["running_mean"],
        bound["running_var"],
        bound["weight"],
        bound["bias"],
        None,
    )
    return op, template, {}
