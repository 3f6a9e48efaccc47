"""The weight side of the threat, one Linear/Conv2d layer at a time, and the key lemma.

Lemma (DESIGN section 2): for a dense layer and a per-example perturbation with
``|Delta[i,j]| <= R[i,j]``, the reachable changes of the output are exactly the box
``{u : |u_i| <= (R |h|)_i}``, attained by ``Delta = t R sign(h)^T`` (t in [-1, 1]^n_out).
For ``||Delta||_F <= rho`` they are the ball ``||u||_2 <= rho ||h||_2``, attained by
``Delta = rho t h^T / ||h||``. So a per-example weight attack on a dense layer optimizes one
``n_out`` vector ``t``, never a weight copy. Attacks and certificates both call this module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .balls import Ball, make_ball
from .errors import ThreatError
from .layers import Affine
from .network import Network
from .threat import Threat


@dataclass
class OutputSet:
    """A set holding every change ``Delta_W h + Delta_b`` of one layer's output ``(B, *out)``.

    The sum of an elementwise box (``box``, broadcastable to the output) and a Euclidean ball
    over the flattened output (``ball``, shape (B,)). Bounds only need its box radius (IBP)
    and its support function (CROWN: the largest ``lam . delta`` over the set).
    """

    box: Tensor | None = None
    ball: Tensor | None = None

    def radius(self) -> Tensor:
        """Elementwise radius of a box containing the set."""
        r = 0.0 if self.box is None else self.box
        if self.ball is not None:
            r = r + self.ball.reshape(-1, 1)  # (B, 1): dense outputs only
        return r  # type: ignore[return-value]

    def support(self, lam: Tensor) -> Tensor:
        """``max over the set of lam . delta`` for ``lam: (B, K, *out)``, shape (B, K)."""
        total = lam.new_zeros(lam.shape[:2])
        if self.box is not None:
            total = total + (lam.abs() * self.box.unsqueeze(1)).flatten(2).sum(-1)
        if self.ball is not None:
            total = total + lam.flatten(2).norm(dim=-1) * self.ball.reshape(-1, 1)
        return total


@dataclass
class LayerBudget:
    """Which tensors of one layer are perturbed and how far.

    linf: ``weight_radius`` is an elementwise radius broadcastable to the weight (0-dim when
    uniform); l2: a 0-dim Frobenius radius. Same for ``bias_radius`` (None: bias untouched).
    """

    layer: Affine
    norm: str
    weight_radius: Tensor
    bias_radius: Tensor | None

    @classmethod
    def from_threat(cls, layer: Affine, threat: Threat) -> LayerBudget:
        def radius(p: Tensor) -> Tensor:
            eps = torch.tensor(threat.eps_w, dtype=p.dtype, device=p.device)
            if threat.w_mode == "absolute":
                return eps
            if threat.w_mode == "layer":
                return eps * p.abs().max()
            return eps * (p.abs() if threat.w_norm == "linf" else p.norm())  # relative

        bias = radius(layer.bias) if threat.bias and layer.bias is not None else None
        return cls(layer, threat.w_norm, radius(layer.weight), bias)

    def _through_layer(self, h_abs: Tensor, radius: Tensor) -> Tensor:
        """``R |h|`` through the layer's linear map (cheap forms for a uniform radius)."""
        if radius.dim() == 0 and not self.layer.is_conv:
            return radius * h_abs.sum(dim=-1, keepdim=True)
        if radius.dim() == 0:
            w = self.layer.weight
            ones = torch.ones((1,) + w.shape[1:], dtype=w.dtype, device=w.device)
            if int(self.layer.conv["groups"]) != 1:  # type: ignore[index]
                ones = torch.ones_like(w)
            return radius * self.layer.linear(h_abs, ones)
        return self.layer.linear(h_abs, radius.expand_as(self.layer.weight))

    def activation_radius(self, h_abs: Tensor) -> Tensor:
        """Box radius of ``Delta_W h + Delta_b`` over the budget, for every ``|h| <= h_abs``.

        Exact for dense layers with linf weights (the lemma); a sound box otherwise
        (conv: ``R * |h|`` as a convolution; l2: Cauchy-Schwarz per output unit).
        Broadcastable to the layer's output.
        """
        if self.norm == "linf":
            r = self._through_layer(h_abs, self.weight_radius)
        else:
            one = torch.ones((), dtype=h_abs.dtype, device=h_abs.device)
            r = self.weight_radius * self._through_layer(h_abs.square(), one).sqrt()
        if self.bias_radius is not None:
            r = self.layer.add_bias(r, self.bias_radius)
        return r

    def output_set(self, h_abs: Tensor) -> OutputSet:
        """The set of output changes over the budget, for every input ``|h| <= h_abs``.

        Dense layers with l2 weights get the exact ball of the lemma, everything else a box.
        """
        if self.norm == "l2" and not self.layer.is_conv:
            ball = self.weight_radius * h_abs.flatten(1).norm(dim=-1)
            if self.bias_radius is not None:
                ball = ball + self.bias_radius
            return OutputSet(ball=ball)
        return OutputSet(box=self.activation_radius(h_abs))

    def lemma_output(self, h: Tensor, t: Tensor, nonnegative: bool = False) -> Tensor:
        """The dense layer's output at ``h: (B, n_in)`` moved by ``lemma_radius(h) * t``.

        ``nonnegative``: ``h >= 0`` is known (a ReLU output), so ``|h| = h`` is skipped.
        """
        return torch.addcmul(self.layer.forward(h), self.lemma_radius(h, nonnegative), t)

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
        layer = self.layer
        if self.norm == "linf":
            delta = t[:, None] * self.weight_radius * h.sign()[None, :]
            delta = delta.expand_as(layer.weight).clone()
        else:
            norm = h.norm()
            scale = self.weight_radius / norm if norm > 0 else torch.zeros_like(norm)
            delta = scale * t[:, None] * h[None, :]
        out = {layer.weight_name: delta}
        if self.bias_radius is not None:
            out[layer.bias_name] = t * self.bias_radius
        return out

    def parameter_balls(self, batch_dims: int) -> dict[str, Ball]:
        """Balls in parameter space (for conv per-example and for shared perturbations)."""
        balls = {"weight": make_ball(self.norm, self.weight_radius, batch_dims)}
        if self.bias_radius is not None:
            balls["bias"] = make_ball(self.norm, self.bias_radius, batch_dims)
        return balls


