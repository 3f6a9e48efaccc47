"""A joint perturbation of one batch: the input delta and the weight variables.

``JointSpace`` knows, for a read model and a threat, which variables exist, which ball each one
lives in, how to run the model under a point of the space, and how to turn a point into the
parameter-space perturbation of one example (materialization). Weights enter in one of three
forms, chosen per affine node:

- the lemma (a ``lemma`` variable, one ``(B, n_out)`` vector): a dense layer on one vector per
  example, per-example scope, its weight read by no other node: as cheap as an input attack;
- per-example parameters (a ``weight`` variable, ``(B, *W.shape)``): convolutions, Linear over
  several positions, and tied weights (one tensor read by several nodes, perturbed once);
- shared parameters (a ``weight`` variable, ``W.shape``): one perturbation for the whole batch;
- any other moved parameter (a matmul/einsum operand, attention and recurrent weights, a
  weight also read elsewhere: ``WeightChoice.operands``) is a ``weight`` variable too, and the
  model then runs once per example with that example's copy (``torch.func.vmap``, RNNs
  unrolled over time; a loop over the examples where vmap fails): one materialized
  perturbation per example, every operation that reads the parameter reading the same copy.

Attacks and adversarial training walk its variables; nothing here branches on the weight mode.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from ..balls import Ball, make_ball
from ..errors import InputError
from ..model.graph import Graph
from ..model.lemma import LayerBudget, nonnegative_nodes, tied
from ..model.operators.recurrent import unrolled_recurrent
from ..model.weights import choose_weights
from ..seeds import generator, mix, per_example
from ..threat import Threat


class Variable(NamedTuple):
    """A variable of the joint space: the input delta (``INPUT``), the lemma vector of a
    dense layer's weight (kind ``lemma``) or a weight in parameter space (kind ``weight``),
    with the parameter's name. Its text (``x``, ``t:NAME``, ``w:NAME``) seeds its random
    draws."""

    kind: str
    name: str = ""

    def __str__(self) -> str:
        return (
            "x"
            if self.kind == "input"
            else f"{self.kind[0] if self.kind == 'weight' else 't'}:{self.name}"
        )


INPUT = Variable("input")
State = dict[Variable, Tensor]


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{j != y} z_j`` per example: positive iff the prediction is ``y``.

    A margin the logits cannot give (NaN: a NaN logit, or ``inf`` against ``inf``) is
    ``-inf``: a point where the model computes no answer is broken, never robust (the clean
    pass itself is checked for NaN first, ``verify.check_clean_logits``)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    margin = true - other
    return margin.masked_fill(margin.isnan(), float("-inf"))


def finite_gradient(g: Tensor | None, like: Tensor) -> Tensor:
    """A variable's gradient for a step: zero where there is none (``g`` None: the output does
    not reach it) or where it is not finite (logits overflowing: it would step out of the
    ball). One summing pass decides; only a gradient whose sum is not finite is copied."""
    if g is None:
        return torch.zeros_like(like)
    return g if bool(torch.isfinite(g.sum())) else g.nan_to_num(0.0, 0.0, 0.0)


def copy_rows(into: Tensor, source: Tensor, mask: Tensor, shared: bool = False) -> None:
    """``into[i] = source[i]`` for every row ``i`` where ``mask``, in place, consecutive rows
    in one copy (``shared``: one flag for the whole tensor)."""
    if shared:
        if bool(mask.all()):
            into.copy_(source)
        return
    start = 0
    for flag, run in itertools.groupby(mask.tolist()):
        end = start + len(list(run))
        if flag:
            into[start:end].copy_(source[start:end])
        start = end


def check_positions(positions: object, batch: int) -> Tensor:
    """Each example's place in its data set (default 0..B-1), checked."""
    if positions is None:
        return torch.arange(batch)
    if not isinstance(positions, Tensor) or positions.dtype not in (torch.int64, torch.int32):
        raise InputError(f"positions must be an integer tensor, got {type(positions).__name__}")
    if positions.shape != (batch,) or (batch and int(positions.min()) < 0):
        raise InputError(
            f"positions must hold {batch} non-negative places, got shape {tuple(positions.shape)}"
        )
    return positions.cpu().long()


