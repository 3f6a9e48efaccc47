"""The weight side of the threat, one affine node at a time, and the key lemma.

Lemma: for a dense layer applied to one vector ``h`` and a perturbation with
``|Delta[i,j]| <= R[i,j]``, the reachable changes of the output are exactly the box
``{u : |u_i| <= (R |h|)_i}``, attained by ``Delta = t R sign(h)^T`` (t in [-1, 1]^n_out). For
``||Delta||_F <= rho`` they are the ball ``||u||_2 <= rho ||h||_2``, attained by
``Delta = rho t h^T / ||h||``. So a per-example weight attack on a dense layer optimizes one
``n_out`` vector ``t``, never a weight copy. Where one weight meets several input vectors (a
convolution's positions, a Linear over a sequence) the lemma's box still bounds each output
(``R`` convolved with ``|h|``): sound for interval bounds, while backward bounds take the
term jointly over the positions (``LayerBudget.coupled_support``); attacks hold the weight
itself.
Attacks and certificates both call this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..balls import Ball, make_ball
from ..threat import Threat
from .graph import Graph, Node
from .operators.affine import Affine
from .operators.base import Box, gamma, tiny_of
from .operators.elementwise import Elementwise
from .operators.linear import Identity, LinearMap
from .operators.pooling import MaxPool

# the most elements of ``L C^T`` (``LayerBudget.coupled_support``) held at once: rows of ``lam``
# are taken in chunks below it
JOINT_ELEMENTS = 1 << 24


def radius(threat: Threat, p: Tensor) -> Tensor:
    """The radius of ``threat``'s ball around the parameter ``p``: 0-dim, or elementwise
    (relative linf)."""
    eps = torch.tensor(threat.eps_w, dtype=p.dtype, device=p.device)
    if threat.w_mode == "absolute":
        return eps
    if threat.w_mode == "layer":
        return eps * p.abs().max()
    return eps * (p.abs() if threat.w_norm == "linf" else p.norm())  # relative


@dataclass
class OutputSet:
    """A set holding every change ``Delta_W h + Delta_b`` of one node's output ``(B, *out)``.

    The sum of an elementwise box (``box``, broadcastable to the output) and a Euclidean ball
    over the flattened output (``ball``, shape (B,)). Bounds only need its box radius (IBP)
    and its support function (CROWN: the largest ``lam . delta`` over the set;
    ``certificates.crown_engine.added_support``).
    """

    box: Tensor | None = None
    ball: Tensor | None = None

    def radius(self) -> Tensor:
        """Elementwise radius of a box containing the set."""
        r = 0.0 if self.box is None else self.box
        if self.ball is not None:
            r = r + self.ball.reshape(-1, 1)  # (B, 1): dense outputs only
        return r  # type: ignore[return-value]


@dataclass
class LayerBudget:
    """Which tensors of one affine node are perturbed and how far.

    linf: ``weight_radius`` is an elementwise radius broadcastable to the weight (0-dim when
    uniform); l2: a 0-dim Frobenius radius. Same for ``bias_radius`` (None: bias untouched).
    """

    node: Node
    weight: Tensor
    bias: Tensor | None
    norm: str
    weight_radius: Tensor
    bias_radius: Tensor | None

    @property
    def op(self) -> Affine:
        return self.node.op  # type: ignore[return-value]

    @property
    def index(self) -> int:
        return self.node.index

    @classmethod
    def from_threat(cls, node: Node, graph: Graph, threat: Threat) -> LayerBudget:
        op: Affine = node.op  # type: ignore[assignment]

        weight = graph.tensors[op.weight_name]  # type: ignore[index]
        bias = graph.tensors[op.bias_name] if op.bias_name else None
        bias_radius = radius(threat, bias) if threat.bias and bias is not None else None
        return cls(node, weight, bias, threat.w_norm, radius(threat, weight), bias_radius)

    def _through_layer(self, h_abs: Tensor, radius: Tensor) -> Tensor:
        """``R |h|`` through the layer's linear map (cheap forms for a uniform radius)."""
        if radius.dim() == 0:
            return radius * self.op.ones_through(h_abs, self.weight)
        return self.op.apply(h_abs, radius.expand_as(self.weight))

    def _add_bias(self, r: Tensor) -> Tensor:
        if self.bias_radius is None:
            return r
        b = self.bias_radius
        return r + (self.op.bias_view(b, r.dim()) if b.dim() else b)

    def activation_radius(self, h_abs: Tensor) -> Tensor:
        """Box radius of ``Delta_W h + Delta_b`` over the budget, for every ``|h| <= h_abs``.

        Exact for a dense layer on one vector with linf weights (the lemma); a sound box
        otherwise (positions sharing the weight: each output on its own; l2: Cauchy-Schwarz
        per output). Broadcastable to the node's output.
        """
        if self.norm == "linf":
            r = self._through_layer(h_abs, self.weight_radius)
        else:
            r = self.weight_radius * self.op.ones_through(h_abs.square(), self.weight).sqrt()
        return self._add_bias(r)

    def output_set(self, h_abs: Tensor) -> OutputSet:
        """The set of output changes over the budget, for every input ``|h| <= h_abs``.

        A dense layer on one vector with l2 weights gets the exact ball of the lemma,
        everything else a box.
        """
        if self.norm == "l2" and self.op.one_vector(h_abs):
            ball = self.weight_radius * h_abs.flatten(1).norm(dim=-1)
            if self.bias_radius is not None:
                ball = ball + self.bias_radius
            return OutputSet(ball=ball)
        return OutputSet(box=self.activation_radius(h_abs))

    def linear_in_input(self, h: Tensor) -> bool:
        """Whether a backward bound pass may take this weight term linearly in the input
        (``weight_terms``): linf weights on a dense layer meeting one vector."""
        return self.norm == "linf" and self.op.one_vector(h)

    def shares_weight(self, h: Tensor) -> bool:
        """Whether one weight meets several input vectors per example (a convolution's
        positions, a Linear over a sequence): backward passes then bound its term jointly over
        them (``coupled_support``) rather than output by output."""
        return not self.op.one_vector(h)

    def coupled_support(
        self, lam: Tensor, h: Box, unit: float, magnitude: Tensor | None = None
    ) -> Tensor:
        """An upper bound ``(B, K)`` on the largest ``lam . (Delta_W h + Delta_b)`` over the
        budget and every input in ``h``, one ``Delta_W`` serving every position.

        With ``X`` the input's columns (``Affine.input_columns``) and ``L`` the coefficients'
        (``output_columns``), ``lam . (Delta_W h) = <Delta_W, L X^T>``: its largest value is
        ``R . |L X^T|`` (linf) or ``rho ||L X^T||_F`` (l2). Over the box ``X = C + r U``
        (``|U| <= 1``), ``|L X^T| <= |L C^T| + |L| r^T`` elementwise: exact where the input
        is fixed. The bias term ``<Delta_b, L 1>`` is exact (docs/certificates.md).
        ``magnitude``: ``|lam|``, if known.
        """
        op, weight = self.op, self.weight
        cols = op.output_columns(lam, weight)  # (B, K, g, O, P)
        sizes = op.output_columns(lam.abs() if magnitude is None else magnitude, weight)
        center, radius = _center_radius(h, unit, cols.shape[-1])
        both = op.input_columns(torch.cat([center, radius]), weight)  # one im2col for both
        centers, spread = both[: len(center)], both[len(center) :]  # (B, g, J, P)
        through = None  # linf: R r^T through the layer, (B, g, O or 1, P)
        if self.norm == "linf" and self.weight_radius.dim() == 0:
            through = self.weight_radius * spread.sum(2, keepdim=True)
        elif self.norm == "linf":
            rows = op.weight_rows(self.weight_radius.expand_as(weight))
            through = torch.einsum("goj,bgjp->bgop", rows, spread)
        # rows of lam at a time: G is (B, K, O, J), which may be far larger than lam
        batch, _, groups, outs, _ = cols.shape
        step = max(1, JOINT_ELEMENTS // (batch * groups * outs * both.shape[2]))
        parts = [
            self._joint_rows(
                cols[:, i : i + step], sizes[:, i : i + step], centers, spread, through
            )
            for i in range(0, cols.shape[1], step)
        ]
        return torch.cat(parts, dim=1)

    def _joint_rows(
        self, cols: Tensor, sizes: Tensor, centers: Tensor, spread: Tensor, through: Tensor | None
    ) -> Tensor:
        """``coupled_support`` for coefficient columns ``cols (B, k, g, O, P)``, whose
        magnitudes are ``sizes``."""
        fixed = torch.einsum("bkgop,bgjp->bkgoj", cols, centers)  # L C^T
        if through is not None:  # linf
            r = self.weight_radius
            if r.dim() == 0:
                total = r * fixed.abs().flatten(2).sum(-1)
            else:
                total = (fixed.abs() * self.op.weight_rows(r.expand_as(self.weight))).flatten(2)
                total = total.sum(-1)
            total = total + _through_sum(sizes, through)
        else:
            moved = torch.einsum("bkgop,bgjp->bkgoj", sizes, spread)  # |L| r^T
            total = self.weight_radius * (
                fixed.flatten(2).norm(dim=-1) + moved.flatten(2).norm(dim=-1)
            )
        if self.bias_radius is None:
            return total
        sums = cols.sum(-1).flatten(2)  # (B, k, O): L 1
        if self.norm == "l2":
            return total + self.bias_radius * sums.norm(dim=-1)
        return total + (sums.abs() * self.bias_radius).sum(-1)

    def weight_radius_box(self, h_abs: Tensor) -> Tensor:
        """Box radius of ``Delta_W h`` alone over linf weights, for every ``|h| <= h_abs``."""
        return self._through_layer(h_abs, self.weight_radius)

    def bias_radius_box(self) -> Tensor | float:
        """Box radius of ``Delta_b`` alone, broadcastable to the output (0.0: bias untouched)."""
        if self.bias_radius is None:
            return 0.0
        return self._add_bias(self.bias_radius.new_zeros(()))

    def weight_terms(self, lam: Tensor, line: tuple[Tensor, Tensor], into: Tensor) -> Tensor:
        """A linear lower bound on the weight term of a backward pass, over the input box.

        For ``lam: (B, K, n_out)``, the least ``lam . (Delta_W h)`` over the budget is exactly
        ``-g . |h|`` with ``g = |lam| R`` (the lemma, by coordinate). ``|h|`` is convex, so on
        ``[l, u]`` it lies under its chord ``s h + t`` (exact where ``h`` keeps a sign): the
        term is at least ``-(g s) . h - g . t``, which goes on back through the input instead
        of being priced at ``max|h|``. ``line``: ``(s, t)``, ``chord(h, unit)``. Adds
        ``-(g s)`` to ``into`` (the coefficients on ``h``, ``(B, K, n_in)``) in place and
        returns ``-g . t``, ``(B, K)``.
        """
        slope, offset = line
        radius = self.weight_radius
        if radius.dim() == 0:  # g is the same for every input: (B, K, 1)
            g = radius * torch.linalg.vector_norm(lam, 1, dim=-1, keepdim=True)
            into.addcmul_(g, slope[:, None, :], value=-1)
            return -(g.squeeze(-1) * offset.sum(-1, keepdim=True))
        g = lam.abs() @ radius.expand_as(self.weight)
        into.addcmul_(g, slope[:, None, :], value=-1)
        return -torch.bmm(g, offset[:, :, None]).squeeze(-1)

    def lemma_output(self, h: Tensor, t: Tensor, nonnegative: bool = False) -> Tensor:
        """The dense layer's output at ``h: (B, n_in)`` moved by ``lemma_radius(h) * t``.

        ``nonnegative``: ``h >= 0`` is known (a ReLU output), so ``|h| = h`` is skipped.
        """
        return torch.addcmul(
            self.op.forward(h, self.weight, self.bias), self.lemma_radius(h, nonnegative), t
        )

    def lemma_radius(self, h: Tensor, nonnegative: bool = False) -> Tensor:
        """Radius of the exact output ball of a dense layer at ``h: (B, n_in)``.

        linf: (B, n_out) or (B, 1) box radius; l2: (B, 1) Euclidean radius.
        """
        if self.norm == "linf":
            return self.activation_radius(h if nonnegative else h.abs())
        r = self.weight_radius * h.norm(dim=-1, keepdim=True)
        return r if self.bias_radius is None else r + self.bias_radius

    def materialize_lemma(self, h: Tensor, t: Tensor) -> dict[str, Tensor]:
        """The weight (and bias) perturbation that moves the output by ``lemma_radius(h) * t``.

        ``h: (n_in,)`` is the layer's (perturbed) input for one example, ``t: (n_out,)``.
        """
        if self.norm == "linf":
            delta = t[:, None] * self.weight_radius * h.sign()[None, :]
            delta = delta.expand_as(self.weight).clone()
        else:
            norm = h.norm()
            scale = self.weight_radius / norm if norm > 0 else torch.zeros_like(norm)
            delta = scale * t[:, None] * h[None, :]
        out = {self.op.weight_name: delta}
        if self.bias_radius is not None:
            out[self.op.bias_name] = t * self.bias_radius
        return out  # type: ignore[return-value]

    def parameter_balls(self, batch_dims: int) -> dict[str, Ball]:
        """Balls in parameter space, by parameter name (conv, tied and shared perturbations)."""
        balls = {self.op.weight_name: make_ball(self.norm, self.weight_radius, batch_dims)}
        if self.bias_radius is not None:
            balls[self.op.bias_name] = make_ball(self.norm, self.bias_radius, batch_dims)
        return balls  # type: ignore[return-value]


def _through_sum(sizes: Tensor, through: Tensor) -> Tensor:
    """``(sizes * through).sum`` over everything but ``(B, k)``, for ``sizes (B, k, g, O, P)``
    and ``through (B, g, O or 1, P)``: one batched product, no product tensor the size of
    ``sizes`` in memory."""
    batch, _, groups, outs, positions = sizes.shape
    full = through.expand(batch, groups, outs, positions).reshape(batch, -1, 1)
    return torch.bmm(sizes.reshape(batch, sizes.shape[1], -1), full).squeeze(-1)


def chord(h: Box, unit: float) -> tuple[Tensor, Tensor]:
    """Slope and offset ``(B, n)`` of a line above ``|h|`` on the box: its chord (``|h|`` itself
    where the box keeps a sign), the offset padded by ``unit`` for its own rounding (and its
    absolute part near zero, ``tiny_of``)."""
    lower, upper = h.lower, h.upper
    mixed = (lower < 0) & (upper > 0)
    width = (upper - lower).clamp_min(torch.finfo(lower.dtype).tiny)
    slope = torch.where(lower >= 0, 1.0, -1.0).to(lower.dtype)
    slope = torch.where(mixed, ((upper + lower) / width).clamp(-1.0, 1.0), slope)
    # the line is above |h| at both ends of [l, u], hence on all of it (|h| is convex)
    offset = torch.maximum(lower.abs() - slope * lower, upper.abs() - slope * upper)
    if unit > 0:
        offset = offset + 8 * (unit * torch.maximum(lower.abs(), upper.abs()) + tiny_of(unit))
    return slope, offset.clamp_min(0.0)


def _center_radius(h: Box, unit: float, positions: int) -> tuple[Tensor, Tensor]:
    """Centre ``c`` and radius ``r`` with ``[c - r, c + r]`` holding the box ``h``, the radius
    padded (``unit > 0``) by ``gamma(positions + 4) (|c| + r)`` plus ``tiny`` per term: what
    computing ``c``, ``r`` and a sum of ``positions`` products with ``c`` may round away."""
    center = h.center
    radius = torch.maximum(h.upper - center, center - h.lower).clamp_min(0.0)
    if unit > 0:
        n = positions + 4
        radius = radius + gamma(n, unit) * (center.abs() + radius) + n * tiny_of(unit)
    return center, radius


def perturbed_layers(graph: Graph, threat: Threat) -> list[LayerBudget]:
    """The Linear/Conv layers ``threat`` perturbs, with their budgets, for bounds (empty when
    ``eps_w == 0``); ``weights.choose_weights`` checks the threat against the model.

    Raises ThreatError when the threat names something no weight threat moves, or moves
    nothing; UnsupportedLayerError when it moves parameters bounds cannot follow (a matmul
    operand, attention or recurrent weights, a weight also read elsewhere).
    """
    from .weights import bounded_layers  # weights.py builds on this module

    return bounded_layers(graph, threat)


def tied(budgets: list[LayerBudget]) -> set[str]:
    """Parameter names that more than one perturbed node reads (one tensor, perturbed once)."""
    seen: dict[str, int] = {}
    for b in budgets:
        for name in (b.op.weight_name, b.op.bias_name if b.bias_radius is not None else None):
            if name:
                seen[name] = seen.get(name, 0) + 1
    return {name for name, count in seen.items() if count > 1}


def nonnegative_nodes(graph: Graph, input_nonnegative: bool) -> set[int]:
    """Nodes whose value is known to be >= 0 from the graph alone (ReLU outputs and what only
    moves or pools them, the input when its domain starts at 0)."""
    found = {0} if input_nonnegative else set()
    for node in graph.nodes[1:]:
        op = node.op
        if (
            isinstance(op, Elementwise)
            and op.act.nonnegative
            or (
                isinstance(op, (Identity, MaxPool))
                or (isinstance(op, LinearMap) and op.sign > 0 and not op.offset)
            )
            and (node.box_refs and all(i in found for i in node.box_refs))
        ):
            found.add(node.index)
    return found
