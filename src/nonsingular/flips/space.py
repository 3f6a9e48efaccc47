"""Which bits a flip threat may flip on a quantized model, and the model run with flips applied.

Every forward here is the unmodified model through ``torch.func.functional_call`` in eval mode,
its flipped weights rebuilt from the flipped integers by ``grid.dequantize``: what a replay
computes, bit for bit.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..attacks.space import margins
from ..errors import ThreatError
from ..model.reader import eval_mode
from ..threat import Threat
from .grid import Flip, Quantization, bit_changes, dequantize, flip_integers, quantized


class FlipSpace:
    """The flippable bits of ``model`` (quantized) under ``threat`` (``threat.flips > 0``).

    names:   the weights that may flip (``threat.layers``: weight or module names).
    allowed: ``(n_bits,)`` the bit positions that may flip.
    """

    def __init__(self, model: nn.Module, threat: Threat) -> None:
        self.model = model
        self.quantization: Quantization = quantized(model)
        self.bits = self.quantization.bits
        self.integers = self.quantization.integers(model)
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.names = _chosen(self.quantization, threat)
        positions = threat.bits if threat.bits is not None else tuple(range(self.bits))
        if max(positions) >= self.bits:
            raise ThreatError(
                f"bits names position {max(positions)}, but the model's integers have "
                f"{self.bits} bits (positions 0 to {self.bits - 1})"
            )
        self.allowed = torch.tensor(positions, dtype=torch.long)
        available = sum(self.params[n].numel() for n in self.names) * len(positions)
        if threat.flips > available:
            raise ThreatError(
                f"flips={threat.flips} exceeds the {available} bits the threat may flip "
                f"({len(self.names)} weight tensor(s), {len(positions)} bit position(s) each)"
            )

    @functools.cached_property
    def flat_scales(self) -> dict[str, Tensor]:
        """``{name: (numel,)}`` each element's scale."""
        scales = self.quantization.scales
        return {n: scales[n].expand_as(self.params[n]).flatten() for n in self.names}

    @functools.cached_property
    def base_deltas(self) -> dict[str, Tensor]:
        """``{name: (numel, n_allowed)}`` the change of each flip of the unflipped model."""
        return {n: self.deltas(n, self.integers[n], self.params[n]) for n in self.names}

    def current(self, flips: list[Flip]) -> dict[str, Tensor]:
        """``{name: integers}`` of the chosen weights after ``flips``."""
        out = dict(self.integers)
        for name in dict.fromkeys(n for n, _, _ in flips):
            mine = [(i, b) for n, i, b in flips if n == name]
            index, bit = (torch.tensor(v, dtype=torch.long) for v in zip(*mine, strict=True))
            out[name] = flip_integers(self.integers[name], index, bit, self.bits)
        return out

    def weights(self, flips: list[Flip]) -> dict[str, Tensor]:
        """Every parameter of the model, the flipped weights rebuilt from their integers."""
        params = dict(self.params)
        ints = self.current(flips)
        for name in dict.fromkeys(n for n, _, _ in flips):
            params[name] = dequantize(ints[name], self.quantization.scales[name])
        return params

    def deltas(self, name: str, q: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        """``(numel, n_allowed)``: the weight change of flipping each allowed bit of each
        element of ``name``, from its current integers ``q`` and weight (``scale``: theirs,
        flat, when they are not the whole tensor)."""
        change = bit_changes(q.flatten(), self.bits)[:, self.allowed]
        if scale is None:
            scale = self.quantization.scales[name].expand_as(weight).flatten()
        return dequantize(q.flatten()[:, None] + change, scale[:, None]) - weight.flatten()[:, None]

    def logits(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        with eval_mode(self.model):
            return functional_call(self.model, params, (x,))

    def replay_margins(self, x: Tensor, y: Tensor, flip_sets: list[list[Flip]]) -> Tensor:
        """``(B,)`` margins of each example alone (a batch of one) under its own flip set:
        exactly what ``FlipAttackResult.replay`` computes."""
        out = []
        with torch.no_grad():
            for i, flips in enumerate(flip_sets):
                out.append(margins(self.logits(x[i : i + 1], self.weights(flips)), y[i : i + 1]))
        return torch.cat(out) if out else x.new_zeros(0)


def _chosen(quantization: Quantization, threat: Threat) -> list[str]:
    names = quantization.names
    if threat.layers is None:
        return names
    unknown = [n for n in threat.layers if n not in names and f"{n}.weight" not in names]
    if unknown:
        raise ThreatError(
            f"threat.layers names {', '.join(unknown)}, which is not a quantized weight of this "
            f"model; quantized weights: {', '.join(names)}"
        )
    wanted = set(threat.layers) | {f"{n}.weight" for n in threat.layers}
    return [n for n in names if n in wanted]


class FlipState:
    """A growing flip set on a ``FlipSpace``, kept up to date element by element: the current
    integers, weights (each flipped element rebuilt by ``dequantize``, the same product as a
    whole tensor's) and the change each further flip would make (the unflipped model's table,
    ``deltas``, with the rows of flipped elements in ``changed``)."""

    def __init__(self, space: FlipSpace) -> None:
        self.space = space
        self.flips: list[Flip] = []
        self.ints = {n: space.integers[n].flatten().clone() for n in space.names}
        self.weights = {n: space.params[n].clone() for n in space.names}
        self.scales = space.flat_scales
        self.deltas = space.base_deltas  # never written: rows of flipped elements in ``changed``
        self.changed: dict[str, dict[int, Tensor]] = {n: {} for n in space.names}

    def value(self, flip: Flip) -> Tensor:
        """The weight element ``flip`` would make, from the current integer."""
        name, i, b = flip
        q = self.ints[name][i : i + 1]
        change = bit_changes(q, self.space.bits)[:, b]
        return dequantize(q + change, self.scales[name][i : i + 1])[0]

    def params(self, extra: Flip | None = None) -> dict[str, Tensor]:
        """Every parameter under the current flips (and ``extra``, not kept)."""
        params = {**self.space.params, **self.weights}
        if extra is not None:
            name = extra[0]
            weight = self.weights[name].clone()
            weight.view(-1)[extra[1]] = self.value(extra)
            params[name] = weight
        return params

    def apply(self, flip: Flip) -> None:
        """Keep ``flip``: its integer, weight element and row of further changes."""
        name, i, b = flip
        self.weights[name].view(-1)[i] = self.value(flip)
        self.ints[name][i] += int(bit_changes(self.ints[name][i : i + 1], self.space.bits)[0, b])
        row = self.weights[name].view(-1)[i : i + 1]
        self.changed[name][i] = self.space.deltas(
            name, self.ints[name][i : i + 1], row, self.scales[name][i : i + 1]
        )[0]
        self.flips.append(flip)
