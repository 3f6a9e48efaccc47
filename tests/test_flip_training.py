"""flip-at (training/flip_at.py): training against the worst bit flips of the quantized weights
makes a model that needs more flips to collapse than standard training."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import nonsingular as ns
from nonsingular import ConfigError
from nonsingular.data import load
from nonsingular.errors import UnsupportedModelError
from nonsingular.flips.grid import bit_changes
from nonsingular.model.architectures import mlp
from nonsingular.training import TrainConfig, train
from nonsingular.training.flip_at import on_grid, worst_flips
from nonsingular.training.registry import make_method

# sklearn's digits, small and fast; standard and flip-at differ in the method only
DIGITS = {
    "data": "digits",
    "hidden": (64,),
    "epochs": 3,
    "batch_size": 64,
    "lr": 1e-2,
    "augment": 0,
    "eval_size": 0,
}


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def test_flip_at_needs_more_flips_to_collapse_than_standard_training(digits):
    x, y = digits.x_test, digits.y_test  # 359 digits

    def flips_to_collapse(method):
        model = train(TrainConfig(method=method, **DIGITS), digits, progress=False).model
        q = ns.quantize(model)
        assert ns.training.accuracy(q, x, y) > 0.85, method  # both learn the task
        found = ns.flips_to(q, x, y, 0.11, max_flips=300)  # the shared bit search, replayed
        return found.flips if found.flips is not None else 301

    standard, defended = flips_to_collapse("standard"), flips_to_collapse("flip-at")
    # measured, seeds 0-4: standard 42, 44, 45, 20, 69 flips; flip-at 59, 64, 49, 68, 75 (seed
    # 0 here: 1.4x). Training on the grid without the flips (k = 0) gave 43, 44, 46 on seeds
    # 0-2: standard's count again, which this margin fails
    assert standard <= 300 and defended >= 1.25 * standard, (standard, defended)


def _mlp(seed: int, widths: tuple[int, ...]) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 40))
def test_the_worst_flips_are_k_single_bit_flips_that_raise_the_loss(seed, k):
    model = _mlp(seed, (6, 5, 4, 3))
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    params = dict(model.named_parameters())
    grids = {n: on_grid(params[n]) for n in ("0.weight", "2.weight", "4.weight")}
    changes = worst_flips(model, grids, x, y, k)
    moved = 0
    for name, (w, q, scale) in grids.items():
        assert torch.equal(w, ns.quantize(model).get_parameter(name))  # ns.quantize's grid
        assert not changes[name].requires_grad
        where = changes[name].flatten().nonzero().flatten()
        moved += len(where)
        options = bit_changes(q.flatten(), 8)[where]  # each integer's possible single flips
        new = (w.detach() + changes[name]).flatten()[where]
        per = scale.expand_as(w).flatten()[where]
        flipped = (q.flatten()[where, None] + options) * per[:, None]
        # each change is one of its integer's single flips (to rounding: options are a scale
        # or more apart)
        close = (flipped - new[:, None]).abs() <= 1e-3 * per[:, None]
        assert bool((close.sum(dim=1) == 1).all()), name
    assert moved == k  # 27 + 20 + 12 integers: k distinct ones

    # first order: no other set of k single flips gains more (the gradient taken here)
    leaves = {n: grids[n][0].detach().clone().requires_grad_(True) for n in grids}
    value = F.cross_entropy(functional_call(model, leaves, (x,)), y, reduction="sum")
    grads = dict(zip(leaves, torch.autograd.grad(value, list(leaves.values())), strict=True))
    chosen = sum(float((grads[n] * changes[n]).sum()) for n in grids)
    q_all = torch.cat([q.flatten() for _, q, _ in grids.values()])
    s_all = torch.cat([s.expand_as(w).flatten() for w, _, s in grids.values()])
    g_all = torch.cat([grads[n].flatten() for n in grids])
    for draw in range(20):  # k random single flips of distinct integers
        index = torch.randperm(len(q_all), generator=g)[:k]
        bit = torch.randint(0, 8, (len(index),), generator=g)
        step = bit_changes(q_all[index], 8)[torch.arange(len(index)), bit] * s_all[index]
        assert float((g_all[index] * step).sum()) <= chosen + 1e-5 * abs(chosen) + 1e-6, draw


def test_flip_at_trains_the_float_weights_through_the_grid():
    model = _mlp(0, (6, 5, 3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.rand(16, 6), torch.randint(0, 3, (16,))
    method = make_method(TrainConfig(method="flip-at", attack_steps=3))
    from nonsingular.training.methods import Batch

    loss, logits = method.loss(model, x, y, 1.0, Batch(torch.arange(16), 0))
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    assert method.flips(1.0) == 3 and method.flips(0.0) == 0  # ramped up
    for name, p in model.named_parameters():  # the loss only reads the model
        assert torch.equal(p.detach(), before[name])


def test_flip_at_config_threat_and_refusals():
    config = TrainConfig(method="flip-at", attack_steps=4)
    threat = config.resolved_threat()
    assert (threat.flips, threat.scope, threat.eps_w, threat.eps_x) == (4, "shared", 0.0, 0.0)
    assert config.eval_threat() == threat  # each epoch: the shared bit search, 4 flips
    assert TrainConfig(method="flip-at").resolved().attack_steps == 10
    for kwargs, message in [
        ({"eps_w": 1e-3}, "flip-at trains with eps_w = 0.0 only"),
        ({"eps_x": 0.1}, "flip-at trains with eps_x = 0.0 only"),
        ({"attack_steps": 0}, "attack_steps must be >= 1"),
        ({"eval_eps_w": 1e-3}, "evaluated under bit flips"),
        ({"bias": True}, "flip-at trains with bias = False only"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(method="flip-at", **kwargs)


class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 10) * 0.1)

    def forward(self, x):
        return x.flatten(1) @ self.weight


def test_flip_at_refuses_a_model_without_linear_or_conv_layers(digits, tmp_path):
    config = TrainConfig(method="flip-at", **DIGITS)
    with pytest.raises(UnsupportedModelError, match="has no Linear or Conv layer"):
        train(config, digits, progress=False, model=NoLinear(), out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_flip_at_reports_its_accuracy_under_flips_each_epoch(digits):
    config = TrainConfig(method="flip-at", **{**DIGITS, "epochs": 1, "eval_size": 50})
    result = train(config, digits, progress=False)
    line = result.history[-1]
    assert line["eval_threat"] == config.eval_threat().describe()
    assert "10" in line["eval_threat"] and 0.0 <= line["robust_accuracy"] <= 1.0
    q = ns.quantize(result.model)
    x, y = digits.x_test[:50], digits.y_test[:50]
    found = ns.attack(q, x, y, config.eval_threat())
    assert line["robust_accuracy"] == found.robust_accuracy  # the shared search on its grid


def test_a_quantized_model_trains_as_a_float_model_and_is_saved(digits, tmp_path):
    torch.manual_seed(0)
    model = ns.quantize(mlp((1, 8, 8), hidden=(16,), classes=10))
    config = TrainConfig(method="flip-at", **{**DIGITS, "epochs": 1})
    result = train(config, digits, progress=False, model=model, out_dir=tmp_path / "run")
    with pytest.raises(ns.QuantizationError, match="not quantized"):
        ns.quantized(result.model)  # its weights left the grid: no stale grid carried
    assert ns.quantized(model).bits == 8  # the caller's model keeps its own
    assert ns.quantized(ns.quantize(result.model)).bits == 8  # quantized again to deploy
    assert (tmp_path / "run" / "model.safetensors").exists()
