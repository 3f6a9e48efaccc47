"""CROWN's weight term for a weight shared across positions (a convolution's kernel, a Linear
over a sequence) is taken jointly over them: exact where the input is fixed (checked against
the closed-form worst case, from autograd), equal to the dense layer's where there is one
position, and sound against random and attacked perturbations run through the unmodified
model."""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nonsingular as ns
from nonsingular import Threat
from nonsingular.certificates import crown_engine as engine
from nonsingular.certificates.crown_engine import backward, margin_matrix
from nonsingular.certificates.rounding import certificate_unit
from nonsingular.model import lemma

from .test_certificates import ALL_MODES, check_sound
from .test_forward_bounds import crown_bounds_of

MODES = [("absolute", "linf"), ("relative", "linf"), ("layer", "linf"), *ALL_MODES[3:]]


@contextlib.contextmanager
def uncoupled():
    """The position-by-position box for shared weights (the term before this one)."""
    saved, engine.COUPLED = engine.COUPLED, False
    try:
        yield
    finally:
        engine.COUPLED = saved


class Sequence(nn.Module):
    """A Linear over a sequence ``(B, T, n)``, then a dense head on the flattened result."""

    def __init__(self, steps: int, n_in: int, n_out: int, classes: int) -> None:
        super().__init__()
        self.first = nn.Linear(n_in, n_out)
        self.head = nn.Linear(steps * n_out, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.first(x), 1))


