"""Which operator stands for each traced function and tensor method (``catalog.py``: modules).

``function_operator`` turns one traced call into ``(op, args, kwargs)``. Tensor methods are
first mapped to their functions (``x.relu()`` is ``torch.relu(x)``); then the function is
looked up in ``FUNCTIONS``. Anything else runs as it is (``Call``). In-place calls never reach
here: ``inplace.py`` rewrites them first, with their effect on every name of the tensor.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .catalog import Built, adaptive_pool, avg_pool, conv_layout
from .graph import Param, Ref
from .operators.affine import Affine
from .operators.call import Call
from .operators.elementwise import Elementwise
from .operators.linear import Arithmetic, Fill, Identity, LinearMap
from .operators.normalization import BatchNorm, LayerNorm
from .operators.pooling import MaxPool
from .operators.relaxations import Activation

Lookup = Callable[[Any], Tensor | None]  # a template argument -> its tensor, if it is a Param
Builder = Callable[[Any, tuple, dict[str, Any], str, Lookup], Built]


def bind(
    args: tuple, kwargs: dict[str, Any], names: tuple[str, ...], defaults: dict[str, Any]
) -> dict[str, Any]:
    """Positional and keyword arguments by name (the signature ``names``, with ``defaults``)."""
    bound = dict(defaults)
    bound.update(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


# ------------------------------------------------------------------------------ activations
# function -> (kind, its option names after the input, their defaults)
ACTIVATIONS: dict[Any, tuple[str, tuple[str, ...], dict[str, Any]]] = {
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
_OPTION = {"negative_slope": "alpha"}  # PyTorch's option name -> Activation's field


def _activation(target: Any, args: tuple, kwargs: dict[str, Any], label: str, _: Lookup) -> Built:
    kind, names, defaults = ACTIVATIONS[target]
    options = bind(args[1:], kwargs, names, defaults)
    options.pop("inplace", None)
    act = Activation(kind, **{_OPTION.get(k, k): v for k, v in options.items()})
    return Elementwise(act, label), (args[0],), {}


# ------------------------------------------------------------------------------ arithmetic
ARITHMETIC: dict[Any, str] = {
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    torch.subtract: "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    torch.multiply: "mul",
    operator.truediv: "div",
    torch.div: "div",
    torch.true_divide: "div",
    operator.neg: "neg",
    torch.neg: "neg",
    torch.negative: "neg",
}


def _arithmetic(target: Any, args: tuple, kwargs: dict[str, Any], label: str, _: Lookup) -> Built:
    if kwargs.get("rounding_mode") is not None:  # floor or trunc division: not linear
        return Call(target, label), args, kwargs
    return Arithmetic(ARITHMETIC[target], label, float(kwargs.get("alpha", 1.0))), tuple(args), {}


# --------------------------------------------------------------- reshapes, selections, pooling
# only move, copy or select values: boxes map through them, and their adjoint is exact
RESHAPES = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
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
    operator.getitem,
}
REDUCTIONS = {torch.mean, torch.sum}
FILLS = {torch.zeros_like, torch.ones_like, torch.full_like}


def _linear_map(target: Any, args: tuple, kwargs: dict[str, Any], label: str, _: Lookup) -> Built:
    if target in FILLS:
        return Fill(target, label), args, kwargs
    terms = -1 if target in REDUCTIONS else 1  # a reduction sums values: rounding from shapes
    return LinearMap(target, label, reshape=target in RESHAPES, terms=terms), args, kwargs


def _avg_pool(target: Any, args: tuple, kwargs: dict[str, Any], label: str, _: Lookup) -> Built:
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
    if target is F.avg_pool2d:
        names += ("divisor_override",)
    options = bind(args[1:], kwargs, names, {})
    return avg_pool(1 if target is F.avg_pool1d else 2, options, label), (args[0],), {}


def _adaptive_pool(
    target: Any, args: tuple, kwargs: dict[str, Any], label: str, _: Lookup
) -> Built:
    options = bind(args[1:], kwargs, ("output_size",), {})
    return adaptive_pool(target, options["output_size"], label), (args[0],), {}


def _max_pool(target: Any, args: tuple, kwargs: dict[str, Any], label: str, _: Lookup) -> Built:
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    defaults = {
        "stride": None,
        "padding": 0,
        "dilation": 1,
        "ceil_mode": False,
        "return_indices": False,
    }
    options = bind(args[1:], kwargs, names, defaults)
    if options.pop("return_indices"):
        return Call(target, label), args, kwargs  # a tuple: run as it is
    return MaxPool(label, 1 if target is F.max_pool1d else 2, options), (args[0],), {}


def _pad(target: Any, args: tuple, kwargs: dict[str, Any], label: str, _: Lookup) -> Built:
    options = bind(args[1:], kwargs, ("pad", "mode", "value"), {"mode": "constant"})
    offset = options["mode"] == "constant" and options.get("value") not in (None, 0, 0.0)
    return LinearMap(F.pad, label, offset=offset), (args[0],), options


def _dropout(target: Any, args: tuple, kwargs: dict[str, Any], label: str, _: Lookup) -> Built:
    options = bind(args[1:], kwargs, ("p", "training", "inplace"), {"p": 0.5, "training": True})
    if options["training"]:
        return Call(target, label), args, kwargs  # random: verification will refuse it
    return Identity(label), (args[0],), {}


# ------------------------------------------------------------------------ affine, norms
def _affine(target: Any, args: tuple, kwargs: dict[str, Any], label: str, lookup: Lookup) -> Built:
    if target is F.linear:
        bound = bind(args, kwargs, ("input", "weight", "bias"), {"bias": None})
        kind, conv, pad = "linear", {}, None
    else:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        bound = bind(args, kwargs, names, defaults)
        kind = "conv1d" if target is F.conv1d else "conv2d"
        dims = 1 if kind == "conv1d" else 2
        weight = lookup(bound["weight"])
        if weight is None and isinstance(bound["padding"], str):
            return Call(target, label), args, kwargs  # "same" needs the kernel's size

        def tup(v: Any) -> tuple[int, ...]:
            return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * dims

        kernel = tuple(weight.shape[2:]) if weight is not None else (1,) * dims
        padding = bound["padding"] if isinstance(bound["padding"], str) else tup(bound["padding"])
        padding, pad, _ = conv_layout(padding, None, "zeros", kernel, tup(bound["dilation"]))
        conv = {
            "stride": tup(bound["stride"]),
            "padding": padding,
            "dilation": tup(bound["dilation"]),
            "groups": int(bound["groups"]),
        }
    if isinstance(bound["weight"], Ref) or isinstance(bound["bias"], Ref):
        weight_name = bias_name = None  # computed in forward: affine, but no parameter to move
    else:
        weight_name = bound["weight"].name
        bias_name = bound["bias"].name if isinstance(bound["bias"], Param) else None
    op = Affine(kind, label, conv, pad, "constant", weight_name, bias_name)
    return op, (bound["input"], bound["weight"], bound["bias"]), {}


def _layer_norm(target: Any, args: tuple, kwargs: dict[str, Any], label: str, _: Lookup) -> Built:
    options = bind(
        args[1:],
        kwargs,
        ("normalized_shape", "weight", "bias", "eps"),
        {"weight": None, "bias": None, "eps": 1e-5},
    )
    op = LayerNorm(label, tuple(options["normalized_shape"]), float(options["eps"]))
    return op, (args[0], options["weight"], options["bias"]), {}


def _batch_norm(target: Any, args: tuple, kwargs: dict[str, Any], label: str, _: Lookup) -> Built:
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
    bound = bind(
        args,
        kwargs,
        names,
        {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
    )
    if bound["training"] or bound["running_mean"] is None or bound["running_var"] is None:
        return Call(target, label), args, kwargs  # batch statistics: depends on the batch
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


FUNCTIONS: dict[Any, Builder] = {
    **dict.fromkeys(ACTIVATIONS, _activation),
    **dict.fromkeys(ARITHMETIC, _arithmetic),
    **dict.fromkeys(RESHAPES | SELECTIONS | REDUCTIONS | FILLS, _linear_map),
    **dict.fromkeys((F.avg_pool1d, F.avg_pool2d), _avg_pool),
    **dict.fromkeys((F.adaptive_avg_pool1d, F.adaptive_avg_pool2d), _adaptive_pool),
    **dict.fromkeys((F.max_pool1d, F.max_pool2d), _max_pool),
    **dict.fromkeys((F.linear, F.conv1d, F.conv2d), _affine),
    F.pad: _pad,
    F.dropout: _dropout,
    F.layer_norm: _layer_norm,
    F.batch_norm: _batch_norm,
}

# tensor methods that are these functions (``x.view`` has no torch.* twin: its own entry)
METHODS: dict[str, Any] = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "add": torch.add,
    "sub": torch.sub,
    "subtract": torch.sub,
    "mul": torch.mul,
    "multiply": torch.mul,
    "div": torch.div,
    "true_divide": torch.div,
    "neg": torch.neg,
    "mean": torch.mean,
    "sum": torch.sum,
}
METHOD_RESHAPES = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "unflatten"}
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
METHOD_FILLS = {"new_zeros", "new_ones", "new_full"}


def method_operator(
    name: str, args: tuple, kwargs: dict[str, Any], label: str, lookup: Lookup
) -> Built:
    """The operator for a traced tensor method call ``args[0].name(*args[1:])``."""
    if name in METHODS:
        return function_operator(METHODS[name], args, kwargs, label, lookup)
    fn = getattr(torch.Tensor, name)
    if name in METHOD_RESHAPES or name in METHOD_SELECTIONS:
        return LinearMap(fn, label, reshape=name in METHOD_RESHAPES), args, kwargs
    if name in METHOD_FILLS:
        return Fill(fn, label), args, kwargs
    return Call(fn, label), args, kwargs


def function_operator(
    target: Any, args: tuple, kwargs: dict[str, Any], label: str, lookup: Lookup
) -> Built:
    """The operator for a traced call of the function ``target``."""
    builder = FUNCTIONS.get(target)
    if builder is None:
        return Call(target, label), args, kwargs
    return builder(target, args, kwargs, label, lookup)
