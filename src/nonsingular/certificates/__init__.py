"""Certified lower bounds on robust accuracy under the joint threat (DESIGN section 3).

``certify(model, x, y, threat, method)`` returns, per example, a lower bound on every margin
``z_y - z_j`` over every input and weight perturbation of the threat; an example is certified
when all of them are positive. Methods, loosest first: ``closed-form`` (B0, the paper's),
``recursive`` (B1), ``ibp`` (B2), ``crown`` (B3). Bounds are computed in float64 by default
(so rounding cannot turn a near-zero bound positive), and ``scope="shared"`` is certified
through the per-example threat, which contains it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..network import Network, check_batch, move_batch
from ..perturbation import check_domain, margins
from ..threat import Threat
from ..weights import perturbed_layers
from .closed_form import MarginTerms, closed_form_terms, recursive_terms
from .crown import INTERMEDIATE, crown_margins
from .ibp import ibp_margins
from .linear import margin_matrix
from .region import InputRegion

METHODS = ("closed-form", "recursive", "ibp", "crown")


@dataclass
class CertifyResult:
    """Certified lower bounds for a batch.

    lower: (B, classes) lower bound of ``z_y - z_j`` for each class j (``+inf`` at ``j = y``).
    """

    lower: Tensor
    method: str
    threat: Threat
    _clean: Callable[[], Tensor] = field(repr=False)

    @cached_property
    def clean_margins(self) -> Tensor:
        """(B,) ``z_y - max_{j != y} z_j`` without perturbation (computed on first use)."""
        return self._clean()

    @property
    def worst(self) -> Tensor:
        """(B,) the smallest lower bound over wrong classes: the certified margin."""
        return self.lower.min(dim=1).values

    @property
    def certified(self) -> Tensor:
        """(B,) bool: every margin provably stays positive."""
        return self.worst > 0

    @property
    def certified_accuracy(self) -> float:
        return float(self.certified.float().mean())


def _bounds(
    net: Network, x: Tensor, y: Tensor, threat: Threat, method: str, intermediate: str, classes: int
) -> Tensor:
    if method in ("closed-form", "recursive"):
        terms = (closed_form_terms if method == "closed-form" else recursive_terms)(
            net, x, y, threat
        )
        return terms.lower
    budgets = dict(perturbed_layers(net, threat))
    region = InputRegion.from_threat(x, threat)
    if method == "ibp":
        return ibp_margins(net, budgets, region, y, classes)
    c = margin_matrix(y, classes, x.dtype)
    crown, ibp = crown_margins(net, budgets, region, c, intermediate)
    return crown.maximum(ibp)  # both are sound: report the tighter, per margin


def certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    method: str = "crown",
    *,
    intermediate: str = "crown",
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> CertifyResult:
    """Certified lower bounds on the margins of ``model`` at ``(x, y)`` under ``threat``.

    x: (B, ...) inside ``threat.bounds``; y: (B,) labels. ``intermediate``: how ``crown``
    bounds pre-activations (``crown`` or ``ibp``). ``batch_size``: examples per chunk
    (default: sized for ~250 MB of bound matrices). ``dtype``: precision of the bound
    computation; float32 is faster, and exact only up to float32 rounding. The model is never
    modified.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if intermediate not in INTERMEDIATE:
        raise ConfigError(
            f"intermediate must be one of {', '.join(INTERMEDIATE)}; got {intermediate!r}"
        )
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(threat, Threat):
        raise ConfigError(f"threat must be a nonsingular.Threat, got {type(threat).__name__}")
    net = Network.from_module(model)
    device = net.affine_layers[0][1].weight.device
    x, y = move_batch(x, y, device)
    classes = check_batch(net, x, y, probe=True).shape[1]
    y = y.long()
    check_domain(x, threat)
    if dtype not in (torch.float64, torch.float32):
        raise ConfigError(f"dtype must be torch.float64 or torch.float32, got {dtype!r}")
    bound_net = net.cast(dtype)
    size = batch_size or _default_chunk(bound_net, x, method)
    parts = []
    with torch.no_grad():
        for i in range(0, len(x), size):
            xs, ys = x[i : i + size].to(dtype), y[i : i + size]
            lower = _bounds(bound_net, xs, ys, threat, method, intermediate, classes)
            parts.append(lower.scatter(1, ys[:, None], float("inf")))
    lower = torch.cat(parts) if parts else x.new_zeros(0, classes, dtype=dtype)

    def clean() -> Tensor:
        with torch.no_grad():
            return margins(net.forward(x), y)

    return CertifyResult(lower, method, threat, clean)


def _default_chunk(net: Network, x: Tensor, method: str) -> int:
    """Examples per chunk so that CROWN's largest bound matrix stays near 256 MB."""
    if method != "crown":
        return max(1, len(x))
    widest = 1
    h = x[:1].to(net.affine_layers[0][1].weight.dtype)
    with torch.no_grad():
        for layer in net.layers:
            h = layer.forward(h)
            widest = max(widest, h[0].numel())
    per_example = 2 * widest * x[0].numel()  # at most (2 neurons, input) per example
    return max(1, min(len(x), (1 << 25) // per_example))


__all__ = [
    "METHODS",
    "CertifyResult",
    "MarginTerms",
    "certify",
    "closed_form_terms",
    "recursive_terms",
]
