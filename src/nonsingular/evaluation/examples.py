"""Adversarial examples kept from an evaluation: the perturbed inputs and, per example, the
weight deltas the attack used, written as one safetensors file (no pickle) with a JSON sidecar
saying what each tensor is.

The deltas are the materialized ones (``AttackResult.weight_deltas``): the full parameter-
space Delta of each example, which replays exactly on the unmodified model (add it to the
parameter and run ``x_adv``), also for the layers the attack perturbs through the lemma's
factors. They are as large as the perturbed weights, per example: hence only the first
``count`` examples of the data set are kept at each grid point. A shared-scope point stores
its one Delta once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save
from torch import Tensor

from ..attacks import AttackResult
from ..files import write_bytes, write_json
from ..threat import Threat

FORMAT = "nonsingular adversarial examples 1"


def sidecar(path: Path) -> Path:
    """Where the JSON description of ``path`` goes: beside it, ``.json`` for its suffix."""
    return path.with_suffix(".json")


@dataclass
class _Point:
    threat: Threat
    rows: list[tuple[int, Tensor, int, float, bool, dict[str, Tensor]]] = field(
        default_factory=list
    )


class ExampleSaver:
    """An ``evaluate(on_attack=...)`` callback keeping the first ``count`` examples of the data
    set at each grid point; ``save`` writes them."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.points: list[_Point] = []

    def __call__(self, threat: Threat, positions: Tensor, y: Tensor, res: AttackResult) -> None:
        if not self.points or self.points[-1].threat is not threat:
            self.points.append(_Point(threat))
        point = self.points[-1]
        for i in (positions < self.count).nonzero().flatten().tolist():
            shared = threat.scope == "shared" and bool(point.rows)
            deltas = {} if shared else res.weight_deltas(i)
            row = (int(positions[i]), res.x_adv[i], int(y[i]), float(res.margins[i]))
            point.rows.append((*row, bool(res.success[i]), deltas))

    def tensors(self) -> tuple[dict[str, Tensor], list[dict[str, object]]]:
        """Every tensor by name, and the sidecar's description of every point."""
        tensors: dict[str, Tensor] = {}
        points = []
        for k, point in enumerate(self.points):
            rows = sorted(point.rows, key=lambda r: r[0])
            prefix = f"point{k}"
            what = {
                f"{prefix}.x_adv": "(N, ...) adversarial inputs, in the order of 'positions'",
                f"{prefix}.positions": "(N,) each example's place in the evaluated data set",
                f"{prefix}.y": "(N,) labels",
                f"{prefix}.margins": "(N,) attacked margin: true logit minus the best other",
                f"{prefix}.success": "(N,) 1 where the attack broke the example",
            }
            if rows:
                columns = list(zip(*rows, strict=True))
                tensors[f"{prefix}.x_adv"] = torch.stack(columns[1])
                tensors[f"{prefix}.positions"] = torch.tensor(columns[0], dtype=torch.int64)
                tensors[f"{prefix}.y"] = torch.tensor(columns[2], dtype=torch.int64)
                tensors[f"{prefix}.margins"] = torch.tensor(columns[3])
                tensors[f"{prefix}.success"] = torch.tensor(columns[4], dtype=torch.uint8)
            shared = point.threat.scope == "shared"
            for position, _, _, _, _, deltas in rows:
                for name, delta in deltas.items():
                    key = f"{prefix}.delta.{name}" if shared else f"{prefix}.{position}.{name}"
                    tensors[key] = delta
                    what[key] = (
                        f"Delta of parameter {name}, shared by every example"
                        if shared
                        else f"Delta of parameter {name} for the example at position {position}"
                    )
            what = {k: v for k, v in what.items() if k in tensors}
            points.append({"threat": point.threat.to_dict(), "tensors": what})
        return tensors, points

    def save(self, path: Path) -> None:
        """Write ``path`` (safetensors) and its sidecar, each atomically."""
        tensors, points = self.tensors()
        data = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
        write_bytes(path, data)
        about = {
            "format": FORMAT,
            "file": path.name,
            "deltas": "materialized: add each Delta to its parameter (named as in "
            "model.named_parameters()) and run the unmodified model on x_adv",
            "points": points,
        }
        write_json(sidecar(path), about)
