"""The cheap first pass of CROWN's intermediate bounds (certificates/forward.py): its boxes hold
every value the model computes, CROWN still tightens every neuron they leave unstable, and
certificates stay sound on residual and convolutional networks with batch norm."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nonsingular as ns
from nonsingular import Threat
from nonsingular.certificates import crown, forward
from nonsingular.certificates.crown import crown_bounds
from nonsingular.certificates.crown_engine import backward
from nonsingular.certificates.region import InputRegion
from nonsingular.model import read_model
from nonsingular.model.architectures import resnet
from nonsingular.model.graph import VARIABLE
from nonsingular.model.lemma import perturbed_layers

from .test_any_model import check_sound_as_it_runs
from .test_certificates import check_sound, sample_inputs, sample_parameters


def randomized_resnet(seed: int, widths: tuple[int, ...], size: int):
    """The built-in ResNet, small, with random weights and random eval-mode batch-norm
    statistics (scales of both signs), and a batch of 3 inputs in [0, 1]."""
    torch.manual_seed(seed)
    model = resnet((1, size, size), channels=widths, classes=3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.3, 2.0)
            module.weight.data.uniform_(-1.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    model.eval()
    x = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, 3, (3,), generator=torch.Generator().manual_seed(seed + 1))
    return model, x, y


@st.composite
def residual_networks(draw):
    seed = draw(st.integers(0, 2**16))
    widths = draw(st.sampled_from([(2,), (2, 3), (3, 4)]))
    return randomized_resnet(seed, widths, draw(st.sampled_from([6, 8])))


@st.composite
def joint_threats(draw):
    return Threat(
        eps_x=draw(st.sampled_from([0.0, 0.01, 0.05])),
        eps_w=draw(st.sampled_from([0.0, 0.005, 0.02])),
        w_mode=draw(st.sampled_from(["absolute", "relative"])),
        bias=draw(st.booleans()),
    )


def crown_bounds_of(model, x, threat, unit=0.0):
    """The graph (float64), input region and CROWN's bounds over its own intermediate ones."""
    graph = read_model(model, x).cast(torch.float64)
    budgets = {b.index: b for b in perturbed_layers(graph, threat)}
    region = InputRegion.from_threat(x.double(), threat)
    return graph, region, crown_bounds(graph, budgets, region, "crown", unit)


@settings(max_examples=20, deadline=None)
@given(case=residual_networks(), threat=joint_threats())
def test_forward_boxes_hold_every_value_the_model_computes(case, threat):
    """Every box the first pass concretizes holds the node's value at random inputs and
    weights of the threat, run through the unmodified model's reading."""
    model, x, _ = case
    graph = read_model(model, x)
    found: dict[int, object] = {}
    step = forward.ForwardPass.step

    def spy(self, bounds, index, box_wanted):
        box = step(self, bounds, index, True)
        found[index] = box
        return box if box_wanted else None

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(forward.ForwardPass, "step", spy)
        crown_bounds_of(model, x, threat)
    assert found, "the first pass ran on a network with convolutions"
    generator = torch.Generator().manual_seed(0)
    inputs = sample_inputs(x, threat, 20, generator)
    weights = sample_parameters(model, x, threat, 20, generator)
    for i in range(20):
        tensors = dict(graph.tensors)
        tensors.update({k: v[i] for k, v in weights.items()})
        values = graph.with_tensors(tensors).values(inputs[i])
        for index, box in found.items():
            value = values[index].double()
            slack = 1e-5 * (1 + value.abs())  # the float32 model's own rounding
            assert bool((value >= box.lower - slack).all()), (index, graph.nodes[index].label)
            assert bool((value <= box.upper + slack).all()), (index, graph.nodes[index].label)


def unsettled(model, x, threat):
    """Per node CROWN tightened, the neurons its final box leaves unstable whose bounds are
    looser than a backward pass over the same earlier bounds gives: a neuron the selection
    left out. Empty when every neuron CROWN could help was tightened."""
    graph, region, bounds = crown_bounds_of(model, x, threat)
    missed = {}
    for node in graph.nodes:
        if node.kind != VARIABLE or not crown.is_relu(node):
            continue
        (k,) = node.box_refs
        box = bounds.values[k]
        unstable = ((box.lower < 0) & (box.upper > 0)).flatten(1)
        if not bool(unstable.any()) or k in crown._exact_nodes(graph, region):
            continue
        size = unstable.shape[1]
        eye = torch.eye(size, dtype=torch.float64).expand(len(x), size, size)
        lam = torch.cat([eye, -eye], 1).reshape(len(x), 2 * size, *box.shape[1:])
        bound = backward(graph, region, bounds, lam, k)
        low, high = bound[:, :size], -bound[:, size:]
        slack = 1e-9 * (1 + low.abs() + high.abs())
        loose = (box.lower.flatten(1) < low - slack) | (box.upper.flatten(1) > high + slack)
        if bool((loose & unstable).any()):
            missed[k] = (loose & unstable).nonzero().tolist()
    return missed


