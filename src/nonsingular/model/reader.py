"""Reading a model as it runs: torch.fx symbolic tracing of its real ``forward``, each traced
call mapped to an operator (``catalog.py``), then the reading checked against ``model(x)``.

Why torch.fx and not torch.export: symbolic tracing keeps calls at the level users write them
(``nn.Conv2d``, ``F.gelu``, ``x.view``), with the model's own parameter names, in milliseconds
and without compiling; torch.export lowers to ATen operators (hundreds of them), lifts
parameters to inputs and takes seconds per model. Its limits (no data-dependent control flow)
are reported as a clear error, and everything we read is verified against ``model(x)`` before
it is used.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules import module as module_globals

from ..errors import InputError, NonsingularError, UnsupportedModelError
from .catalog import MODULES, module_operator
from .functions import function_operator, method_operator
from .graph import CONSTANT, INPUT, SHAPE, VARIABLE, Graph, Node, Param, Ref
from .inplace import WriteProxy, functionalize, written_copy
from .operators.affine import Affine
from .operators.call import ModuleCall

PREFIX = "model."


class _Root(nn.Module):
    """Traced instead of the user's model, so that torch.fx never writes onto it (it stores
    traced tensor constants as attributes of the root)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        return self.model(x)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in MODULES or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return WriteProxy(node, self)  # records `h += v` and `h[i] = v` as the writes they are


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run code that calls or traces ``model`` and leave it as it was: every module's mode and
    attributes (a forward that stores features on ``self`` stores nothing), the RNG state."""
    saved = []
    for m in model.modules():
        registries = {k: dict(m.__dict__[k]) for k in ("_parameters", "_buffers", "_modules")}
        saved.append((m, m.training, dict(m.__dict__), registries))
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for m, training, attributes, registries in saved:
            m.__dict__.clear()
            m.__dict__.update(attributes)
            for key, registry in registries.items():
                m.__dict__[key].clear()
                m.__dict__[key].update(registry)
            m.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside, its own modes restored after (even on errors)."""
    with preserved(model):
        model.eval()
        yield


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    hooks = [
        ("torch.nn (every module)", "global forward hook", module_globals._global_forward_hooks),
        (
            "torch.nn (every module)",
            "global forward pre-hook",
            module_globals._global_forward_pre_hooks,
        ),
    ]
    for name, m in model.named_modules():
        where = f"module '{name}'" if name else "the model"
        hooks.append((where, "forward hook", m._forward_hooks))
        hooks.append((where, "forward pre-hook", m._forward_pre_hooks))
        if torch.nn.utils.parametrize.is_parametrized(m):
            raise UnsupportedModelError(
                f"module '{name or 'the model'}' ({type(m).__name__}) has parametrizations "
                f"({', '.join(m.parametrizations)}): its weights are computed, not parameters a "
                "threat can perturb; remove them first with torch.nn.utils.parametrize."
                "remove_parametrizations(module, name, leave_parametrized=True)"
            )
    for where, kind, registry in hooks:
        for hook in registry.values():
            what = type(hook).__name__
            if what in ("WeightNorm", "SpectralNorm"):
                raise UnsupportedModelError(
                    f"{where} uses old-style torch.nn.utils.{what.lower()[:-4]}_norm "
                    "(a forward pre-hook that recomputes the weight): remove it with "
                    f"torch.nn.utils.remove_{what.lower()[:-4]}_norm, or use "
                    "torch.nn.utils.parametrizations and remove the parametrization"
                )
            raise UnsupportedModelError(
                f"{where} has a {kind} ({getattr(hook, '__name__', what)}): nonsingular reads "
                "the model's forward without hooks, so its results could differ from "
                "model(x); remove the hook (handle.remove()) before attacking or certifying"
            )


def _trace(model: nn.Module) -> fx.GraphModule:
    root = _Root(model)
    signature = inspect.signature(model.forward)
    params = [
        p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    required = [p for p in params if p.default is p.empty]
    if len(required) != 1:
        raise UnsupportedModelError(
            f"{type(model).__name__}.forward must take exactly one required input (the batch), "
            f"it takes {len(required)}: {', '.join(p.name for p in required) or 'none'}"
        )
    try:
        with eval_mode(model):
            graph = _Tracer().trace(root)
    except NonsingularError:  # said already (a logits= selector that picks nothing)
        raise
    except Exception as exc:  # tracing runs user code: any failure means "cannot read"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(
            f"the forward of {type(model).__name__} cannot be traced by torch.fx: {first}. "
            "nonsingular reads models whose forward has no control flow on tensor values "
            "(if/while on data) and calls no untraceable code"
        ) from None
    return fx.GraphModule(root, graph)


