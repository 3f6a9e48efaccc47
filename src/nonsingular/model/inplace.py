"""In-place operations read with their effect on every name of the tensor they write into.

torch.fx records ``h.relu_()`` as a node nothing reads, while the model's later reads of ``h``
see the written values; dead-code elimination then drops the node (on torch 2.13 it drops
in-place methods, functions, ``inplace=True`` calls and modules alike). And fx records
``h += 1`` as ``h + 1``, hiding the write from every other name of ``h``; ``WriteProxy`` makes
the trace record it (and ``h[i] = v``, which fx cannot trace at all).

``functionalize`` rewrites the traced graph, before dead-code elimination, so that no node
writes into a tensor (design: exact functionalization where memory sharing is provably absent,
refusal elsewhere; verification on a batch cannot guard this, since a batch need not reach the
inputs where the write changes anything):

- a write into a tensor only its own names can see (a result computed in ``forward``, not the
  input, a parameter, buffer or constant, and with no possible view or alias of it read after
  the write) becomes its out-of-place twin (``relu_`` -> ``relu``, ``inplace=True`` ->
  ``inplace=False``, ``+=`` -> ``+``; any other write runs on a copy: ``written_copy``), and
  every later reader of the tensor reads that result: exact;
- any other write raises ``UnsupportedModelError`` naming it and the way out.

Which values may share memory is decided conservatively: only the calls listed as allocating
their result (``FRESH_*``) start a new tensor; any other call (views, ``contiguous``, ``to``,
Identity, eval-mode Dropout, unknown functions and modules) may alias each tensor argument.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .catalog import MODULES
from .functions import ACTIVATIONS, ARITHMETIC, FILLS, METHOD_FILLS, METHODS, REDUCTIONS

Label = Callable[[fx.Node], str]  # a traced node -> how messages name it

# a op= b on tensors writes into a; on numbers it is a op b
AUGMENTED: dict[Any, Any] = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod,
    operator.ipow: operator.pow,
    operator.imatmul: operator.matmul,
    operator.iand: operator.and_,
    operator.ior: operator.or_,
    operator.ixor: operator.xor,
    operator.ilshift: operator.lshift,
    operator.irshift: operator.rshift,
}
SYMBOLS = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/"}
DUNDERS = {f"__{fn.__name__}__": fn for fn in AUGMENTED} | {"__setitem__": operator.setitem}

# in-place functions -> their out-of-place twins (any other in-place function runs on a copy)
FUNCTION_TWINS: dict[Any, Any] = {
    torch.relu_: torch.relu,
    torch.sigmoid_: torch.sigmoid,
    torch.tanh_: torch.tanh,
    torch.clamp_: torch.clamp,
    torch.clamp_min_: torch.clamp_min,
    torch.clamp_max_: torch.clamp_max,
    torch.threshold_: torch.threshold,
    torch.celu_: torch.celu,
    torch.selu_: torch.selu,
    torch.rrelu_: torch.rrelu,
    F.elu_: F.elu,
    F.leaky_relu_: F.leaky_relu,
    F.hardtanh_: F.hardtanh,
}
METHOD_WITHOUT_TWIN = {"bernoulli_"}  # x.bernoulli() is another function than x.bernoulli_(p)

# calls whose result is always a new tensor (anything else may share its arguments' memory)
FRESH_FUNCTIONS = (
    set(ACTIVATIONS)
    | set(ARITHMETIC)
    | REDUCTIONS
    | FILLS
    | {F.linear, F.conv1d, F.conv2d, F.batch_norm, F.layer_norm, torch.matmul, operator.matmul}
    | {F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}
    | {F.max_pool1d, F.max_pool2d, torch.cat, torch.concat, torch.stack, torch.clone}
    | {torch.flip, torch.roll, F.softmax, F.log_softmax, torch.softmax, torch.where}
)
FRESH_METHODS = set(METHODS) | METHOD_FILLS | {"clone", "flip", "roll", "repeat", "matmul"}
ALIASING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)
FRESH_MODULES = {t for t in MODULES if not issubclass(t, ALIASING_MODULES)}
# calls whose result is a number or a shape, never memory shared with a tensor
SHAPE_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "stride", "item", "tolist"}
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}


def _augmented(fn: Any) -> Callable[..., Any]:
    def write(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", fn, (self, other), {})

    return write


class WriteProxy(fx.Proxy):
    """A traced value that records ``a += b`` as ``operator.iadd`` (fx records ``a + b``) and
    ``a[i] = v`` as ``operator.setitem`` (fx cannot trace it), so ``functionalize`` sees them."""

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


for _fn in AUGMENTED:
    setattr(WriteProxy, f"__{_fn.__name__}__", _augmented(_fn))


def written_copy(tensor: Tensor, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Tensor:
    """A copy of ``tensor`` after the in-place ``write(copy, *args, **kwargs)``; ``tensor``
    itself is left as it is (how an in-place call without an out-of-place twin is read)."""
    copy = tensor.clone()
    write(copy, *args, **kwargs)
    return copy


@dataclass
class Write:
    """A node that writes into ``target``: ``rewrite`` turns the node into its out-of-place
    twin (None: there is none to read it by) and ``way_out`` says what to write instead."""

    target: Any
    rewrite: Callable[[fx.Node], None] | None
    way_out: str


def functionalize(gm: fx.GraphModule, label: Label) -> None:
    """Rewrite ``gm.graph`` in place so that no node writes into a tensor, every later reader
    of a written tensor reading the write's result; raise ``UnsupportedModelError`` for a
    write that cannot be read exactly (into the input, a model tensor, a view or an alias)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    memory = _Memory()
    for node in list(gm.graph.nodes):
        _undunder(node)
        write = _write(node, gm)
        if write is None or memory.is_shape(write.target):  # numbers are never written into
            if write is not None and write.rewrite is not None:
                write.rewrite(node)
            memory.add(node, _is_fresh(node, gm))
            continue
        _check_exact(node, write, memory, order, label)
        _read_after(node, memory.same_tensor(write.target), order)
        write.rewrite(node)
        memory.add_write(node, write.target)


