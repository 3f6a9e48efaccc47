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
from torch import Tensor

from ..errors import ConfigError, UnsupportedLayerError
from ..layers import Affine, Flatten, Identity, ReLU
from ..network import Network
from ..threat import Threat
from ..weights import LayerBudget, perturbed_layers
from .region import InputRegion


@dataclass
class MarginTerms:
    """Clean margins and the two parts of the bound on their change, each ``(B, K)``.

    ``input_term``: the bound with ``eps_w = 0``; ``weight_term``: what the weight budget adds.
    The certified lower bound is ``margins - input_term - weight_term``.
    """

    margins: Tensor
    input_term: Tensor
    weight_term: Tensor

    @property
    def lower(self) -> Tensor:
        return self.margins - self.input_term - self.weight_term


def dense_layers(net: Network, method: str) -> list[Affine]:
    """The dense layers of an MLP, or a clear error for anything else."""
    dense: list[Affine] = []
    for layer in net.layers:
        if isinstance(layer, Affine) and not layer.is_conv:
            dense.append(layer)
        elif isinstance(layer, (Flatten, Identity)) and not dense:
            continue  # before the first dense layer: the input itself
        elif isinstance(layer, (ReLU, Identity)) and dense:
            continue  # 1-Lipschitz, and |relu(z)| <= |z|: the recursion holds through it
        else:
            kind = "Conv2d" if isinstance(layer, Affine) else type(layer).__name__
            raise UnsupportedLayerError(
                f"method '{method}' bounds MLPs (Flatten, Linear, ReLU, Identity, Dropout); "
                f"layer '{layer.name}' ({kind}) needs method 'ibp' or 'crown'"
            )
    return dense


def _check_threat(threat: Threat, method: str) -> None:
    if threat.eps_w > 0 and threat.w_norm != "linf":
        raise ConfigError(
            f"method '{method}' bounds elementwise (linf) weight budgets only, got "
            f"w_norm='{threat.w_norm}'; use method 'ibp' or 'crown'"
        )


def _row_radius(budget: LayerBudget | None, h_abs: Tensor) -> Tensor:
    """The lemma's output radius ``(B, n_out)`` at input magnitude ``h_abs`` (0 if unperturbed)."""
    if budget is None:
        return h_abs.new_zeros(())
    return budget.activation_radius(h_abs).expand(h_abs.shape[0], budget.layer.weight.shape[0])


def _margin_change(last: Affine, y: Tensor, e: Tensor, r: Tensor) -> Tensor:
    """``||w_y - w_j||_1 e + r_y + r_j``: ``e (B,)``, ``r (B, n_classes)`` or 0-dim."""
    w = last.weight
    spread = (w[y][:, None, :] - w[None, :, :]).abs().sum(-1)  # (B, K)
    r = r.expand(len(y), w.shape[0]) if r.dim() else r.new_zeros(len(y), w.shape[0])
    return spread * e[:, None] + r.gather(1, y[:, None]) + r


def _clean_margins(net: Network, x: Tensor, y: Tensor) -> Tensor:
    logits = net.forward(x)
    return logits.gather(1, y[:, None]) - logits


def closed_form_terms(net: Network, x: Tensor, y: Tensor, threat: Threat) -> MarginTerms:
    """B0's parts, differentiable in the weights when ``net`` holds live parameters."""
    _check_threat(threat, "closed-form")
    dense = dense_layers(net, "closed-form")
    budgets = {id(b.layer): b for _, b in perturbed_layers(net, threat)}
    p = x.flatten(1).abs().amax(1)  # (B,) P_0
    e = torch.full_like(p, threat.eps_x)  # P'_l - P_l, tracked directly (no cancellation)
    gain = torch.ones_like(p)
    for layer in dense[:-1]:
        a = layer.weight.abs().sum(1).amax()
        beta = layer.bias.abs().amax() if layer.bias is not None else 0.0
        r = _row_radius(budgets.get(id(layer)), (p + e)[:, None].expand(-1, layer.weight.shape[1]))
        p, e = a * p + beta, a * e + (r.amax(1) if r.dim() else 0.0)
        gain = gain * a
    last = dense[-1]
    r = _row_radius(budgets.get(id(last)), (p + e)[:, None].expand(-1, last.weight.shape[1]))
    total = _margin_change(last, y, e, r)
    input_term = _margin_change(last, y, threat.eps_x * gain, x.new_zeros(()))
    return MarginTerms(_clean_margins(net, x, y), input_term, total - input_term)


def recursive_terms(net: Network, x: Tensor, y: Tensor, threat: Threat) -> MarginTerms:
    """B1's parts: the same recursion along the example's own activations."""
    _check_threat(threat, "recursive")
    dense = dense_layers(net, "recursive")
    budgets = {id(b.layer): b for _, b in perturbed_layers(net, threat)}
    region = InputRegion.from_threat(x, threat)
    h = x.flatten(1)
    u = region.lower.abs().maximum(region.upper.abs()).flatten(1)
    e = torch.full_like(h[:, 0], threat.eps_x)
    gain = torch.ones_like(e)
    for layer in dense[:-1]:
        a = layer.weight.abs().sum(1).amax()
        r = _row_radius(budgets.get(id(layer)), u)
        h = layer.forward(h)
        if _relu_follows(net, layer):
            h = h.relu()
        e = a * e + (r.amax(1) if r.dim() else 0.0)
        u = h.abs() + e[:, None]
        gain = gain * a
    last = dense[-1]
    total = _margin_change(last, y, e, _row_radius(budgets.get(id(last)), u))
    input_term = _margin_change(last, y, threat.eps_x * gain, x.new_zeros(()))
    return MarginTerms(_clean_margins(net, x, y), input_term, total - input_term)


def _relu_follows(net: Network, layer: Affine) -> bool:
    k = next(i for i, lay in enumerate(net.layers) if lay is layer)
    following = [lay for lay in net.layers[k + 1 :] if not isinstance(lay, Identity)]
    return bool(following) and isinstance(following[0], ReLU)
