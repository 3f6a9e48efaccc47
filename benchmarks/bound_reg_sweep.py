"""How the bound-reg defaults were chosen: a sweep of (lambda_x, lambda_w) for both bounds,
scored on a validation split carved from the training set (train on 3,500, validate on the
other 500 training digits; the test set is never looked at), next to standard and joint-at.

Score: clean validation accuracy, and robust accuracy under PGD-10 averaged over the joint
grid eps_x in {0.02, 0.05, 0.1} x eps_w in {5e-4, 1e-3, 2e-3} (absolute, per-example).

    python benchmarks/bound_reg_sweep.py   # about 2 minutes on 2 cores
"""

from __future__ import annotations

import nonsingular as ns
from nonsingular.data import Dataset, load

LAMBDAS = [
    (1e-3, 1e-3),
    (3e-3, 3e-3),
    (1e-2, 1e-2),
    (0.0, 1e-2),
    (1e-2, 0.0),
    (3e-2, 3e-2),
    (1e-1, 1e-1),
]


def main() -> None:
    full = load("mnist5k")
    data = Dataset(
        "mnist5k-validation",
        full.x_train[:3500],
        full.y_train[:3500],
        full.x_train[3500:],
        full.y_train[3500:],
        full.classes,
    )
    x, y = data.x_test, data.y_test
    joint = ns.grid(eps_x=[0.02, 0.05, 0.1], eps_w=[5e-4, 1e-3, 2e-3])
    configs = [{"method": "standard"}, {"method": "joint-at"}]
    configs += [
        {"method": "bound-reg", "bound": bound, "lambda_x": lx, "lambda_w": lw}
        for bound in ("closed-form", "recursive")
        for lx, lw in LAMBDAS
    ]
    print("| method | bound | lambda_x | lambda_w | clean | joint robust (mean of 9) |")
    print("|---|---|---:|---:|---:|---:|")
    for config in configs:
        model = ns.train(
            ns.TrainConfig(epochs=20, eval_size=0, **config), data, progress=False
        ).model
        clean = ns.training.accuracy(model, x, y)
        robust = [ns.attack(model, x, y, t, steps=10).robust_accuracy for t in joint]
        print(
            f"| {config['method']} | {config.get('bound', '')} | {config.get('lambda_x', '')} "
            f"| {config.get('lambda_w', '')} | {clean:.1%} | {sum(robust) / len(robust):.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
