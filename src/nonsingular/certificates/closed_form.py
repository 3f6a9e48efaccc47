"""B0 and B1: norm-recursion bounds for MLPs (dense layers with ReLU or identity between).

Both bound ``e_l >= ||h'_l - h_l||_inf``, the change of layer l's output under the joint
threat, and the margin change ``|Delta m_j| <= ||w_y - w_j||_1 e_{L-1} + r_y + r_j`` where
``r`` is the last layer's output-change radius (the lemma). B0 (the paper's style) uses only
layer norms and ``||x||_inf``: loose, but differentiable in the weights, so it is the paper's
regularizer. B1 follows the example's own activations.

B0: ``P_0 = ||x||_inf``, ``P_l = a_l P_{l-1} + ||b_l||_inf`` with ``a_l = ||W_l||_inf``
bounds the clean activations; ``e_0 = eps_x``, ``e_l = a_l e_{l-1} + max_i r_l(P'_{l-1} 1)_i``
with ``P' = P + e`` bounds the perturbed ones and the change (ReLU is 1-Lipschitz).
B1: ``e_0 = eps_x``, ``u_0 = max |x'|``; ``e_l = a_l e_{l-1} + max_i r_l(u_{l-1})_i``,
``u_l = |h_l| + e_l`` with ``h_l`` the example's clean activation.
B1 >= B0 (as lower bounds): ``u_l <= P'_l`` elementwise, and each radius is monotone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, UnsupportedLayerError
from ..model.graph import VARIABLE, Graph
from ..model.lemma import LayerBudget, perturbed_layers
from ..model.operators.affine import Affine
from ..model.operators.base import dot_gamma, guarded, tiny_of
from ..model.operators.elementwise import Elementwise
from ..model.operators.linear import Identity, LinearMap
from ..threat import Threat
from .region import InputRegion


@dataclass
class MarginTerms:
    """Clean margins and the two parts of the bound on their change, kept factored.

    Both bounds have the form ``|Delta m_j| <= spread[y, j] * e + r_y + r_j``, with
    ``spread[a, b] = ||w_a - w_b||_1`` of the last layer. ``input_term`` (the bound with
    ``eps_w = 0``) is ``spread[y] * input_scale``; ``weight_term`` (what the weight budget adds)
    is ``spread[y] * weight_scale + r_y + r_j``. The certified lower bound is
    ``margins - input_term - weight_term``; training uses ``worst`` on the factored form.
    """

    logits: Tensor  # (B, K) the clean logits (training reuses them for its cross-entropy)
    y: Tensor
    spread: Tensor  # (K, K)
    input_scale: Tensor  # (B,)
    weight_scale: Tensor  # (B,), >= 0
    radius: Tensor  # the last layer's output radius: (B, K), (B, 1) or 0-dim

    @property
    def margins(self) -> Tensor:
        return self.logits.gather(1, self.y[:, None]) - self.logits

    @property
    def input_term(self) -> Tensor:
        return self.spread[self.y] * self.input_scale[:, None]

    @property
    def weight_term(self) -> Tensor:
        r = self.radius.expand(len(self.y), self.spread.shape[0])
        return self.spread[self.y] * self.weight_scale[:, None] + r.gather(1, self.y[:, None]) + r

    @property
    def lower(self) -> Tensor:
        return self.margins - self.input_term - self.weight_term

    def worst(self) -> tuple[Tensor, Tensor]:
        """``(input, weight)`` terms of the worst wrong class, each (B,).

        With a radius equal for every class (absolute and layer budgets) the maximum is taken
        on the (K,) row maxima of ``spread``, never forming (B, K) tensors: the hot path of
        the bound regularizer.
        """
        largest = self.spread.amax(1)[self.y]  # max_j spread[y, j]; the j = y entry is 0
        if self.radius.dim() < 2 or self.radius.shape[1] == 1:
            r = self.radius.reshape(-1) if self.radius.dim() else self.radius
            return largest * self.input_scale, largest * self.weight_scale + 2 * r
        true = self.y[:, None]
        weight = self.weight_term.scatter(1, true, float("-inf")).amax(1)
        return largest * self.input_scale, weight


@dataclass
class Dense:
    """One dense layer of an MLP: its node, its tensors, and whether a ReLU follows it."""

    index: int
    weight: Tensor
    bias: Tensor | None
    relu: bool

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight, self.bias)


def dense_layers(graph: Graph, x: Tensor, method: str) -> list[Dense]:
    """The dense layers of an MLP (a chain of reshapes, then Linear layers on one vector with
    ReLU or identity between them, the logits straight from the last), or a clear error."""
    chain = graph.cache.get("mlp")
    if chain is None:
        chain = graph.cache["mlp"] = _mlp_chain(graph, x, method)
    return [
        Dense(k, graph.tensors[graph.nodes[k].op.weight_name], _bias(graph, k), relu)
        for k, relu in chain
    ]


def _bias(graph: Graph, k: int) -> Tensor | None:
    name = graph.nodes[k].op.bias_name
    if name is not None:
        return graph.tensors[name]
    args, _ = graph.nodes[k].fill([None] * len(graph.nodes), graph.tensors)
    return args[2] if len(args) > 2 else None


def _mlp_chain(graph: Graph, x: Tensor, method: str) -> list[tuple[int, bool]]:
    with torch.no_grad():
        values = graph.values(x[:1])
    chain: list[tuple[int, bool]] = []
    previous, last = 0, None
    for node in graph.nodes[1:]:
        if node.kind != VARIABLE:
            continue
        op = node.op
        if node.box_refs != (previous,):
            raise UnsupportedLayerError(
                f"method '{method}' bounds MLPs, a chain of layers; {op.label} does not read "
                "the layer before it alone: use 'ibp' or 'crown'"
            )
        previous = node.index
        if isinstance(op, Identity) or (isinstance(op, LinearMap) and op.reshape and not chain):
            continue  # identity anywhere; reshapes before the first layer are the input itself
        last = node
        if chain and isinstance(op, Elementwise) and op.act.kind == "relu":
            chain[-1] = (chain[-1][0], True)  # 1-Lipschitz and |relu(z)| <= |z|: it holds
        elif isinstance(op, Affine) and op.one_vector(values[node.first]):
            chain.append((node.index, False))
        else:
            raise UnsupportedLayerError(
                f"method '{method}' bounds MLPs (Flatten, Linear, ReLU, Identity, Dropout); "
                f"{op.label} needs method 'ibp' or 'crown'"
            )
    if not chain:
        raise UnsupportedLayerError(f"method '{method}' needs an MLP with a Linear layer")
    if last is not None and last.index != chain[-1][0]:
        raise UnsupportedLayerError(
            f"method '{method}' needs the logits straight from the last Linear layer; "
            f"{last.label} follows it: use 'ibp' or 'crown'"
        )
    return chain


def _check_threat(threat: Threat, method: str) -> None:
    if threat.eps_w > 0 and threat.w_norm != "linf":
        raise ConfigError(
            f"method '{method}' bounds elementwise (linf) weight budgets only, got "
            f"w_norm='{threat.w_norm}'; use method 'ibp' or 'crown'"
        )


def _row_radius(layer: Dense, budget: LayerBudget | None, h_abs: Tensor, unit: float) -> Tensor:
    """The layer's output-change radius ``(B, n_out)`` at input magnitude ``h_abs``: the lemma's
    box (0 if unperturbed) plus the rounding of its own dot products (``unit > 0``), their
    absolute part near zero as ``Affine.rounding`` has it; ``inf`` where they may overflow."""
    n_out = layer.weight.shape[0]
    r = _unchecked_radius(layer, budget, h_abs, unit)
    if unit > 0:
        r = guarded(r, _through(layer, h_abs) + r, unit)
    return r.expand(h_abs.shape[0], n_out) if r.dim() else r


def _through(layer: Dense, h_abs: Tensor) -> Tensor:
    """``|W| h_abs + |b|``: a bound on every partial sum of the layer's dot products."""
    return F.linear(h_abs, layer.weight.abs(), None if layer.bias is None else layer.bias.abs())


