"""In-place operations are read with their effect on every name of the tensor they write into,
or refused by name with the way out; never read as if they wrote nothing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nonsingular as ns
from nonsingular import Threat, UnsupportedLayerError
from nonsingular.errors import UnsupportedModelError
from nonsingular.model import read_model

from .conftest import assert_state_equal, state_copy
from .test_certificates import attacked_margins, check_sound, random_margins

X, Y = torch.tensor([[0.02]]), torch.tensor([0])
THREAT = Threat(eps_x=0.05, bounds=None)
BROKEN = torch.tensor([[-0.03]])  # inside THREAT around X, where the models misclassify
AT = torch.tensor([[-0.05], [-0.03], [0.0], [0.02], [0.07]])  # pre-activations of both signs


def lin(w, b):
    m = nn.Linear(len(w[0]), len(w))
    with torch.no_grad():
        m.weight.copy_(torch.tensor(w))
        m.bias.copy_(torch.tensor(b))
    return m


class OwnLine(nn.Module):
    """``h.relu_()`` on its own line: fx records a node nothing reads."""

    def __init__(self):
        super().__init__()
        self.fc1 = lin([[1.0], [-1.0]], [0.0, 0.1])
        self.fc2 = lin([[-1.0, -1.0], [0.0, 0.0]], [0.115, 0.0])

    def forward(self, x):
        h = self.fc1(x)
        h.relu_()
        return self.fc2(h)


class Skip(nn.Module):
    """``nn.ReLU(inplace=True)`` on a tensor also kept for a skip connection: the model computes
    ``2 relu(h)``, not ``relu(h) + h``."""

    def __init__(self):
        super().__init__()
        self.fc1 = lin([[1.0], [-1.0]], [0.0, 0.1])
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = lin([[-1.0, -1.0], [0.0, 0.0]], [0.245, 0.0])

    def forward(self, x):
        h = self.fc1(x)
        out = self.relu(h)  # overwrites h too
        return self.fc2(out + h)


class Written(nn.Module):
    """``fc2(write(h) + kept)`` where ``kept`` is another name of ``h``, written into in place."""

    def __init__(self, write):
        super().__init__()
        self.fc1 = lin([[1.0], [-1.0]], [0.0, 0.1])
        self.fc2 = lin([[-1.0, -1.0], [0.0, 0.0]], [0.245, 0.0])
        self.write = write

    def forward(self, x):
        h = self.fc1(x)
        kept = h
        return self.fc2(self.write(h) + kept)


def relu_kw(h):
    F.relu(h, inplace=True)
    return h


def add_(h):
    h.add_(F.relu(-h))  # h + relu(-h) = relu(h), written into h
    return h


def iadd(h):
    h += F.relu(-h)
    return h


def mul_(h):
    h.mul_(0.5)
    return h


def clamp_(h):
    h.clamp_(min=0.0, max=0.05)
    return h


def assign(h):
    h[:, 0] = h[:, 1] * 2
    return h


def assert_exact_and_sound(model):
    """The reading equals ``model(x)`` where the write changes values (pre-activations of both
    signs), and crown and alpha-crown never certify what a sampled input breaks."""
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(read_model(model, AT)(AT), model(AT.clone()))
    check_sound(model, X, Y, THREAT, ["crown", "alpha-crown"])


@pytest.mark.parametrize("model", [OwnLine, Skip], ids=["relu_ own line", "ReLU(inplace) skip"])
def test_the_two_reproductions_are_never_certified(model):
    """Both were certified by crown: the reading dropped the write, the model at -0.03 does
    not."""
    model = model().eval()
    with torch.no_grad():
        margin = model(BROKEN)[0, 0] - model(BROKEN)[0, 1]
    assert margin < 0  # the model misclassifies inside the threat
    assert_exact_and_sound(model)
    for method in ("crown", "alpha-crown", "bab"):
        cert = ns.certify(model, X, Y, THREAT, method, time_limit=1.0)
        assert not bool(cert.certified[0]), method
        assert float(cert.worst[0]) <= float(margin) + 1e-6, method


@pytest.mark.parametrize(
    "write",
    [relu_kw, add_, iadd, mul_],
    ids=["F.relu(inplace=True)", "add_", "+=", "mul_"],
)
def test_a_write_into_a_tensor_kept_elsewhere_is_read_with_its_effect(write):
    assert_exact_and_sound(Written(write))


@pytest.mark.parametrize(
    "write, name",
    [(clamp_, r"Tensor\.clamp at 'clamp_'"), (assign, r"setitem on a copy at 'setitem'")],
    ids=["clamp_", "h[:, 0] = v"],
)
def test_a_write_without_bounds_is_read_exactly_and_certificates_name_it(write, name):
    """clamp and index assignment have no relaxation: attacks run them, certificates refuse."""
    model = Written(write).eval()
    with torch.no_grad():
        torch.testing.assert_close(read_model(model, AT)(AT), model(AT.clone()))
    attacked_margins(model, X, Y, THREAT)  # the attack's result replays through the model
    for method in ("crown", "alpha-crown"):
        with pytest.raises(UnsupportedLayerError, match=name):
            ns.certify(model, X, Y, THREAT, method)


class BasicBlock(nn.Module):
    """torchvision's ResNet block: ``ReLU(inplace=True)`` twice, ``out += identity``."""

    def __init__(self, c_in, c_out, stride=1, alias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.alias = alias  # the skip reads bn1's output, which the in-place ReLU overwrites

    def forward(self, x):
        identity = x
        out = self.bn1(self.conv1(x))
        if self.alias:
            identity = out
        out = self.relu(out)
        out = self.bn2(self.conv2(out))
        if self.downsample is not None and not self.alias:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


def resnet():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, bias=False),
        nn.BatchNorm2d(2),
        nn.ReLU(inplace=True),
        BasicBlock(2, 2),
        BasicBlock(2, 3, stride=2),
        BasicBlock(3, 3, alias=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 3),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_resnet_blocks_with_inplace_relu_and_augmented_skip_are_read_exactly_and_soundly():
    model = resnet()
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    before = state_copy(model)
    with torch.no_grad():
        torch.testing.assert_close(read_model(model, x)(x), model(x.clone()))
    assert_state_equal(model, before)
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    y, threat = model(x).argmax(1), Threat(eps_x=0.05)
    samples = random_margins(model, x, y, threat)  # check_sound's samples; its attack is slow here
    for method in ("crown", "alpha-crown"):
        lower = ns.certify(model, x, y, threat, method).lower.float()
        assert bool((lower.nan_to_num(posinf=float("-inf"))[None] <= samples + 1e-5).all())


