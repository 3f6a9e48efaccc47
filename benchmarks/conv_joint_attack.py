"""Joint attacks on a ResNet-18-style conv net: the library's attack against a naive one (issue 23).

The model is a torchvision-style ResNet-18 (BasicBlocks [2, 2, 2, 2], BatchNorm, a 3x3 stem
for 32x32 inputs, widths ``w, 2w, 4w, 8w``), written here (no torchvision), with random weights
and BatchNorm statistics calibrated on random images; the labels are its own clean predictions,
so every example starts correct and margins compare the attacks' strength directly.

Three attacks at the same steps, step size (``2.5 / steps`` of each ball's radius), loss
(cross-entropy), one random start and best-so-far margin over the iterates:

- ``input-only``: ``ns.attack`` with ``eps_w = 0``;
- ``joint``: ``ns.attack`` under the joint threat (one kernel per example per convolution, the
  lemma on the final Linear);
- ``naive``: PGD on the input and on a full weight copy per example of every parameter the
  joint threat moves, run through ``torch.func.functional_call`` under ``vmap``.

A step's time is ``(T(long) - T(short)) / (long - short steps)`` (set-up cancels), timings
interleaved, median of ``--repeats``. ``--kernels`` also times, for each convolution shape of
the model, one forward + backward of a per-example convolution in each parametrization
(grouped convolution, unfold + batched matmul, vmap of ``F.conv2d``).

    python benchmarks/conv_joint_attack.py [--width 16] [--batch 32] [--steps 10] [--kernels]
        [--eps-x 0.001] [--eps-w 0.0002] [--w-mode relative] [--seeds 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

import nonsingular as ns
from nonsingular.attacks.space import JointSpace, margins
from nonsingular.model.lemma import radius
from nonsingular.model.verify import read_batch


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 conv-BN, a 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or inputs != width:
            self.downsample = nn.Sequential(
                nn.Conv2d(inputs, width, 1, stride, bias=False), nn.BatchNorm2d(width)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (CIFAR stem: 3x3 conv, no max-pool)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, inputs = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**i
            layers.append(nn.Sequential(BasicBlock(inputs, out, stride), BasicBlock(out, out, 1)))
            inputs = out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def calibrated(width: int, seed: int) -> nn.Module:
    """A random ResNet-18 whose BatchNorm statistics are those of random images (so that
    activations keep their scale through the 20 layers), in eval mode."""
    torch.manual_seed(seed)
    model = ResNet18(width)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(64, 3, 32, 32))
    return model.eval()


def naive_joint_pgd(model, x, y, threat, names, steps, seed=0):
    """Per-example joint PGD with a full copy of every moved weight per example (vmap of
    ``functional_call``), linf balls; the best-so-far margin of each example."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    radii = {n: radius(threat, params[n]) for n in names}
    alpha = 2.5 / steps
    g = torch.Generator().manual_seed(seed)
    d = (2 * torch.rand(x.shape, generator=g) - 1) * threat.eps_x
    d = (x + d).clamp(0, 1) - x
    deltas = {
        n: (2 * torch.rand((len(x), *params[n].shape), generator=g) - 1) * radii[n] for n in names
    }

    def logits_one(delta, xi):
        perturbed = {**params, **{n: params[n] + delta[n] for n in delta}}
        return functional_call(model, (perturbed, buffers), (xi[None],))[0]

    batched = vmap(logits_one)
    best = torch.full((len(x),), float("inf"))
    for it in range(steps + 1):
        last = it == steps
        deltas = {n: v.requires_grad_(not last) for n, v in deltas.items()}
        d.requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            logits = batched(deltas, x + d)
        best = torch.minimum(best, margins(logits.detach(), y))
        if last:
            break
        loss = F.cross_entropy(logits, y, reduction="sum")
        grads = torch.autograd.grad(loss, [d, *deltas.values()])
        with torch.no_grad():
            d = (d + alpha * threat.eps_x * grads[0].sign()).clamp(-threat.eps_x, threat.eps_x)
            d = (x + d).clamp(0, 1) - x
            deltas = {
                n: torch.maximum(
                    torch.minimum(v + alpha * radii[n] * gr.sign(), radii[n]), -radii[n]
                )
                for (n, v), gr in zip(deltas.items(), grads[1:], strict=True)
            }
    return best


def moved(model, x, threat) -> list[str]:
    """The parameters the library's joint attack moves under ``threat`` (the naive one moves
    the same ones, in parameter space)."""
    graph = read_batch(model, x, model(x).argmax(1))[0]
    space = JointSpace(graph, threat, x)
    return [k.name for k in space.balls if k.kind in ("weight", "lemma")]


def seconds(fn, steps: int) -> float:
    start = time.perf_counter()
    fn(steps)
    return time.perf_counter() - start


