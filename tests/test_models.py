import pytest
import torch
from torch import nn

from nonsingular import CheckpointError, UnsupportedLayerError
from nonsingular.models import build, cnn, describe, mlp


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
    with pytest.raises(UnsupportedLayerError, match="Tanh"):
        describe(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    with pytest.raises(CheckpointError, match="unknown type 'Tanh'"):
        build([{"type": "Linear", "in_features": 2, "out_features": 2}, {"type": "Tanh"}])
    with pytest.raises(CheckpointError, match="invalid"):
        build([{"type": "Linear", "in_features": 2}])
    with pytest.raises(CheckpointError, match="non-empty list"):
        build({"type": "Linear"})
