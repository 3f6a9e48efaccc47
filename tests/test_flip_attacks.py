"""Bit-flip attacks: every reported flip set replays exactly on the unmodified model (checked by
flipping the integers independently, with Python's own two's complement), the search beats
random faults, and bad threats are refused before anything runs."""

from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F

import nonsingular as ns
from nonsingular import data
from nonsingular.model.architectures import mlp


@pytest.fixture(scope="module")
def trained():
    d = data.load("digits")
    torch.manual_seed(0)
    model = mlp((1, 8, 8), hidden=(32, 32))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(d.x_train), d.y_train).backward()
        opt.step()
    return ns.quantize(model), d.x_test[:120], d.y_test[:120]


def independent_logits(q_model, flips, x):
    """The model with its integers flipped by Python int arithmetic (not the library's)."""
    grid = ns.quantized(q_model)
    ints = grid.integers(q_model)
    copy = deepcopy(q_model)
    params = dict(copy.named_parameters())
    top = 1 << grid.bits
    for name, index, bit in flips:
        flat = ints[name].flatten()
        u = (int(flat[index]) % top) ^ (1 << bit)
        flat[index] = u - top if u >= top // 2 else u
        ints[name] = flat.view_as(ints[name])
    with torch.no_grad():
        for name in {n for n, _, _ in flips}:
            params[name].copy_(ints[name].to(params[name].dtype) * grid.scales[name])
    copy.eval()
    with torch.no_grad():
        return copy(x)


def margin(logits, y):
    true = logits[0, y]
    return true - torch.cat([logits[0, :y], logits[0, y + 1 :]]).max()


def check_replays(q_model, result, y, rows):
    for i in rows:
        flips = result.bit_flips(i)
        assert len(flips) <= result.threat.flips
        logits = independent_logits(q_model, flips, result.x_adv[i : i + 1])
        assert float(margin(logits, int(y[i]))) == float(result.margins[i])
        assert torch.equal(result.replay(q_model, i), logits)


def test_shared_search_replays_exactly_and_beats_random_faults(trained):
    q_model, x, y = trained
    before = {k: v.clone() for k, v in q_model.state_dict().items()}
    q_model.train()
    shared = ns.attack(q_model, x, y, ns.Threat(flips=4, scope="shared"))
    assert q_model.training  # mode restored, weights untouched
    assert all(torch.equal(v, before[k]) for k, v in q_model.state_dict().items())
    assert all(shared.bit_flips(i) == shared.bit_flips(0) for i in range(len(y)))
    check_replays(q_model, shared, y, range(0, len(y), 7))
    threat = ns.Threat(flips=4, scope="shared")
    faults = ns.attack(q_model, x, y, threat, method="noise", samples=20)
    assert len(faults.accuracy_trace) == 20
    assert shared.robust_accuracy < float(faults.accuracy_trace.mean()) - 0.02
    check_replays(q_model, faults, y, range(0, len(y), 11))


def test_per_example_search_breaks_most_examples_with_its_replayable_flips(trained):
    q_model, x, y = trained
    result = ns.attack(q_model, x[:40], y[:40], ns.Threat(flips=2))
    assert result.robust_accuracy < result.clean_accuracy - 0.3
    check_replays(q_model, result, y, range(40))
    flips = result.bit_flips(0)
    assert result.weight_deltas(0).keys() == {n for n, _, _ in flips}


def test_joint_search_moves_inputs_inside_the_ball_and_replays(trained):
    q_model, x, y = trained
    threat = ns.Threat(flips=1, eps_x=0.05, scope="shared")
    result = ns.attack(q_model, x[:30], y[:30], threat)
    assert float((result.x_adv - x[:30]).abs().max()) <= 0.05 + 1e-6
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    flips_only = ns.attack(q_model, x[:30], y[:30], ns.Threat(flips=1, scope="shared"))
    assert result.robust_accuracy <= flips_only.robust_accuracy
    check_replays(q_model, result, y, range(0, 30, 3))


def test_bits_and_layers_restrict_the_flips(trained):
    q_model, x, y = trained
    threat = ns.Threat(flips=3, bits=(7,), layers=("3",), scope="shared")
    result = ns.attack(q_model, x, y, threat)
    flips = result.bit_flips(0)
    assert flips and all(n == "3.weight" and b == 7 for n, _, b in flips)


def test_flips_to_reaches_the_target_by_replay(trained):
    q_model, x, y = trained
    found = ns.flips_to(q_model, x, y, max_flips=60)
    assert found.target == pytest.approx(0.11)
    assert found.flips is not None and len(found.flip_set) == found.flips
    logits = independent_logits(q_model, found.flip_set, x)
    assert float((logits.argmax(1) == y).float().mean()) == found.replayed <= found.target
    assert all(a > found.target for a in found.accuracy[: found.flips])


def test_bad_flip_threats_raise_before_anything_runs(trained):
    q_model, x, y = trained
    float_model = mlp((1, 8, 8), hidden=(4,))
    with pytest.raises(ns.QuantizationError, match="not quantized"):
        ns.attack(float_model, x, y, ns.Threat(flips=1))
    with pytest.raises(ns.ThreatError, match="8 bits"):
        ns.attack(q_model, x, y, ns.Threat(flips=1, bits=(8,)))
    with pytest.raises(ns.ThreatError, match="exceeds the 320 bits"):
        ns.attack(q_model, x, y, ns.Threat(flips=321, bits=(0,), layers=("5.weight",)))
    with pytest.raises(ns.ThreatError, match="not a quantized weight"):
        ns.attack(q_model, x, y, ns.Threat(flips=1, layers=("5.bias",)))
    with pytest.raises(ns.InputError):
        ns.attack(q_model, x, y + 20, ns.Threat(flips=1))


def test_evaluate_runs_a_grid_over_flips(trained):
    q_model, x, y = trained
    grid = ns.grid(flips=[0, 1, 8], scope="shared")
    assert [t.flips for t in grid] == [0, 1, 8]
    table = ns.evaluate(q_model, (x, y), grid, certify=["crown"], progress=False)
    attacked = [r.attacked for r in table.rows]
    assert attacked[0] == table.rows[0].clean  # no flips: the clean accuracy
    assert attacked[2] < attacked[0]
    for r in table.rows:
        assert r.certified["crown"] <= r.attacked
    with pytest.raises(ns.ThreatError, match="eps_w at 0"):
        ns.grid(eps_w=[0.1], flips=[1])
