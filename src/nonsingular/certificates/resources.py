"""What a certificate run may take, decided before it starts: memory (estimated from the
model's shapes and, for CROWN's intermediate bounds, the neurons IBP leaves unstable, then
chunked to fit or refused) and time (``CertifyOptions.time_limit``: examples not reached in
it are not certified, never certified)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import MemoryLimitError
from ..model.graph import VARIABLE, Graph
from ..model.lemma import LayerBudget
from ..model.operators.base import Box
from ..threat import Threat
from .ibp import interval_bounds
from .region import InputRegion

CHUNK_BYTES = 1 << 28  # a chunk's bound matrices, when memory allows: large enough to be fast
HEADROOM = 0.8  # of the memory available, what one run may plan to take
# coefficient-sized tensors alive at once in a backward pass (its own, the next, products and
# what the allocator keeps): measured, peak RSS growth of one example's CROWN on small conv nets
# was 2.0-2.1x an estimate made with 3 (benchmarks/certify_memory.py)
MOVING = 6
PROBE = 16  # examples whose unstable neurons size CROWN's intermediate passes


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one example needs at the peak of a bound pass, and what that peak is."""

    per_example: int
    peak: str


def _gb(count: float) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.2f} GB"
    return f"{count / 1e6:.1f} MB" if count >= 1e6 else f"{count / 1e3:.1f} kB"


def estimate_memory(
    graph: Graph,
    x: Tensor,
    method: str,
    intermediate: str,
    budgets: dict[int, LayerBudget],
    threat: Threat,
) -> MemoryEstimate:
    """The bytes per example of ``method`` on ``graph`` (cast to the bound dtype) at ``x``:
    every node's box, plus the largest backward pass: the margins' (classes rows), or, with
    CROWN's own intermediate bounds, a relaxed node's (two rows per neuron IBP leaves unstable
    on the first ``PROBE`` examples, back to the widest node before it)."""
    itemsize = x.element_size()
    with torch.no_grad():
        values = graph.values(x[:1])
    sizes = {0: x[0].numel()}
    sizes.update({n.index: values[n.index].numel() for n in graph.nodes if n.kind == VARIABLE})
    classes = values[graph.output].shape[-1]
    boxes = 4 * sum(sizes.values())  # lower, upper, added radius, a concrete copy
    widest = max(sizes.values())
    peak, where = classes * widest, f"the margins' backward pass ({classes} rows)"
    if method in ("crown", "alpha-crown") and intermediate == "crown":
        rows, k = _unstable_rows(graph, budgets, InputRegion.from_threat(x[:PROBE], threat))
        before = max((s for i, s in sizes.items() if i <= k), default=widest)
        if 2 * rows * before > peak:
            label = graph.nodes[k].label
            peak, where = 2 * rows * before, f"CROWN's intermediate bounds at {label}: {rows} "
            where += f"unstable neurons back to a node of {before} values"
    per_example = itemsize * (boxes + MOVING * peak)
    return MemoryEstimate(per_example, where)


def _unstable_rows(
    graph: Graph, budgets: dict[int, LayerBudget], region: InputRegion
) -> tuple[int, int]:
    """The most neurons one example's CROWN tightening may bound at one node (those IBP
    leaves unstable: CROWN's boxes lie within IBP's), and that node."""
    with torch.no_grad():
        bounds = interval_bounds(graph, budgets, region, unit=0.0)
    most, where = 0, 0
    for node in graph.nodes:
        if node.kind != VARIABLE or node.op.linear:
            continue
        for ref in node.box_refs:
            box = bounds.values[ref]
            mask = node.op.needs_tightening(box) if isinstance(box, Box) else None
            count = int(mask.flatten(1).sum(1).max()) if mask is not None else 0
            if count > most:
                most, where = count, ref
    return most, where


def available_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on ``device`` (None: unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def chunk_size(
    estimate: MemoryEstimate, n: int, method: str, limit: int | None, device: torch.device
) -> int:
    """Examples per chunk: as many as ``CHUNK_BYTES`` hold, fewer where the memory available
    (or ``limit``) is smaller; MemoryLimitError when one example does not fit."""
    allowed = limit if limit is not None else available_memory(device)
    room = int(allowed * HEADROOM) if limit is None and allowed is not None else allowed
    if room is not None and estimate.per_example > room:
        said = "memory_limit allows" if limit is not None else "this machine has available"
        raise MemoryLimitError(
            f"certify {method} needs an estimated {_gb(estimate.per_example)} for one example "
            f"(at its peak, {estimate.peak}), more than the {_gb(room)} {said}; chunks of "
            "fewer examples cannot help: use intermediate='ibp' (no per-neuron passes), "
            "method 'ibp', dtype=torch.float32, or a machine with more memory"
        )
    fits = CHUNK_BYTES if room is None else min(CHUNK_BYTES, room)
    return max(1, min(n, fits // max(1, estimate.per_example)))


def run_chunks(
    bound: Callable[[slice], Tensor],
    n: int,
    size: int,
    time_limit: float | None,
    label: str,
    progress: bool,
) -> tuple[list[Tensor], int]:
    """``bound(chunk)`` over the ``n`` examples in order, in chunks of at most ``size``; with
    ``time_limit`` (seconds per example) no chunk starts once ``time_limit * n`` seconds are
    spent, and chunks are sized by the time the first example took. Returns the chunks'
    bounds and how many examples they cover."""
    bar = tqdm(total=n, desc=label, unit="example", leave=False, disable=None if progress else True)
    parts: list[Tensor] = []
    done, began = 0, time.perf_counter()
    budget = None if time_limit is None else time_limit * n
    step = size if budget is None else 1
    while done < n:
        parts.append(bound(slice(done, done + step)))
        done += len(parts[-1])
        bar.update(len(parts[-1]))
        if budget is not None:
            spent = time.perf_counter() - began
            if spent >= budget:
                break
            each = spent / done
            step = max(1, min(size, int((budget - spent) / max(each, 1e-9))))
        else:
            step = size
    bar.close()
    return parts, done
