"""Hostile values (issue 20): a model computing NaN is an error, never a robust example; the API
works inside ``torch.no_grad()`` and ``torch.inference_mode()``; the global RNG is left alone."""

import pytest
import torch
from torch import nn

import nonsingular as ns
from nonsingular import InputError, TrainingError, checkpoint
from nonsingular.certificates import METHODS
from nonsingular.data import Dataset
from nonsingular.training import TrainConfig

THREAT = ns.Threat(eps_x=0.05, eps_w=0.01)
MODES = [torch.no_grad, torch.inference_mode]


def mlp(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(6)] if batchnorm else []
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 6), *norm, nn.ReLU(), nn.Linear(6, 3)).eval()


def nan_model() -> nn.Module:
    """Finite parameters and buffers, NaN output: ``sqrt(running_var + eps)`` of -1."""
    model = mlp(batchnorm=True)
    model[2].running_var.fill_(-1.0)
    return model


def batch(model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in [0, 1], labelled by ``model`` (so that the attack has margins to lower)."""
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2]) if model is None else model(x).argmax(1)
    return x, y


def dataset(n: int = 16) -> Dataset:
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2 * n, 4, generator=g), torch.randint(0, 3, (2 * n,), generator=g)
    return Dataset("tiny", x[:n], y[:n], x[n:], y[n:], 3)


CONFIG = {"epochs": 1, "batch_size": 8, "augment": 0, "eval_size": 0, "eps_x": 0.05}
CALLS = {
    "attack": lambda m, x, y: ns.attack(m, x, y, THREAT, steps=3),
    "attack seed=7": lambda m, x, y: ns.attack(m, x, y, THREAT, steps=3, seed=7),
    "noise": lambda m, x, y: ns.attack(m, x, y, THREAT, method="noise", samples=3),
    **{
        f"certify {method}": lambda m, x, y, method=method: ns.certify(
            m, x, y, THREAT, method, time_limit=0.2
        )
        for method in METHODS
    },
    "bab": lambda m, x, y: ns.bab(m, x, y, THREAT, time_limit=0.2, steps=3),
    "evaluate": lambda m, x, y: ns.evaluate(
        m, (x, y), [THREAT], ns.AttackOptions(steps=3), certify=["crown"], progress=False
    ),
}


# --- a model whose output is NaN -------------------------------------------------------------


@pytest.mark.parametrize("call", CALLS)
def test_a_model_computing_nan_is_an_error_never_a_robust_example(call):
    model = nan_model()
    assert all(bool(t.isfinite().all()) for t in model.state_dict().values())
    x, y = batch()
    assert bool(model(x).isnan().all())
    with pytest.raises(InputError, match="NaN on the clean pass on example 0 .* expected finite"):
        CALLS[call](model, x, y)


def test_training_a_model_computing_nan_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(method="pgd-at", **CONFIG)
    with pytest.raises(InputError, match="NaN on the clean pass"):
        ns.train(config, dataset(), model=nan_model(), out_dir=out, progress=False)
    assert not out.exists()


class SqrtOfZero(nn.Module):
    """Finite logits whose gradient is NaN: ``0 * sqrt(p)`` at ``p = 0`` has the derivative
    ``0 * inf``; one optimizer step makes ``p`` NaN while the loss stays finite."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.p = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.fc(x) + 0.0 * self.p.sqrt()


def test_weights_made_nan_by_a_step_stop_training_naming_the_step(tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(method="standard", **{**CONFIG, "eps_x": None})
    with pytest.raises(TrainingError, match=r"weights became NaN .* epoch 1, step 1 \(first: p\)"):
        ns.train(config, dataset(), model=SqrtOfZero(), out_dir=out, progress=False)
    assert not (out / "model.safetensors").exists() and not (out / "state.safetensors").exists()


def test_a_perturbation_making_the_model_overflow_is_a_broken_example():
    """Logits ``(0.98 x, 0.99 x) * max``: finite at the clean ``x = 1`` (class 1 wins), both
    ``inf`` (a NaN margin) from ``x = 1.03`` on, inside the ball. The attack counts that point
    as broken (margin ``-inf``), with an input inside the ball, never as robust (PGD finds it
    from a random start: its gradient points the other way, towards smaller margins)."""
    top = torch.finfo(torch.float32).max
    model = nn.Sequential(nn.Linear(1, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.98 * top], [0.99 * top]]))
    x, y = torch.tensor([[1.0]]), torch.tensor([1])
    threat = ns.Threat(eps_x=0.8, bounds=None)
    for method in ("pgd", "noise"):
        result = ns.attack(model, x, y, threat, method=method, restarts=8, samples=20, steps=2)
        assert result.clean_margins.item() > 0
        assert result.success.tolist() == [True], method
        assert result.margins.item() == float("-inf")
        assert 1.02 <= result.x_adv.item() <= 1.8 + 1e-6
        assert bool(result.replay(model, 0).isinf().all())  # the model really overflows