def _read_after(node: fx.Node, names: list[fx.Node], order: dict[fx.Node, int]) -> None:
    """Every reader of ``names`` (one tensor) after ``node`` (a write into it) reads ``node``."""
    for name in names:
        name.replace_all_uses_with(node, lambda user: order[user] > order[node])


def _check_exact(
    node: fx.Node, write: Write, memory: _Memory, order: dict[fx.Node, int], label: Label
) -> None:
    what = f"{label(node)} writes in place into"
    why = (
        "nonsingular reads a write in place only into a tensor computed in forward that "
        f"nothing else shares: {write.way_out}"
    )
    if not isinstance(write.target, fx.Node):
        raise UnsupportedModelError(f"{what} a value the reading cannot follow; {why}")
    outside = memory.outside(write.target)
    if outside is write.target:
        raise UnsupportedModelError(f"{what} {label(outside)}; {why}")
    if outside is not None:
        raise UnsupportedModelError(
            f"{what} a tensor that may be a view or alias of {label(outside)}; {why}"
        )
    same = memory.same_tensor(write.target)
    for other in memory.sharing(write.target):
        if other not in same and any(order[user] > order[node] for user in other.users):
            raise UnsupportedModelError(
                f"{what} a tensor that {label(other)} may share (a view or alias), read again "
                f"after the write; {why}"
            )
    if write.rewrite is None:
        raise UnsupportedModelError(f"{what} its out= argument; {why}")


