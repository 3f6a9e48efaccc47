"""Certified vs attacked robust accuracy of the standard mnist5k MLP over a small joint grid,
as the Markdown table recorded in docs/certificates.md.

    python benchmarks/certified_table.py [--epochs 20]
"""

from __future__ import annotations

import argparse
import platform

import torch

import nonsingular as ns
from nonsingular.data import load
from nonsingular.training import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    data = load("mnist5k")
    model = train(TrainConfig(epochs=args.epochs), data, progress=False).model
    grid = ns.grid(eps_x=[0, 0.005, 0.01, 0.02], eps_w=[0, 1e-5, 1e-4, 5e-4])
    table = ns.evaluate(
        model,
        data,
        grid,
        {"steps": 50, "restarts": 2, "loss": "both"},
        certify=list(ns.certificates.METHODS),
        progress=False,
    )
    print(
        f"<!-- {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads -->"
    )
    print(table.to_markdown())
    print()
    for column in table.columns():
        print(f"{column}:")
        print(table.matrix_text(column))
    print(
        "\nseconds per grid point:",
        {
            k: round(sum(r.seconds[k] for r in table.rows) / len(table.rows), 2)
            for k in table.rows[0].seconds
        },
    )
    print("warnings:", table.warnings or "none")


if __name__ == "__main__":
    main()