@settings(max_examples=15, deadline=None)
@given(case=residual_networks(), threat=joint_threats())
def test_every_unstable_neuron_gets_crown_bounds(case, threat):
    model, x, _ = case
    assert unsettled(model, x, threat) == {}


def test_a_selection_that_drops_an_unstable_neuron_is_caught(monkeypatch):
    """The check above is not vacuous: leave out of the selection one neuron of the deepest
    node CROWN tightens (where the first pass is loosest), and it finds that neuron."""
    model, x, _ = randomized_resnet(3, (3, 4), 8)
    threat = Threat(eps_x=0.05, eps_w=0.005)
    assert unsettled(model, x, threat) == {}
    graph = read_model(model, x)
    relu_inputs = [n.box_refs[0] for n in graph.nodes if crown.is_relu(n)]
    target = crown._relaxed_inputs(graph)[max(relu_inputs)]
    wanted, dropped = crown._wanted, []

    def drop_one(graph, readers, box):
        mask = wanted(graph, readers, box)
        if mask is not None and readers == target and not dropped and bool(mask[0].any()):
            dropped.append(int(mask[0].nonzero()[0]))
            mask = mask.clone()
            mask[0, dropped[0]] = False
        return mask

    monkeypatch.setattr(crown, "_wanted", drop_one)
    missed = unsettled(model, x, threat)
    assert dropped, "the selection was asked for the deepest node"
    assert [0, dropped[0]] in missed[max(relu_inputs)]


@pytest.mark.parametrize("seed", range(3))
def test_tightening_in_passes_of_few_rows_gives_the_boxes_of_one_pass(seed, monkeypatch):
    """``ROW_ELEMENTS`` splits a node's rows into several backward passes: with passes of a
    few rows each (batch 3), every box equals the one a single pass gives, and no neuron is
    left out (``unsettled``)."""
    model, x, _ = randomized_resnet(seed, (3, 4), 8)
    threat = Threat(eps_x=0.05, eps_w=0.005, bias=True)
    monkeypatch.setattr(crown, "ROW_ELEMENTS", 1 << 40)
    _, _, whole = crown_bounds_of(model, x, threat)
    monkeypatch.setattr(crown, "ROW_ELEMENTS", 3 * 5 * 4 * 8 * 8)  # 5 rows a pass
    graph, _, parts = crown_bounds_of(model, x, threat)
    compared = 0
    for node in graph.nodes:
        a, b = whole.values[node.index], parts.values[node.index]
        if node.kind == VARIABLE:
            torch.testing.assert_close(a.lower, b.lower, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a.upper, b.upper, rtol=1e-12, atol=1e-12)
            compared += 1
    assert compared > 10
    assert unsettled(model, x, threat) == {}


