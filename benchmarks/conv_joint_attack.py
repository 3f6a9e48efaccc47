"""Joint attacks on a trained ResNet-18-style conv net: the library's attack against a naive one
(issue 23, item 5).

The model is a torchvision-style ResNet-18 (BasicBlocks [2, 2, 2, 2], BatchNorm, a 3x3 stem
for 32x32 inputs, widths ``w, 2w, 4w, 8w``), written here (no torchvision), trained
``--epochs`` epochs on the 4,000 mnist5k training digits (zero-padded to 32x32, one channel),
one model per ``--models`` training seed, each cached as safetensors in ``--out``. The attacked
examples are the first ``--batch`` test digits the model classifies correctly.

Attacks at the same steps (gradients), loss (cross-entropy), one random start and best-so-far
margin over the iterates:

- ``input-only``: ``ns.attack`` (PGD) with ``eps_w = 0``;
- ``joint``: ``ns.attack`` (PGD) under the joint threat (one kernel per example per
  convolution, the lemma on the final Linear);
- ``joint linear``: ``ns.attack(schedule="linear")``, PGD whose step decreases linearly from
  2 radii (the same cost);
- ``joint apgd``: ``ns.attack(method="apgd")``, the library's APGD on the same variables
  (``steps`` gradients too);
- ``naive``: PGD on the input and on a full weight copy per example of every parameter the
  joint threat moves, run through ``torch.func.functional_call`` under ``vmap``;
- ``naive linear``: the naive PGD with the linear schedule (its like-for-like baseline);
- ``naive apgd``: the library's APGD code (``nonsingular.attacks.apgd.apgd``) on those same
  naive variables (``NaiveSpace``): the like-for-like baseline of ``joint apgd``.

PGD's step is ``2.5 / steps`` of each ball's radius in both constant-step PGD attacks.
Strength is compared per example, paired, over ``--seeds`` seeds of the random start (the
attacks' only randomness): each attack's median margin per seed and, for each (attack,
baseline) of ``PAIRS``, the median of the per-example difference of their margins and on how
many seeds the attack's median is no higher than the baseline's. A step's time is
``(T(long) - T(short)) / (long - short steps)`` (set-up cancels), timings interleaved, median
of ``--repeats``, on the first model. ``--kernels`` also times, for each convolution shape of
the model, one forward + backward of a per-example convolution in
each parametrization (grouped convolution, unfold + batched matmul, vmap of ``F.conv2d``).
``--zero-start`` also runs the joint and the naive PGD from the unperturbed point (no
randomness) and compares their margins example by example.

    python benchmarks/conv_joint_attack.py [--width 16] [--batch 64] [--steps 10]
        [--eps-x 0.02] [--eps-w 0.003] [--w-mode relative] [--seeds 5] [--models 2]
        [--epochs 5] [--out runs/conv-joint-attack] [--repeats 3] [--kernels] [--wider]
        [--zero-start]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.func import functional_call, vmap

import nonsingular as ns
from nonsingular.attacks.apgd import apgd
from nonsingular.attacks.options import LINEAR_STEP, scheduled
from nonsingular.attacks.space import JointSpace, margins
from nonsingular.balls import BoxBall
from nonsingular.data import load
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

    def __init__(self, width: int = 16, classes: int = 10, channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
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


def digits32(x: Tensor) -> Tensor:
    """mnist5k digits ``(N, 1, 28, 28)`` zero-padded to ``(N, 1, 32, 32)`` (the 32x32 stem)."""
    return F.pad(x, (2, 2, 2, 2))


def trained(width: int, seed: int, epochs: int, out: Path) -> tuple[nn.Module, float]:
    """The ResNet-18 trained ``epochs`` epochs on the 4,000 mnist5k training digits (Adam,
    batch 64, seed ``seed``), and its clean accuracy on the 1,000 test digits; cached as
    safetensors in ``out`` (weights and buffers; no pickle), so later runs and seeds reuse it."""
    data = load("mnist5k")
    x_test, y_test = digits32(data.x_test), data.y_test
    path = out / f"resnet18-w{width}-seed{seed}-{epochs}ep.safetensors"
    torch.manual_seed(seed)
    model = ResNet18(width)
    if path.exists():
        model.load_state_dict(load_file(str(path)))
    else:
        x, y = digits32(data.x_train), data.y_train
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=g).split(64):
                optimizer.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path))
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return model, accuracy


def naive_joint_pgd(
    model, x, y, threat, names, steps, seed=0, schedule="constant", random_start=True
):
    """Per-example joint PGD with a full copy of every moved weight per example (vmap of
    ``functional_call``, ``NaiveSpace``), linf balls, its step written as a user would write it;
    the best-so-far margin of each example. Its steps are the library's for ``schedule``
    (``scheduled``): 2.5 / steps radii, or linear from 2 radii. ``random_start=False``: start
    at the unperturbed point (no randomness at all)."""
    space = NaiveSpace(model, threat, names)
    alpha = LINEAR_STEP if schedule == "linear" else 2.5 / steps
    state = space.random(x, seed)
    if not random_start:
        state = space.clamp_input(x, {k: torch.zeros_like(v) for k, v in state.items()})
    eps, radii = threat.eps_x, {n: space.balls[n].radius for n in names}
    best = torch.full((len(x),), float("inf"))
    for it in range(steps + 1):
        last = it == steps
        state = {k: v.requires_grad_(not last) for k, v in state.items()}
        with torch.set_grad_enabled(not last):
            logits = space.forward(x, state)
        best = torch.minimum(best, margins(logits.detach(), y))
        if last:
            break
        loss = F.cross_entropy(logits, y, reduction="sum")
        grads = dict(zip(state, torch.autograd.grad(loss, list(state.values())), strict=True))
        a = scheduled(alpha, schedule, it, steps)
        with torch.no_grad():
            d = (state["x"] + a * eps * grads["x"].sign()).clamp(-eps, eps)
            moved = {"x": (x + d).clamp(0, 1) - x}
            for n in names:
                step = state[n] + a * radii[n] * grads[n].sign()
                moved[n] = torch.maximum(torch.minimum(step, radii[n]), -radii[n])
            state = moved
    return best


class NaiveSpace:
    """The naive attack's variables for the library's APGD (``apgd``, the same code as the
    joint one): the input and a full copy per example of every moved weight, run through
    ``functional_call`` under ``vmap``; the random start drawn as ``naive_joint_pgd`` draws it."""

    is_shared = False

    def __init__(self, model: nn.Module, threat: ns.Threat, names: list[str]) -> None:
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.buffers = dict(model.named_buffers())
        self.threat, self.names = threat, names
        radii = {n: radius(threat, self.params[n]) for n in names}
        self.balls = {"x": BoxBall(threat.eps_x), **{n: BoxBall(radii[n], 1) for n in names}}

        def logits_one(delta, xi):
            perturbed = {**self.params, **{n: self.params[n] + delta[n] for n in delta}}
            return functional_call(model, (perturbed, self.buffers), (xi[None],))[0]

        self.batched = vmap(logits_one)

    def random(self, x: Tensor, seed: int, positions: Tensor | None = None) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(seed)
        state = {"x": (2 * torch.rand(x.shape, generator=g) - 1) * self.threat.eps_x}
        for n in self.names:
            r = self.balls[n].radius
            state[n] = (2 * torch.rand((len(x), *self.params[n].shape), generator=g) - 1) * r
        return self.clamp_input(x, state)

    def clamp_input(self, x: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
        state["x"] = (x + state["x"]).clamp(0, 1) - x
        return state

    def forward(self, x: Tensor, state: dict[str, Tensor]) -> Tensor:
        return self.batched({n: state[n] for n in self.names}, x + state["x"])


def naive_joint_apgd(model, x, y, threat, names, steps, seed=0):
    """The library's APGD (``nonsingular.attacks.apgd.apgd``) on the naive attack's variables
    (``NaiveSpace``); the best-so-far margin of each example."""
    best = torch.full((len(x),), float("inf"))

    def offer(logits: Tensor, state) -> None:
        best.copy_(torch.minimum(best, margins(logits, y)))

    def ce(logits: Tensor, labels: Tensor, target: Tensor | None) -> Tensor:
        return F.cross_entropy(logits, labels, reduction="none")

    space = NaiveSpace(model, threat, names)
    apgd(space, x, y, steps=steps, loss=ce, seed=seed, on_iterate=offer)  # type: ignore[arg-type]
    return best


def correct(model: nn.Module, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` mnist5k test digits (padded to 32x32) that ``model`` classifies
    correctly, and their labels (every example starts correct, so margins compare attacks)."""
    data = load("mnist5k")
    x, y = digits32(data.x_test), data.y_test
    with torch.no_grad():
        right = model(x).argmax(1) == y
    return x[right][:n], y[right][:n]


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


