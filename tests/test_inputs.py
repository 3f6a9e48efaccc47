"""Inputs as researchers pass them: ``(x, y)`` tensors, a torch ``Dataset``, a ``DataLoader``
wherever a data set is accepted; float64 and bfloat16 models trained and attacked in their
own dtype; a ``logits=`` selector for models returning dicts or tuples."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data import Dataset as TorchDataset

import nonsingular as ns
from nonsingular import ConfigError, InputError, Threat, UnsupportedModelError
from nonsingular.data import examples, load, training_set
from nonsingular.training import TrainConfig, train

from .conftest import assert_state_equal, state_copy

THREAT = Threat(eps_x=0.05, eps_w=1e-3)
QUICK = {"epochs": 1, "batch_size": 32, "eval_size": 8}


@pytest.fixture(scope="module")
def digits():
    return load("digits", train_size=96, test_size=24, seed=1)


class Items(TorchDataset):
    """A map-style dataset of (image, int label) items, as torchvision's are."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def forms(x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    return {
        "pair": (x, y),
        "tensor-dataset": TensorDataset(x, y),
        "items": Items(x, y),
        "loader": DataLoader(Items(x, y), batch_size=7),
    }


def mlp(dtype: torch.dtype = torch.float32, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes)).to(
        dtype
    )