def _tensor_names(
    model: nn.Module, detach: bool
) -> tuple[dict[str, Tensor], set[str], dict[str, str]]:
    """Tensors by canonical name (first registered name), parameter names, and aliases."""
    tensors: dict[str, Tensor] = {}
    parameters: set[str] = set()
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    named = [(n, t, True) for n, t in model.named_parameters(remove_duplicate=False)]
    named += [(n, t, False) for n, t in model.named_buffers(remove_duplicate=False)]
    for name, tensor, is_param in named:
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
            continue
        seen[id(tensor)] = name
        tensors[name] = tensor.detach() if detach else tensor
        if is_param:
            parameters.add(name)
    return tensors, parameters, aliases


def _label(node: fx.Node, model_name: str) -> str:
    where = f"'{node.name}' in {model_name}.forward"
    if node.op == "placeholder":
        return f"the input of {model_name}.forward"
    if node.op == "get_attr":
        return f"the model's tensor '{str(node.target).removeprefix(PREFIX)}'"
    if node.op == "call_module":
        module = type(node.graph.owning_module.get_submodule(str(node.target))).__name__
        return f"{str(node.target).removeprefix(PREFIX)} ({module}) in {model_name}.forward"
    if node.op == "call_method":
        return f"Tensor.{node.target} at {where}"
    target = node.target
    if target is written_copy:  # an in-place call without an out-of-place twin, on a copy
        write = node.args[1]
        return f"{getattr(write, '__name__', write)} on a copy at {where}"
    module = getattr(target, "__module__", None) or "builtins"
    module = {
        "_operator": "operator",
        "torch._C._nn": "torch.nn.functional",
        "torch._C._VariableFunctions": "torch",
    }.get(module, module)
    name = getattr(target, "__name__", str(target))
    return f"{module}.{name} at {where}"


def read_model(model: nn.Module, x: Tensor, *, detach: bool = True) -> Graph:
    """The graph of ``model`` as it runs, run once on the first example of ``x`` to tell the
    values that depend on the input from the rest (``verify.check_batch`` then compares it
    with ``model(x)``).

    detach: hold detached tensors (attacks, certificates) or the live parameters (training,
    whose losses must reach them). The model is left exactly as it was.
    """
    _check_model(model)
    tensors, parameters, aliases = _tensor_names(model, detach)
    traced = _trace(model)
    # before dead-code elimination, which drops in-place writes (nothing reads their results)
    functionalize(traced, lambda node: _label(node, type(model).__name__))
    traced.graph.eliminate_dead_code()  # values the output never reads are not the model's
    converter = _Converter(traced, type(model).__name__, tensors, aliases)
    for fx_node in traced.graph.nodes:
        converter.add(fx_node)
    if converter.output is None:
        raise UnsupportedModelError(f"{type(model).__name__}.forward returns no computed value")
    graph = Graph(
        converter.nodes,
        converter.output,
        tensors,
        frozenset(parameters),
        aliases,
        type(model).__name__,
    )
    _classify(graph, x)
    return graph


class _Converter:
    """Turns traced fx nodes, in order, into graph nodes with operators (``catalog.py``,
    ``functions.py``), their arguments as templates of Refs (earlier nodes) and Params (the
    model's tensors, by canonical name)."""

    def __init__(
        self,
        traced: fx.GraphModule,
        model_name: str,
        tensors: dict[str, Tensor],
        aliases: dict[str, str],
    ) -> None:
        self.traced = traced
        self.model_name = model_name
        self.tensors = tensors
        self.aliases = aliases
        self.nodes: list[Node] = []
        self.index: dict[fx.Node, int] = {}
        self.params: dict[fx.Node, Param] = {}
        self.output: int | None = None
        self.taken = {n.name for n in traced.graph.nodes}

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def template(self, value: Any) -> Any:
        return fx.node.map_arg(
            value, lambda n: self.params[n] if n in self.params else Ref(self.index[n])
        )

    def name(self, fx_node: fx.Node) -> str:
        # call_module nodes are named after the wrapper's path: drop its prefix when unambiguous
        short = fx_node.name.removeprefix("model_")
        return short if short == fx_node.name or short not in self.taken else fx_node.name

    def add(self, fx_node: fx.Node) -> None:
        if fx_node.op == "placeholder":
            self.index[fx_node] = 0
            self.nodes.append(Node(0, fx_node.name, "the input", INPUT, None))
        elif fx_node.op == "get_attr":
            self.params[fx_node] = _get_attr(
                self.traced, fx_node.target, self.tensors, self.canonical
            )
        elif fx_node.op == "output":
            result = fx_node.args[0]
            if not isinstance(result, fx.Node) or result not in self.index:
                raise UnsupportedModelError(
                    f"{self.model_name}.forward must return one tensor of logits, it "
                    f"returns {type(result).__name__}: pass logits= (a dict key, a tuple "
                    "index, or a function of the output) to pick them"
                )
            self.output = self.index[result]
        else:
            self.call(fx_node)

    def call(self, fx_node: fx.Node) -> None:
        args, kwargs = self.template(fx_node.args), self.template(fx_node.kwargs)
        if fx_node.op == "call_module":
            name = str(fx_node.target)[len(PREFIX) :]
            module = self.traced.get_submodule(str(fx_node.target))
            op, args, kwargs = module_operator(module, name, args, kwargs)
            if isinstance(op, ModuleCall):
                _check_module_call(module, name)
        else:
            build = method_operator if fx_node.op == "call_method" else function_operator
            label = _label(fx_node, self.model_name)
            op, args, kwargs = build(fx_node.target, args, kwargs, label, self.lookup)
        args, kwargs = _canonical((args, kwargs), self.canonical)
        if isinstance(op, Affine):
            op.weight_name = self.canonical(op.weight_name) if op.weight_name else None
            op.bias_name = self.canonical(op.bias_name) if op.bias_name else None
        index = len(self.nodes)
        self.index[fx_node] = index
        self.nodes.append(Node(index, self.name(fx_node), op.label, VARIABLE, op, args, kwargs))

    def lookup(self, template: Any) -> Tensor | None:
        """The tensor a template argument names, if it is a Param."""
        return self.tensors.get(template.name) if isinstance(template, Param) else None


