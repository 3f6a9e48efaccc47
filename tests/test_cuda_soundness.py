"""Certificates on a GPU hold for the model as it runs there: random graphs (in-place steps,
switch points, the edges of float32), random residual networks with batch norm, and every
kind of model in the zoo, bounded and run on CUDA with PyTorch's default settings (TF32 in
convolutions, not in matrix products). Skipped where no GPU is present;
``benchmarks/device_checks.sh`` runs them on a device machine."""

import pytest
from hypothesis import given, settings

from .test_any_model import (
    KIND_THREATS,
    check_sound_as_it_runs,
    graph_threats,
    labels,
    random_graphs,
)
from .test_forward_bounds import joint_threats, residual_networks
from .zoo import ZOO

DEVICE = "cuda"
EVERY = ["ibp", "crown", "alpha-crown", "bab"]
pytestmark = pytest.mark.cuda


@settings(max_examples=20, deadline=None)
@given(case=random_graphs(inplace=True), threat=graph_threats((0.0, 0.0, 0.02), (0.0, 0.01)))
def test_certificates_are_sound_on_cuda_on_random_graphs(case, threat):
    model, x, y = case
    check_sound_as_it_runs(model, x, y, threat, EVERY, device=DEVICE)


@settings(max_examples=20, deadline=None)
@given(
    case=random_graphs(magnitudes=True),
    threat=graph_threats(inputs=(0.0, 1e-3, 0.01), weights=(0.0, 1e-4, 1e-3)),
)
def test_certificates_are_sound_on_cuda_at_the_edges_of_float32(case, threat):
    model, x, y = case
    check_sound_as_it_runs(model, x, y, threat, EVERY, device=DEVICE)


@settings(max_examples=15, deadline=None)
@given(case=residual_networks(), threat=joint_threats())
def test_certificates_are_sound_on_cuda_on_residual_networks(case, threat):
    """Convolutions, batch norm and sums: crown over its own intermediate bounds (the first
    pass, the transposed convolutions), alpha-crown and bab, with TF32 in the convolutions."""
    model, x, y = case
    check_sound_as_it_runs(model, x, y, threat, ["crown", "alpha-crown", "bab"], device=DEVICE)


@pytest.mark.parametrize("kind", list(ZOO))
def test_certificates_are_sound_on_cuda_on_every_kind(kind):
    model, x = ZOO[kind]()
    y = labels(model, x)
    for threat in KIND_THREATS:
        check_sound_as_it_runs(model, x, y, threat, ["ibp", "crown", "alpha-crown"], device=DEVICE)