# ----------------------------------------------------------------------- forms of data
@pytest.mark.parametrize("form", ["pair", "tensor-dataset", "items", "loader"])
def test_every_form_reads_as_the_same_examples(digits, form):
    x, y = examples(forms(digits.x_test, digits.y_test)[form])
    assert torch.equal(x, digits.x_test) and torch.equal(y, digits.y_test)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([{"pixels": torch.zeros(3), "label": 1}], "pair, got a dict with keys"),
        ([(torch.zeros(3), 1, 2)], "pair, got tuple of 3"),
        ([(torch.zeros(3), 1), (torch.zeros(4), 0)], "several shapes"),
        ([(torch.zeros(3), 0.5)], "label must be an integer"),
        ([("image", 1)], "input must be a tensor"),
        ([], "holds no examples"),
        ("mnist5k", "must be a nonsingular Dataset, an \\(x, y\\) pair"),
        ((torch.zeros(2, 3), [0, 1]), "pair must be \\(x, y\\) torch tensors"),
    ],
)
def test_data_that_is_not_examples_is_an_input_error(data, match):
    class Listed(TorchDataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> object:
            return data[i]

    source = Listed() if isinstance(data, list) else data
    with pytest.raises(InputError, match=match):
        examples(source)


@pytest.mark.parametrize("form", ["pair", "tensor-dataset", "items", "loader"])
def test_train_takes_every_form_of_data(digits, form):
    """``ns.train(config, (x, y))`` once raised a raw AttributeError."""
    result = train(
        TrainConfig(**QUICK), forms(digits.x_train, digits.y_train)[form], progress=False
    )
    assert len(result.history) == 1 and result.history[0]["test_accuracy"] is None
    same = train(
        TrainConfig(**QUICK), training_set((digits.x_train, digits.y_train)), progress=False
    )
    assert torch.equal(result.model[1].weight, same.model[1].weight)  # the same examples


def test_train_takes_its_classes_from_the_model_where_the_labels_show_fewer(digits):
    keep = digits.y_train < 9  # class 9 never appears
    x, y = digits.x_train[keep], digits.y_train[keep]
    assert training_set((x, y)).classes == 9
    result = train(TrainConfig(**QUICK), (x, y), model=mlp(), progress=False)
    assert result.model(x[:2]).shape == (2, 10)
    with pytest.raises(ConfigError, match="outputs shape \\(32, 5\\).*\\(32, 9\\)"):
        train(TrainConfig(**QUICK), (x, y), model=mlp(classes=5), progress=False)


@pytest.mark.parametrize(
    ("y", "error", "match"),
    [
        (torch.zeros(96), InputError, "must be an integer tensor of labels"),
        (torch.zeros(96, 10, dtype=torch.long), InputError, "must have shape \\(96,\\)"),
        (torch.full((96,), -1), InputError, "labels in \\[-1, -1\\]"),
    ],
)
def test_labels_that_are_not_class_indices_are_refused_before_training(digits, y, error, match):
    with pytest.raises(error, match=match):
        train(TrainConfig(**QUICK), (digits.x_train, y), progress=False)


@pytest.mark.parametrize("form", ["pair", "tensor-dataset", "items", "loader"])
def test_evaluate_takes_every_form_of_data(digits, form):
    model = mlp().eval()
    table = ns.evaluate(model, forms(digits.x_test, digits.y_test)[form], [THREAT], progress=False)
    whole = ns.evaluate(model, (digits.x_test, digits.y_test), [THREAT], progress=False)
    assert table.rows[0].attacked == whole.rows[0].attacked
    assert table.rows[0].n == len(digits.x_test)


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_float64_and_bfloat16_models_train_and_are_attacked_in_their_dtype(digits, dtype):
    """Once: 'Input type (float) and bias type (double)' training on the built-in data."""
    model = mlp(dtype)
    before = state_copy(model)
    config = TrainConfig(method="joint-at", attack_steps=2, **QUICK)
    result = train(config, digits, model=model, progress=False)
    assert all(p.dtype == dtype for p in result.model.parameters())
    assert result.history[0]["robust_accuracy"] is not None
    found = ns.attack(result.model, digits.x_test, digits.y_test, THREAT, steps=3)
    assert found.margins.dtype == dtype and found.x_adv.dtype == dtype
    replayed = found.replay(result.model, 0)
    assert replayed.dtype == dtype
    table = ns.evaluate(result.model, digits, [THREAT], progress=False)
    assert table.rows[0].n == len(digits.x_test) and table.rows[0].attacked is not None
    assert_state_equal(model, before)


def test_a_float64_model_is_certified_at_its_own_inputs(digits):
    model = mlp(torch.float64).eval()
    x32 = digits.x_test[:6]
    ours = ns.certify(model, x32, digits.y_test[:6], Threat(eps_x=0.01), "crown")
    theirs = ns.certify(model, x32.double(), digits.y_test[:6], Threat(eps_x=0.01), "crown")
    assert torch.equal(ours.lower, theirs.lower)


# -------------------------------------------------------------------------- logits=
class DictOut(nn.Module):
    """Hugging Face style: a dict holding the logits beside other outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"hidden": h, "logits": self.fc(h)}


class TupleOut(DictOut):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        out = super().forward(x)
        return out["hidden"], out["logits"]


class Plain(DictOut):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)["logits"]


def plain(model: DictOut) -> nn.Module:
    """The same network, its parameters under the same names, returning its logits alone."""
    copy = Plain().eval()
    copy.load_state_dict(model.state_dict())
    return copy


@pytest.mark.parametrize(
    ("build", "logits"),
    [(DictOut, "logits"), (TupleOut, 1), (TupleOut, -1), (DictOut, lambda out: out["logits"])],
)
def test_logits_picks_them_for_attacks_certificates_and_evaluation(digits, build, logits):
    torch.manual_seed(0)
    model = build().eval()
    before = state_copy(model)
    x, y = digits.x_test, digits.y_test
    with pytest.raises(UnsupportedModelError, match="pass logits="):
        ns.attack(model, x, y, THREAT)
    found = ns.attack(model, x, y, THREAT, steps=3, logits=logits)
    reference = ns.attack(plain(model), x, y, THREAT, steps=3)
    assert torch.equal(found.margins, reference.margins)
    assert sorted(found.weight_deltas(0)) == ["body.1.weight", "fc.weight"]  # the user's names
    cert = ns.certify(model, x, y, Threat(eps_x=0.01), "crown", logits=logits)
    assert torch.equal(cert.lower, ns.certify(plain(model), x, y, Threat(eps_x=0.01)).lower)
    table = ns.evaluate(model, (x, y), [THREAT], progress=False, logits=logits)
    assert (
        table.rows[0].clean
        == ns.evaluate(plain(model), (x, y), [THREAT], progress=False).rows[0].clean
    )
    assert_state_equal(model, before)
    assert type(model).forward is build.forward and "forward" not in vars(model)


def test_train_with_logits_returns_a_model_that_returns_what_yours_does(digits, tmp_path):
    model = DictOut()
    config = TrainConfig(method="pgd-at", attack_steps=2, **QUICK)
    result = train(config, digits, model=model, logits="logits", out_dir=tmp_path, progress=False)
    out = result.model(digits.x_test[:3])
    assert isinstance(out, dict) and out["logits"].shape == (3, 10)
    assert "forward" not in vars(model) and isinstance(model(digits.x_test[:1]), dict)
    loaded, _ = ns.checkpoint.load(tmp_path / "model.safetensors", model=DictOut())
    assert torch.equal(loaded(digits.x_test[:3])["logits"], out["logits"])


@pytest.mark.parametrize(
    ("logits", "error", "match"),
    [
        ("scores", ConfigError, "logits='scores' picks nothing.*'hidden', 'logits'"),
        (5, ConfigError, "logits=5 picks nothing"),
        (2.0, ConfigError, "a dict key \\(str\\), a tuple index \\(int\\) or a function"),
        (True, ConfigError, "a dict key"),
    ],
)
def test_a_selector_that_picks_nothing_says_so(digits, logits, error, match):
    with pytest.raises(error, match=match):
        ns.attack(DictOut().eval(), digits.x_test, digits.y_test, THREAT, logits=logits)


def test_a_key_on_a_model_returning_a_tensor_says_to_leave_logits_unset(digits):
    with pytest.raises(ConfigError, match="returns a tensor: leave logits unset"):
        ns.attack(mlp().eval(), digits.x_test, digits.y_test, THREAT, logits="logits")