class Refused(nn.Module):
    def __init__(self, forward):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.body = forward

    def forward(self, x):
        return self.body(self, x)


def view_written(m, x):
    h = m.fc(x)
    h[:, :1].relu_()
    return m.fc(h)


def input_written(m, x):
    F.relu(x, inplace=True)
    return m.fc(x)


def parameter_written(m, x):
    m.fc.bias.add_(1.0)
    return m.fc(x)


def base_written_under_a_view(m, x):
    h = m.fc(x)
    v = h.view(-1)
    h.relu_()
    return m.fc(v.view(-1, 2))


@pytest.mark.parametrize(
    "forward, message",
    [
        (view_written, r"Tensor\.relu_ at 'relu_' .* writes in place into a tensor that fc "),
        (input_written, r"functional\.relu at 'relu' .* into the input of Refused\.forward"),
        (parameter_written, r"Tensor\.add_ at 'add_' .* into the model's tensor 'fc\.bias'"),
        (base_written_under_a_view, r"relu_' .* a tensor that Tensor\.view at 'view' .* may"),
    ],
    ids=["a view", "the input", "a parameter", "the base of a view"],
)
def test_a_write_into_a_shared_tensor_is_refused_by_name_with_the_way_out(forward, message):
    model = Refused(forward).eval()
    before = state_copy(model)
    with pytest.raises(UnsupportedModelError, match=message) as error:
        read_model(model, torch.rand(3, 2))
    assert "inplace=False" in str(error.value) or "out-of-place" in str(error.value)
    assert_state_equal(model, before)


class Hardswish(nn.Module):
    """An in-place module nonsingular has no operator for, writing into a tensor that a product
    saved for its gradient and the skip also read."""

    def __init__(self):
        super().__init__()
        self.fc1 = lin([[1.0], [-1.0]], [0.0, 0.1])
        self.act = nn.Hardswish(inplace=True)
        self.fc2 = lin([[-1.0, -1.0], [0.0, 0.0]], [0.245, 0.0])

    def forward(self, x):
        h = self.fc1(x)
        square = h * h
        return self.fc2(self.act(h) + square + h)


def test_a_module_without_an_operator_is_run_out_of_place_and_left_as_it_was():
    model = Hardswish().eval()
    with torch.no_grad():
        torch.testing.assert_close(read_model(model, AT)(AT), model(AT.clone()))
    attacked_margins(model, X, Y, THREAT)  # gradients through the reading: nothing overwritten
    assert model.act.inplace
