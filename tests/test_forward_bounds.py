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


def _bounds_of(model, x, threat, unit=0.0):
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
        _bounds_of(model, x, threat)
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
    graph, region, bounds = _bounds_of(model, x, threat)
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
    _, _, whole = _bounds_of(model, x, threat)
    monkeypatch.setattr(crown, "ROW_ELEMENTS", 3 * 5 * 4 * 8 * 8)  # 5 rows a pass
    graph, _, parts = _bounds_of(model, x, threat)
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
    graph, _, fast = _bounds_of(model, x, threat)
    seen = []
    weight_term = crown_engine._weight_term

    def spy(bounds, index, lam, h, into, first, magnitude):
        seen.append(first and lam.shape[1] > 0)
        return weight_term(bounds, index, lam, h, into, first, magnitude)

    monkeypatch.setattr(crown_engine, "_weight_term", spy)
    _bounds_of(model, x, threat)
    assert any(seen), "some convolution was reached by one-value rows"
    monkeypatch.setattr(crown_engine, "_PER_VALUE", ())
    _, _, joint = _bounds_of(model, x, threat)
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
    graph, _, right = _bounds_of(model, x, threat)
    monkeypatch.setattr(crown_engine, "_PER_VALUE", (object,))  # every operator, unchecked
    monkeypatch.setattr(torch, "count_nonzero", lambda t, dim: torch.zeros_like(t[..., 0]))
    _, _, loose = _bounds_of(model, x, threat)
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
