"""Per-step cost of the per-example joint attack, side by side with the input-only attack and
(for the MLP) with a naive per-example attack that materializes a weight copy per example
(torch.func.vmap).

The lemma (DESIGN section 2) predicts, on the MLP: joint / input-only close to 1 (target
<= 1.5), and a large speed-up over the naive attack (target >= 20x). On the small ResNet the
convolutions hold one kernel per example (the lemma does not apply to shared kernels), so a
joint step also computes every convolution's per-example weight gradient. A step's time is the
difference of a long and a short attack divided by the difference in steps, so per-call set-up
(reading and checking the model) cancels. Timings are interleaved (A B C A B C ...) and the
median is reported, so drift of a shared machine hits every variant alike.

    python benchmarks/attack_speed.py [--model mlp|resnet|resmlp] [--batch 500] [--steps 100]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

import nonsingular as ns
from nonsingular.data import load
from nonsingular.training import TrainConfig, train


def naive_joint_pgd(model, x, y, eps_x, eps_w, steps, alpha):
    """Per-example joint PGD holding a full weight perturbation per example: (B, *W.shape)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    weights = [n for n in params if n.endswith("weight")]
    deltas = {n: torch.zeros(len(x), *params[n].shape) for n in weights}
    d = torch.zeros_like(x)

    def loss_one(delta, xi, yi):
        perturbed = {n: params[n] + delta[n] if n in delta else params[n] for n in params}
        return F.cross_entropy(functional_call(model, perturbed, (xi[None],)), yi[None])

    batched_loss = vmap(loss_one)
    for _ in range(steps):
        deltas = {n: v.requires_grad_() for n, v in deltas.items()}
        d.requires_grad_()
        loss = batched_loss(deltas, (x + d).clamp(0, 1), y).sum()
        grads = torch.autograd.grad(loss, [d, *deltas.values()])
        with torch.no_grad():
            d = (d + alpha * eps_x * grads[0].sign()).clamp(-eps_x, eps_x)
            deltas = {
                n: (v + alpha * eps_w * g.sign()).clamp(-eps_w, eps_w)
                for (n, v), g in zip(deltas.items(), grads[1:], strict=True)
            }
    return d, deltas


class DenseBlock(torch.nn.Module):
    """``relu(x + W2 relu(W1 x))``: a residual block of dense layers."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(width, width)
        self.fc2 = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.fc2(F.relu(self.fc1(x))))


def residual_mlp(in_shape=(1, 28, 28), classes: int = 10, width: int = 256) -> torch.nn.Module:
    """A residual network of dense layers (784-256, two residual blocks, 256-10): residual
    structure without shared kernels, so the lemma applies at every layer."""
    inputs = 1
    for s in in_shape:
        inputs *= s
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(inputs, width),
        torch.nn.ReLU(),
        DenseBlock(width),
        DenseBlock(width),
        torch.nn.Linear(width, classes),
    )


def seconds(fn, steps: int) -> float:
    start = time.perf_counter()
    fn(steps)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100, help="steps of the long run")
    parser.add_argument(
        "--naive-batch",
        type=int,
        default=100,
        help="the naive attack's batch (its memory grows with B x weights)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", choices=("mlp", "resnet", "resmlp"), default="mlp")
    args = parser.parse_args()

    data = load("mnist5k")
    # a trained model, so the attack works on a realistic batch (it skips broken examples)
    if args.model == "resmlp":
        torch.manual_seed(0)
        config = TrainConfig(epochs=10)
        model = train(config, data, model=residual_mlp(), progress=False).model
    else:
        model = train(TrainConfig(model=args.model, epochs=10), data, progress=False).model
    x, y = data.x_test[: args.batch], data.y_test[: args.batch]
    xn, yn = x[: args.naive_batch], y[: args.naive_batch]
    eps_x, eps_w, steps = 0.05, 1e-3, args.steps
    joint = ns.Threat(eps_x=eps_x, eps_w=eps_w)
    input_only = ns.Threat(eps_x=eps_x)

    short = max(1, steps // 5)
    variants = {
        "input-only PGD": lambda s: ns.attack(model, x, y, input_only, steps=s),
        "joint PGD": lambda s: ns.attack(model, x, y, joint, steps=s),
    }
    if args.model == "mlp":
        variants["joint PGD, naive batch"] = lambda s: ns.attack(model, xn, yn, joint, steps=s)
        variants["joint PGD (naive vmap)"] = lambda s: naive_joint_pgd(
            model, xn, yn, eps_x, eps_w, s, 2.5 / s
        )
    naive_steps = (max(1, short // 4), max(2, steps // 10))  # the naive attack is slow
    for fn in variants.values():  # warm-up
        fn(2)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            lo, hi = naive_steps if "vmap" in name else (short, steps)
            times[name].append((seconds(fn, hi) - seconds(fn, lo)) / (hi - lo))
    per_step = {k: statistics.median(v) for k, v in times.items()}

    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    names = {
        "mlp": "784-256-256-10 MLP",
        "resnet": "small ResNet (channels 16, 32)",
        "resmlp": "residual MLP (784-256, two dense residual blocks, 256-10)",
    }
    print(
        f"model: {names[args.model]}, 10 epochs; threat eps_x={eps_x}, eps_w={eps_w} "
        f"(absolute, per-example); per step = (T({steps} steps) - T({short} steps)) / "
        f"{steps - short}; median of {args.repeats} interleaved runs\n"
    )
    print(f"{'variant':34s} {'batch':>6s} {'ms/step':>9s} {'ms/step/example':>16s}")
    for name, t in per_step.items():
        b = args.naive_batch if "naive" in name else args.batch
        print(f"{name:34s} {b:6d} {1e3 * t:9.2f} {1e3 * t / b:16.4f}")
    ratio = per_step["joint PGD"] / per_step["input-only PGD"]
    print(f"\njoint / input-only per step:          {ratio:6.2f}x")
    if args.model == "mlp":
        speedup = per_step["joint PGD (naive vmap)"] / per_step["joint PGD, naive batch"]
        print(
            f"speed-up over naive per-example vmap:  {speedup:6.1f}x   (target >= 20, "
            f"same batch of {args.naive_batch})"
        )


if __name__ == "__main__":
    main()