def _unchecked_radius(
    layer: Dense, budget: LayerBudget | None, h_abs: Tensor, unit: float
) -> Tensor:
    """``_row_radius`` without its overflow check: affine in ``h_abs`` (linf budgets)."""
    n_in = layer.weight.shape[1]
    r = h_abs.new_zeros(()) if budget is None else budget.activation_radius(h_abs)
    if unit == 0:
        return r
    error = dot_gamma(n_in + 1, unit) * (_through(layer, h_abs) + r)
    tiny = tiny_of(unit)
    if tiny > 0:  # products and additions flushed, and their operands
        operands = layer.weight.abs().sum(1) + n_in * h_abs.amax(-1, keepdim=True)
        if budget is not None:
            operands = operands + budget.activation_radius(torch.ones_like(h_abs[:1]))
        error = error + tiny * (3 * (n_in + 1) + operands)
    return r + error


def _uniform_radius(layer: Dense, budget: LayerBudget | None, level: Tensor, unit: float) -> Tensor:
    """``_row_radius`` at ``h_abs = level * 1`` for ``level: (B,)``, without a (B, n_in) tensor:
    the radius is affine in ``h_abs`` for linf budgets, so two probes at 0 and 1 give it (and
    the overflow check is made at ``level`` itself)."""
    if budget is None and unit == 0:
        return level.new_zeros(())
    n_out, n_in = layer.weight.shape
    uniform = budget is not None and budget.weight_radius.dim() == 0
    if uniform and budget.bias_radius is None and unit == 0:  # absolute, layer
        return level[:, None] * (budget.weight_radius * n_in)
    probe = torch.stack([torch.zeros_like(layer.weight[0]), torch.ones_like(layer.weight[0])])
    at_zero, at_one = _unchecked_radius(layer, budget, probe, unit).expand(2, n_out).to(level.dtype)
    r = at_zero + level[:, None] * (at_one - at_zero)
    if unit == 0:
        return r
    through = level[:, None] * layer.weight.abs().sum(1).to(level.dtype)
    if layer.bias is not None:
        through = through + layer.bias.abs().to(level.dtype)
    return guarded(r, through + r, unit)