def attacks(model, x, y, threat, names, steps: int) -> dict[str, Callable[[int], Tensor]]:
    """Each attack at ``steps`` steps as a function of the seed: its best-so-far margins."""
    common = {"steps": steps, "restarts": 1, "loss": "ce"}
    input_only = ns.Threat(eps_x=threat.eps_x)
    return {
        "input-only": lambda s: ns.attack(model, x, y, input_only, **common, seed=s).margins,
        "joint": lambda s: ns.attack(model, x, y, threat, **common, seed=s).margins,
        "joint linear": lambda s: (
            ns.attack(model, x, y, threat, schedule="linear", **common, seed=s).margins
        ),
        "joint apgd": lambda s: (
            ns.attack(model, x, y, threat, method="apgd", **common, seed=s).margins
        ),
        "naive": lambda s: naive_joint_pgd(model, x, y, threat, names, steps, s),
        "naive linear": lambda s: naive_joint_pgd(model, x, y, threat, names, steps, s, "linear"),
        "naive apgd": lambda s: naive_joint_apgd(model, x, y, threat, names, steps, s),
    }


def strength(model, x, y, threat, names, args) -> dict[str, list[Tensor]]:
    """Every attack's margins for each seed of the random start, printed per seed: median
    margin, robust accuracy and (joint attacks) the median paired difference to naive."""
    runs = attacks(model, x, y, threat, names, args.steps)
    found: dict[str, list[Tensor]] = {k: [] for k in runs}
    print(
        "| seed | "
        + " | ".join(f"{k} median (robust acc.)" for k in runs)
        + " | "
        + " | ".join(f"{a} - {b}, paired median" for a, b in PAIRS)
        + " |"
    )
    print("|---:|" + "---:|" * (len(runs) + len(PAIRS)))
    for seed in range(args.seeds):
        for k, fn in runs.items():
            found[k].append(fn(seed))
        row = [
            f"{float(m[-1].median()):.4f} ({float((m[-1] > 0).float().mean()):.3f})"
            for m in found.values()
        ]
        diffs = [f"{float((found[a][-1] - found[b][-1]).median()):+.4f}" for a, b in PAIRS]
        print(f"| {seed} | " + " | ".join(row + diffs) + f" |  (load {os.getloadavg()[0]:.1f})")
    return found