def _get_attr(
    traced: fx.GraphModule, target: str, tensors: dict[str, Tensor], canonical: Any
) -> Param:
    if target.startswith(PREFIX):
        name = canonical(target[len(PREFIX) :])
        if name in tensors:
            return Param(name)
    value = traced
    for part in target.split("."):
        value = getattr(value, part)
    if not isinstance(value, Tensor):
        raise UnsupportedModelError(
            f"the forward reads attribute '{target}', which is not a tensor"
        )
    name = f"_constant.{target}"
    tensors[name] = value.detach()
    return Param(name)


def _canonical(template: Any, canonical: Any) -> Any:
    # Not fx's map_aggregate: it returns immutable_list/immutable_dict and a plain tuple for
    # torch.Size where this keeps the container's type (dicts become dict), and it walks into
    # slices, which this leaves as they are.
    if isinstance(template, Param):
        return Param(canonical(template.name))
    if isinstance(template, (tuple, list)):
        return type(template)(_canonical(v, canonical) for v in template)
    if isinstance(template, dict):
        return {k: _canonical(v, canonical) for k, v in template.items()}
    return template


def _check_module_call(module: nn.Module, name: str) -> None:
    training = [n or name for n, m in module.named_modules() if m.training]
    if training:
        raise UnsupportedModelError(
            f"module '{name}' ({type(module).__name__}) is run as it is (nonsingular has no "
            "operator for it) and is in training mode, where it may not compute its deployed "
            "function: call model.eval() first"
        )


def _classify(graph: Graph, x: Tensor) -> None:
    """Mark each node variable, constant or shape from what it depends on and what it returns,
    and record the dtype of each tensor it returns (one run on the first example of ``x``)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1 or len(x) == 0:
        raise InputError(
            f"x must be a non-empty floating-point tensor with a batch dimension, got "
            f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}".rstrip()
        )
    try:
        with torch.no_grad():
            values = graph.values(x[:1])
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"x of shape {tuple(x.shape)} does not fit the model: {first}") from None
    depends = [False] * len(graph.nodes)
    depends[0] = True
    for node in graph.nodes[1:]:
        depends[node.index] = any(depends[i] for i in node.refs)
        if not depends[node.index]:
            node.kind = CONSTANT
        elif _holds_tensor(values[node.index]):  # a tuple of tensors (an RNN's, attention's)
            node.kind = VARIABLE  # is bounded as a value, never fixed at the centre like a size
        else:
            node.kind = SHAPE
        if isinstance(values[node.index], Tensor):  # the dtype torch computes it in
            node.op.model_dtype = values[node.index].dtype
    for node in graph.nodes:
        node.box_refs = tuple(i for i in node.refs if graph.nodes[i].kind in (INPUT, VARIABLE))
    out = values[graph.output]
    if graph.nodes[graph.output].kind != VARIABLE or not isinstance(out, Tensor):
        raise UnsupportedModelError(
            f"{graph.model_name}.forward must return a tensor of logits computed from its input"
        )


def _holds_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor or a tuple, list or dict holding one."""
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False