def _spread(last: Dense) -> Tensor:
    """``(K, K)``: ``||w_a - w_b||_1`` for every pair of classes."""
    w = last.weight
    return (w[:, None, :] - w[None, :, :]).abs().sum(-1)


def _terms(
    logits: Tensor, y: Tensor, last: Dense, e: Tensor, input_scale: Tensor | float, radius: Tensor
) -> MarginTerms:
    """``e`` bounds the change of the last layer's input; ``input_scale`` is its part from
    ``eps_x`` alone, so the weight budget's part is ``e - input_scale``."""
    input_scale = torch.as_tensor(input_scale, dtype=e.dtype, device=e.device).expand_as(e)
    return MarginTerms(logits, y, _spread(last), input_scale, e - input_scale, radius)


def closed_form_terms(
    graph: Graph,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    logits: Tensor | None = None,
    *,
    unit: float = 0.0,
) -> MarginTerms:
    """B0's parts, differentiable in the weights when ``graph`` holds live parameters.

    B0 needs only the weights and ``||x||_inf``; ``logits`` (the clean ones, if the caller
    already has them) saves the forward pass that the margins would otherwise cost. ``unit``:
    the unit roundoff of the model's arithmetic, whose rounding then joins each layer's radius
    (0 for the training regularizer).
    """
    _check_threat(threat, "closed-form")
    dense = dense_layers(graph, x, "closed-form")
    budgets = {b.index: b for b in perturbed_layers(graph, threat)}
    p = x.flatten(1).abs().amax(1)  # (B,) P_0
    e = torch.full_like(p, threat.eps_x)  # P'_l - P_l, tracked directly (no cancellation)
    gain = 1.0  # product of the layer norms: what eps_x alone is multiplied by
    for layer in dense[:-1]:
        a = _inf_norm(layer)
        beta = layer.bias.abs().amax() if layer.bias is not None else 0.0
        r = _uniform_radius(layer, budgets.get(layer.index), p + e, unit)
        p, e = a * p + beta, a * e + (r.amax(1) if r.dim() else 0.0)
        gain = gain * a
    last = dense[-1]
    radius = _uniform_radius(last, budgets.get(last.index), p + e, unit)
    return _terms(
        graph.run(x) if logits is None else logits, y, last, e, threat.eps_x * gain, radius
    )


def recursive_terms(
    graph: Graph, x: Tensor, y: Tensor, threat: Threat, *, unit: float = 0.0
) -> MarginTerms:
    """B1's parts: the same recursion along the example's own activations (``unit`` as for
    ``closed_form_terms``)."""
    _check_threat(threat, "recursive")
    dense = dense_layers(graph, x, "recursive")
    budgets = {b.index: b for b in perturbed_layers(graph, threat)}
    region = InputRegion.from_threat(x, threat)
    h = x.flatten(1)
    u = region.lower.abs().maximum(region.upper.abs()).flatten(1)
    e = torch.full_like(h[:, 0], threat.eps_x)
    gain = 1.0
    for layer in dense[:-1]:
        a = _inf_norm(layer)
        r = _row_radius(layer, budgets.get(layer.index), u, unit)
        h = layer.forward(h)
        if layer.relu:
            h = h.relu()
        e = a * e + (r.amax(1) if r.dim() else 0.0)
        u = h.abs() + e[:, None]
        gain = gain * a
    last = dense[-1]
    radius = _row_radius(last, budgets.get(last.index), u, unit)
    return _terms(last.forward(h), y, last, e, threat.eps_x * gain, radius)


def _inf_norm(layer: Dense) -> Tensor:
    """``||W||_inf``, the largest absolute row sum (one fused kernel)."""
    return torch.linalg.vector_norm(layer.weight, ord=1, dim=1).amax()
