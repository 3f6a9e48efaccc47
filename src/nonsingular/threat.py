"""The joint threat model: one immutable object holding the input budget and the weight budget.

``eps_x = 0`` or ``eps_w = 0`` give the two singular threats; nothing downstream branches on
them, the corresponding part of the perturbation simply has zero radius and is left out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from .checks import choice, integer
from .errors import ThreatError

X_NORMS = ("linf", "l2")
W_MODES = ("absolute", "relative", "layer")
W_NORMS = ("linf", "l2")
SCOPES = ("per-example", "shared")


MAX_FLIPS = 1_000_000
MAX_BIT = 15  # bit positions of integers of up to 16 bits (flips.grid.MAX_BITS)
MAX_BUDGET = 1e12  # larger budgets overflow float32 arithmetic (squared norms reach 1e38)


def _check_budget(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ThreatError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ThreatError(f"{name} must be finite, got {value}")
    if value < 0:
        raise ThreatError(f"{name} must be >= 0, got {value}")
    if value > MAX_BUDGET:
        raise ThreatError(
            f"{name} must be at most {MAX_BUDGET:g} (larger budgets overflow float32 "
            f"arithmetic), got {value:g}"
        )
    return value


@dataclass(frozen=True)
class Threat:
    """Joint perturbation set S(x): ``x' = x + d`` and ``W_l -> W_l + Delta_l``.

    eps_x:   input budget, ``||d||_{x_norm} <= eps_x``; ``x'`` is clamped into ``bounds``.
    eps_w:   weight budget per perturbed parameter tensor:
             ``w_norm="linf"``: ``|Delta[i,j]| <= eps_w`` (absolute), ``eps_w*|W[i,j]|``
             (relative) or ``eps_w*max|W|`` (layer);
             ``w_norm="l2"``: ``||Delta||_F <= eps_w`` (absolute) or ``eps_w*||W||_F`` (relative).
    scope:   ``per-example`` (the adversary picks Delta for each input) or ``shared``
             (one Delta for the whole batch or data set).
    layers:  None for every parameter that enters a linear map (Linear/Conv weights, matmul
             and einsum operands, attention and LSTM/GRU weights: ``model/weights.py``), or
             parameter / module names (``"0.weight"``, ``"0"``; a module selects every
             weight inside it, at any depth).
    bias:    also perturb the biases of the chosen weights' linear maps (same mode, own
             budget eps_w).
    flips:   bit flips instead of eps_w: at most ``flips`` flips of bits of the integers of the
             chosen weights of a quantized model (``nonsingular.quantize``; see
             docs/quantization.md). Exclusive with ``eps_w``.
    bits:    with ``flips``: the bit positions that may flip (None: all; ``(7,)``: the sign
             bit of 8-bit integers only).
    """

    eps_x: float = 0.0
    eps_w: float = 0.0
    x_norm: str = "linf"
    w_mode: str = "absolute"
    w_norm: str = "linf"
    scope: str = "per-example"
    layers: tuple[str, ...] | None = None
    bias: bool = False
    bounds: tuple[float, float] | None = (0.0, 1.0)
    flips: int = 0
    bits: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalize fields once, here
        set_(self, "eps_x", _check_budget("eps_x", self.eps_x))
        set_(self, "eps_w", _check_budget("eps_w", self.eps_w))
        self._check_flips()
        choice("x_norm", self.x_norm, X_NORMS, ThreatError)
        choice("w_mode", self.w_mode, W_MODES, ThreatError)
        choice("w_norm", self.w_norm, W_NORMS, ThreatError)
        choice("scope", self.scope, SCOPES, ThreatError)
        if self.w_norm == "l2" and self.w_mode == "layer":
            raise ThreatError(
                "w_mode='layer' is defined for w_norm='linf' only; "
                "use w_mode='absolute' or 'relative' with w_norm='l2'"
            )
        if not isinstance(self.bias, bool):
            raise ThreatError(f"bias must be True or False, got {self.bias!r}")
        if self.layers is not None:
            if isinstance(self.layers, str) or not isinstance(self.layers, Iterable):
                raise ThreatError(f"layers must be None or a list of names, got {self.layers!r}")
            layers = tuple(self.layers)
            if not layers or not all(isinstance(n, str) and n for n in layers):
                raise ThreatError(f"layers must be a non-empty list of names, got {self.layers!r}")
            set_(self, "layers", layers)
        if self.bounds is not None:
            try:
                lo, hi = (float(b) for b in self.bounds)
            except (TypeError, ValueError):
                raise ThreatError(
                    f"bounds must be (low, high) or None, got {self.bounds!r}"
                ) from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ThreatError(f"bounds must be finite with low < high, got {self.bounds!r}")
            if max(abs(lo), abs(hi)) > MAX_BUDGET:
                raise ThreatError(f"bounds must lie within +-{MAX_BUDGET:g}, got {self.bounds!r}")
            set_(self, "bounds", (lo, hi))

    def _check_flips(self) -> None:
        integer("flips", self.flips, 0, MAX_FLIPS, ThreatError)
        if self.flips and self.eps_w:
            raise ThreatError(
                f"eps_w and flips are two weight threats; give one (got eps_w={self.eps_w:g} "
                f"and flips={self.flips})"
            )
        if self.flips and self.bias:
            raise ThreatError("flips act on quantized weights; biases stay float (bias=False)")
        if self.bits is None:
            return
        if not self.flips:
            raise ThreatError(
                f"bits restricts which bits flip; it needs flips >= 1 ({self.bits!r})"
            )
        if isinstance(self.bits, (str, bytes)) or not isinstance(self.bits, Iterable):
            raise ThreatError(f"bits must be None or a list of bit positions, got {self.bits!r}")
        bits = tuple(self.bits)
        if not bits or len(set(bits)) != len(bits):
            raise ThreatError(f"bits must list distinct bit positions, got {self.bits!r}")
        for b in bits:
            integer("bits", b, 0, MAX_BIT, ThreatError)
        object.__setattr__(self, "bits", tuple(sorted(bits)))

    @property
    def perturbs_input(self) -> bool:
        return self.eps_x > 0

    @property
    def perturbs_weights(self) -> bool:
        return self.eps_w > 0

    def replace(self, **changes: object) -> Threat:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def describe(self) -> str:
        """One human line, e.g. ``eps_x=0.1 (linf) + eps_w=0.002 (absolute linf, per-example)``."""
        parts = []
        if self.eps_x > 0:
            parts.append(f"eps_x={self.eps_x:g} ({self.x_norm})")
        if self.eps_w > 0:
            extra = ", +bias" if self.bias else ""
            where = f", layers={','.join(self.layers)}" if self.layers else ""
            parts.append(
                f"eps_w={self.eps_w:g} ({self.w_mode} {self.w_norm}, {self.scope}{extra}{where})"
            )
        if self.flips:
            which = f" of bits {','.join(map(str, self.bits))}" if self.bits else ""
            where = f", layers={','.join(self.layers)}" if self.layers else ""
            parts.append(f"{self.flips} bit flip(s){which} ({self.scope}{where})")
        return " + ".join(parts) if parts else "no perturbation"

    def to_dict(self) -> dict[str, object]:
        """The fields as JSON values (``flips`` and ``bits`` only when flips are threatened,
        so that the dicts of other threats, and what is cached under them, are unchanged)."""
        out: dict[str, object] = {
            "eps_x": self.eps_x,
            "eps_w": self.eps_w,
            "x_norm": self.x_norm,
            "w_mode": self.w_mode,
            "w_norm": self.w_norm,
            "scope": self.scope,
            "layers": list(self.layers) if self.layers is not None else None,
            "bias": self.bias,
            "bounds": list(self.bounds) if self.bounds is not None else None,
        }
        if self.flips:
            out["flips"] = self.flips
            out["bits"] = list(self.bits) if self.bits is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Threat:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ThreatError(f"unknown threat fields: {', '.join(sorted(unknown))}")
        kwargs = dict(data)
        if kwargs.get("layers") is not None:
            kwargs["layers"] = tuple(kwargs["layers"])  # type: ignore[arg-type]
        for key in ("bounds", "bits"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])  # type: ignore[arg-type]
        return cls(**kwargs)  # type: ignore[arg-type]


def grid(
    eps_x: Sequence[float] = (0.0,),
    eps_w: Sequence[float] = (0.0,),
    flips: Sequence[int] = (),
    **threat_fields: object,
) -> list[Threat]:
    """Every ``(eps_x, eps_w)`` pair of the two lists as a Threat, eps_x varying slowest;
    with ``flips`` (a list of flip counts, eps_w left at 0): every ``(eps_x, flips)`` pair.

    ``threat_fields`` (x_norm, w_mode, scope, ...) apply to every point (``bits``: to the
    points with flips).
    """
    if isinstance(eps_x, (int, float)):
        eps_x = [eps_x]
    if isinstance(eps_w, (int, float)):
        eps_w = [eps_w]
    if isinstance(flips, int):
        flips = [flips]
    if not len(eps_x) or not len(eps_w):
        raise ThreatError("grid needs at least one eps_x and one eps_w")
    if len(flips):
        if any(float(w) != 0 for w in eps_w):
            raise ThreatError("a grid over flips leaves eps_w at 0 (the two weight threats)")
        pairs = [{"eps_x": ex, "flips": k} for ex, k in itertools.product(eps_x, flips)]
        bits = threat_fields.pop("bits", None)  # which bits flip: for the points with flips
        for pair in pairs:
            if pair["flips"] and bits is not None:
                pair["bits"] = bits
    else:
        pairs = [{"eps_x": ex, "eps_w": ew} for ex, ew in itertools.product(eps_x, eps_w)]
    return [Threat(**pair, **threat_fields) for pair in pairs]  # type: ignore[arg-type]
