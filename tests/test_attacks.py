"""The joint attack: materializable, strong, and harmless to the model it attacks."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import nonsingular as ns
from nonsingular import ConfigError, InputError, Threat
from nonsingular.attacks import JointSpace, margins
from nonsingular.attacks.best import BestSoFar
from nonsingular.attacks.space import finite_gradient
from nonsingular.model import read_model

from .conftest import assert_state_equal, state_copy

THREATS = {
    "absolute": Threat(eps_x=0.02, eps_w=1e-3),
    "relative": Threat(eps_x=0.02, eps_w=0.05, w_mode="relative"),
    "layer": Threat(eps_x=0.02, eps_w=2e-3, w_mode="layer"),
    "l2-absolute": Threat(eps_x=0.5, x_norm="l2", eps_w=0.3, w_norm="l2"),
    "l2-relative": Threat(eps_x=0.02, eps_w=0.05, w_norm="l2", w_mode="relative"),
    "bias": Threat(eps_x=0.02, eps_w=1e-3, bias=True),
    "some-layers": Threat(eps_x=0.02, eps_w=3e-3, layers=("1", "5.weight")),
    "shared": Threat(eps_x=0.02, eps_w=1e-3, scope="shared"),
}


def in_ball(threat, w, delta):
    """Independent check of the weight budget (not the library's own ball code)."""
    eps = threat.eps_w
    if threat.w_norm == "l2":
        limit = eps * (w.norm() if threat.w_mode == "relative" else 1.0)
        return bool(delta.norm() <= limit * (1 + 1e-5) + 1e-7)
    limit = {"absolute": eps, "relative": eps * w.abs(), "layer": eps * w.abs().max()}
    return bool((delta.abs() <= limit[threat.w_mode] * (1 + 1e-5) + 1e-7).all())


def input_ok(threat, x, x_adv):
    d = (x_adv - x).flatten()
    size = d.abs().max() if threat.x_norm == "linf" else d.norm()
    return bool(size <= threat.eps_x * (1 + 1e-5) + 1e-6) and bool(
        (x_adv >= 0).all() and (x_adv <= 1).all()
    )


def expected_names(model, threat):
    names = {n for n, p in model.named_parameters() if n.endswith("weight")}
    if threat.layers:
        names = {n for n in names if n in threat.layers or n.rsplit(".", 1)[0] in threat.layers}
    if threat.bias:
        names |= {n.replace("weight", "bias") for n in names}
    return names


def check_materialized(model, x, y, res, threat, rows):
    params = dict(model.named_parameters())
    for i in rows:
        deltas = res.weight_deltas(i)
        assert set(deltas) == expected_names(model, threat)
        for name, delta in deltas.items():
            assert delta.shape == params[name].shape
            assert in_ball(threat, params[name].detach(), delta), name
        assert input_ok(threat, x[i], res.x_adv[i])
        perturbed = {n: p.detach() + deltas.get(n, 0) for n, p in params.items()}
        logits = functional_call(model, perturbed, (res.x_adv[i : i + 1],))
        assert abs(float(margins(logits, y[i : i + 1])) - float(res.margins[i])) < 1e-4
        torch.testing.assert_close(res.replay(model, i), logits)


@pytest.fixture(scope="module")
def sample(mnist):
    idx = torch.randperm(len(mnist.x_test), generator=torch.Generator().manual_seed(1))[:20]
    return mnist.x_test[idx], mnist.y_test[idx]


@pytest.mark.parametrize("name", list(THREATS))
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_materialized_perturbations_are_in_the_ball_and_reproduce_the_margins(
    name, arch, standard_mlp, small_cnn, sample
):
    model = standard_mlp if arch == "mlp" else small_cnn
    threat = THREATS[name]
    if arch == "cnn" and threat.layers:
        threat = threat.replace(layers=("0", "7.weight"))
    x, y = sample
    res = ns.attack(model, x, y, threat, steps=10)
    assert bool((res.margins < res.clean_margins - 1e-3).any()), "the attack found nothing"
    check_materialized(model, x, y, res, threat, range(20))
    if threat.scope == "shared":
        first = res.weight_deltas(0)
        assert all(torch.equal(first[k], res.weight_deltas(7)[k]) for k in first)


@pytest.mark.parametrize("scope", ["per-example", "shared"])
def test_noise_perturbations_are_materializable(scope, small_cnn, sample):
    x, y = sample
    threat = Threat(eps_x=0.1, eps_w=0.02, scope=scope, bias=True)
    res = ns.attack(small_cnn, x, y, threat, method="noise", samples=10)
    assert bool((res.margins < res.clean_margins).any())
    check_materialized(small_cnn, x, y, res, threat, range(20))


def test_conv_kernels_are_per_example_and_dense_layers_use_the_lemma(small_cnn, sample):
    x, y = sample
    res = ns.attack(small_cnn, x, y, Threat(eps_w=0.02), steps=5)
    a, b = res.weight_deltas(0), res.weight_deltas(1)
    assert not torch.equal(a["0.weight"], b["0.weight"])
    space = JointSpace(read_model(small_cnn, x), Threat(eps_w=0.02), x)
    assert {str(k) for k in space.balls} == {"w:0.weight", "w:2.weight", "t:5.weight", "t:7.weight"}


def test_standard_mlp_accuracy_falls_with_each_budget_and_joint_beats_singular(mnist, standard_mlp):
    x, y = mnist.x_test, mnist.y_test
    clean = ns.attack(standard_mlp, x, y, Threat()).robust_accuracy
    assert clean >= 0.93
    eps_x = [0.0, 0.01, 0.02, 0.05]
    eps_w = [0.0, 5e-4, 1e-3, 2e-3]
    acc = {
        (ex, ew): ns.attack(standard_mlp, x, y, Threat(eps_x=ex, eps_w=ew)).robust_accuracy
        for ex in eps_x
        for ew in eps_w
    }
    assert acc[0.0, 0.0] == clean
    tol = 0.005
    for i, ex in enumerate(eps_x):
        for j, ew in enumerate(eps_w):
            if i:
                assert acc[ex, ew] <= acc[eps_x[i - 1], ew] + tol
            if j:
                assert acc[ex, ew] <= acc[ex, eps_w[j - 1]] + tol
            assert acc[ex, ew] <= min(acc[ex, 0.0], acc[0.0, ew]) + tol
    assert acc[0.05, 0.0] < clean - 0.3 and acc[0.0, 2e-3] < clean - 0.3  # budgets that matter
    assert acc[0.02, 1e-3] < min(acc[0.02, 0.0], acc[0.0, 1e-3]) - 0.05  # joint is stronger


@pytest.mark.parametrize(
    "threat",
    [
        Threat(eps_x=0.05),
        Threat(eps_w=1e-3),
        Threat(eps_x=0.02, eps_w=5e-4),
        Threat(eps_w=0.05, w_mode="relative", scope="shared"),
    ],
)
def test_pgd_is_at_least_as_strong_as_random_noise(mnist, standard_mlp, threat):
    x, y = mnist.x_test[:500], mnist.y_test[:500]
    pgd = ns.attack(standard_mlp, x, y, threat, steps=50)
    noise = ns.attack(standard_mlp, x, y, threat, method="noise", samples=50)
    assert pgd.robust_accuracy <= noise.robust_accuracy
    assert bool(pgd.margins.mean() < noise.margins.mean())


def test_shared_perturbation_is_weaker_than_per_example(mnist, standard_mlp):
    x, y = mnist.x_test[:500], mnist.y_test[:500]
    per = ns.attack(standard_mlp, x, y, Threat(eps_w=1e-3)).robust_accuracy
    shared = ns.attack(standard_mlp, x, y, Threat(eps_w=1e-3, scope="shared")).robust_accuracy
    assert per < shared


def test_more_restarts_and_losses_never_hurt(mnist, standard_mlp):
    x, y = mnist.x_test[:300], mnist.y_test[:300]
    threat = Threat(eps_x=0.03, eps_w=3e-4)
    one = ns.attack(standard_mlp, x, y, threat, steps=10)
    many = ns.attack(standard_mlp, x, y, threat, steps=10, restarts=3, loss="both")
    assert bool((many.margins <= one.margins + 1e-6).all())  # first run is the same run
    assert many.robust_accuracy <= one.robust_accuracy


@pytest.mark.parametrize(
    "threat",
    [
        Threat(eps_x=0.03, eps_w=3e-4),
        Threat(eps_x=0.1),
        Threat(eps_w=2e-3, w_mode="relative"),
    ],
    ids=["joint", "input", "weights-relative"],
)
def test_until_broken_breaks_the_same_examples_and_stops_on_them(mnist, standard_mlp, threat):
    """Dropping an example once misclassified changes which examples break in no case (the
    others' runs are theirs alone); the broken ones keep a margin below zero that replays."""
    x, y = mnist.x_test[:200], mnist.y_test[:200]
    full = ns.attack(standard_mlp, x, y, threat, steps=15, restarts=2, loss="both")
    quick = ns.attack(
        standard_mlp, x, y, threat, steps=15, restarts=2, loss="both", until_broken=True
    )
    assert 0 < int(full.success.sum()) < len(y)  # some examples break, some hold
    assert torch.equal(quick.success, full.success)
    assert bool((quick.margins[quick.success] <= 0).all())
    assert bool((quick.margins >= full.margins - 1e-6).all())  # never stronger than the full run
    if threat.eps_w > 0:  # the weights it found replay on the unmodified model
        rows = torch.nonzero(quick.success).flatten()[:5].tolist()
        check_materialized(standard_mlp, x, y, quick, threat, rows)


def test_until_broken_must_be_a_flag(standard_mlp, sample):
    x, y = sample
    with pytest.raises(ConfigError, match="until_broken"):
        ns.attack(standard_mlp, x, y, Threat(eps_x=0.01), until_broken="yes")


def test_fgsm_is_one_signed_step(mnist, standard_mlp):
    x, y = mnist.x_test[:50], mnist.y_test[:50]
    res = ns.attack(standard_mlp, x, y, Threat(eps_x=0.1), steps=1)
    x_ = x.clone().requires_grad_()
    loss = F.cross_entropy(standard_mlp(x_), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_)
    fgsm = (x + 0.1 * grad.sign()).clamp(0, 1)
    # signs of float32 round-off (confident examples have gradients near 1e-10) may differ
    clear = grad.abs() > 1e-4 * grad.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None, None]
    improved = res.margins < res.clean_margins  # best-so-far keeps the clean point otherwise
    assert int(improved.sum()) > 10
    step = (res.x_adv - x)[improved]
    assert torch.equal(step[clear[improved]], (fgsm - x)[improved][clear[improved]])
    assert float((res.x_adv - x).abs().max()) <= 0.1 + 1e-6