def check_domain(x: Tensor, threat: Threat) -> None:
    """Raise when ``x`` lies outside the threat's input bounds, by any amount: attacks and
    certificates cover the input the model really receives, never a clamped copy of it."""
    if threat.bounds is None or x.numel() == 0:
        return
    lo, hi = threat.bounds
    xmin, xmax = float(x.min()), float(x.max())
    if xmin < lo or xmax > hi:
        raise InputError(
            f"x has values in [{xmin:.9g}, {xmax:.9g}], outside the threat's bounds "
            f"({lo:g}, {hi:g}); pass Threat(bounds=...) matching your data, or bounds=None"
        )


class JointSpace:
    """The variables of a joint perturbation of ``graph`` under ``threat`` for batches like
    ``x``. ``shared_weights``: hold every weight variable in parameter space, shared by the
    batch whatever the scope (the noise baseline's draws)."""

    def __init__(
        self, graph: Graph, threat: Threat, x: Tensor, *, shared_weights: bool = False
    ) -> None:
        self.graph = graph
        self.threat = threat
        self.balls: dict[Variable, Ball] = {}
        self.batched: dict[Variable, bool] = {}
        self.lemma: dict[int, tuple[LayerBudget, Variable, bool]] = {}
        self.per_example: dict[int, LayerBudget] = {}
        self.shared: dict[str, Variable] = {}  # parameter name -> variable
        if threat.eps_x > 0:
            self.balls[INPUT] = make_ball(threat.x_norm, threat.eps_x, batch_dims=1)
            self.batched[INPUT] = True
        choice = choose_weights(graph, threat)
        self.untouched = choice.untouched  # parameters the threat leaves as they are, and why
        self.operands: list[str] = []  # per-example parameters the model runs row by row with
        budgets = choice.budgets
        one_weight = shared_weights or threat.scope == "shared"
        for p in choice.operands:
            key = Variable("weight", p.name)
            self.balls[key] = p.ball(batch_dims=0 if one_weight else 1)
            self.batched[key] = not one_weight
            if one_weight:
                self.shared[p.name] = key
            else:
                self.operands.append(p.name)
        if not budgets:
            return
        several = tied(budgets)
        single = _single_vector_nodes(graph, x)
        nonnegative = nonnegative_nodes(graph, threat.bounds is not None and threat.bounds[0] >= 0)
        for budget in budgets:
            node = budget.node
            names = [n for n in (budget.op.weight_name, budget.op.bias_name) if n]
            lemma = node.index in single and not (set(names) & several)
            if not one_weight and lemma:
                key = Variable("lemma", budget.op.weight_name)
                self.balls[key] = make_ball(budget.norm, 1.0, batch_dims=1)
                self.batched[key] = True
                self.lemma[node.index] = (budget, key, node.first in nonnegative)
                continue
            for name, ball in budget.parameter_balls(batch_dims=0 if one_weight else 1).items():
                self.balls[Variable("weight", name)] = ball
                self.batched[Variable("weight", name)] = not one_weight
                if one_weight:
                    self.shared[name] = Variable("weight", name)
            if not one_weight:
                self.per_example[node.index] = budget

    @property
    def is_shared(self) -> bool:
        """True when some variable is shared by the whole batch (one Delta for all)."""
        return not all(self.batched.values())

    def _shapes(self, x: Tensor) -> dict[Variable, tuple[int, ...]]:
        shapes: dict[Variable, tuple[int, ...]] = {}
        batch = x.shape[0]
        for key in self.balls:
            if key == INPUT:
                shapes[key] = tuple(x.shape)
            elif key.kind == "lemma":
                budget = next(b for b, k, _ in self.lemma.values() if k == key)
                shapes[key] = (batch, budget.weight.shape[0])
            else:
                shape = tuple(self.graph.tensors[key.name].shape)
                shapes[key] = (batch, *shape) if self.batched[key] else shape
        return shapes

    def zeros(self, x: Tensor) -> State:
        """The unperturbed point."""
        return {key: x.new_zeros(shape) for key, shape in self._shapes(x).items()}

    def random(self, x: Tensor, seed: int, positions: Tensor | None = None) -> State:
        """A point drawn uniformly from every ball (input then clamped into the domain).

        Each example's part of a per-example variable is drawn from its own generator, seeded
        by ``(seed, variable, its position)`` (``positions``: each example's place in its data
        set, default 0..B-1): an example's start never depends on the batch it is in. Draws
        are made on the CPU, so they are the same on every device.
        """
        where = range(len(x)) if positions is None else positions.tolist()
        state = {}
        for key, shape in self._shapes(x).items():
            ball = self.balls[key]
            if self.batched[key]:
                like = torch.empty((1, *shape[1:]), dtype=x.dtype)

                def draw(g: torch.Generator, b: Ball = ball, e: Tensor = like) -> Tensor:
                    return b.random(e, g)[0]

                value = per_example(draw, mix(seed, str(key)), where)
            else:
                value = ball.random(torch.empty(shape, dtype=x.dtype), generator(seed, str(key)))
            state[key] = value.to(x.device)
        return self.clamp_input(x, state)

    def clamp_input(self, x: Tensor, state: State) -> State:
        """Keep ``x + d`` inside the threat's bounds (shrinks ``d``, so it stays in its ball)."""
        if INPUT in state and self.threat.bounds is not None:
            lo, hi = self.threat.bounds
            state[INPUT] = (x + state[INPUT]).clamp(lo, hi) - x
        return state

    def step(
        self, x: Tensor, state: State, grads: State, alpha: float, *, consume: bool = False
    ) -> State:
        """One projected ascent step of every variable. ``consume``: the gradients are the
        caller's scratch, which the step may compute into (one that shares its memory with
        another variable's is not)."""
        shared = Counter(g.data_ptr() for g in grads.values())
        new = {
            key: self.balls[key].ascend(
                v, grads[key], alpha, consume=consume and shared[grads[key].data_ptr()] == 1
            )
            for key, v in state.items()
        }
        return self.clamp_input(x, new)

    def forward(
        self,
        x: Tensor,
        state: State,
        record: Callable[[int, Tensor], None] | None = None,
        *,
        graph: Graph | None = None,
        training: bool = False,
    ) -> Tensor:
        """Logits at ``x + state[INPUT]`` with the weight perturbation applied.

        graph: another reading of the same model (the live one, when training), whose tensors
        the perturbation is added to. training: BatchNorm's batch statistics and Dropout.
        """
        graph = self.graph if graph is None else graph
        if self.operands and len(x) > 1:
            return self._rows(x, state, record, graph, training)
        overrides = {}
        for k, (budget, key, nonnegative) in self.lemma.items():
            live = _with_tensors(budget, graph, self.threat)
            overrides[k] = lambda h, b=live, t=state[key], n=nonnegative: b.lemma_output(h, t, n)
        for k, budget in self.per_example.items():
            overrides[k] = self._per_example(budget, graph, state)
        tensors = None
        if self.shared or self.operands:
            tensors = dict(graph.tensors)
            for name, key in self.shared.items():
                tensors[name] = tensors[name] + state[key]
            for name in self.operands:  # one example here: its own copy
                tensors[name] = tensors[name] + state[Variable("weight", name)][0]
        x_in = self.inputs(x, state)
        return graph.run(
            x_in, tensors=tensors, overrides=overrides, record=record, training=training
        )

    def _rows(
        self,
        x: Tensor,
        state: State,
        record: Callable[[int, Tensor], None] | None,
        graph: Graph,
        training: bool,
    ) -> Tensor:
        """``forward`` one example at a time, each with its own copy of the moved parameters
        (``operands``): vmapped (attention on its composite path: the fused fast path has no
        derivative under vmap; RNNs unrolled over time: their fused kernels have no batching
        rule), or a loop over the examples where vmap still fails."""
        if record is None and training is False and _vmappable(graph):
            batched = {k: v for k, v in state.items() if self.batched[k]}
            shared = {k: v for k, v in state.items() if not self.batched[k]}

            def one(x_row: Tensor, rows: State) -> Tensor:
                row = {**shared, **{k: v[None] for k, v in rows.items()}}
                return self.forward(x_row[None], row, graph=graph)[0]

            try:
                with _attention_fast_path(False), unrolled_recurrent(), warnings.catch_warnings():
                    # vmap runs an operation without a batching rule as a loop, and says so
                    warnings.filterwarnings("ignore", "There is a performance drop because")
                    return torch.func.vmap(one)(x, batched)
            except (RuntimeError, TypeError, ValueError, NotImplementedError):
                graph.cache["vmappable"] = False  # an operation vmap cannot batch: loop
        rows = []
        for i in range(len(x)):
            index = torch.tensor([i], device=x.device)
            part = self.select(state, index)
            rows.append(self.forward(x[index], part, record, graph=graph, training=training))
        return torch.cat(rows)

    @staticmethod
    def _per_example(budget: LayerBudget, graph: Graph, state: State) -> Callable[[Tensor], Tensor]:
        op = budget.op
        weight = graph.tensors[op.weight_name] + state[Variable("weight", op.weight_name)]  # type: ignore[index,arg-type]
        bias = graph.tensors[op.bias_name] if op.bias_name else None
        if op.bias_name and Variable("weight", op.bias_name) in state:
            bias = bias + state[Variable("weight", op.bias_name)]  # type: ignore[operator]
        return lambda h: op.forward_per_example(h, weight, bias)

    @staticmethod
    def inputs(x: Tensor, state: State) -> Tensor:
        """The perturbed inputs ``x + d`` of a point (``x`` when the input is not perturbed)."""
        return x + state[INPUT] if INPUT in state else x

    def select(self, state: State, index: Tensor) -> State:
        """The rows ``index`` of every per-example variable (shared ones unchanged)."""
        return {key: v[index] if self.batched[key] else v for key, v in state.items()}

    def materialize(self, x_adv: Tensor, state: State) -> dict[str, Tensor]:
        """``{parameter name: Delta}`` for one example: ``x_adv (1, ...)``, ``state`` of that row.

        Lemma variables are turned into weights from the perturbed activations they met, so
        running the unmodified model on ``x_adv`` with these deltas reproduces ``forward``.
        """
        inputs: dict[int, Tensor] = {}
        zero_x = {key: v for key, v in state.items() if key != INPUT}
        deltas: dict[str, Tensor] = {}
        with torch.no_grad():
            self.forward(x_adv, zero_x, record=lambda k, h: inputs.__setitem__(k, h))
            for k, (budget, key, _) in self.lemma.items():
                deltas.update(budget.materialize_lemma(inputs[k][0], state[key][0]))
        for key, v in state.items():
            if key.kind == "weight":
                deltas[key.name] = v[0] if self.batched[key] else v
        return deltas


