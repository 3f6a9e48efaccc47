"""Training any model: all six methods on a user's module from Python, importable factories from
the shell, checkpoints that name their factory (and never import one nobody named)."""

import json
import textwrap

import pytest
import torch

import nonsingular as ns
from nonsingular import CheckpointError, ConfigError, UnsupportedLayerError, checkpoint
from nonsingular.cli import main
from nonsingular.data import load
from nonsingular.model.architectures import Architecture, resnet
from nonsingular.training import TrainConfig, train

from .conftest import assert_state_equal, state_copy
from .zoo import DIGIT_MODELS

FACTORY = """
import torch
import torch.nn.functional as F
from torch import nn


class Small(nn.Module):
    def __init__(self, width, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.res = nn.Conv2d(width, width, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = F.max_pool2d(h + F.relu(self.res(h)), 2)
        return self.head(self.drop(torch.flatten(h, 1)))


def small(in_shape, classes, width=4):
    return Small(width, classes)
"""


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def digits_tiny(digits):
    """64 training and 16 test digits: enough for one epoch of every method."""
    return ns.data.Dataset(
        "digits-tiny",
        digits.x_train[:64],
        digits.y_train[:64],
        digits.x_test[:16],
        digits.y_test[:16],
        digits.classes,
    )


@pytest.fixture
def userpkg(tmp_path, monkeypatch):
    """An importable package ``userpkg`` with a model factory, as a user would have."""
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userpkg.models:small"


def test_every_method_trains_a_users_residual_model_without_touching_it(digits, userpkg):
    import userpkg.models

    torch.manual_seed(0)
    model = userpkg.models.small((1, 8, 8), 10)
    before = state_copy(model)
    quick = {"epochs": 3, "eval_size": 60, "lr": 1e-2}
    chance = 1 / digits.classes
    for method in ("standard", "pgd-at", "awp", "joint-at", "ibp", "flip-at"):
        budget = {} if method in ("standard", "awp", "flip-at") else {"eps_x": 0.05, "eps_w": 1e-3}
        if method == "pgd-at":  # it trains against inputs only (a weight budget is refused)
            budget = {"eps_x": 0.05}
        if method == "flip-at":  # two flips a batch: ten (its default) in a model this small
            budget = {"attack_steps": 2}  # left it at 18.9% after 3 epochs in one run
        config = TrainConfig(method=method, **budget, **quick)
        result = train(config, digits, model=model, progress=False)
        assert result.model is not model
        assert result.history[-1]["test_accuracy"] > 2 * chance, method
        assert not result.model.training
    assert_state_equal(model, before)
    assert model.training  # the caller's module keeps its mode
    with pytest.raises(UnsupportedLayerError, match="bound-reg.*MLPs.*'ibp' or 'crown'"):
        train(TrainConfig(method="bound-reg", **quick), digits, model=model, progress=False)


def test_a_bn_model_trains_its_batch_statistics_under_adversarial_methods(digits):
    config = TrainConfig(
        method="joint-at", model="resnet", model_args={"channels": [4, 8]}, epochs=1, eval_size=0
    )
    result = train(config, digits, progress=False)
    bn = result.model.stem[1]
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert int(bn.num_batches_tracked) > 0


def test_a_factory_checkpoint_is_rebuilt_only_when_its_factory_is_named(digits, userpkg, tmp_path):
    config = TrainConfig(model=userpkg, model_args={"width": 3}, epochs=1, eval_size=0)
    result = train(config, digits, out_dir=tmp_path / "run", progress=False)
    path = tmp_path / "run" / "model.safetensors"
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert info["model"] == {
        "factory": userpkg,
        "args": {"width": 3},
        "in_shape": [1, 8, 8],
        "classes": 10,
    }
    with pytest.raises(CheckpointError, match=f"built by {userpkg}.*--model {userpkg}"):
        checkpoint.load(path)
    loaded, _ = checkpoint.load(path, factory=userpkg)
    x = digits.x_test[:20]
    torch.testing.assert_close(loaded(x), result.model(x))
    # a module passed by hand is recorded by its class; loading it needs an instance
    by_hand = train(
        TrainConfig(epochs=1, eval_size=0),
        digits,
        model=result.model,
        out_dir=tmp_path / "hand",
        progress=False,
    )
    with pytest.raises(CheckpointError, match="Small trained from an instance.*model="):
        checkpoint.load(tmp_path / "hand" / "model.safetensors")
    again, _ = checkpoint.load(tmp_path / "hand" / "model.safetensors", model=result.model)
    torch.testing.assert_close(again(x), by_hand.model(x))


