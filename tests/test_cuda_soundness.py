"""Certificates on a GPU hold for the model as it runs there: random graphs (in-place steps,
switch points, the edges of float32), random residual networks with batch norm, and every
kind of model in the zoo, bounded and run on CUDA with PyTorch's default settings (TF32 in
convolutions, not in matrix products). Skipped where no GPU is present;
``benchmarks/device_checks.sh`` runs them on a device machine."""

import copy

import pytest
import torch
from hypothesis import given, settings

import nonsingular as ns
from nonsingular import Threat

from .test_any_model import graph_threats, labels, random_graphs
from .test_certificates import TOL, random_margins
from .test_forward_bounds import joint_threats, residual_networks
from .zoo import ZOO

DEVICE = "cuda"
pytestmark = pytest.mark.cuda


def check_sound_on(device, model, x, y, threat, methods):
    """No certificate computed on ``device`` where the model, run there on a materialized
    perturbation (random ones, the attack's), ranks a wrong class at or above the label, and
    no bound above any margin it computes there. The user's model stays where it is."""
    runs = copy.deepcopy(model).to(device)
    xs, ys = x.to(device), y.to(device)
    samples = random_margins(model, x, y, threat, n=100, device=device)
    samples = samples.double().nan_to_num(nan=float("-inf"))
    res = ns.attack(runs, xs, ys, threat, steps=20, restarts=1, loss="both", seed=1)
    for i in range(len(x)):
        logits = res.replay(runs, i)[0].double().cpu()
        margin = (logits[y[i]] - logits).nan_to_num(nan=float("-inf"))
        samples = torch.cat([samples, margin[None, None].expand(1, len(x), -1).clone()])
        samples[-1, [j for j in range(len(x)) if j != i]] = float("inf")
    worst = samples.scatter(2, y[None, :, None].expand(len(samples), -1, 1), float("inf"))
    worst = worst.min(2).values.min(0).values  # (B,) the lowest margin the model computed
    for method in methods:
        cert = ns.certify(runs, xs, ys, threat, method, time_limit=0.3)
        assert cert.lower.device.type == torch.device(device).type, method
        broken = cert.certified.cpu() & (worst <= 0)
        assert not bool(broken.any()), f"{method} certifies examples {broken.nonzero()}"
        lower = cert.lower.double().cpu()
        finite = torch.isfinite(lower)[None] & torch.isfinite(samples)
        gap = torch.where(finite, lower[None] - samples - TOL * (1 + samples.abs()), -1.0)
        assert float(gap.max()) <= 0, f"{method}: a perturbation went {gap.max()} below"


@settings(max_examples=20, deadline=None)
@given(case=random_graphs(inplace=True), threat=graph_threats((0.0, 0.0, 0.02), (0.0, 0.01)))
def test_certificates_are_sound_on_cuda_on_random_graphs(case, threat):
    model, x, y = case
    check_sound_on(DEVICE, model, x, y, threat, ["ibp", "crown", "alpha-crown", "bab"])


@settings(max_examples=20, deadline=None)
@given(
    case=random_graphs(magnitudes=True),
    threat=graph_threats(inputs=(0.0, 1e-3, 0.01), weights=(0.0, 1e-4, 1e-3)),
)
def test_certificates_are_sound_on_cuda_at_the_edges_of_float32(case, threat):
    model, x, y = case
    check_sound_on(DEVICE, model, x, y, threat, ["ibp", "crown", "alpha-crown", "bab"])


@settings(max_examples=15, deadline=None)
@given(case=residual_networks(), threat=joint_threats())
def test_certificates_are_sound_on_cuda_on_residual_networks(case, threat):
    """Convolutions, batch norm and sums: crown over its own intermediate bounds (the first
    pass, the transposed convolutions), alpha-crown and bab, with TF32 in the convolutions."""
    model, x, y = case
    check_sound_on(DEVICE, model, x, y, threat, ["crown", "alpha-crown", "bab"])


@pytest.mark.parametrize("kind", list(ZOO))
def test_certificates_are_sound_on_cuda_on_every_kind(kind):
    model, x = ZOO[kind]()
    y = labels(model, x)
    for threat in (
        Threat(eps_x=0.02, eps_w=0.005),
        Threat(eps_x=0.1, x_norm="l2", eps_w=0.02, w_mode="relative"),
    ):
        check_sound_on(DEVICE, model, x, y, threat, ["ibp", "crown", "alpha-crown"])
