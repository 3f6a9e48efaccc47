import pytest
import torch
from torch import nn

from nonsingular import InputError, UnsupportedLayerError
from nonsingular.network import Network, check_batch


def zoo():
    torch.manual_seed(0)
    bn2 = nn.BatchNorm2d(4)
    bn2.running_mean.uniform_(-1, 1)
    bn2.running_var.uniform_(0.5, 2)
    bn1 = nn.BatchNorm1d(10, affine=False)
    bn1.running_mean.uniform_(-1, 1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        bn2,
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 4 * 4, 10)),
        bn1,
        nn.ReLU(),
        nn.Identity(),
        nn.Linear(10, 3, bias=False),
    )


def test_network_computes_the_models_eval_function_without_touching_its_mode():
    model = zoo()
    model.train()  # our forward is the deployed (eval) function whatever the mode
    x = torch.rand(5, 1, 8, 8)
    net = Network.from_module(model)
    out = net(x)
    assert model.training
    model.eval()
    torch.testing.assert_close(out, model(x))
    names = [lay.weight_name for _, lay in net.affine_layers]
    assert names == ["0.weight", "4.2.weight", "8.weight"]
    assert set(names) <= dict(model.named_parameters()).keys()


def test_per_example_forward_matches_separate_calls():
    model = zoo()
    net = Network.from_module(model)
    conv = net.layers[0]
    x = torch.rand(3, 1, 8, 8)
    kernels = conv.weight + 0.1 * torch.randn(3, *conv.weight.shape)
    biases = conv.bias + torch.randn(3, 4)
    batched = conv.forward_per_example(x, kernels, biases)
    for i in range(3):
        torch.testing.assert_close(
            batched[i : i + 1], conv.forward(x[i : i + 1], kernels[i], biases[i])
        )


@pytest.mark.parametrize("layer", [nn.Tanh(), nn.MaxPool2d(2), nn.LSTM(3, 3)])
def test_unsupported_layers_are_named_with_the_supported_set(layer):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), layer)
    with pytest.raises(UnsupportedLayerError) as info:
        Network.from_module(model)
    msg = str(info.value)
    assert f"'2' ({type(layer).__name__})" in msg and "Linear, Conv2d, ReLU" in msg
    assert isinstance(info.value, TypeError)


def test_non_sequential_and_custom_forward_models_are_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

    class Odd(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(UnsupportedLayerError, match="got Net"):
        Network.from_module(Net())
    with pytest.raises(UnsupportedLayerError, match="Odd"):
        Network.from_module(Odd(nn.Linear(2, 2)))
    with pytest.raises(UnsupportedLayerError, match="no Linear or Conv2d"):
        Network.from_module(nn.Sequential(nn.ReLU()))
    bn = nn.BatchNorm1d(2, track_running_stats=False)
    with pytest.raises(UnsupportedLayerError, match="running statistics"):
        Network.from_module(nn.Sequential(nn.Linear(2, 2), bn))


def test_check_batch_errors_say_what_was_expected():
    net = Network.from_module(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    x = torch.rand(2, 4)
    assert check_batch(net, x, torch.tensor([0, 2])).shape == (2, 3)
    with pytest.raises(InputError, match="does not fit the model"):
        check_batch(net, torch.rand(2, 5))
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\].*\[0, 3\]"):
        check_batch(net, x, torch.tensor([0, 3]))
    with pytest.raises(InputError, match=r"y must have shape \(2,\)"):
        check_batch(net, x, torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="integer tensor"):
        check_batch(net, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(InputError, match="floating-point"):
        check_batch(net, torch.ones(2, 4, dtype=torch.long))