def shared_then_dense(kind: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """``first -> flatten -> linear`` (no activation: the margin is linear in the first layer's
    weights) in float64, and a batch of inputs."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "conv2d":
        first = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        model, x = (
            nn.Sequential(first, nn.Flatten(), nn.Linear(4 * 16, 5)),
            torch.rand(6, 2, 7, 7, generator=g),
        )
    elif kind == "conv1d":
        first = nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2)
        model, x = (
            nn.Sequential(first, nn.Flatten(), nn.Linear(6 * 9, 5)),
            torch.rand(6, 4, 9, generator=g),
        )
    else:
        model, x = Sequence(7, 3, 4, 5), torch.rand(6, 7, 3, generator=g)
    return model.double().eval(), x.double()


def first_layer(model: nn.Module) -> tuple[str, nn.Module]:
    return next(
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
    )


def exact_worst_margins(model, x, y, threat):
    """``(B, K)`` the least margins over the first layer's weight (and bias) budget with the
    input fixed: a margin is ``m(0) + <Delta_W, G_W> + <Delta_b, G_b>`` with ``G`` its gradient
    in those parameters, so its least value is ``m(0) - R . |G|`` (linf) or
    ``m(0) - rho ||G||`` (l2) for each tensor's own radius (the threat model's table)."""
    _, layer = first_layer(model)
    params = [layer.weight] + ([layer.bias] if threat.bias else [])
    worst = torch.full((len(x), model(x[:1]).shape[1]), float("inf"), dtype=x.dtype)
    for i in range(len(x)):
        logits = model(x[i : i + 1])[0]
        for j in range(len(logits)):
            if j == y[i]:
                continue
            margin = logits[y[i]] - logits[j]
            grads = torch.autograd.grad(margin, params, retain_graph=True)
            term = 0.0
            for p, grad in zip(params, grads, strict=True):
                p = p.detach()
                if threat.w_norm == "l2":
                    rho = threat.eps_w * (p.norm() if threat.w_mode == "relative" else 1.0)
                    term = term + rho * grad.norm()
                else:
                    scale = {"absolute": 1.0, "relative": p.abs(), "layer": p.abs().max()}
                    term = term + (threat.eps_w * scale[threat.w_mode] * grad.abs()).sum()
            worst[i, j] = margin.detach() - term
    return worst


def clean_margins(model, x, y):
    with torch.no_grad():
        logits = model(x)
    return logits.gather(1, y[:, None]) - logits


@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "sequence"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [False, True])
def test_crown_weight_term_is_the_exact_worst_case_where_the_input_is_fixed(kind, mode, bias):
    model, x = shared_then_dense(kind, seed=len(kind))
    y = model(x).argmax(1).detach()
    name, _ = first_layer(model)
    eps = 0.05 if mode[1] == "linf" else 0.3
    threat = Threat(eps_w=eps, w_mode=mode[0], w_norm=mode[1], layers=[name], bias=bias)
    exact = exact_worst_margins(model, x, y, threat)
    clean = clean_margins(model, x, y)
    lower = ns.certify(model, x, y, threat, "crown").lower
    wrong = torch.ones_like(lower, dtype=torch.bool).scatter(1, y[:, None], False)
    assert bool((lower[wrong] <= exact[wrong] + 1e-9).all()), (
        "the bound is above a reachable margin"
    )
    exact_term, term = clean[wrong] - exact[wrong], clean[wrong] - lower[wrong]
    assert float(exact_term.min()) > 1e-3  # the budget matters
    assert bool((term <= 1.05 * exact_term).all()), float((term / exact_term).max())


def test_the_position_by_position_box_is_far_from_exact_on_the_same_case():
    """What the exactness test guards against: the old term, on the same network, is several
    times the exact one (so that test fails without the coupling)."""
    model, x = shared_then_dense("conv2d", seed=len("conv2d"))
    y = model(x).argmax(1).detach()
    threat = Threat(eps_w=0.05, layers=["0"])
    exact_term = clean_margins(model, x, y) - exact_worst_margins(model, x, y, threat)
    with uncoupled():
        old = clean_margins(model, x, y) - ns.certify(model, x, y, threat, "crown").lower
    wrong = torch.ones_like(old, dtype=torch.bool).scatter(1, y[:, None], False)
    assert float((old[wrong] / exact_term[wrong]).min()) > 2.0


@pytest.mark.parametrize("method", ["crown", "alpha-crown", "bab"])
@pytest.mark.parametrize("w_norm", ["linf", "l2"])
def test_every_method_certifies_what_is_exactly_robust(method, w_norm):
    """A budget at which every example's exact worst margin keeps a tenth of its clean margin: the
    joint term certifies them all (crown, and alpha-crown and bab through the same engine)."""
    model, x = shared_then_dense("conv2d", seed=3)
    y = model(x).argmax(1).detach()
    unit = Threat(eps_w=1.0, w_norm=w_norm, layers=["0"])
    clean = clean_margins(model, x, y)
    per_unit = clean - exact_worst_margins(model, x, y, unit)  # the term at eps_w = 1
    wrong = torch.ones_like(clean, dtype=torch.bool).scatter(1, y[:, None], False)
    eps = 0.9 * float((clean[wrong] / per_unit[wrong]).min())
    threat = Threat(eps_w=eps, w_norm=w_norm, layers=["0"])
    assert bool((exact_worst_margins(model, x, y, threat)[wrong] > 0).all())
    assert bool(ns.certify(model, x, y, threat, method, time_limit=2.0).certified.all())


def _paired(conv: nn.Module, dense: nn.Module, head: nn.Module) -> None:
    with torch.no_grad():
        dense.weight.copy_(conv.weight.reshape(dense.weight.shape))
        dense.bias.copy_(conv.bias)
    head.double()


@pytest.mark.parametrize("mode", MODES)
def test_one_position_convolutions_are_bounded_like_the_dense_layer(mode):
    """A 1x1 convolution on a 1x1 image, and a kernel as large as its image, are a Linear:
    with the input fixed (where the dense layer's term is exact) the bounds agree."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    eps = 0.05 if mode[1] == "linf" else 0.3
    threat = Threat(eps_w=eps, w_mode=mode[0], w_norm=mode[1], bias=True)
    for size, kernel in ((1, 1), (3, 3)):
        conv, dense = nn.Conv2d(3, 6, kernel), nn.Linear(3 * size * size, 6)
        _paired(conv, dense, conv)
        head = nn.Sequential(nn.ReLU(), nn.Linear(6, 4))
        as_conv = nn.Sequential(conv, nn.Flatten(), head).double().eval()
        as_dense = nn.Sequential(nn.Flatten(), dense, head).double().eval()
        x = torch.rand(5, 3, size, size, generator=g, dtype=torch.float64)
        y = as_dense(x).argmax(1)
        a = ns.certify(as_conv, x, y, threat, "crown").lower
        b = ns.certify(as_dense, x, y, threat, "crown").lower
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class Pointwise(nn.Module):
    """A Linear over every pixel's channels (``(B, H, W, C)``), then ReLU and a dense head:
    the function of a 1x1 convolution with the same weights."""

    def __init__(self, first: nn.Linear, head: nn.Module) -> None:
        super().__init__()
        self.first, self.head = first, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(torch.flatten(torch.relu(h), 1))


@pytest.mark.parametrize("mode", MODES)
def test_a_pointwise_convolution_is_bounded_like_a_linear_over_its_pixels(mode):
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    conv, dense = nn.Conv2d(3, 4, 1), nn.Linear(3, 4)
    _paired(conv, dense, conv)
    head = nn.Linear(4 * 25, 3)
    as_conv = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head).double().eval()
    as_dense = Pointwise(dense, head).double().eval()
    x = torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64)
    y = as_conv(x).argmax(1)
    eps = 0.02 if mode[1] == "linf" else 0.2
    threat = Threat(eps_x=0.02, eps_w=eps, w_mode=mode[0], w_norm=mode[1], bias=True)
    a = ns.certify(as_conv, x, y, threat, "crown").lower
    b = ns.certify(as_dense, x, y, threat, "crown").lower
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@st.composite
def shared_weight_networks(draw):
    """Small ReLU networks whose first layers share their weights across positions: conv2d
    (stride, dilation, groups, padding modes), conv1d, or a Linear over a sequence."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["conv2d", "conv1d", "sequence"]))
    bias = draw(st.booleans())
    if kind == "sequence":
        model = nn.Sequential(nn.Linear(3, 4, bias=bias), nn.ReLU(), nn.Flatten(), nn.Linear(20, 3))
        x = torch.rand(3, 5, 3, generator=g)
    else:
        conv_type = nn.Conv2d if kind == "conv2d" else nn.Conv1d
        groups, dilation = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
        mode = draw(st.sampled_from(["zeros", "reflect", "circular"]))
        stride = draw(st.sampled_from([1, 2]))
        first = conv_type(2, 4, 3, stride, dilation, dilation, groups, bias, mode)
        second = conv_type(4, 2, 2, 1, 0, bias=bias)
        shape = (2, 6, 6) if kind == "conv2d" else (2, 8)
        x = torch.rand(3, *shape, generator=g)
        body = nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), nn.Flatten())
        width = body(x[:1]).shape[1]
        model = nn.Sequential(*body, nn.Linear(width, 3, bias=bias))
    for p in model.parameters():
        p.data.mul_(draw(st.sampled_from([1.0, 2.0])))
    model.eval()
    y = torch.randint(0, 3, (3,), generator=g)
    return model, x, y


@st.composite
def joint_threats(draw):
    w_mode, w_norm = draw(st.sampled_from(MODES))
    x_norm = draw(st.sampled_from(["linf", "l2"]))
    eps_x = draw(st.sampled_from([0.0, 0.01, 0.05]))
    return Threat(
        eps_x=eps_x * (3 if x_norm == "l2" else 1),
        eps_w=draw(st.sampled_from([0.01, 0.05, 0.2])),
        x_norm=x_norm,
        w_mode=w_mode,
        w_norm=w_norm,
        bias=draw(st.booleans()),
        scope=draw(st.sampled_from(["per-example", "shared"])),
    )


@settings(max_examples=12)
@given(case=shared_weight_networks(), threat=joint_threats())
def test_the_joint_term_is_sound_and_never_looser_than_the_box(case, threat):
    """Sound, and over the same intermediate boxes never looser than the box (each pass takes
    the smaller of the two terms). The whole bound is not compared: tighter boxes can flip
    CROWN's adaptive slope of a neuron, which fresh seeds found to cost a margin now and then."""
    model, x, y = case
    check_sound(model, x, y, threat, ["crown", "alpha-crown"])
    unit = certificate_unit(torch.float32, x.device, torch.float64)
    graph, region, bounds = crown_bounds_of(model, x, threat, unit)
    c = margin_matrix(y, 3, torch.float64)
    joint = backward(graph, region, bounds, c, graph.output)
    with uncoupled():
        box = backward(graph, region, bounds, c, graph.output)
    wrong = torch.isfinite(box)  # +inf at the label
    assert bool((joint[wrong] >= box[wrong] - 1e-9 * (1 + box[wrong].abs())).all())