def _single_vector_nodes(graph: Graph, x: Tensor) -> set[int]:
    """The dense nodes that meet one vector per example for inputs shaped like ``x`` (found
    once per input shape: training builds a space every step)."""
    key = ("single-vector nodes", tuple(x.shape[1:]))
    if key not in graph.cache:
        with torch.no_grad():
            values = graph.values(x[:1])
        graph.cache[key] = {n.index for n in graph.affine_nodes if n.op.one_vector(values[n.first])}
    return graph.cache[key]


def _vmappable(graph: Graph) -> bool:
    """Whether ``graph`` may run under ``torch.func.vmap`` (until a vmapped run fails, then
    never again for this graph: a loop over the examples instead)."""
    return graph.cache.get("vmappable", True)


@contextlib.contextmanager
def _attention_fast_path(enabled: bool) -> Iterator[None]:
    """PyTorch's fused attention fast path on or off inside (restored after, even on errors):
    its kernels have no derivative under vmap; the composite path computes the same function."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _with_tensors(budget: LayerBudget, graph: Graph, threat: Threat) -> LayerBudget:
    """The budget reading ``graph``'s tensors (the live parameters when training, so that a
    relative radius carries their gradient, as a parameter-space perturbation would)."""
    if graph.tensors[budget.op.weight_name] is budget.weight:  # type: ignore[index]
        return budget
    return LayerBudget.from_threat(budget.node, graph, threat)