def test_zero_budget_is_the_clean_model(mnist, standard_mlp):
    x, y = mnist.x_test[:64], mnist.y_test[:64]
    res = ns.attack(standard_mlp, x, y, Threat())
    assert torch.equal(res.margins, res.clean_margins) and torch.equal(res.x_adv, x)
    assert res.weight_deltas(3) == {}
    assert res.robust_accuracy == res.clean_accuracy


@pytest.mark.parametrize("method", ["pgd", "noise"])
@pytest.mark.parametrize("scope", ["per-example", "shared"])
def test_the_model_is_never_mutated(small_cnn, sample, method, scope):
    x, y = sample
    small_cnn.train()
    try:
        before = state_copy(small_cnn)
        grads = [None if p.grad is None else p.grad.clone() for p in small_cnn.parameters()]
        res = ns.attack(
            small_cnn,
            x,
            y,
            Threat(eps_x=0.1, eps_w=0.01, scope=scope, bias=True),
            method=method,
            steps=3,
            samples=3,
        )
        res.weight_deltas(0)
        res.replay(small_cnn, 1)
        assert_state_equal(small_cnn, before)
        assert small_cnn.training
        for p, g in zip(small_cnn.parameters(), grads, strict=True):
            assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    finally:
        small_cnn.eval()
    assert not small_cnn.training


