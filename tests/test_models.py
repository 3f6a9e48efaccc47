import pytest
import torch
from torch import nn

from nonsingular import CheckpointError, UnsupportedLayerError
from nonsingular.checkpoint.layers import build, describe
from nonsingular.model.architectures import cnn, mlp


def test_builders_make_the_documented_shapes():
    m = mlp((1, 28, 28), hidden=(32, 16), classes=10)
    assert [type(x).__name__ for x in m] == [
        "Flatten",
        "Linear",
        "ReLU",
        "Linear",
        "ReLU",
        "Linear",
    ]
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    c = cnn((3, 32, 32), classes=7)
    assert c(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert sum(isinstance(x, nn.Conv2d) for x in c) == 2
    with pytest.raises(ValueError, match="in_shape"):
        mlp((0, 28))


def test_describe_and_build_round_trip_every_supported_layer():
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(12, 5),
        nn.BatchNorm1d(5),
        nn.Identity(),
        nn.Linear(5, 2),
    )
    spec = describe(model)
    rebuilt = build(spec)
    assert describe(rebuilt) == spec
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_describe_refuses_unsupported_layers_and_build_refuses_unknown_types():
    with pytest.raises(UnsupportedLayerError, match="PixelShuffle"):
        describe(nn.Sequential(nn.Linear(2, 2), nn.PixelShuffle(1)))
    with pytest.raises(CheckpointError, match="unknown type 'PixelShuffle'"):
        build([{"type": "Linear", "in_features": 2, "out_features": 2}, {"type": "PixelShuffle"}])
    with pytest.raises(CheckpointError, match="invalid"):
        build([{"type": "Linear", "in_features": 2}])
    with pytest.raises(CheckpointError, match="non-empty list"):
        build({"type": "Linear"})


# one instance of every layer the reader supports, with options away from their defaults
EVERY_LAYER = [
    nn.Linear(4, 3, bias=False),
    nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1, groups=1),
    nn.Conv2d(2, 4, 3, stride=(2, 1), padding=1, groups=2, bias=False),
    nn.BatchNorm1d(3, eps=1e-3, momentum=0.2),
    nn.BatchNorm2d(3, affine=False),
    nn.LayerNorm([3, 4], eps=1e-4, elementwise_affine=True, bias=False),
    nn.ReLU(),
    nn.LeakyReLU(0.3),
    nn.ELU(0.7),
    nn.GELU(approximate="tanh"),
    nn.SiLU(),
    nn.Tanh(),
    nn.Sigmoid(),
    nn.Softplus(beta=3, threshold=5),
    nn.Hardtanh(-2.0, 3.0),
    nn.ReLU6(),
    nn.MaxPool1d(3, stride=2, padding=1),
    nn.MaxPool2d(2, ceil_mode=True),
    nn.AvgPool1d(2),
    nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
    nn.AdaptiveAvgPool1d(5),
    nn.AdaptiveAvgPool2d((2, 3)),
    nn.Flatten(2),
    nn.Unflatten(1, (2, 2)),
    nn.Identity(),
    nn.Dropout(0.3),
    nn.Dropout1d(0.1),
    nn.Dropout2d(0.2),
]


def test_every_layer_the_reader_supports_can_be_saved_and_built_back():
    from nonsingular.model.catalog import MODULES

    assert {type(m) for m in EVERY_LAYER} == set(MODULES)  # the one registry, covered whole
    for layer in EVERY_LAYER:
        spec = describe(nn.Sequential(layer))
        (rebuilt,) = build(spec)
        assert type(rebuilt) is type(layer)
        for name, value in vars(layer).items():
            if not name.startswith("_") and name != "training":
                assert getattr(rebuilt, name) == value, (type(layer).__name__, name)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in layer.state_dict().items()
        }


def test_a_layer_its_constructor_does_not_rebuild_is_refused():
    layer = nn.Linear(2, 2)
    layer.weight = nn.Parameter(torch.zeros(3, 2))  # no longer what Linear(2, 2) makes
    with pytest.raises(UnsupportedLayerError, match="not rebuilt the same"):
        describe(nn.Sequential(layer))