def zero_start(model, x, y, threat, names, steps: int) -> None:
    """The joint and the naive PGD both started at the unperturbed point (no random start, so
    no randomness): the same algorithm on the same variables up to the final Linear's lemma
    vector, so their margins should agree example by example; printed: the largest and the
    median per-example difference, and on how many examples joint ends at or below naive."""
    for schedule in ("constant", "linear"):
        joint = ns.attack(
            model,
            x,
            y,
            threat,
            steps=steps,
            restarts=1,
            loss="ce",
            schedule=schedule,
            random_start=False,
        ).margins
        naive = naive_joint_pgd(model, x, y, threat, names, steps, 0, schedule, False)
        diff = joint - naive
        print(
            f"zero start, {schedule} steps: joint median margin {float(joint.median()):.4f}, "
            f"naive {float(naive.median()):.4f}; joint - naive per example: median "
            f"{float(diff.median()):+.2e}, largest |.| {float(diff.abs().max()):.2e}; joint at "
            f"or below naive on {int((diff <= 0).sum())} of {len(diff)}, within 1e-4 above on "
            f"{int(((diff > 0) & (diff <= 1e-4)).sum())}"
        )


def paired_summary(found: dict[str, list[Tensor]]) -> None:
    """Over the seeds, for each (attack, baseline) of ``PAIRS``: how often the attack's median
    margin is no higher than the baseline's, the median of the per-seed paired median
    differences, and the share of (example, seed) pairs where it ends at or below it."""
    for k, base in PAIRS:
        pairs = list(zip(found[k], found[base], strict=True))
        wins = sum(float(a.median()) <= float(b.median()) for a, b in pairs)
        diffs = [float((a - b).median()) for a, b in pairs]
        at_most = float(torch.cat([(a <= b).float() for a, b in pairs]).mean())
        print(
            f"{k} against {base}: median margin no higher on {wins} of {len(pairs)} seeds; "
            f"per-seed paired median difference {min(diffs):+.4f} to {max(diffs):+.4f} (median "
            f"{statistics.median(diffs):+.4f}); at or below on {at_most:.2f} of "
            "(example, seed) pairs"
        )