def test_the_model_is_untouched_when_an_attack_raises_midway(standard_mlp, sample, monkeypatch):
    x, y = sample
    before = state_copy(standard_mlp)
    calls = {"n": 0}
    original = JointSpace.step

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(JointSpace, "step", failing_step)
    with pytest.raises(RuntimeError, match="injected failure"):
        ns.attack(standard_mlp, x, y, Threat(eps_x=0.1, eps_w=1e-3), steps=10)
    assert calls["n"] == 3
    assert_state_equal(standard_mlp, before)
    assert not standard_mlp.training


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps"),
        ({"restarts": -1}, "restarts"),
        ({"loss": "hinge"}, "loss"),
        ({"method": "cw"}, "method"),
        ({"step_size": -0.1}, "step_size"),
        ({"samples": 0}, "samples"),
        ({"schedule": "cosine"}, "schedule"),
        ({"schedule": "linear", "method": "apgd"}, "schedule 'linear' is pgd's"),
    ],
)
def test_bad_options_raise_config_errors(standard_mlp, sample, kwargs, message):
    x, y = sample
    with pytest.raises(ConfigError, match=message):
        ns.attack(standard_mlp, x, y, Threat(eps_x=0.1), **kwargs)


def test_bad_batches_raise_input_errors(standard_mlp, sample):
    x, y = sample
    with pytest.raises(InputError, match="labels must lie in"):
        ns.attack(standard_mlp, x, y + 10, Threat(eps_x=0.1))
    with pytest.raises(InputError, match="does not fit the model"):
        ns.attack(standard_mlp, x[:, :, :10], y, Threat(eps_x=0.1))
    with pytest.raises(InputError, match="outside the threat's bounds"):
        ns.attack(standard_mlp, x * 255, y, Threat(eps_x=0.1))
    with pytest.raises(InputError, match="x must be a torch.Tensor, got ndarray"):
        ns.attack(standard_mlp, x.numpy(), y, Threat(eps_x=0.1))
    with pytest.raises(InputError, match="y must be a torch.Tensor, got list"):
        ns.certify(standard_mlp, x, y.tolist(), Threat(eps_x=0.1))
    res = ns.attack(standard_mlp, x * 2 - 1, y, Threat(eps_x=0.1, bounds=None), steps=2)
    assert res.x_adv.shape == x.shape