def kernel_times(batch: int, shapes, repeats: int) -> dict[str, float]:
    """Seconds of one forward + backward (to the input and the per-example kernels) of every
    convolution ``(c_in, c_out, kernel, stride, padding, size)`` in ``shapes``, summed, per
    parametrization; each checked against the grouped one first."""

    def grouped(h, w, conv):
        b = h.shape[0]
        z = F.conv2d(
            h.reshape(1, -1, *h.shape[2:]),
            w.reshape(-1, *w.shape[2:]),
            stride=conv[0],
            padding=conv[1],
            groups=b,
        )
        return z.reshape(b, -1, *z.shape[2:])

    def unfold(h, w, conv):
        b, k = h.shape[0], w.shape[-1]
        cols = F.unfold(h, k, padding=conv[1], stride=conv[0])  # (B, C k k, P)
        z = torch.bmm(w.reshape(b, w.shape[1], -1), cols)
        side = (h.shape[-1] + 2 * conv[1] - k) // conv[0] + 1
        return z.reshape(b, -1, side, side)

    def vmapped(h, w, conv):
        one = lambda hi, wi: F.conv2d(hi[None], wi, stride=conv[0], padding=conv[1])[0]  # noqa: E731
        return vmap(one)(h, w)

    kinds = {"grouped conv": grouped, "unfold + bmm": unfold, "vmap F.conv2d": vmapped}
    found: dict[str, list[float]] = {k: [] for k in kinds}
    cases = []
    for c_in, c_out, k, stride, pad, size in shapes:
        h = torch.rand(batch, c_in, size, size, requires_grad=True)
        w = torch.randn(batch, c_out, c_in, k, k, requires_grad=True)
        cases.append((h, w, (stride, pad)))
        ref = grouped(h, w, (stride, pad))
        for name, fn in kinds.items():
            if not torch.allclose(fn(h, w, (stride, pad)), ref, atol=1e-4, rtol=1e-4):
                raise SystemExit(f"{name} differs from the grouped convolution")
    for _ in range(repeats):
        for name, fn in kinds.items():
            start = time.perf_counter()
            for h, w, conv in cases:
                z = fn(h, w, conv)
                torch.autograd.grad(z.sum(), [h, w])
            found[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in found.items()}


def conv_shapes(model: nn.Module, x: Tensor):
    """``(c_in, c_out, kernel, stride, padding, size)`` of every convolution on ``x``."""
    shapes = []

    def hook(m, inputs, _):
        shapes.append(
            (
                m.in_channels,
                m.out_channels,
                m.kernel_size[0],
                m.stride[0],
                m.padding[0],
                inputs[0].shape[-1],
            )
        )

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return shapes


def strength_over_seeds(model, x, y, threat, names, args) -> None:
    """Median margins of the joint and the naive attack for several seeds (the random start
    is each attack's only randomness), and how often the joint one ends at or below."""
    print("| seed | joint median margin | naive median margin | examples joint <= naive |")
    print("|---:|---:|---:|---:|")
    for seed in range(args.seed, args.seed + args.seeds):
        joint = ns.attack(model, x, y, threat, steps=args.steps, restarts=1, loss="ce", seed=seed)
        naive = naive_joint_pgd(model, x, y, threat, names, args.steps, seed)
        at_most = float((joint.margins <= naive).float().mean())
        print(
            f"| {seed} | {float(joint.margins.median()):.4f} | {float(naive.median()):.4f} | "
            f"{at_most:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps of every attack")
    parser.add_argument("--eps-x", type=float, default=0.001)
    parser.add_argument("--eps-w", type=float, default=0.0002)
    parser.add_argument("--w-mode", default="relative", choices=["absolute", "relative"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--kernels", action="store_true", help="also time conv kernels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="strength over this many seeds")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = calibrated(args.width, args.seed)
    x = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        y = model(x).argmax(1)
    joint = ns.Threat(eps_x=args.eps_x, eps_w=args.eps_w, w_mode=args.w_mode)
    input_only = ns.Threat(eps_x=args.eps_x)
    names = moved(model, x, joint)
    common = {"steps": args.steps, "restarts": 1, "loss": "ce", "seed": args.seed}
    print(
        f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, load "
        f"{os.getloadavg()[0]:.2f}; ResNet-18 width {args.width}, 32x32, batch {args.batch}, "
        f"{args.steps} steps; eps_x={args.eps_x:.4g} linf, eps_w={args.eps_w:g} {args.w_mode} "
        f"linf, per-example; {len(names)} weights moved"
    )
    strength = {
        "input-only": ns.attack(model, x, y, input_only, **common).margins,
        "joint": ns.attack(model, x, y, joint, **common).margins,
        "naive": naive_joint_pgd(model, x, y, joint, names, args.steps, args.seed),
    }
    variants = {
        "input-only": lambda s: ns.attack(model, x, y, input_only, **{**common, "steps": s}),
        "joint": lambda s: ns.attack(model, x, y, joint, **{**common, "steps": s}),
        "naive": lambda s: naive_joint_pgd(model, x, y, joint, names, s, args.seed),
    }
    short, long = max(1, args.steps // 5), args.steps
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append((seconds(fn, long) - seconds(fn, short)) / (long - short))
    per_step = {k: statistics.median(v) for k, v in times.items()}
    print("| attack | median margin | robust accuracy | ms/step | / input-only | / naive |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in strength.items():
        t = per_step[name]
        print(
            f"| {name} | {float(m.median()):.4f} | {float((m > 0).float().mean()):.3f} | "
            f"{1e3 * t:.1f} | {t / per_step['input-only']:.2f} | {t / per_step['naive']:.2f} |"
        )
    print(f"load after: {os.getloadavg()[0]:.2f}")
    every = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    wider = naive_joint_pgd(model, x, y, joint, every, args.steps, args.seed)
    print(
        f"naive attack moving every *.weight ({len(every)}: BatchNorm scales too, a larger "
        f"threat): median margin {float(wider.median()):.4f}, robust accuracy "
        f"{float((wider > 0).float().mean()):.3f}"
    )
    if args.seeds > 1:
        strength_over_seeds(model, x, y, joint, names, args)
    if args.kernels:
        shapes = conv_shapes(model, x)
        print("| per-example conv kernel (all convs, fwd + bwd) | ms |")
        print("|---|---:|")
        for name, t in kernel_times(args.batch, shapes, args.repeats).items():
            print(f"| {name} | {1e3 * t:.1f} |")


if __name__ == "__main__":
    main()
