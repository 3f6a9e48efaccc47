"""APGD and the strong ensemble: best-so-far and replayable, inside every ball, at least as
strong as PGD at equal cost, targeted runs, and the CLI's --method strong."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import nonsingular as ns
from nonsingular import ConfigError, Threat
from nonsingular.attacks import AttackOptions, JointSpace, attack_loss
from nonsingular.attacks.apgd import checkpoints
from nonsingular.cli import main

from .test_attacks import THREATS, in_ball, input_ok

N = 200  # test examples of the trained MLP
STEPS = 20


def margin_of(logits, y):
    """Independent margin: true logit minus the best other one."""
    other = logits.clone()
    other[torch.arange(len(y)), y] = float("-inf")
    return logits[torch.arange(len(y)), y] - other.max(dim=1).values


def small_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    model.append(nn.Linear(32, 5))
    x = torch.rand(24, 20, generator=torch.Generator().manual_seed(1))
    return model.eval(), x, model(x).argmax(1).detach()


def small_cnn():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).eval()
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    return model, x, model(x).argmax(1).detach()


def replayed_margins(model, x, y, res):
    return torch.cat([margin_of(res.replay(model, i), y[i : i + 1]) for i in range(len(y))])


def test_checkpoints_are_the_papers():
    # Croce & Hein 2020 (their code's integer schedule): 22, then intervals 19, 16, 13, 10, 7, 6
    assert sorted(checkpoints(100)) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == set()


def test_targeted_dlr_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    y, t = torch.tensor([0]), torch.tensor([2])
    # -(z_y - z_t) / (z_1st - (z_3rd + z_4th) / 2) = -(3 - 1) / (3 - 0.5)
    assert float(attack_loss("dlr-targeted", logits, y, t)) == pytest.approx(-0.8)
    with pytest.raises(ConfigError, match="target"):
        attack_loss("dlr-targeted", logits, y)
    with pytest.raises(ConfigError, match="targets"):
        AttackOptions(targets=0)
    with pytest.raises(ConfigError, match="method"):
        AttackOptions(method="autoattack")


@pytest.mark.parametrize("build", [small_mlp, small_cnn])
@pytest.mark.parametrize("method", ["apgd", "strong"])
@pytest.mark.parametrize("name", sorted(THREATS))
def test_apgd_stays_in_every_ball_and_replays(build, method, name):
    model, x, y = build()
    threat = THREATS[name]
    if threat.layers is not None:  # these models' own layer names
        threat = Threat(eps_x=0.02, eps_w=3e-3, layers=("0", f"{len(model) - 1}.weight"))
    res = ns.attack(model, x, y, threat, method=method, steps=8, targets=2)
    params = dict(model.named_parameters())
    assert (res.margins <= res.clean_margins).all()  # never worse than the clean point
    for i in range(len(y)):
        assert input_ok(threat, x[i], res.x_adv[i])
        for pname, delta in res.weight_deltas(i).items():
            assert in_ball(threat, params[pname], delta), (pname, i)
    assert torch.allclose(replayed_margins(model, x, y, res), res.margins, atol=1e-4)
    assert (res.margins < res.clean_margins - 1e-3).any()  # it moved
    if threat.scope == "shared":  # one Delta for the batch
        first, last = res.weight_deltas(0), res.weight_deltas(len(y) - 1)
        assert all(torch.equal(first[k], last[k]) for k in first)


@pytest.mark.parametrize("threat", [THREATS["absolute"], THREATS["shared"]])
def test_apgd_reports_its_best_iterate(monkeypatch, threat):
    """The reported margin of each example is the lowest over the clean point and every
    iterate the run evaluated (not the last one)."""
    model, x, y = small_mlp()
    seen = []
    forward = JointSpace.forward

    def record(self, x_in, state, *args, **kwargs):
        logits = forward(self, x_in, state, *args, **kwargs)
        seen.append(margin_of(logits.detach(), y))
        return logits

    monkeypatch.setattr(JointSpace, "forward", record)
    res = ns.attack(model, x, y, threat, method="apgd", steps=10, loss="dlr")
    # the start and 10 steps (no rows dropped without until_broken), per run: a shared threat
    # adds one class-permutation run per restart
    assert len(seen) == 11 * (2 if threat.scope == "shared" else 1)
    candidates = [res.clean_margins, *seen]
    if threat.scope == "shared":  # the first point breaking most, then of lowest total margin
        scores = [(int((m <= 0).sum()), -float(m.sum())) for m in candidates]
        assert torch.allclose(res.margins, candidates[scores.index(max(scores))])
    else:
        best = torch.stack(candidates).min(dim=0).values
        assert torch.allclose(res.margins, best)
        assert not torch.allclose(res.margins, seen[-1])  # the last iterate is not the best


def count_passes(monkeypatch):
    counts = {"forward": 0, "backward": 0}
    forward, grad = JointSpace.forward, torch.autograd.grad

    def counted_forward(*args, **kwargs):
        counts["forward"] += 1
        return forward(*args, **kwargs)

    def counted_grad(*args, **kwargs):
        counts["backward"] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(JointSpace, "forward", counted_forward)
    monkeypatch.setattr(torch.autograd, "grad", counted_grad)
    return counts


def test_apgd_costs_what_pgd_costs(monkeypatch):
    model, x, y = small_mlp()
    counts = count_passes(monkeypatch)
    ns.attack(model, x, y, THREATS["absolute"], method="pgd", steps=STEPS)
    pgd_cost = dict(counts)
    counts.update(forward=0, backward=0)
    ns.attack(model, x, y, THREATS["absolute"], method="apgd", steps=STEPS)
    assert counts == pgd_cost == {"forward": STEPS + 1, "backward": STEPS}


@pytest.fixture(scope="module")
def digits(mnist):
    return mnist.x_test[:N], mnist.y_test[:N]


@pytest.mark.parametrize(
    "threat",
    [Threat(eps_x=0.03), Threat(eps_w=0.002), Threat(eps_x=0.01, eps_w=0.001)],
    ids=["input", "weight", "joint"],
)
def test_apgd_at_equal_cost_is_no_weaker_than_pgd(standard_mlp, digits, threat):
    x, y = digits
    pgd = ns.attack(standard_mlp, x, y, threat, method="pgd", steps=STEPS)
    apgd = ns.attack(standard_mlp, x, y, threat, method="apgd", steps=STEPS)
    assert 0 < pgd.robust_accuracy < pgd.clean_accuracy  # a budget where strength shows
    assert apgd.robust_accuracy <= pgd.robust_accuracy + 1 / N


def test_strong_is_no_weaker_than_its_parts(standard_mlp, digits):
    x, y = digits
    threat = Threat(eps_x=0.03)
    strong = ns.attack(standard_mlp, x, y, threat, method="strong", steps=STEPS, targets=2)
    ce = ns.attack(standard_mlp, x, y, threat, method="apgd", loss="ce", steps=STEPS)
    targeted = ns.attack(
        standard_mlp, x, y, threat, method="apgd", loss="dlr-targeted", steps=STEPS, targets=2
    )
    assert (strong.success >= ce.success).all()  # its first run is this one
    assert strong.robust_accuracy <= targeted.robust_accuracy + 1 / N
    assert strong.robust_accuracy < ce.robust_accuracy  # the targeted runs add something


def test_targeted_runs_aim_at_their_target(standard_mlp, digits):
    """With one target (the runner-up class), most broken digits land on it."""
    x, y = digits
    res = ns.attack(
        standard_mlp, x, y, Threat(eps_x=0.03), method="apgd", loss="dlr-targeted", targets=1
    )
    clean = standard_mlp(x).detach()
    clean[torch.arange(N), y] = float("-inf")
    runner_up = clean.argmax(1)
    broken = res.success.nonzero().flatten()
    landed = [int(res.replay(standard_mlp, int(i)).argmax()) == int(runner_up[i]) for i in broken]
    assert len(broken) > 10 and sum(landed) > 0.8 * len(landed)


def test_cli_evaluate_method_strong(capsys, standard_mlp, tmp_path):
    from nonsingular import checkpoint

    ckpt = checkpoint.save(standard_mlp, tmp_path / "model.safetensors")
    out = tmp_path / "r.json"
    args = ["evaluate", "--checkpoint", str(ckpt), "--test-size", "60", "--eps-x", "0,0.05"]
    args += ["--eps-w", "0", "--steps", "5", "--method", "strong", "--targets", "2"]
    code = main([*args, "--out", str(out), "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    table = json.loads(out.read_text())
    assert table["attack"]["method"] == "strong" and table["attack"]["targets"] == 2
    assert table["rows"][1]["attacked"] < table["rows"][0]["attacked"]


def test_replay_through_functional_call_matches(standard_mlp, digits):
    """The joint APGD's reported perturbation, added by hand, gives the reported margin."""
    x, y = digits[0][:20], digits[1][:20]
    res = ns.attack(standard_mlp, x, y, Threat(eps_x=0.01, eps_w=0.001), method="apgd", steps=10)
    params = {n: p.detach() for n, p in standard_mlp.named_parameters()}
    for i in range(len(y)):
        moved = {n: params[n] + d for n, d in res.weight_deltas(i).items()}
        logits = functional_call(standard_mlp, {**params, **moved}, (res.x_adv[i : i + 1],))
        assert float(margin_of(logits, y[i : i + 1])) == pytest.approx(
            float(res.margins[i]), abs=1e-4
        )