@pytest.mark.cuda
@pytest.mark.parametrize("scope", ["per-example", "shared"])
def test_attacks_run_on_cuda_and_replay_there(scope):
    """Every attack path on a GPU (restarts, both losses, stopping on broken examples, the
    noise baseline): the data, model and perturbations stay there and replay exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 10)
    )
    model = model.cuda().eval()
    x, y = torch.rand(16, 1, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    threat = Threat(eps_x=0.05, eps_w=0.01, scope=scope)
    for kwargs in (
        {"steps": 10, "restarts": 2, "loss": "both", "until_broken": True},
        {"method": "noise", "samples": 8},
    ):
        res = ns.attack(model, x, y, threat, **kwargs)
        assert res.x_adv.device.type == "cuda"
        for i in range(len(x)):
            logits = res.replay(model, i)[0]
            replayed = logits[y[i]] - logits.scatter(0, y[i : i + 1], float("-inf")).max()
            assert abs(float(replayed - res.margins[i])) <= 1e-4, (kwargs, i)


def test_finite_gradient_zeroes_only_what_cannot_be_stepped_along():
    like = torch.ones(2, 3)
    assert torch.equal(finite_gradient(None, like), torch.zeros(2, 3))
    g = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    assert finite_gradient(g, like) is g  # finite: no copy
    bad = torch.tensor([[1.0, float("nan"), float("inf")], [float("-inf"), 2.0, 0.0]])
    assert torch.equal(finite_gradient(bad, like), torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]))
    assert bool(bad[0, 1].isnan())  # the caller's gradient is left as it was
    huge = torch.full((4,), 3e38)  # finite entries whose sum overflows: kept as they are
    assert torch.equal(finite_gradient(huge, huge), huge)


def test_best_so_far_never_writes_into_an_iterate_it_kept(small_cnn, sample):
    # a fully improved iterate is kept without a copy; a later partial improvement must copy
    # it before writing, so the attack's own tensor (and what was kept) stay as they were
    x = sample[0][:4]
    space = JointSpace(read_model(small_cnn, x), Threat(eps_x=0.1, eps_w=0.01), x)
    best = BestSoFar(space, x, torch.full((4,), 5.0), shared=False)
    rows = torch.arange(4)
    first = space.random(x, seed=1)
    kept = {k: v.clone() for k, v in first.items()}
    best.offer(rows, torch.full((4,), 1.0), first, space.inputs(x, first))
    second = space.random(x, seed=2)
    better = best.offer(rows, torch.tensor([0.0, 2.0, -1.0, 3.0]), second, x)
    assert better.tolist() == [True, False, True, False]
    for key, v in first.items():
        assert torch.equal(v, kept[key])  # the first iterate is untouched
        expected = torch.where(better.reshape(-1, *[1] * (v.dim() - 1)), second[key], kept[key])
        assert torch.equal(best.state[key], expected)
    assert best.margins.tolist() == [0.0, 1.0, -1.0, 1.0]
    third = space.random(x, seed=3)  # only some rows of a sub-batch: no borrowing
    best.offer(torch.tensor([1, 3]), torch.tensor([0.5, 4.0]), space.select(third, rows[:2]), x[:2])
    for key in first:
        assert torch.equal(best.state[key][1], third[key][0])
        assert torch.equal(best.state[key][3], kept[key][3])


@settings(max_examples=25, deadline=None)
@given(
    dims=st.sampled_from([1, 2]),
    stride=st.integers(1, 2),
    padding=st.sampled_from([0, 1, "same"]),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    padding_mode=st.sampled_from(["zeros", "reflect"]),
    kernel=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_per_example_conv_kernels_equal_materialized_weights(
    dims, stride, padding, dilation, groups, padding_mode, kernel, seed
):
    # each example's own kernel (one grouped convolution for the batch) gives what the
    # unmodified model computes with that example's weights written into it
    stride = 1 if padding == "same" else stride
    conv = (torch.nn.Conv1d if dims == 1 else torch.nn.Conv2d)(
        4, 6, kernel, stride, padding, dilation, groups, padding_mode=padding_mode
    )
    torch.manual_seed(seed)
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    x = torch.rand(3, 4, *[7] * dims)
    model(x)  # the lazy layer takes its shape
    threat = Threat(eps_w=0.05, bias=True)
    space = JointSpace(read_model(model, x), threat, x)
    state = space.random(x, seed)
    assert {str(k) for k in space.balls} == {"w:0.weight", "w:0.bias", "t:3.weight"}
    with torch.no_grad():
        got = space.forward(x, state)
    for i in range(len(x)):
        row = torch.tensor([i])
        deltas = space.materialize(x[row], space.select(state, row))
        params = {n: p + deltas.get(n, 0) for n, p in model.named_parameters()}
        with torch.no_grad():
            expected = functional_call(model, params, (x[row],))
        torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=1e-5)


def test_best_so_far_copies_a_kept_iterate_before_a_sub_batch_writes_into_it(small_cnn, sample):
    x = sample[0][:4]
    space = JointSpace(read_model(small_cnn, x), Threat(eps_x=0.1, eps_w=0.01), x)
    best = BestSoFar(space, x, torch.full((4,), 5.0), shared=False)
    first = space.random(x, seed=1)
    kept = {k: v.clone() for k, v in first.items()}
    best.offer(torch.arange(4), torch.full((4,), 1.0), first, space.inputs(x, first))
    later = space.random(x[:2], seed=2)  # rows 2 and 3 only (a later run's survivors)
    best.offer(torch.tensor([2, 3]), torch.tensor([0.0, 2.0]), later, x[:2])
    for key, v in first.items():
        assert torch.equal(v, kept[key])  # the attack's own iterate is untouched
        assert torch.equal(best.state[key][2], later[key][0])
        assert torch.equal(best.state[key][[0, 1, 3]], kept[key][[0, 1, 3]])


def test_linear_schedule_steps_down_from_its_first_step(monkeypatch, standard_mlp, sample):
    # schedule="linear": step i of n is first * (n - i) / n radii (first: 2 by default, or
    # step_size), and every iterate stays in its ball and replays; constant: step_size always
    x, y = sample
    x, y = x[:8], y[:8]
    sizes = []
    original = JointSpace.step

    def recording(self, x, state, grads, alpha, **kwargs):
        sizes.append(alpha)
        return original(self, x, state, grads, alpha, **kwargs)

    monkeypatch.setattr(JointSpace, "step", recording)
    threat = Threat(eps_x=0.1, eps_w=0.01)
    res = ns.attack(standard_mlp, x, y, threat, steps=4, schedule="linear")
    assert sizes == [2.0, 1.5, 1.0, 0.5]
    sizes.clear()
    ns.attack(standard_mlp, x, y, threat, steps=5, schedule="linear", step_size=0.5)
    assert sizes == [0.5, 0.4, 0.3, 0.2, 0.1]
    sizes.clear()
    ns.attack(standard_mlp, x, y, threat, steps=4)
    assert sizes == [2.5 / 4] * 4
    for i in range(len(y)):
        replayed = float(margins(res.replay(standard_mlp, i), y[i : i + 1]))
        assert replayed == pytest.approx(float(res.margins[i]), abs=1e-4)
        assert input_ok(threat, x[i : i + 1], res.x_adv[i : i + 1])