def step_times(model, x, y, threat, names, args) -> dict[str, float]:
    """Seconds per step of every attack: ``(T(long) - T(short)) / (long - short)``, the
    attacks interleaved, median of ``--repeats``."""
    runs = {k: (lambda s, k=k: attacks(model, x, y, threat, names, s)[k](0)) for k in ATTACKS}
    short, long = max(1, args.steps // 5), args.steps
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append((seconds(fn, long) - seconds(fn, short)) / (long - short))
    return {k: statistics.median(v) for k, v in times.items()}


ATTACKS = (
    "input-only",
    "joint",
    "joint linear",
    "joint apgd",
    "naive",
    "naive linear",
    "naive apgd",
)
# (attack, baseline) compared per example over the seeds
PAIRS = (
    ("joint", "naive"),
    ("joint linear", "naive"),
    ("joint linear", "naive linear"),
    ("joint apgd", "naive"),
    ("joint apgd", "naive apgd"),
)


def print_times(per_step: dict[str, float]) -> None:
    print("| attack | ms / step | / input-only | / naive | / naive apgd |")
    print("|---|---:|---:|---:|---:|")
    for name, t in per_step.items():
        print(
            f"| {name} | {1e3 * t:.1f} | {t / per_step['input-only']:.2f} | "
            f"{t / per_step['naive']:.2f} | {t / per_step['naive apgd']:.2f} |"
        )


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64, help="attacked test digits")
    parser.add_argument("--steps", type=int, default=10, help="steps of every attack")
    parser.add_argument("--eps-x", type=float, default=0.02)
    parser.add_argument("--eps-w", type=float, default=0.003)
    parser.add_argument("--w-mode", default="relative", choices=["absolute", "relative"])
    parser.add_argument(
        "--seeds", type=int, default=5, help="seeds of the random start (0: timings only)"
    )
    parser.add_argument("--models", type=int, default=2, help="trained models (seeds 0, 1..)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/conv-joint-attack"))
    parser.add_argument("--repeats", type=int, default=3, help="timings (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--kernels", action="store_true", help="also time conv kernels")
    parser.add_argument(
        "--zero-start",
        action="store_true",
        help="also joint against naive PGD both from the unperturbed point (no random start)",
    )
    parser.add_argument(
        "--wider", action="store_true", help="also a naive attack moving every *.weight"
    )
    return parser.parse_args()


def main() -> None:
    args = arguments()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threat = ns.Threat(eps_x=args.eps_x, eps_w=args.eps_w, w_mode=args.w_mode)
    print(
        f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, load "
        f"{os.getloadavg()[0]:.2f}; ResNet-18 width {args.width}, mnist5k padded to 32x32, "
        f"{args.epochs} epochs; {args.batch} correctly classified test digits, {args.steps} "
        f"steps; {threat.describe()}"
    )
    found: dict[str, list[Tensor]] = {k: [] for k in ATTACKS}
    for index in range(args.models):
        model, accuracy = trained(args.width, index, args.epochs, args.out)
        x, y = correct(model, args.batch)
        names = moved(model, x, threat)
        print(
            f"\nmodel {index} (training seed {index}): clean accuracy {accuracy:.3f} on the "
            f"1,000 test digits; {len(names)} weights moved"
        )
        if args.seeds > 0:
            for k, v in strength(model, x, y, threat, names, args).items():
                found[k] += v
        if args.zero_start:
            zero_start(model, x, y, threat, names, args.steps)
        if index == 0 and args.wider:
            every = [n for n, _ in model.named_parameters() if n.endswith("weight")]
            wider = naive_joint_pgd(model, x, y, threat, every, args.steps, 0)
            print(
                f"naive attack moving every *.weight ({len(every)}: BatchNorm scales too, a "
                f"larger threat), seed 0: median margin {float(wider.median()):.4f}"
            )
        if index == 0 and args.repeats > 0:
            print_times(step_times(model, x, y, threat, names, args))
            print(f"load after the timings: {os.getloadavg()[0]:.2f}")
        if index == 0 and args.kernels:
            print("| per-example conv kernel (all convs, fwd + bwd) | ms |")
            print("|---|---:|")
            for name, t in kernel_times(len(x), conv_shapes(model, x), args.repeats).items():
                print(f"| {name} | {1e3 * t:.1f} |")
    if args.seeds > 0:
        print(f"\nover {args.models} model(s) x {args.seeds} seeds:")
        paired_summary(found)
    print(f"load at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
