"""Which parameters a weight threat moves, how, and which it leaves out (and why).

A weight threat covers every parameter that enters a linear map of the graph: the weight (and,
with ``bias=True``, the bias) of ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` and ``F.linear``/
``F.conv*d``; an operand of ``matmul``/``@``/``mm``/``bmm``/``mv``/``einsum``/``tensordot``;
the projections of ``nn.MultiheadAttention`` and the ``nn.Linear`` layers of Transformer layers;
the input-to-hidden and hidden-to-hidden weights of ``nn.LSTM``/``nn.GRU``/``nn.RNN``; also a
parameter that reaches one of these through computations on parameters alone (``W.t()``,
``W * 2``). Every other parameter (LayerNorm and BatchNorm scales, a parameter only added or
multiplied elementwise, one no forward reads) is out of the threat, listed by name with why.

Moved parameters take one of two forms (``WeightChoice``):

- ``budgets``: Linear/Conv layers whose moved tensors no other operation reads: the lemma's
  fast forms for attacks (``attacks/space.py``) and the weight terms of certificates;
- ``operands``: every other moved parameter, perturbed in parameter space, one materialized
  copy per example (or one for the batch, shared scope), in every operation that reads it;
  attacks only: bounds refuse them (``perturbed_layers``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..balls import Ball, make_ball
from ..errors import ThreatError, UnsupportedLayerError
from ..threat import Threat
from .graph import CONSTANT, VARIABLE, Graph, Node, Param, Ref
from .lemma import LayerBudget, radius
from .operators.affine import Affine
from .operators.call import PARAMETERS, Call, ModuleCall

# functions and tensor methods that are linear in each operand (bilinear in the pair)
LINEAR_CALLS = frozenset(
    {
        torch.matmul,
        operator.matmul,
        torch.mm,
        torch.bmm,
        torch.mv,
        torch.einsum,
        torch.tensordot,
        torch.Tensor.matmul,
        torch.Tensor.mm,
        torch.Tensor.bmm,
        torch.Tensor.mv,
        torch.Tensor.__matmul__,
    }
)
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
WEIGHT, BIAS = "weight", "bias"


def module_role(module: nn.Module, name: str) -> str | None:
    """``weight``, ``bias`` or None (not a linear map's): the role of ``module``'s parameter
    ``name`` (its own dotted name) in what the module computes."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)):
        return WEIGHT if leaf == "weight" else BIAS
    if isinstance(owner, nn.MultiheadAttention):  # bias_k, bias_v are appended keys: not linear
        return WEIGHT if leaf in ATTENTION_WEIGHTS else BIAS if leaf == "in_proj_bias" else None
    if isinstance(owner, nn.RNNBase):  # weight_ih_l0, weight_hh_l0_reverse, weight_hr_l0, bias_*
        return WEIGHT if leaf.startswith("weight_") else BIAS
    return None


def _role(node: Node, operand: Param | Ref) -> str | None:
    """The role of ``operand`` (a parameter or an earlier node) in ``node``, if ``node`` is a
    linear map in it."""
    op = node.op
    if isinstance(op, Affine):
        return BIAS if len(node.args) > 2 and node.args[2] == operand else WEIGHT
    if isinstance(op, Call) and op.fn in LINEAR_CALLS:
        return WEIGHT
    if isinstance(op, ModuleCall) and isinstance(operand, Param):
        own = [k for k, v in node.kwargs.get(PARAMETERS, {}).items() if v == operand]
        roles = {module_role(op.module, k) for k in own}
        return WEIGHT if WEIGHT in roles else BIAS if BIAS in roles else None
    return None


SHAPE_READS = frozenset({"shape", "ndim", "dtype", "device", "layout", "is_cuda"})
SHAPE_METHODS = frozenset({torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel})


def _reads_shape_only(node: Node) -> bool:
    """Whether ``node`` reads only its tensor's shape (``W.shape``, ``W.size(0)``): a value no
    weight perturbation changes."""
    op = node.op
    if not isinstance(op, Call) or not node.args:
        return False
    if op.fn is getattr:
        return len(node.args) == 2 and node.args[1] in SHAPE_READS
    return op.fn in SHAPE_METHODS


def _why_not(node: Node, name: str) -> str:
    op = node.op
    if isinstance(op, ModuleCall):
        own = [k for k, v in node.kwargs.get(PARAMETERS, {}).items() if v == Param(name)]
        if own:
            owner_name, _, leaf = own[0].rpartition(".")
            owner = op.module.get_submodule(owner_name) if owner_name else op.module
            return (
                f"'{leaf}' of a {type(owner).__name__} inside {op.label}, "
                "not a linear map's weight or bias"
            )
    return f"read by {node.label}, which is not a linear map"


@dataclass(frozen=True)
class Coverage:
    """Which parameters of a read model a weight threat can move.

    roles:   every movable parameter -> ``weight`` or ``bias`` (moved with ``bias=True``).
    out:     every other parameter -> why no weight threat moves it.
    generic: the movable parameters read by something else than the weight/bias slot of a
             Linear/Conv layer (moved as materialized copies: ``WeightChoice.operands``).
    """

    roles: dict[str, str]
    out: dict[str, str]
    generic: frozenset[str]


def coverage(graph: Graph) -> Coverage:
    """The coverage of ``graph``'s parameters (found once per graph)."""
    if "weight coverage" not in graph.cache:
        graph.cache["weight coverage"] = _coverage(graph)
    return graph.cache["weight coverage"]


def _coverage(graph: Graph) -> Coverage:
    uses = graph.uses()
    consumers: dict[int, list[Node]] = {}
    for node in graph.nodes:
        for i in set(node.refs):
            consumers.setdefault(i, []).append(node)
    roles: dict[str, str] = {}
    out: dict[str, str] = {}
    generic = set()
    for name in graph.tensors:
        if name not in graph.parameters:
            continue
        found, reason = _follow(name, uses.get(name, []), consumers)
        if found:
            roles[name] = WEIGHT if WEIGHT in found else BIAS
        else:
            out[name] = reason
        direct = all(
            n.kind == VARIABLE
            and isinstance(n.op, Affine)
            and name in (n.op.weight_name, n.op.bias_name)
            or _reads_shape_only(n)
            for n in uses.get(name, [])
        )
        if found and not direct:
            generic.add(name)
    return Coverage(roles, out, frozenset(generic))


def _follow(name: str, readers: list[Node], consumers: dict[int, list[Node]]) -> tuple[set, str]:
    """The roles ``name`` has in the linear maps it reaches (directly or through values
    computed from parameters alone), and why not, when it reaches none."""
    found: set[str] = set()
    reason, first = "never read by the forward", True
    todo: list[tuple[Node, Param | Ref]] = [(n, Param(name)) for n in readers]
    seen: set[int] = set()
    while todo:
        node, operand = todo.pop()
        role = _role(node, operand)
        if role is not None:
            found.add(role)
        elif node.kind == CONSTANT and node.op.model_dtype is not None:
            if node.index not in seen:  # a tensor computed from parameters: follow it
                seen.add(node.index)
                todo += [(c, Ref(node.index)) for c in consumers.get(node.index, [])]
        elif first:
            reason, first = _why_not(node, name), False
    return found, reason


@dataclass
class ParameterBudget:
    """One moved parameter in parameter space: its ball's norm and radius."""

    name: str
    norm: str
    radius: Tensor

    def ball(self, batch_dims: int) -> Ball:
        return make_ball(self.norm, self.radius, batch_dims)


@dataclass
class WeightChoice:
    """What a threat moves in a graph (``weights.py``'s docstring).

    budgets:   Linear/Conv layers whose moved tensors only they read (lemma, bounds).
    operands:  every other moved parameter (attacks only).
    untouched: every parameter the threat leaves as it is -> why (empty when eps_w == 0).
    """

    budgets: list[LayerBudget]
    operands: list[ParameterBudget]
    untouched: dict[str, str]

    @property
    def moved(self) -> list[str]:
        """Every parameter the threat moves, sorted."""
        names = {b.op.weight_name for b in self.budgets}
        names |= {b.op.bias_name for b in self.budgets if b.bias_radius is not None}
        return sorted({n for n in names if n} | {p.name for p in self.operands})


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _selected(graph: Graph, cov: Coverage, threat: Threat) -> set[str]:
    """The movable parameters ``threat.layers`` and ``threat.bias`` choose (names checked even
    with no weight budget: a typo is never ignored)."""
    weights = {n for n, r in cov.roles.items() if r == WEIGHT}
    biases = {n for n, r in cov.roles.items() if r == BIAS} if threat.bias else set()
    if threat.layers is None:
        return weights | biases
    by_name: dict[str, set[str]] = {}
    names = {**{n: n for n in graph.tensors}, **graph.aliases}
    for alias, canonical in names.items():
        if canonical in weights:  # the name itself and every module holding it, at any depth
            parts = alias.split(".")
            for n in [alias] + [".".join(parts[:k]) for k in range(1, len(parts))]:
                by_name.setdefault(n, set()).add(canonical)
    unknown = [n for n in threat.layers if n not in by_name]
    if unknown:
        movable = ", ".join(sorted(weights)) or "none"
        out = [n for n in unknown if names.get(n) in cov.out]
        if out:
            name = out[0]
            raise ThreatError(
                f"threat.layers names '{name}', which no weight threat moves "
                f"({cov.out[names[name]]}); movable weights: {movable}"
            )
        hint = " (biases follow bias=True)" if any(n.endswith(".bias") for n in unknown) else ""
        raise ThreatError(
            f"threat.layers names {', '.join(unknown)}, which is not a weight of this "
            f"model{hint}; weights: {movable}"
        )
    chosen = set().union(*(by_name[n] for n in threat.layers))
    modules = {_module_of(n) for n in chosen}
    return chosen | {n for n in biases if _module_of(n) in modules}


def choose_weights(graph: Graph, threat: Threat) -> WeightChoice:
    """The parameters ``threat`` moves in ``graph``, in their forms, and those it leaves out.

    Raises ThreatError when ``threat.layers`` names something no weight threat moves (listing
    the movable weights), or when ``eps_w > 0`` moves no parameter at all.
    """
    cov = coverage(graph)
    selected = _selected(graph, cov, threat)
    if threat.eps_w == 0:
        return WeightChoice([], [], {})
    budgets = []
    for node in graph.affine_nodes:
        op: Affine = node.op  # type: ignore[assignment]
        if op.weight_name not in selected or op.weight_name in cov.generic:
            continue
        if threat.bias and op.bias_name is not None and op.bias_name in cov.generic:
            continue
        budgets.append(LayerBudget.from_threat(node, graph, threat))
    covered = {b.op.weight_name for b in budgets} | {
        b.op.bias_name for b in budgets if b.bias_radius is not None
    }
    operands = [
        ParameterBudget(name, threat.w_norm, radius(threat, graph.tensors[name]))
        for name in graph.tensors
        if name in selected and name not in covered
    ]
    untouched = {}
    for name in graph.tensors:
        if name in graph.parameters and name not in selected:
            untouched[name] = cov.out.get(name) or (
                "a bias: moved with bias=True"
                if cov.roles[name] == BIAS and not threat.bias
                else "left out by threat.layers"
            )
    if not selected:
        listed = "; ".join(f"{n}: {why}" for n, why in list(untouched.items())[:4])
        more = f" (and {len(untouched) - 4} more)" if len(untouched) > 4 else ""
        raise ThreatError(
            f"eps_w={threat.eps_w:g} moves no parameter of {graph.model_name}, which has no "
            f"weight of a linear map: {listed or 'it has no parameters'}{more}"
        )
    return WeightChoice(budgets, operands, untouched)


def bounded_layers(graph: Graph, threat: Threat) -> list[LayerBudget]:
    """The Linear/Conv layers ``threat`` moves, for bounds; raises UnsupportedLayerError when
    it also moves parameters bounds cannot follow (``WeightChoice.operands``)."""
    choice = choose_weights(graph, threat)
    if choice.operands:
        names = [p.name for p in choice.operands]
        uses = graph.uses()
        where = ", ".join(sorted({n.label for n in uses.get(names[0], [])})) or "the forward"
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise UnsupportedLayerError(
            f"bounds cover weights read only as the weight of a Linear or Conv layer; this threat "
            f"also moves '{names[0]}'{more}, read by {where}: attacks move it, bounds cannot; "
            f"leave it out with Threat(layers=[...]) to bound the rest"
        )
    return choice.budgets


__all__ = [
    "LINEAR_CALLS",
    "Coverage",
    "ParameterBudget",
    "WeightChoice",
    "WeightCoverage",
    "bounded_layers",
    "choose_weights",
    "coverage",
    "module_role",
    "weight_coverage",
]


@dataclass(frozen=True)
class WeightCoverage:
    """What a weight threat does to a model's parameters.

    moved:     the parameters it perturbs (``named_parameters`` names, a tied one once).
    untouched: every other parameter -> why it stays as it is.
    """

    moved: tuple[str, ...]
    untouched: dict[str, str]

    def lines(self, limit: int = 12) -> list[str]:
        """Human lines naming the untouched parameters (at most ``limit`` of them)."""
        if not self.untouched:
            return [f"the weight threat moves every parameter ({len(self.moved)})"]
        out = [
            f"the weight threat moves {len(self.moved)} parameters and leaves "
            f"{len(self.untouched)} as they are:"
        ]
        out += [f"  {name}: {why}" for name, why in list(self.untouched.items())[:limit]]
        if len(self.untouched) > limit:
            out.append(f"  ... and {len(self.untouched) - limit} more (AttackResult.untouched)")
        return out


def weight_coverage(model: nn.Module, x: Tensor, threat: Threat) -> WeightCoverage:
    """Which parameters of ``model`` (read on inputs like ``x``) ``threat`` moves and which it
    leaves as they are, with why. Raises ThreatError as attacks do (``choose_weights``)."""
    from .reader import read_model  # reading builds on this package: imported when asked
    from .verify import check_batch

    graph = read_model(model, x)
    check_batch(graph, model, x)
    choice = choose_weights(graph, threat)
    return WeightCoverage(tuple(choice.moved), choice.untouched)