@pytest.mark.parametrize("seed", range(3))
def test_one_value_rows_take_the_box_weight_term_at_no_loss(seed, monkeypatch):
    """The weight term of a convolution that a tightening's rows reach still one neuron each
    (through batch norm, sums, activations) is the box's, without the joint support: the
    same boxes as with the joint support everywhere, within rounding."""
    from nonsingular.certificates import crown_engine

    model, x, _ = randomized_resnet(seed, (3, 4), 8)
    threat = Threat(eps_x=0.02, eps_w=0.01, bias=True)
    graph, _, fast = crown_bounds_of(model, x, threat)
    seen = []
    weight_term = crown_engine._weight_term

    def spy(bounds, index, lam, h, into, first, magnitude):
        seen.append(first and lam.shape[1] > 0)
        return weight_term(bounds, index, lam, h, into, first, magnitude)

    monkeypatch.setattr(crown_engine, "_weight_term", spy)
    crown_bounds_of(model, x, threat)
    assert any(seen), "some convolution was reached by one-value rows"
    monkeypatch.setattr(crown_engine, "_PER_VALUE", ())
    _, _, joint = crown_bounds_of(model, x, threat)
    for node in graph.nodes:
        if node.kind == VARIABLE:
            a, b = fast.values[node.index], joint.values[node.index]
            torch.testing.assert_close(a.lower, b.lower, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(a.upper, b.upper, rtol=1e-9, atol=1e-12)


def test_the_box_weight_term_on_rows_of_many_values_is_caught(monkeypatch):
    """The check above is not vacuous: taking the box's weight term wherever a pass may hold
    one value per row, unchecked, loosens some box."""
    from nonsingular.certificates import crown_engine

    model, x, _ = randomized_resnet(1, (3, 4), 8)
    threat = Threat(eps_x=0.02, eps_w=0.01, bias=True)
    graph, _, right = crown_bounds_of(model, x, threat)
    monkeypatch.setattr(crown_engine, "_PER_VALUE", (object,))  # every operator, unchecked
    monkeypatch.setattr(crown_engine, "one_value_rows", lambda magnitude: True)
    _, _, loose = crown_bounds_of(model, x, threat)
    wider = [
        n.index
        for n in graph.nodes
        if n.kind == VARIABLE
        and bool((loose.values[n.index].upper > right.values[n.index].upper + 1e-9).any())
    ]
    assert wider


def test_passes_that_lose_their_last_rows_are_caught(monkeypatch):
    """The check above is not vacuous: a split into passes that drops the last pass's rows
    leaves neurons without CROWN bounds, and ``unsettled`` finds them."""
    model, x, _ = randomized_resnet(3, (3, 4), 8)
    threat = Threat(eps_x=0.05, eps_w=0.005)
    monkeypatch.setattr(crown, "ROW_ELEMENTS", 3 * 5 * 4 * 8 * 8)
    backward_pass = crown.backward

    def losing(graph, region, bounds, lam, k, **kwargs):
        bound = backward_pass(graph, region, bounds, lam, k, **kwargs)
        if lam.shape[1] < 5:  # the last, short pass of a node: as if never run
            return torch.full_like(bound, -torch.inf)
        return bound

    monkeypatch.setattr(crown, "backward", losing)
    assert unsettled(model, x, threat) != {}


@settings(max_examples=15, deadline=None)
@given(case=residual_networks(), threat=joint_threats())
def test_crown_is_sound_on_random_residual_networks(case, threat):
    model, x, y = case
    check_sound(model, x, y, threat, ["crown", "alpha-crown"])


@settings(max_examples=10, deadline=None)
@given(case=residual_networks(), threat=joint_threats())
def test_crown_is_sound_on_residual_networks_as_they_run(case, threat):
    model, x, y = case
    check_sound_as_it_runs(model, x, y, threat, ["crown"])


@pytest.mark.parametrize("seed", range(4))
def test_the_first_pass_certifies_no_less_than_interval_boxes_alone(seed, monkeypatch):
    """Against the interval boxes alone (``FIRST_PASS`` off: git main's CROWN), on residual
    networks: every example certified before is certified after."""
    model, x, _ = randomized_resnet(seed, (3, 4), 8)
    y = model(x).argmax(1)
    threat = Threat(eps_x=0.01, eps_w=0.002)
    after = ns.certify(model, x, y, threat, "crown")
    monkeypatch.setattr(crown, "FIRST_PASS", False)
    before = ns.certify(model, x, y, threat, "crown")
    assert bool(before.certified.any())
    assert bool((after.certified | ~before.certified).all())


def adjoint_gap(op, weight: torch.Tensor, h: torch.Tensor) -> float:
    """How far ``op.transpose`` is from the adjoint of ``op.apply`` at ``h`` (float64):
    the largest of ``|<lam, A h> - <A^T lam, h>|`` over random rows ``lam`` and of its gap
    to PyTorch's own ``convolution_backward``."""
    out = op.apply(h, weight)
    generator = torch.Generator().manual_seed(1)
    lam = torch.randn(len(h), 4, *out.shape[1:], dtype=h.dtype, generator=generator)
    back = op.transpose(lam, tuple(h.shape[1:]), weight)
    left = (lam * out[:, None]).flatten(2).sum(-1)
    right = (back * h[:, None]).flatten(2).sum(-1)
    if op.pad is not None:  # the explicit padding's adjoint too: no reference to compare with
        return float((left - right).abs().max())
    grad = torch.nn.grad.conv2d_input if op.kind == "conv2d" else torch.nn.grad.conv1d_input
    flat = lam.reshape(-1, *lam.shape[2:])
    reference = grad((len(flat), *h.shape[1:]), weight, flat, **op.conv)
    return max(
        float((left - right).abs().max()),
        float((back.reshape(reference.shape) - reference).abs().max()),
    )


@st.composite
def convolutions(draw):
    """A conv1d or conv2d ``Affine`` with random channels, groups, kernel, stride, padding,
    dilation and (sometimes) an explicit ``F.pad`` of any mode before it, its weight and an
    input (float64) it reads at least one window of."""
    from nonsingular.model.operators.affine import Affine

    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 5)), groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    mode = draw(st.sampled_from([None, "constant", "reflect", "replicate", "circular"]))
    size = tuple(  # reflect pads less than the size
        max(1 if mode is None else 2, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 4))
        for k, p, d in zip(kernel, padding, dilation, strict=True)
    )
    conv = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    pad = None if mode is None else tuple(draw(st.integers(0, 1)) for _ in range(2 * dims))
    kind = "conv1d" if dims == 1 else "conv2d"
    op = Affine(kind, conv=conv, pad=pad, pad_mode=mode or "constant")
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    weight = torch.randn(c_out, c_in // groups, *kernel, dtype=torch.float64, generator=generator)
    h = torch.randn(2, c_in, *size, dtype=torch.float64, generator=generator)
    return op, weight, h


@settings(max_examples=60, deadline=None)
@given(case=convolutions())
def test_convolutions_transpose_to_their_adjoint(case):
    """``Affine.transpose`` (a transposed convolution, or a matrix product and col2im for
    short weight rows) is the adjoint of the convolution, whatever its stride leaves unread."""
    op, weight, h = case
    assert adjoint_gap(op, weight, h) < 1e-10


@pytest.mark.parametrize("fan_in", ["short", "long"])
def test_a_transpose_that_drops_a_term_is_caught(fan_in, monkeypatch):
    """The check above is not vacuous, on both ways ``Affine._adjoint`` takes: a col2im that
    loses one column, or a transposed convolution that loses one output channel, is caught."""
    from nonsingular.model.operators import affine

    channels = 1 if fan_in == "short" else 8  # fan-in 9 (col2im) or 72
    conv = {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    op = affine.Affine("conv2d", conv=conv)
    weight = torch.randn(4, channels, 3, 3, dtype=torch.float64)
    h = torch.randn(2, channels, 8, 8, dtype=torch.float64)
    assert (op.fan_in(weight) <= affine.FOLD_FAN_IN) == (fan_in == "short")
    assert adjoint_gap(op, weight, h) < 1e-10
    fold, transposed = affine.F.fold, dict(affine._CONV_TRANSPOSE)

    def losing_fold(cols, *args, **kwargs):
        cols = cols.clone()
        cols[..., -1] = 0.0
        return fold(cols, *args, **kwargs)

    def losing_transpose(grad, *args):
        grad = grad.clone()
        grad[:, 0] = 0.0
        return transposed["conv2d"](grad, *args)

    monkeypatch.setattr(affine.F, "fold", losing_fold)
    monkeypatch.setitem(affine._CONV_TRANSPOSE, "conv2d", losing_transpose)
    assert adjoint_gap(op, weight, h) > 1e-3


def test_concretizing_twice_gives_the_same_box_and_leaves_the_bounds_alone():
    """``forward.concretize`` overwrites only its own temporaries (the magnitudes of ``M - D``
    and ``M + D``): the bounds it reads are unchanged, a second call gives the same box, and
    the box is the one the two linear functions give over the input box, computed here by
    brute force over its corners' coordinates."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 2, 3, dtype=torch.float64, generator=generator)
    region = InputRegion.from_threat(x, Threat(eps_x=0.1))
    mid = torch.randn(2, 6, 4, 5, dtype=torch.float64, generator=generator)
    rad = torch.rand(2, 6, 4, 5, dtype=torch.float64, generator=generator)
    const = torch.randn(2, 4, 5, dtype=torch.float64, generator=generator)
    for lin in (
        forward.Linear(mid, const, rad, const.abs()),
        forward.Linear(mid, const, None, const.abs()),
        forward.Linear(None, const, rad, const.abs()),
    ):
        saved = [None if t is None else t.clone() for t in (lin.mid, lin.rad)]
        first = forward.concretize(lin, region)
        for before, now in zip(saved, (lin.mid, lin.rad), strict=True):
            assert (before is None and now is None) or torch.equal(before, now)
        again = forward.concretize(lin, region)
        assert torch.equal(first.lower, again.lower) and torch.equal(first.upper, again.upper)
        m = torch.zeros_like(mid) if lin.mid is None else lin.mid
        d = torch.zeros_like(rad) if lin.rad is None else lin.rad
        lo, hi = (
            region.lower.flatten(1)[:, :, None, None],
            region.upper.flatten(1)[:, :, None, None],
        )
        low_c, high_c = m - d, m + d  # each coordinate at the end of its range that is least
        least = torch.minimum(low_c * lo, low_c * hi).sum(1)
        most = torch.maximum(high_c * lo, high_c * hi).sum(1)
        torch.testing.assert_close(first.lower, const - const.abs() + least)
        torch.testing.assert_close(first.upper, const + const.abs() + most)


def test_one_value_rows_are_told_from_rows_of_two():
    """``crown_engine.one_value_rows``: rows of one nonzero (or none) pass; a row holding two
    nonzeros, however small the second, fails."""
    from nonsingular.certificates.crown_engine import one_value_rows

    rows = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
    rows[0, 0, 1, 2], rows[1, 2, 3, 4] = 0.7, 2.5
    assert one_value_rows(rows)
    assert one_value_rows(rows[:, :0])
    rows[1, 1, 0, 0], rows[1, 1, 2, 2] = 1.0, 1e-12
    assert not one_value_rows(rows)
