"""Branch and bound with weight-term splits against ReLU splits alone (issue 22 item 2).

The 784-256-256-10 MLP trained by the library (``standard``, 20 epochs, mnist5k: the
experiment's reference model), the first ``--examples`` test digits, ``ns.bab`` with
``weight_splits=False`` (ReLUs only) and ``True`` at the same time limit per example, at
``(eps_x, eps_w) = (0.02, 1e-4)`` and ``(0, 5e-4)`` (absolute linf per-example weights).
Two versions of the model:

- ``[0, 1] inputs``: the model as trained. Every perturbed layer reads values >= 0 (pixels,
  ReLU outputs), where the weight term is linear in the layer's input and exact: no weight
  term is left to split, and the script counts the split candidates (0) to show it.
- ``[-1, 1] inputs``: the same function with the image centred inside the model
  (``2x - 1``, then the first layer with ``W / 2`` and ``b + W 1 / 2``), as models on
  normalized inputs are: the first layer's weight term ``eps |2x - 1|`` is then relaxed by
  its chord, which weight-term splits remove. The threat perturbs the model's own layers, so
  this is a different (larger) weight threat than the first version's.

    python benchmarks/bab_weight_splits.py [--examples 200] [--epochs 20] [--bab-seconds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch import Tensor, nn

import nonsingular as ns
from nonsingular.certificates.bab import _Domains
from nonsingular.data import load
from nonsingular.model import perturbed_layers, read_model
from nonsingular.training import TrainConfig, train

POINTS = [(0.02, 1e-4), (0.0, 5e-4)]


class Centred(nn.Module):
    """``2x - 1``: [0, 1] images to [-1, 1] inside the model."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * x - 1


def centred(model: nn.Sequential) -> nn.Sequential:
    """The same function as ``model`` (Flatten, Linear, ...) on ``2x - 1`` inside it."""
    first: nn.Linear = model[1]
    moved = nn.Linear(first.in_features, first.out_features)
    with torch.no_grad():
        moved.weight.copy_(first.weight / 2)
        moved.bias.copy_(first.bias + first.weight.sum(1) / 2)
    return nn.Sequential(Centred(), model[0], moved, *model[2:]).eval()


def candidates(model: nn.Module, x: Tensor, threat: ns.Threat) -> int:
    """How many perturbed dense layers have an input of both signs that bab may split."""
    graph = read_model(model, x)
    budgets = {b.index: b for b in perturbed_layers(graph, threat)}
    pool = _Domains(graph, budgets, x, torch.zeros(len(x), dtype=torch.long), threat, 0.0, 10)
    with torch.no_grad():
        pool.start(torch.full((len(x), 10), -float("inf")))
    return len(pool.weighted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--bab-seconds", type=float, default=3.0, help="bab's limit per example")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load("mnist5k", seed=0)
    config = TrainConfig(method="standard", epochs=args.epochs, seed=0)
    model = train(config, data, progress=False).model.eval()
    x, y = data.x_test[: args.examples], data.y_test[: args.examples]
    other = centred(model)
    torch.testing.assert_close(other(x), model(x), atol=1e-4, rtol=1e-4)
    print(
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, load {os.getloadavg()[0]:.1f}; standard MLP, "
        f"{args.epochs} epochs; {len(x)} test digits; bab {args.bab_seconds:g} s per example",
        flush=True,
    )
    print(
        "| inputs | eps_x | eps_w | split candidates | splits | certified | broken | unknown | s |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|", flush=True)
    for label, net in (("[0, 1]", model), ("[-1, 1]", other)):
        for eps_x, eps_w in POINTS:
            threat = ns.Threat(eps_x=eps_x, eps_w=eps_w)
            count = candidates(net, x[:8], threat)
            for weight_splits in (False, True):
                start = time.perf_counter()
                found = ns.bab(
                    net, x, y, threat, time_limit=args.bab_seconds, weight_splits=weight_splits
                )
                seconds = time.perf_counter() - start
                kind = "ReLU + weight" if weight_splits else "ReLU"
                s = found.status
                print(
                    f"| {label} | {eps_x:g} | {eps_w:g} | {count} | {kind} | "
                    f"{s.count('certified')} | {s.count('broken')} | {s.count('unknown')} | "
                    f"{seconds:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
