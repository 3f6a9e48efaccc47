"""Certified lower bounds on robust accuracy under the joint threat (docs/certificates.md).

``certify(model, x, y, threat, method)`` returns, per example, a lower bound on every margin
``z_y - z_j`` over every input and weight perturbation of the threat; an example is certified
when all of them are positive. Methods, loosest first: ``closed-form`` (B0, the paper's),
``recursive`` (B1), ``ibp`` (B2), ``crown`` (B3), ``alpha-crown`` (B3 with its ReLU
relaxations optimized per example and output), ``bab`` (branch and bound over the ReLUs from
``crown``'s bounds, with a time limit per example: exact where it finishes, see ``bab.py``).
Bounds are computed in float64 by default
(so rounding cannot turn a near-zero bound positive), and ``scope="shared"`` is certified
through the per-example threat, which contains it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.space import check_domain, margins
from ..errors import ConfigError
from ..model.graph import Graph
from ..model.lemma import perturbed_layers
from ..model.select import Selector, selecting
from ..model.verify import read_batch, with_gradients
from ..revision import PACKAGE, code_digest
from ..threat import Threat
from .bab import BabResult, bab
from .closed_form import MarginTerms, closed_form_terms, recursive_terms
from .crown import alpha_crown_margins, crown_margins
from .crown_engine import margin_matrix, trusted
from .ibp import ibp_margins, interval_bounds
from .options import BAB_SECONDS, BOUNDS, METHODS, CertifyOptions, check_method
from .region import InputRegion
from .resources import chunk_size, estimate_memory, run_chunks
from .rounding import certificate_unit, exact_products
from .support import check_bounded


def bound_code_digest(root: Path) -> str:
    """A digest of the code every bound is computed by (the package at ``root``: its
    certificates, the bit-flip bounds and its model reading with the operators): numbers
    cached by other bound code (``reproduce``'s evaluation caches) are recomputed, never
    reused, with no counter for a change to forget to raise."""
    return code_digest(root, ("certificates", "flips", "model"))


REVISION = bound_code_digest(PACKAGE)


@dataclass
class CertifyResult:
    """Certified lower bounds for a batch.

    lower: (B, classes) lower bound of ``z_y - z_j`` for each class j (``+inf`` at ``j = y``),
           as the model computes it (the rounding of its own arithmetic included); ``-inf``
           where a value the model computes may overflow. Never NaN.
    clean_margins: (B,) ``z_y - max_{j != y} z_j`` without perturbation.
    finished: (B,) bool, the examples bounded within ``time_limit`` (None: every one); the
           others are unknown: their lower bounds are ``-inf``, never certified.
    """

    lower: Tensor
    method: str
    threat: Threat
    clean_margins: Tensor
    finished: Tensor | None = None

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
    graph: Graph,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    method: str,
    intermediate: str,
    classes: int,
    unit: float,
) -> Tensor:
    budgets = {b.index: b for b in perturbed_layers(graph, threat)}
    region = InputRegion.from_threat(x, threat)
    if method in ("crown", "alpha-crown"):
        c = margin_matrix(y, classes, x.dtype)
        margins_of = crown_margins if method == "crown" else alpha_crown_margins
        crown, ibp = margins_of(graph, budgets, region, c, intermediate, unit)
        return crown.maximum(ibp)  # both are sound: report the tighter, per margin
    if method == "ibp":
        bounds = interval_bounds(graph, budgets, region, unit)
        return ibp_margins(graph, budgets, region, y, classes, bounds)
    terms_of = closed_form_terms if method == "closed-form" else recursive_terms
    return terms_of(graph, x, y, threat, unit=unit).lower


@with_gradients
def certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    method: str = "crown",
    options: CertifyOptions | None = None,
    *,
    logits: Selector | None = None,
    progress: bool = True,
    **overrides: Any,
) -> CertifyResult:
    """Certified lower bounds on the margins of ``model`` at ``(x, y)`` under ``threat``.

    x: (B, ...) inside ``threat.bounds``; y: (B,) labels. ``method``: one of ``METHODS``.
    ``options``: ``CertifyOptions`` (intermediate, batch_size, dtype, time_limit); ``overrides``
    replace some of them by name (``certify(..., dtype=torch.float32)``). ``nonsingular.bab``
    also says which examples bab found broken, with their counterexamples. The model is read
    from its real graph, checked against ``model(x)``, and never modified. ``logits``: for a
    model returning a dict or tuple, the key or index of its logits (or a function of its
    output returning them). ``progress``: a progress bar over the examples (on a terminal).
    """
    check_method(method)
    options = CertifyOptions.of(options, **overrides)
    model = selecting(model, logits)
    intermediate, dtype = options.intermediate, options.dtype
    if not isinstance(threat, Threat):
        raise ConfigError(f"threat must be a nonsingular.Threat, got {type(threat).__name__}")
    if threat.flips:  # bit flips of a quantized MLP: their own bounds, always in float64
        return _flip_certify(model, x, y, threat, method, options)
    graph, x, y, logits = read_batch(model, x, y)
    classes = logits.shape[1]
    check_domain(x, threat)
    perturbed_layers(graph, threat)  # a threat that does not fit the model, said first
    check_bounded(graph)
    if method == "bab":
        found = bab(model, x, y, threat, time_limit=options.bab_seconds, dtype=dtype)
        return CertifyResult(found.lower, method, threat, margins(logits, y))
    bound_graph = graph.cast(dtype)
    unit = certificate_unit(logits.dtype, x.device, dtype)
    size = _chunk(bound_graph, x.to(dtype), threat, method, options)

    def bound(chunk: slice) -> Tensor:
        xs, ys = x[chunk].to(dtype), y[chunk]
        lower = trusted(_bounds(bound_graph, xs, ys, threat, method, intermediate, classes, unit))
        return lower.scatter(1, ys[:, None], float("inf"))

    with torch.no_grad(), exact_products():
        label = f"certify {method}"
        parts, done = run_chunks(bound, len(x), size, options.time_limit, label, progress)
    if done < len(x):  # not reached in the time limit: no bound, never certified
        rest = x.new_full((len(x) - done, classes), -float("inf"), dtype=dtype)
        parts.append(rest.scatter(1, y[done:, None], float("inf")))
    lower = torch.cat(parts) if parts else x.new_zeros(0, classes, dtype=dtype)
    finished = torch.arange(len(x), device=lower.device) < done
    return CertifyResult(lower, method, threat, margins(logits, y), finished)


def _flip_certify(
    model: nn.Module, x: Tensor, y: Tensor, threat: Threat, method: str, options: CertifyOptions
) -> CertifyResult:
    from ..flips.certify import flip_bab, flip_certify

    if method == "bab":
        found = flip_bab(model, x, y, threat, time_limit=options.bab_seconds)
        return CertifyResult(found.lower, method, threat, found.attack.clean_margins)
    return flip_certify(model, x, y, threat, method)


def _chunk(graph: Graph, x: Tensor, threat: Threat, method: str, options: CertifyOptions) -> int:
    """Examples per chunk: ``options.batch_size``, or as many as memory allows (a
    MemoryLimitError, before anything runs, when not even one example fits)."""
    if len(x) == 0:
        return 1
    budgets = {b.index: b for b in perturbed_layers(graph, threat)}
    estimate = estimate_memory(graph, x, method, options.intermediate, budgets, threat)
    fits = chunk_size(estimate, len(x), method, options.memory_limit, x.device)
    return min(options.batch_size or fits, fits)


__all__ = [
    "BAB_SECONDS",
    "BOUNDS",
    "BabResult",
    "CertifyOptions",
    "METHODS",
    "REVISION",
    "bab",
    "CertifyResult",
    "MarginTerms",
    "certify",
    "closed_form_terms",
    "recursive_terms",
]