def test_a_non_finite_gradient_never_steps_out_of_the_ball():
    """At ``x = 1.4`` the logits are ``(finite, inf)``: class 1 wins everywhere in the ball
    (margin ``inf``), but cross entropy is ``inf - inf`` and its gradient NaN. An L2 step on
    it would make ``x`` NaN and a NaN point look broken; the attack stays in the ball."""
    top = torch.finfo(torch.float32).max
    model = nn.Sequential(nn.Linear(1, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.59 * top], [0.88 * top]]))
    x, y = torch.tensor([[1.4]]), torch.tensor([1])
    assert model(x)[0, 1].item() == float("inf") and model(x + 0.1)[0, 0].isfinite()
    result = ns.attack(model, x, y, ns.Threat(eps_x=0.1, x_norm="l2", bounds=None), steps=3)
    assert result.success.tolist() == [False]
    assert bool(result.x_adv.isfinite().all()) and abs(result.x_adv.item() - 1.4) <= 0.1 + 1e-6


# --- inside torch.no_grad() and torch.inference_mode() ----------------------------------------


def _same(a, b) -> None:
    if isinstance(a, ns.EvaluationTable):
        a, b = a.to_dict(), b.to_dict()
        for row in (*a["rows"], *b["rows"]):
            row.pop("seconds", None)
        assert a == b
        return
    assert getattr(a, "status", None) == getattr(b, "status", None)
    for name in ("margins", "success", "x_adv", "lower"):
        if hasattr(a, name):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("call", ["attack", "certify alpha-crown", "bab", "evaluate"])
def test_the_api_works_inside_no_grad_and_inference_mode(call, mode):
    model = mlp()
    x, y = batch(model)
    expected = CALLS[call](model, x, y)
    with mode():
        xm, ym = x.clone(), y.clone()  # inference tensors under inference_mode
        found = CALLS[call](model, xm, ym)
    _same(found, expected)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.__name__)
def test_training_works_inside_no_grad_and_inference_mode(mode):
    config = TrainConfig(method="pgd-at", **CONFIG)
    expected = ns.train(config, dataset(), model=mlp(), progress=False).model
    with mode():
        data = dataset()
        found = ns.train(config, data, model=mlp(), progress=False).model
    found_state = found.state_dict()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(tensor, found_state[name]), name


# --- the global RNG ---------------------------------------------------------------------------


def _rng_unchanged(call) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    call()
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("call", CALLS)
def test_attacks_certificates_and_evaluate_leave_the_global_rng_alone(call):
    model = mlp()
    x, y = batch(model)
    _rng_unchanged(lambda: CALLS[call](model, x, y))


def test_train_leaves_the_global_rng_alone():
    _rng_unchanged(lambda: ns.train(TrainConfig(**CONFIG), dataset(), progress=False))


def test_checkpoint_load_leaves_the_global_rng_alone(tmp_path):
    path = tmp_path / "model.safetensors"
    checkpoint.save(mlp(), path)
    _rng_unchanged(lambda: checkpoint.load(path))