def test_factories_and_their_arguments_are_checked_with_clear_errors(userpkg):
    for bad, match in (
        ("torch.nn", "built-in architecture|importable factory"),
        ("nosuchpackage.models:net", "cannot import nosuchpackage.models"),
        ("userpkg.models:nothing", "has no attribute nothing"),
        ("os:sep", "not callable"),
    ):
        with pytest.raises(ConfigError, match=match):
            Architecture(bad).build()
    with pytest.raises(ConfigError, match="small takes no argument depth"):
        Architecture(userpkg, {"depth": 3}, (1, 8, 8), 10).build()
    with pytest.raises(ConfigError, match="plain JSON"):
        TrainConfig(model=userpkg, model_args={"width": object()})


def test_the_cli_trains_and_evaluates_a_factory_model(capsys, userpkg, tmp_path):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            userpkg,
            "--model-args",
            '{"width": 3}',
            "--data",
            "digits",
            "--epochs",
            "1",
            "--eval-size",
            "0",
            "--out",
            str(run),
            "--quiet",
        ]
    )
    assert code == 0
    ckpt = str(run / "model.safetensors")
    common = ["--checkpoint", ckpt, "--data", "digits", "--test-size", "30", "--quiet"]
    code = main(["evaluate", *common, "--eps-x", "0,0.05", "--eps-w", "0", "--steps", "3"])
    err = capsys.readouterr().err
    assert code == 2 and f"--model {userpkg}" in err and len(err.strip().splitlines()) == 1
    code = main(
        [
            "certify",
            *common,
            "--model",
            userpkg,
            "--eps-x",
            "0.01",
            "--eps-w",
            "0",
            "--method",
            "ibp,crown",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "cert:crown" in out
    code = main(
        [
            "train",
            "--model",
            "userpkg.models:nothing",
            "--data",
            "digits",
            "--quiet",
            "--out",
            str(tmp_path / "bad"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no attribute nothing" in err and not (tmp_path / "bad").exists()


def test_the_builtin_resnet_is_a_real_residual_network_the_library_reads():
    model = resnet((1, 28, 28), channels=(4, 8), classes=10).eval()
    graph = ns.model.read_model(model, torch.rand(2, 1, 28, 28))
    adds = [n for n in graph.nodes if "add" in n.label]
    assert len(adds) == 2  # one residual sum per block
    assert any("AdaptiveAvgPool2d" in n.label for n in graph.nodes)


# what each method does with each of DIGIT_MODELS: trains, or refuses before training starts
# with an UnsupportedLayerError naming the layer it cannot use (their bounds: bound-reg needs an
# MLP, ibp needs interval bounds through every layer; flip-at needs a Linear or Conv layer)
REFUSES = {
    "flip-at": {"einsum-matmul": "no Linear or Conv layer"},
    "bound-reg": {
        "einsum-matmul": "einsum",
        "transformer-encoder": "encoder|embed",
        "lstm": "rnn|getitem",
        "gru": "rnn|getitem",
    },
    "ibp": {
        "einsum-matmul": "einsum",
        "transformer-encoder": "encoder",
        "lstm": "rnn",
        "gru": "rnn",
    },
}


@pytest.mark.parametrize("zoo_name", DIGIT_MODELS)
@pytest.mark.parametrize("method", ns.training.METHODS)
def test_every_method_trains_attention_recurrent_and_einsum_models_or_says_why(
    digits_tiny, method, zoo_name, tmp_path
):
    model = DIGIT_MODELS[zoo_name]()  # in training mode, as a fresh module is
    before = state_copy(model)
    steps = {"attack_steps": 2} if ns.training.METHODS[method].attacks else {}
    config = TrainConfig(method=method, epochs=1, batch_size=32, eval_size=8, **steps)
    out = tmp_path / "run"
    refusal = REFUSES.get(method, {}).get(zoo_name)
    if refusal is not None:
        with pytest.raises(UnsupportedLayerError, match=refusal):
            train(config, digits_tiny, model=model, out_dir=out, progress=False)
        assert not out.exists()  # refused before training started: nothing written
    else:
        result = train(config, digits_tiny, model=model, out_dir=out, progress=False)
        assert len(result.history) == 1 and result.history[0]["loss"] == result.history[0]["loss"]
        trained = result.model.state_dict()
        assert any(not torch.equal(trained[k], v) for k, v in before.items())
        assert (out / "model.safetensors").exists()
    assert_state_equal(model, before)
    assert model.training


def test_adversarial_training_attacks_a_module_run_as_it_is_in_eval_mode(digits_tiny, monkeypatch):
    """The TransformerEncoder (run as it is) computes its deployed function while PGD
    searches (no Dropout), and its training function in the loss."""
    from nonsingular.training import methods

    modes: list[tuple[str, bool]] = []
    real = methods.pgd

    def spy(space, *args, **kwargs):
        modes.append(("attack", model_in_use[0].encoder.training))
        return real(space, *args, **kwargs)

    model_in_use: list = []
    real_loss = methods.Adversarial.loss

    def loss(self, model, *args):
        model_in_use[:] = [model]
        result = real_loss(self, model, *args)
        modes.append(("loss", model.encoder.training))
        return result

    monkeypatch.setattr(methods, "pgd", spy)
    monkeypatch.setattr(methods.Adversarial, "loss", loss)
    config = TrainConfig(method="pgd-at", epochs=1, batch_size=32, eval_size=0, attack_steps=2)
    train(config, digits_tiny, model=DIGIT_MODELS["transformer-encoder"](), progress=False)
    assert ("attack", False) in modes and ("loss", True) in modes
    assert ("attack", True) not in modes and ("loss", False) not in modes


@pytest.mark.parametrize("method", ["weight-at", "joint-at"])
def test_weight_attacks_inside_training_move_every_einsum_weight(digits_tiny, monkeypatch, method):
    """The inner attack of weight-at and joint-at moves the raw einsum/matmul parameters W1
    and W2 (not only layers the lemma reads), each to the edge of its ball somewhere."""
    from nonsingular.attacks.space import Variable
    from nonsingular.training import methods

    seen: list[tuple[dict, object]] = []
    real = methods._attack_state

    def recording(*args, **kwargs):
        state, space = real(*args, **kwargs)
        seen.append((state, space))
        return state, space

    monkeypatch.setattr(methods, "_attack_state", recording)
    model = DIGIT_MODELS["einsum-matmul"]()
    config = TrainConfig(
        method=method, epochs=1, batch_size=32, eval_size=8, attack_steps=3, eps_w=0.01
    )
    train(config, digits_tiny, model=model, progress=False)
    attacked = [(state, space) for state, space in seen if space.balls]  # past the ramp's 0
    assert attacked
    for state, space in attacked:
        for name in ("W1", "W2"):
            key = Variable("weight", name)
            assert key in state, (name, sorted(str(k) for k in state))
            delta, radius = state[key], space.balls[key].radius
            assert float(delta.abs().max()) > 0.99 * float(torch.as_tensor(radius).max())
            assert float(delta.abs().max()) <= float(torch.as_tensor(radius).max()) * (1 + 1e-5)