def read_examples(path):
    from safetensors.torch import load_file

    return load_file(str(path)), json.loads(path.with_suffix(".json").read_text())


def replay_saved(model, tensors, about, x_clean):
    """Every saved example run on the unmodified model with its saved deltas: its margin,
    its success, its distance to the clean input; every tensor described."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    described = set()
    for k, point in enumerate(about["points"]):
        described |= set(point["tensors"])
        threat = Threat.from_dict(point["threat"])
        p = f"point{k}"
        for j, position in enumerate(tensors[f"{p}.positions"].tolist()):
            shared = f"{p}.delta." if threat.scope == "shared" else f"{p}.{position}."
            names = [n for n in params if f"{shared}{n}" in tensors]
            moved = {n: params[n] + tensors[f"{shared}{n}"] for n in names}
            if threat.eps_w > 0:
                assert moved  # a weight budget: the deltas are there
            x_adv = tensors[f"{p}.x_adv"][j : j + 1]
            assert float((x_adv - x_clean[position]).abs().max()) <= threat.eps_x + 1e-6
            logits = functional_call(model, {**params, **moved}, (x_adv,))
            margin = float(margin_of(logits, tensors[f"{p}.y"][j : j + 1]))
            assert margin == pytest.approx(float(tensors[f"{p}.margins"][j]), abs=1e-4)
            assert bool(tensors[f"{p}.success"][j]) == (margin <= 0)
    assert described == set(tensors)


def test_cli_save_examples_replay(capsys, standard_mlp, mnist, tmp_path):
    from nonsingular import checkpoint

    ckpt = checkpoint.save(standard_mlp, tmp_path / "model.safetensors")
    path = tmp_path / "adv.safetensors"
    args = ["evaluate", "--checkpoint", str(ckpt), "--test-size", "30", "--eps-x", "0,0.05"]
    args += ["--eps-w", "0,0.002", "--steps", "5", "--method", "apgd", "--quiet"]
    code = main([*args, "--save-examples", str(path), "--save-count", "4", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    tensors, about = read_examples(path)
    assert len(about["points"]) == 4
    assert tensors["point3.positions"].tolist() == [0, 1, 2, 3]
    assert tensors["point3.success"].any()  # something to replay
    x_clean = ns.data.load("mnist5k", test_size=30, seed=0).x_test
    replay_saved(standard_mlp, tensors, about, x_clean)


def test_save_examples_of_a_shared_delta_replay(tmp_path):
    model, x, y = small_mlp()
    saver = ns.evaluation.ExampleSaver(5)
    threats = [Threat(eps_x=0.05, eps_w=0.05), Threat(eps_x=0.05, eps_w=0.05, scope="shared")]
    ns.evaluate(model, (x, y), threats, AttackOptions(steps=5), on_attack=saver, progress=False)
    saver.save(tmp_path / "adv.safetensors")
    tensors, about = read_examples(tmp_path / "adv.safetensors")
    assert tensors["point1.positions"].tolist() == [0, 1, 2, 3, 4]
    assert not any(k.startswith("point1.0.") for k in tensors)  # one Delta, stored once
    assert any(k.startswith("point0.4.") for k in tensors)  # per example: each its own
    replay_saved(model, tensors, about, x)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--save-examples", "nowhere/adv.safetensors"], "does not exist"),
        (["--save-examples", "adv.pt"], ".safetensors"),
        (["--save-examples", "adv.safetensors", "--out", "adv.json"], "description"),
        (["--save-examples", "adv.safetensors", "--save-count", "0"], "save-count"),
    ],
)
def test_cli_save_examples_refuses_bad_paths_first(capsys, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    code = main(["evaluate", "--train-quick", "--test-size", "10", "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_checkpoint_halves_the_step_and_goes_back_where_progress_stalls():
    """Two examples: one whose loss rose at every step since the start keeps its step and
    its point; one whose loss fell back halves its step and returns to its best point."""
    from nonsingular.attacks.apgd import _Run
    from nonsingular.attacks.space import INPUT
    from nonsingular.model import read_model

    model, x, _ = small_mlp()
    x = x[:2]
    space = JointSpace(read_model(model, x), Threat(eps_x=0.1), x)
    points = [{INPUT: torch.full_like(x, v)} for v in (0.0, 0.01, 0.02, 0.03)]
    grads = {INPUT: torch.ones_like(x)}
    losses = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0])]
    losses += [torch.tensor([2.0, 1.0]), torch.tensor([3.0, 0.5])]
    run = _Run(space, points[0], grads, losses[0], alpha=2.0)
    for point, f in zip(points[1:], losses[1:], strict=True):
        run.update(point, grads, f)
    run.checkpoint(3)
    assert run.eta.tolist() == [2.0, 1.0]
    assert torch.equal(run.cur[INPUT][0], points[3][INPUT][0])  # kept going
    assert torch.equal(run.cur[INPUT][1], points[1][INPUT][1])  # back to its best point


@pytest.mark.parametrize("method", ["apgd", "strong"])
def test_dropping_broken_examples_changes_no_outcome(method):
    """Evaluation's early stop (until_broken) drops each example once broken: every other
    example's run is its own, so which examples break is the same."""
    model, x, y = small_mlp()
    threat = Threat(eps_x=0.05, eps_w=0.003)
    full = ns.attack(model, x, y, threat, method=method, steps=10, targets=2)
    early = ns.attack(model, x, y, threat, method=method, steps=10, targets=2, until_broken=True)
    assert 0 < int(full.success.sum()) < len(y)
    assert torch.equal(full.success, early.success)
    assert (early.margins[early.success] <= 0).all()


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["linf", "linf elementwise", "l2"]),
    batch=st.integers(1, 4),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_apgd_step_in_place_equals_the_projected_formula(kind, batch, shape, first, seed):
    """APGD's step, computed into the gradient (the run's own) by the ball's ``ascend`` with
    a step per row, and its momentum computed in place, gives exactly the numbers of the
    formula written with the ball's own step and projection, and never writes into the
    iterate or the previous point (the best-so-far tracker keeps iterates without a copy)."""
    from nonsingular.attacks.apgd import MOMENTUM, _momentum
    from nonsingular.balls import make_ball

    g = torch.Generator().manual_seed(seed)
    radius = torch.rand(shape, generator=g) + 0.1 if kind == "linf elementwise" else 0.3
    ball = make_ball("l2" if kind == "l2" else "linf", radius, batch_dims=1)
    like = torch.empty(batch, *shape)
    v, prev = ball.random(like, g), ball.random(like, g)
    grad = torch.randn(like.shape, generator=g) * (torch.rand(like.shape, generator=g) > 0.2)
    eta = (torch.rand(batch, generator=g) * 2).reshape(-1, *[1] * len(shape))
    a = 1.0 if first else MOMENTUM
    before = [t.clone() for t in (v, prev, grad)]

    z_ref = ball.project(v + eta * ball.step(torch.zeros_like(v), grad, 1.0))
    moved_ref = ball.project(v + (a * (z_ref - v) + (1 - a) * (v - prev)))
    assert torch.equal(ball.ascend(v, grad, eta), z_ref)  # not consumed: a new tensor
    z = ball.ascend(v, grad.clone(), eta, consume=True)
    assert torch.equal(z, z_ref)
    moved = _momentum(ball, v, z, prev, a, torch.empty_like(v))
    assert torch.equal(moved, moved_ref)
    assert all(torch.equal(t, b) for t, b in zip((v, prev, grad), before, strict=True))


def test_apgd_owns_each_gradient_it_computes_into():
    """The run computes its next step into the gradients: one tensor handed to two variables
    (autograd may), or an expanded one, is copied first, so no step writes into another's."""
    from nonsingular.attacks.apgd import _owned

    g = torch.randn(3, 4)
    wide = torch.randn(4).expand(3, 4)
    owned = _owned({"a": g, "b": g, "c": wide})
    assert owned["a"] is g  # the first holder keeps it
    assert owned["b"].data_ptr() != g.data_ptr() and torch.equal(owned["b"], g)
    assert owned["c"].is_contiguous() and torch.equal(owned["c"], wide)
