import pytest
import torch
from torch import nn

from nonsingular import InputError
from nonsingular.model import check_batch, read_model


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
    graph = read_model(model, x)
    out = graph(x)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    torch.testing.assert_close(out, model(x))
    names = [node.op.weight_name for node in graph.affine_nodes]
    assert names == ["0.weight", "4.2.weight", "8.weight"]
    assert set(names) <= dict(model.named_parameters()).keys()


def test_per_example_forward_matches_separate_calls():
    model = zoo()
    x = torch.rand(3, 1, 8, 8)
    conv = read_model(model, x).affine_nodes[0].op
    weight, bias = model[0].weight.detach(), model[0].bias.detach()
    kernels = weight + 0.1 * torch.randn(3, *weight.shape)
    biases = bias + torch.randn(3, 4)
    batched = conv.forward_per_example(x, kernels, biases)
    for i in range(3):
        torch.testing.assert_close(
            batched[i : i + 1], conv.forward(x[i : i + 1], kernels[i], biases[i])
        )


def test_check_batch_errors_say_what_was_expected():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 4)
    graph = read_model(model, x)
    assert check_batch(graph, model, x, torch.tensor([0, 2])).shape == (2, 3)
    with pytest.raises(InputError, match="does not fit the model"):
        check_batch(graph, model, torch.rand(2, 5))
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\].*\[0, 3\]"):
        check_batch(graph, model, x, torch.tensor([0, 3]))
    with pytest.raises(InputError, match=r"y must have shape \(2,\)"):
        check_batch(graph, model, x, torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="integer tensor"):
        check_batch(graph, model, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(InputError, match="floating-point"):
        check_batch(graph, model, torch.ones(2, 4, dtype=torch.long))