@pytest.mark.parametrize("w_norm", ["linf", "l2"])
def test_the_input_box_enters_the_joint_term(w_norm):
    """A zero kernel whose input fills its whole domain: the input moves the margin only through
    the weight perturbation, so the term's part for the input's radius is all there is (the
    bound without it is above what the attack reaches)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, 1, 1), nn.Flatten(), nn.Linear(4 * 25, 3)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    x = torch.full((4, 2, 5, 5), 0.5)
    y = model(x).argmax(1)
    eps = 0.05 if w_norm == "linf" else 0.3
    check_sound(model, x, y, Threat(eps_x=0.5, eps_w=eps, w_norm=w_norm, layers=["0"]), ["crown"])


@pytest.mark.parametrize("w_norm", ["linf", "l2"])
def test_the_joint_term_taken_row_by_row_is_the_same(monkeypatch, w_norm):
    """Rows of coefficients are taken in chunks (the joint matrix can be far larger than they
    are): one row at a time gives the same bounds."""
    model, x = shared_then_dense("conv2d", seed=2)
    y = model(x).argmax(1).detach()
    threat = Threat(eps_x=0.05, eps_w=0.05 if w_norm == "linf" else 0.3, w_norm=w_norm, bias=True)
    whole = ns.certify(model, x, y, threat, "crown").lower
    monkeypatch.setattr(lemma, "JOINT_ELEMENTS", 1)
    torch.testing.assert_close(ns.certify(model, x, y, threat, "crown").lower, whole)