class _Memory:
    """Which traced values may share memory (a conservative partition, built in graph order),
    which are the very same tensor (a write returns the tensor it wrote into), and which hold
    the model's input or tensors (never written into by the reading)."""

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}
        self.identity: dict[fx.Node, fx.Node] = {}
        self.shapes: set[fx.Node] = set()

    def find(self, node: fx.Node) -> fx.Node:
        while self.parent[node] is not node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def is_shape(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and value in self.shapes

    def add(self, node: fx.Node, fresh: bool) -> None:
        tensors = [n for n in node.all_input_nodes if n in self.parent]
        if _is_shape(node, self.shapes):
            self.shapes.add(node)
            return
        self.parent[node] = self.identity[node] = node
        if node.op not in ("placeholder", "get_attr") and not fresh:
            for arg in tensors:  # may return (a view of) any of them
                self.parent[self.find(arg)] = node

    def add_write(self, node: fx.Node, target: fx.Node) -> None:
        self.parent[node] = self.find(target)
        self.identity[node] = self.identity[target]

    def sharing(self, node: fx.Node) -> list[fx.Node]:
        root = self.find(node)
        return [n for n in self.parent if self.find(n) is root]

    def same_tensor(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in self.sharing(node) if self.identity[n] is self.identity[node]]

    def outside(self, node: fx.Node) -> fx.Node | None:
        """The model's input or tensor that ``node`` may share memory with, if any."""
        for n in self.sharing(node):
            if n.op in ("placeholder", "get_attr"):
                return n
        return None


def _is_shape(node: fx.Node, shapes: set[fx.Node]) -> bool:
    if node.op == "call_method" and node.target in SHAPE_METHODS:
        return True
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return node.args[1] in SHAPE_ATTRIBUTES
    if node.target is len:
        return True
    inputs = node.all_input_nodes
    is_operator = getattr(node.target, "__module__", None) in ("_operator", "operator")
    return is_operator and bool(inputs) and all(n in shapes for n in inputs)


def _is_fresh(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in FRESH_METHODS
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) in FRESH_MODULES
    return False


def _undunder(node: fx.Node) -> None:
    """``h.__iadd__(v)`` and ``h.__setitem__(i, v)`` as the operators ``+=`` and ``[i] =``."""
    if node.op == "call_method" and node.target in DUNDERS:
        node.op, node.target = "call_function", DUNDERS[node.target]


def _write(node: fx.Node, gm: fx.GraphModule) -> Write | None:
    """The write ``node`` makes into a tensor, if it makes one."""
    out = node.kwargs.get("out")
    if node.op in ("call_function", "call_method") and out is not None:
        return Write(out, None, "drop out= and use the value the call returns")
    if node.op == "call_function":
        return _function_write(node)
    if node.op == "call_method":
        return _method_write(node)
    if node.op == "call_module":
        return _module_write(node, gm.get_submodule(str(node.target)))
    return None


def _function_write(node: fx.Node) -> Write | None:
    fn = node.target
    if fn in AUGMENTED:
        twin = AUGMENTED[fn]
        way_out = f"write h = h {SYMBOLS.get(twin, twin.__name__)} ... instead of the augmented one"
        return Write(node.args[0], _retarget(twin), way_out)
    if fn is operator.setitem:
        way_out = "build the tensor out of place (torch.cat, torch.where, a mask product)"
        return Write(node.args[0], _on_a_copy, way_out)
    name = getattr(fn, "__name__", "")
    if name.endswith("_") and not name.startswith("_") and node.args:
        twin = FUNCTION_TWINS.get(fn)
        rewrite = _retarget(twin) if twin is not None else _on_a_copy
        return Write(node.args[0], rewrite, f"call the out-of-place {name[:-1]} instead")
    return _option_write(node)


def _option_write(node: fx.Node) -> Write | None:
    """A call with ``inplace=True`` (keyword or positional), unless it is an eval-mode dropout
    (it returns its input unchanged: an alias, not a write)."""
    try:
        signature = inspect.signature(node.target)
        bound = signature.bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature, or not this call's
        return None
    if "inplace" not in signature.parameters or not bound.arguments.get("inplace", False):
        return None
    training = signature.parameters.get("training")
    if training is not None and not bound.arguments.get("training", training.default):
        return None

    def rewrite(n: fx.Node) -> None:
        bound.arguments["inplace"] = False
        n.args, n.kwargs = bound.args, bound.kwargs

    first = next(iter(bound.arguments.values()))
    return Write(first, rewrite, "pass inplace=False")


def _method_write(node: fx.Node) -> Write | None:
    name = str(node.target)
    if not name.endswith("_") or name.startswith("_") or not node.args:
        return None
    twin = name[:-1]
    if name in METHOD_WITHOUT_TWIN or not callable(getattr(Tensor, twin, None)):
        return Write(node.args[0], _on_a_copy, "write the tensor out of place instead")
    return Write(node.args[0], _retarget(twin), f"call the out-of-place h.{twin}(...) instead")


def _module_write(node: fx.Node, module: nn.Module) -> Write | None:
    """A module built with ``inplace=True`` (the catalog reads every module out of place);
    eval-mode dropout returns its input unchanged: an alias, not a write."""
    if getattr(module, "inplace", False) is not True or isinstance(module, ALIASING_MODULES):
        return None
    target = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    way_out = f"construct it as {type(module).__name__}(inplace=False)"
    return Write(target, lambda n: None, way_out)


def _retarget(twin: Any) -> Callable[[fx.Node], None]:
    def rewrite(node: fx.Node) -> None:
        node.target = twin

    return rewrite


def _on_a_copy(node: fx.Node) -> None:
    write = getattr(Tensor, node.target) if node.op == "call_method" else node.target
    node.op, node.target = "call_function", written_copy
    node.args = (node.args[0], write, *node.args[1:])