class WeightVariables(ABC):
    """How an attack parametrizes one layer's weight perturbation.

    ``balls`` maps variable names to their balls; ``batched`` variables carry a leading
    example dimension.
    """

    batched: bool
    balls: dict[str, Ball]

    def __init__(self, budget: LayerBudget) -> None:
        self.budget = budget

    @abstractmethod
    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Shape of every variable for a batch of ``batch`` examples."""

    @abstractmethod
    def apply(self, h: Tensor, v: dict[str, Tensor]) -> Tensor:
        """The layer's output under the perturbation ``v``."""

    @abstractmethod
    def materialize(self, h: Tensor, v: dict[str, Tensor]) -> dict[str, Tensor]:
        """Parameter-space perturbation for one example (``h``: its input to the layer)."""


class ActivationVariables(WeightVariables):
    """Per-example dense layer through the lemma: one ``t: (B, n_out)`` in the unit ball."""

    batched = True

    def __init__(self, budget: LayerBudget, nonnegative_input: bool = False) -> None:
        super().__init__(budget)
        self.nonnegative_input = nonnegative_input
        self.balls = {"t": make_ball(budget.norm, 1.0, batch_dims=1)}

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {"t": (batch, self.budget.layer.weight.shape[0])}

    def apply(self, h: Tensor, v: dict[str, Tensor]) -> Tensor:
        return self.budget.lemma_output(h, v["t"], self.nonnegative_input)

    def materialize(self, h: Tensor, v: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.budget.materialize_lemma(h.reshape(-1), v["t"].reshape(-1))


class ParameterVariables(WeightVariables):
    """Perturbations held in parameter space: per-example kernels, or one shared copy."""

    def __init__(self, budget: LayerBudget, batched: bool) -> None:
        super().__init__(budget)
        self.batched = batched
        self.balls = budget.parameter_balls(batch_dims=int(batched))

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        lead = (batch,) if self.batched else ()
        layer = self.budget.layer
        shapes = {"weight": lead + tuple(layer.weight.shape)}
        if "bias" in self.balls:
            shapes["bias"] = lead + tuple(layer.bias.shape)  # type: ignore[union-attr]
        return shapes

    def apply(self, h: Tensor, v: dict[str, Tensor]) -> Tensor:
        layer = self.budget.layer
        weight = layer.weight + v["weight"]
        bias = layer.bias + v["bias"] if "bias" in v else layer.bias  # type: ignore[operator]
        if self.batched:
            return layer.forward_per_example(h, weight, bias)
        return layer.forward(h, weight, bias)

    def materialize(self, h: Tensor, v: dict[str, Tensor]) -> dict[str, Tensor]:
        layer = self.budget.layer
        out = {layer.weight_name: v["weight"].reshape(layer.weight.shape)}
        if "bias" in v:
            out[layer.bias_name] = v["bias"].reshape(layer.bias.shape)  # type: ignore[union-attr]
        return out


def perturbed_layers(net: Network, threat: Threat) -> list[tuple[int, LayerBudget]]:
    """The layers ``threat`` perturbs, with their budgets (empty when ``eps_w == 0``)."""
    if threat.eps_w == 0:
        return []
    affine = net.affine_layers
    if threat.layers is None:
        chosen = affine
    else:
        by_name: dict[str, int] = {}
        for k, lay in affine:
            by_name[lay.name] = by_name[lay.weight_name] = k
        unknown = [n for n in threat.layers if n not in by_name]
        if unknown:
            names = ", ".join(lay.weight_name for _, lay in affine)
            hint = " (biases follow bias=True)" if any(n.endswith(".bias") for n in unknown) else ""
            raise ThreatError(
                f"threat.layers names {', '.join(unknown)}, which is not a weight of this "
                f"model{hint}; weights: {names}"
            )
        wanted = {by_name[n] for n in threat.layers}
        chosen = [(k, lay) for k, lay in affine if k in wanted]
    return [(k, LayerBudget.from_threat(lay, threat)) for k, lay in chosen]


def weight_variables(net: Network, threat: Threat) -> dict[int, WeightVariables]:
    """The attack parametrization for every perturbed layer of ``net`` under ``threat``."""
    out: dict[int, WeightVariables] = {}
    nonnegative = net.nonnegative_inputs(threat.bounds is not None and threat.bounds[0] >= 0)
    for k, budget in perturbed_layers(net, threat):
        if threat.scope == "shared":
            out[k] = ParameterVariables(budget, batched=False)
        elif budget.layer.is_conv:  # kernels are shared across positions: no lemma
            out[k] = ParameterVariables(budget, batched=True)
        else:
            out[k] = ActivationVariables(budget, nonnegative_input=k in nonnegative)
    return out
