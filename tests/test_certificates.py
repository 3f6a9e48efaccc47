"""Certificates are sound: no attack, random sample or materialized perturbation goes below."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, vmap

import nonsingular as ns
from nonsingular import ConfigError, Threat, UnsupportedLayerError
from nonsingular.certificates import closed_form_terms
from nonsingular.certificates.bab import STATUSES
from nonsingular.model import perturbed_layers, read_model

from .conftest import assert_state_equal, state_copy

TOL = 1e-5
DENSE_MODES = [("absolute", "linf"), ("relative", "linf"), ("layer", "linf")]
ALL_MODES = DENSE_MODES + [("absolute", "l2"), ("relative", "l2")]


@st.composite
def networks(draw, conv=None):
    """A random small ReLU network (1-4 weight layers, widths 1-16) and an input batch."""
    conv = draw(st.booleans()) if conv is None else conv
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    bias = draw(st.booleans())
    classes = draw(st.integers(2, 5))
    layers: list[nn.Module] = []
    if conv:
        channels, size = draw(st.integers(1, 2)), draw(st.integers(5, 8))
        shape = (channels, size, size)
        for _ in range(draw(st.integers(1, 2))):
            out = draw(st.integers(1, 4))
            k, stride, pad = (
                draw(st.integers(2, 3)),
                draw(st.integers(1, 2)),
                draw(st.integers(0, 1)),
            )
            if size + 2 * pad < k:
                break  # the image is too small for another layer
            layers += [nn.Conv2d(channels, out, k, stride, pad, bias=bias), nn.ReLU()]
            if draw(st.booleans()):
                bn = nn.BatchNorm2d(out)
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.data.uniform_(-1.5, 1.5)
                layers.insert(len(layers) - 1, bn)
            channels, size = out, (size + 2 * pad - k) // stride + 1
        if size >= 2 and draw(st.booleans()):
            layers.append(nn.AvgPool2d(2))
            size //= 2
        width = channels * size * size
        layers.append(nn.Flatten())
    else:
        width = draw(st.integers(1, 8))
        shape = (width,)
    for _ in range(draw(st.integers(0, 2 if conv else 3))):
        out = draw(st.integers(1, 16))
        layers += [nn.Linear(width, out, bias=bias), nn.ReLU()]
        width = out
    layers.append(nn.Linear(width, classes, bias=bias))
    model = nn.Sequential(*layers).eval()
    for p in model.parameters():
        p.data.mul_(draw(st.sampled_from([1.0, 2.0])))  # larger weights: more unstable ReLUs
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, classes, (3,), generator=torch.Generator().manual_seed(seed + 1))
    return model, x, y


@st.composite
def threats(draw, modes=ALL_MODES, input_norms=("linf", "l2")):
    w_mode, w_norm = draw(st.sampled_from(modes))
    x_norm = draw(st.sampled_from(input_norms))
    eps_x = draw(st.sampled_from([0.0, 0.01, 0.05, 0.2]))
    eps_w = draw(st.sampled_from([0.0, 0.01, 0.05, 0.2]))
    return Threat(
        eps_x=eps_x * (3 if x_norm == "l2" else 1),
        eps_w=eps_w,
        x_norm=x_norm,
        w_mode=w_mode,
        w_norm=w_norm,
        bias=draw(st.booleans()),
    )


def sample_parameters(model, x, threat, n, generator):
    """n draws of materialized weights inside the threat's weight ball (half on its boundary)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    graph = read_model(model, x)

    drawn = {k: v.expand(n, *v.shape).clone() for k, v in params.items()}
    for budget in perturbed_layers(graph, threat):
        for key, ball in budget.parameter_balls(batch_dims=1).items():
            shape = (n, *params[key].shape)
            inside = ball.random(torch.empty(shape), generator)
            edge = ball.project(torch.randn(shape, generator=generator) * 1e3)
            drawn[key] = drawn[key] + torch.cat([inside[: n // 2], edge[n // 2 :]])
    return drawn


def sample_inputs(x, threat, n, generator):
    if threat.eps_x == 0:
        return x.expand(n, *x.shape)
    if threat.x_norm == "linf":
        d = (torch.rand((n, *x.shape), generator=generator) * 2 - 1) * threat.eps_x
        d[n // 2 :] = d[n // 2 :].sign() * threat.eps_x  # corners
    else:
        g = torch.randn((n, *x.shape), generator=generator)
        d = g / g.flatten(1).norm(dim=1).reshape(-1, *[1] * x.dim()) * threat.eps_x
    return x + d if threat.bounds is None else (x + d).clamp(*threat.bounds)


def random_margins(model, x, y, threat, n=200, seed=0, device="cpu"):
    """(n, B, K) margins z_y - z_j under n random joint perturbations per example, each run
    through the unmodified model with its weights materialized (drawn on the CPU, run on
    ``device``)."""
    g = torch.Generator().manual_seed(seed)
    runs = copy.deepcopy(model).to(device)
    out = []
    for i in range(len(x)):
        params = sample_parameters(model, x[i : i + 1], threat, n, g)
        params = {k: v.to(device) for k, v in params.items()}
        xs = sample_inputs(x[i], threat, n, g).to(device)
        logits = vmap(lambda p, xi: functional_call(runs, p, (xi[None],))[0])(params, xs)
        out.append((logits[:, y[i] : y[i] + 1] - logits).cpu())
    return torch.stack(out, dim=1)


def violation(lower, samples):
    """How far ``lower`` (B, K; ``+inf`` at the label, skipped) rises above the sampled
    margins ``(n, B, K)``: a bound holds where this is at most ``TOL``."""
    lower = lower.cpu().float().nan_to_num(posinf=float("-inf"))
    return float((lower[None] - samples).max())


def attacked_margins(model, x, y, threat):
    """The strongest attack's margins, replayed through the unmodified model."""
    res = ns.attack(model, x, y, threat, steps=30, restarts=2, loss="both", seed=1)
    replayed = []
    for i in range(len(x)):
        logits = res.replay(model, i)[0]
        replayed.append(logits[y[i]] - logits.scatter(0, y[i : i + 1], float("-inf")).max())
    replayed = torch.stack(replayed)
    torch.testing.assert_close(replayed, res.margins, atol=1e-4, rtol=1e-4)
    return replayed


def check_sound(model, x, y, threat, methods):
    samples = random_margins(model, x, y, threat)  # (n, B, K)
    attacked = attacked_margins(model, x, y, threat)
    for method in methods:
        cert = ns.certify(model, x, y, threat, method)
        lower = cert.lower.float().nan_to_num(posinf=float("-inf"))  # skip j = y
        violation = (lower[None] - samples).max()
        assert violation <= TOL, f"{method}: a random perturbation went {violation} below"
        gap = (cert.worst.float() - attacked).max()
        assert gap <= TOL, f"{method}: the attack went {gap} below the certified margin"
        assert bool((cert.worst <= cert.clean_margins.double() + TOL).all())


@given(case=networks(conv=False), threat=threats(modes=DENSE_MODES))
def test_every_method_is_sound_on_random_mlps(case, threat):
    check_sound(*case, threat, list(ns.certificates.BOUNDS))


@given(case=networks(), threat=threats())
def test_ibp_and_crown_are_sound_on_random_dense_and_conv_networks(case, threat):
    check_sound(*case, threat, ["ibp", "crown", "alpha-crown"])


@given(case=networks(conv=False), threat=threats(modes=DENSE_MODES))
def test_tighter_methods_are_tighter_where_theory_says_so(case, threat):
    model, x, y = case
    bounds = {m: ns.certify(model, x, y, threat, m).lower for m in ns.certificates.BOUNDS}
    finite = torch.isfinite(bounds["ibp"])
    assert bool((bounds["recursive"][finite] >= bounds["closed-form"][finite] - 1e-9).all())
    assert bool((bounds["crown"][finite] >= bounds["ibp"][finite] - 1e-12).all())
    assert bool((bounds["alpha-crown"][finite] >= bounds["crown"][finite]).all())


@pytest.mark.parametrize("method", ["closed-form", "recursive", "ibp", "crown"])
def test_zero_budget_certifies_the_correct_examples_up_to_rounding(mnist, standard_mlp, method):
    """With nothing perturbed, only the model's own float32 arithmetic is left: the bound sits
    just below the margin it computes, every clear margin is certified, no wrong one ever."""
    x, y = mnist.x_test[:300], mnist.y_test[:300]
    cert = ns.certify(standard_mlp, x, y, Threat(), method)
    correct = standard_mlp(x).argmax(1) == y
    rounding = cert.clean_margins.double() - cert.worst
    assert bool((rounding > 0).all())  # rounding can only take margin away
    assert not bool((cert.certified & ~correct).any())
    if method in ("ibp", "crown"):  # B0 and B1 multiply layer norms: rounding costs them more
        assert float(rounding.max()) < 0.05
        assert bool(cert.certified[correct & (cert.clean_margins > 0.05)].all())


def test_on_the_standard_mlp_clean_attacked_certified_are_ordered(mnist, standard_mlp):
    x, y = mnist.x_test[:300], mnist.y_test[:300]
    for eps_x, eps_w in [(0.005, 1e-5), (0.01, 0.0), (0.0, 2e-4), (0.02, 1e-4)]:
        threat = Threat(eps_x=eps_x, eps_w=eps_w)
        attacked = ns.attack(standard_mlp, x, y, threat, steps=20)
        acc = {
            m: ns.certify(standard_mlp, x, y, threat, m).certified_accuracy
            for m in ns.certificates.BOUNDS
        }
        assert acc["closed-form"] <= acc["recursive"] and acc["ibp"] <= acc["crown"]
        assert acc["crown"] <= attacked.robust_accuracy <= attacked.clean_accuracy
    # CROWN keeps its advantage over IBP: far more certified with eps_x alone and jointly
    for threat in (Threat(eps_x=0.01), Threat(eps_x=0.005, eps_w=1e-5)):
        crown = ns.certify(standard_mlp, x, y, threat, "crown").certified_accuracy
        ibp = ns.certify(standard_mlp, x, y, threat, "ibp").certified_accuracy
        assert crown > ibp + 0.3
        assert crown > 0.8


def test_closed_form_terms_split_the_bound_and_are_differentiable(mnist, standard_mlp):
    x, y = mnist.x_test[:16], mnist.y_test[:16]
    graph = read_model(standard_mlp, x, detach=False)
    terms = closed_form_terms(graph, x, y, Threat(eps_x=0.01, eps_w=1e-4))
    only_input = closed_form_terms(graph, x, y, Threat(eps_x=0.01))
    torch.testing.assert_close(terms.input_term, only_input.input_term)
    # with no weight budget the weight term is zero, up to float32 rounding of the norm products
    assert bool((only_input.weight_term.abs() <= 1e-5 * only_input.input_term.abs() + 1e-6).all())
    wrong = torch.ones_like(terms.weight_term, dtype=torch.bool).scatter(1, y[:, None], False)
    assert bool((terms.weight_term[wrong] > 0).all()) and bool((terms.input_term[wrong] > 0).all())
    terms.weight_term.sum().backward()
    grads = [p.grad for p in standard_mlp.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    standard_mlp.zero_grad(set_to_none=True)


def test_methods_refuse_what_they_cannot_bound(mnist, standard_mlp, small_cnn):
    x, y = mnist.x_test[:4], mnist.y_test[:4]
    for method in ("closed-form", "recursive"):
        with pytest.raises(ConfigError, match="w_norm='l2'.*'ibp' or 'crown'"):
            ns.certify(standard_mlp, x, y, Threat(eps_w=0.1, w_norm="l2"), method)
        with pytest.raises(UnsupportedLayerError, match="Conv2d"):
            ns.certify(small_cnn, x, y, Threat(eps_w=0.1), method)
    with pytest.raises(ConfigError, match="method"):
        ns.certify(standard_mlp, x, y, Threat(), "lp")
    with pytest.raises(ConfigError, match="intermediate"):
        ns.certify(standard_mlp, x, y, Threat(), "crown", intermediate="lp")


def test_certify_never_touches_the_model(mnist, small_cnn):
    x, y = mnist.x_test[:5], mnist.y_test[:5]
    before = state_copy(small_cnn)
    small_cnn.train()
    try:
        for method in ("crown", "alpha-crown", "bab"):
            threat = Threat(eps_x=0.01, eps_w=1e-3)
            res = ns.certify(small_cnn, x, y, threat, method, time_limit=0.3)
            assert res.lower.shape == (5, 10) and bool(
                torch.isinf(res.lower.gather(1, y[:, None])).all()
            )
            assert_state_equal(small_cnn, before)
            assert small_cnn.training
    finally:
        small_cnn.eval()


def test_chunking_and_precision_do_not_change_the_bounds(mnist, standard_mlp):
    x, y = mnist.x_test[:40], mnist.y_test[:40]
    threat = Threat(eps_x=0.01, eps_w=1e-5)
    whole = ns.certify(standard_mlp, x, y, threat, "crown", batch_size=40)
    chunks = ns.certify(standard_mlp, x, y, threat, "crown", batch_size=7)
    torch.testing.assert_close(whole.lower, chunks.lower)
    single = ns.certify(standard_mlp, x, y, threat, "crown", dtype=torch.float32)
    # float32 bounds carry their own rounding too: a little lower, never far
    torch.testing.assert_close(single.lower.double(), whole.lower, atol=0.05, rtol=1e-3)
    assert float(single.worst.double().mean()) < float(whole.worst.mean())
    via_ibp = ns.certify(standard_mlp, x, y, threat, "crown", intermediate="ibp")
    assert bool((via_ibp.worst <= whole.worst + 1e-9).all())


def test_a_relu_after_the_last_layer_is_bounded_by_ibp_and_crown_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU()).eval()
    x, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    threat = Threat(eps_x=0.05, eps_w=0.02)
    with pytest.raises(UnsupportedLayerError, match="follows it"):
        ns.certify(model, x, y, threat, "recursive")
    check_sound(model, x, y, threat, ["ibp", "crown"])


@given(case=networks(), threat=threats())
def test_ibp_fast_margin_step_equals_the_generic_backward_step(case, threat):
    from nonsingular.certificates.crown_engine import backward, margin_matrix
    from nonsingular.certificates.ibp import ibp_margins, interval_bounds
    from nonsingular.certificates.region import InputRegion

    model, x, y = case
    graph = read_model(model, x).cast(torch.float64)
    x = x.double()
    budgets = {b.index: b for b in perturbed_layers(graph, threat)}
    region = InputRegion.from_threat(x, threat)
    classes = model(x[:1].float()).shape[1]
    bounds = interval_bounds(graph, budgets, region, unit=2.0**-24)
    fast = ibp_margins(graph, budgets, region, y, classes, bounds)
    c = margin_matrix(y, classes, x.dtype)
    generic = backward(graph, region, bounds, c, graph.output, relax=False)
    torch.testing.assert_close(fast, generic, rtol=1e-9, atol=1e-9)


@given(
    case=networks(conv=False),
    threat=threats(modes=DENSE_MODES),
    method=st.sampled_from(["closed-form", "recursive"]),
)
def test_worst_wrong_class_terms_match_the_full_terms(case, threat, method):
    from nonsingular.certificates import recursive_terms

    model, x, y = case
    terms_of = closed_form_terms if method == "closed-form" else recursive_terms
    terms = terms_of(read_model(model, x), x, y, threat)
    full = [
        t.scatter(1, y[:, None], float("-inf")).amax(1)
        for t in (terms.input_term, terms.weight_term)
    ]
    for fast, slow in zip(terms.worst(), full, strict=True):
        torch.testing.assert_close(fast.expand_as(slow), slow, rtol=1e-5, atol=1e-6)


def _one_layer_bounds(weight, bias, lower, upper, c, eps_w):
    """Exact least ``c . ((W + Delta) h + b)`` over ``h`` in ``[lower, upper]`` and
    ``|Delta| <= eps_w`` for an input that keeps its sign (``|h|`` is linear there), and the
    same priced at ``max|h|`` (the weight term bounded apart from the input term)."""
    cw = c @ weight
    spread = eps_w * c.abs().sum()
    sign = torch.where(lower >= 0, 1.0, -1.0).double()
    coefficient = cw - spread * sign  # lam . (W h) - eps ||c||_1 |h|, linear in h
    exact = torch.minimum(coefficient * lower, coefficient * upper).sum() + c @ bias
    apart = torch.minimum(cw * lower, cw * upper).sum() + c @ bias
    apart = apart - spread * torch.maximum(lower.abs(), upper.abs()).sum()
    return exact, apart


@given(st.integers(0, 10_000), st.sampled_from([(0.0, 1.0), (-1.0, 0.0), (-1.0, 1.0)]))
def test_crown_bounds_a_dense_layer_exactly_where_its_input_keeps_a_sign(seed, domain):
    """One dense layer, input in a box of one sign: the weight term and the input term are
    bounded together (exactly), not the weight term at ``max|h|`` on its own; an input box
    straddling 0 is never bounded looser than that."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(12, 4).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 12, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
    model = nn.Sequential(layer).eval()
    low, high = domain
    x = low + (high - low) * torch.rand(1, 12, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = Threat(eps_x=0.3, eps_w=0.05, bounds=domain)
    bound = ns.certify(model, x, y, threat, method="crown", dtype=torch.float64).lower[0]
    lower, upper = (x[0] - 0.3).clamp(low, high), (x[0] + 0.3).clamp(low, high)
    straddles = domain == (-1.0, 1.0) and bool(((lower < 0) & (upper > 0)).any())
    for j in range(4):
        if j == int(y):
            continue
        c = torch.zeros(4, dtype=torch.float64)
        c[int(y)], c[j] = 1.0, -1.0
        exact, apart = _one_layer_bounds(
            layer.weight.detach(), layer.bias.detach(), lower, upper, c, 0.05
        )
        assert bound[j] >= apart - 1e-9, (j, bound[j], apart)
        if not straddles:
            assert bound[j] == pytest.approx(float(exact), abs=1e-9), (j, float(exact))
            assert bound[j] <= exact + 1e-12  # sound


@given(case=networks(), threat=threats(), seed=st.integers(0, 1000))
def test_crown_is_sound_for_any_relu_lower_slopes(case, threat, seed):
    """alpha-CROWN's soundness does not rest on the optimizer: any lower slopes in [0, 1],
    drawn at random here (0 and 1 included), give a bound under every sampled perturbation."""
    from nonsingular.certificates.crown import crown_bounds, relu_slopes
    from nonsingular.certificates.crown_engine import backward, margin_matrix
    from nonsingular.certificates.region import InputRegion
    from nonsingular.certificates.rounding import unit_roundoff

    model, x, y = case
    graph = read_model(model, x).cast(torch.float64)
    budgets = {b.index: b for b in perturbed_layers(graph, threat)}
    region = InputRegion.from_threat(x.double(), threat)
    c = margin_matrix(y, int(model(x).shape[1]), torch.float64)
    bounds = crown_bounds(graph, budgets, region, "crown", 2 * unit_roundoff(torch.float32))
    slopes = relu_slopes(graph, bounds, c.shape[1], graph.output)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in slopes.values():
            drawn = torch.rand(value.shape, generator=gen, dtype=value.dtype)
            value.copy_(torch.where(drawn < 0.2, 0.0, torch.where(drawn > 0.8, 1.0, drawn)))
        lower = backward(graph, region, bounds, c, graph.output, slopes=slopes)
    lower = lower.scatter(1, y[:, None], float("-inf")).float()
    samples = random_margins(model, x, y, threat)
    assert (lower[None] - samples).max() <= TOL


@pytest.mark.cuda
@pytest.mark.parametrize("tf32", [False, True])
@given(case=networks(), threat=threats(modes=DENSE_MODES))
def test_certificates_are_sound_on_cuda_as_the_model_runs_there(tf32, case, threat):
    """On a GPU, with TF32 matrix products allowed or not: bounds computed there hold for the
    model as it runs there (its perturbed copies run on the GPU too)."""
    model, x, y = case
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        samples = random_margins(model, x, y, threat, device="cuda")
        on_gpu = copy.deepcopy(model).cuda()
        for method in ("ibp", "crown", "alpha-crown"):
            for dtype in (torch.float32, torch.float64):
                cert = ns.certify(on_gpu, x.cuda(), y.cuda(), threat, method, dtype=dtype)
                gap = violation(cert.lower, samples)
                assert gap <= TOL, (method, dtype, gap)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.cuda
@settings(max_examples=6, deadline=None)
@given(case=networks(), threat=threats(modes=DENSE_MODES))
def test_bab_is_sound_on_cuda_as_the_model_runs_there(case, threat):
    """bab on a GPU (its domains bounded there, TF32 as PyTorch's defaults leave it): its
    margin bounds hold for the model as it runs there."""
    model, x, y = case
    samples = random_margins(model, x, y, threat, device="cuda")
    found = ns.bab(copy.deepcopy(model).cuda(), x.cuda(), y.cuda(), threat, time_limit=0.5)
    assert violation(found.lower, samples) <= TOL
    assert found.certified.tolist() == (found.lower.min(1).values > 0).cpu().tolist()


def _absolute_value_model() -> nn.Module:
    """``z_0 - z_1 = relu(x) + relu(-x) - 0.5 relu(x + 2) + 1.1 = |x| - x/2 + 0.1 > 0`` on
    [-1, 1]: robust, but CROWN's adaptive lines (slope 0 at l = -u) lose 0.5 at x = 1."""
    first, last = nn.Linear(1, 3), nn.Linear(3, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0], [-1.0], [1.0]]))
        first.bias.copy_(torch.tensor([0.0, 0.0, 2.0]))
        last.weight.copy_(torch.tensor([[1.0, 1.0, -0.5], [0.0, 0.0, 0.0]]))
        last.bias.copy_(torch.tensor([1.1, 0.0]))
    return nn.Sequential(first, nn.ReLU(), last).double().eval()


def test_optimized_slopes_and_branching_certify_what_crown_cannot():
    model = _absolute_value_model()
    x, y = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    for eps_w in (0.0, 1e-3):
        threat = Threat(eps_x=1.0, eps_w=eps_w, bounds=(-1.0, 1.0))
        assert not bool(ns.certify(model, x, y, threat, "crown").certified[0])
        assert bool(ns.certify(model, x, y, threat, "alpha-crown").certified[0])
        result = ns.bab(model, x, y, threat, time_limit=30.0, steps=10, restarts=1)
        assert result.status == ["certified"] and int(result.domains[0]) > 0
        assert float(result.lower[0, 1]) > 0
        assert bool(ns.certify(model, x, y, threat, "bab").certified[0])
    broken = Threat(eps_x=1.0, eps_w=0.2, bounds=(-1.0, 1.0))  # the weights can now flip it
    result = ns.bab(model, x, y, broken, time_limit=30.0)
    assert result.status == ["broken"] and float(result.lower[0, 1]) <= 0
    assert not bool(ns.certify(model, x, y, broken, "bab").certified[0])
    logits = result.attack.replay(model, 0)[0]
    assert float(logits[0] - logits[1]) <= 0  # the counterexample, on the unmodified model


@settings(max_examples=8, deadline=None)
@given(case=networks(), threat=threats(modes=DENSE_MODES))
def test_bab_never_certifies_what_a_perturbation_breaks(case, threat):
    model, x, y = case
    result = ns.bab(model, x, y, threat, time_limit=0.5, batch=16, steps=20)
    samples = random_margins(model, x, y, threat)  # (n, B, K), 0 at j = y
    worst = samples.scatter(2, y[None, :, None].expand(len(samples), -1, 1), float("inf"))
    worst = worst.min(2).values.min(0).values  # (B,) the worst sampled margin
    attacked = attacked_margins(model, x, y, threat)
    lower = result.lower.float().nan_to_num(posinf=float("-inf"))  # skip j = y
    assert float((lower[None] - samples).max()) <= TOL  # the bound holds, whatever the status
    assert result.certified.tolist() == (result.lower.min(1).values > 0).tolist()
    for i, status in enumerate(result.status):
        assert status in STATUSES
        if status == "certified":
            assert float(worst[i]) > -TOL and float(attacked[i]) > -TOL, i
        if status == "broken":
            logits = result.attack.replay(model, i)[0]
            margin = logits[y[i]] - logits.scatter(0, y[i : i + 1], float("-inf")).max()
            assert float(margin) <= 1e-5, i


def _relu_inputs_sampled(model, x, threat, n, generator):
    """For ``n`` random joint perturbations of the one example ``x``: the margins' logits
    ``(n, K)`` and the input of every ReLU module in order, flat ``(n, width)``, each run
    through the unmodified model with its weights materialized."""
    params = sample_parameters(model, x, threat, n, generator)
    xs = sample_inputs(x[0], threat, n, generator)
    logits, seen, found = [], [], []
    hooks = [
        m.register_forward_hook(lambda _m, args, _out: found.append(args[0][0]))
        for m in model.modules()
        if isinstance(m, nn.ReLU)
    ]
    try:
        for s in range(n):
            found.clear()
            one = {k: v[s] for k, v in params.items()}
            logits.append(functional_call(model, one, (xs[s : s + 1],))[0])
            seen.append(list(found))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(logits), [torch.stack(c).flatten(1) for c in zip(*seen, strict=True)]


@settings(max_examples=12, deadline=None)
@given(case=networks(), threat=threats(modes=DENSE_MODES), rounds=st.integers(1, 4))
def test_every_branch_and_bound_domain_bounds_the_points_inside_it(case, threat, rounds):
    """Branch and bound's domains, split ``rounds`` times (every leaf kept, proved or not):
    every sampled perturbation falls in some leaf (a split covers its parent), and in every
    leaf it falls in, each margin is at least that leaf's bound for it."""
    from nonsingular.certificates.bab import _Domains
    from nonsingular.certificates.rounding import certificate_unit, exact_products

    model, x, y = case
    model = model.double()
    x = x.double()
    graph = read_model(model, x).cast(torch.float64)
    budgets = {b.index: b for b in perturbed_layers(graph, threat)}
    unit = certificate_unit(torch.float64, x.device, torch.float64)
    classes = int(model(x).shape[1])
    generator = torch.Generator().manual_seed(0)
    for i in range(len(x)):
        one = _Domains(graph, budgets, x[i : i + 1], y[i : i + 1], threat, unit, classes)
        with torch.no_grad(), exact_products():
            unknown = torch.full((classes,), -float("inf"), dtype=torch.float64)
            leaves = one.start(unknown.scatter(0, y[i : i + 1], float("inf"))[None])
            for _ in range(rounds if leaves.scores.shape[1] else 0):  # 0: no ReLU
                split = (leaves.scores.max(1).values >= 0) & (leaves.worst <= 0)
                splittable, kept = split.nonzero().flatten(), (~split).nonzero().flatten()
                if len(splittable) == 0:
                    break
                made = one.children(leaves.rows(splittable))
                leaves = leaves.rows(kept).cat(one.bound(made, 3))
        logits, inputs = _relu_inputs_sampled(model, x[i : i + 1], threat, 64, generator)
        margins = logits[:, y[i] : y[i] + 1] - logits  # (n, K)
        inside = torch.ones(len(margins), len(leaves.lower), dtype=torch.bool)
        for node, z in zip(one.nodes, inputs, strict=True):
            signs = leaves.splits[node].flatten(1)[None]  # (1, D, width)
            z = z[:, None]
            ok = ((signs >= 0) | (z <= 1e-9)) & ((signs <= 0) | (z >= -1e-9))
            inside &= ok.all(2)
        assert bool(inside.any(1).all()), "a perturbation outside every domain"
        lower = leaves.lower.nan_to_num(posinf=-float("inf"))  # (D, K); the label's own: skip
        gap = torch.where(inside[:, :, None], lower[None] - margins[:, None], -float("inf"))
        assert float(gap.max()) <= TOL, float(gap.max())


def _first_relu_input_box(model, x, threat):
    """CROWN's box on the input of the model's first ReLU (float64 bounds)."""
    from nonsingular.certificates.bab import _relu_inputs
    from nonsingular.certificates.crown import crown_bounds
    from nonsingular.certificates.region import InputRegion

    graph = read_model(model, x).cast(torch.float64)
    budgets = {b.index: b for b in perturbed_layers(graph, threat)}
    bounds = crown_bounds(graph, budgets, InputRegion.from_threat(x, threat), "crown", 0.0)
    return bounds.values[min(_relu_inputs(graph).values())]


def test_crown_bounds_the_first_layer_over_an_l2_ball_not_its_box():
    """Looseness fix 1: over an l2 input ball the box around it is not exact, so the first
    layer is tightened: an unstable neuron's bounds are ``w.x + b -/+ eps ||w||_2``, not the
    box's ``eps ||w||_1`` (a 64-32-32-5 MLP at eps = 0.3, the ball inside [0, 1])."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)
    )
    model = model.double().eval()
    x = 0.35 + 0.3 * torch.rand(4, 64, dtype=torch.float64)
    threat = Threat(eps_x=0.3, x_norm="l2")
    box = _first_relu_input_box(model, x, threat)
    w, b = model[0].weight.detach(), model[0].bias.detach()
    center, reach = x @ w.T + b, 0.3 * w.norm(dim=1)
    unstable = (center - reach < 0) & (center + reach > 0)
    assert int(unstable.sum()) > 10
    torch.testing.assert_close(box.lower[unstable], (center - reach)[unstable])
    torch.testing.assert_close(box.upper[unstable], (center + reach)[unstable])


def test_crown_bounds_an_affine_layer_after_overlapping_average_pooling_exactly():
    """Looseness fix 2: pooling then an affine layer are two maps that mix values, so the
    box of the pooled values is not exact: the layer's unstable neurons get the exact bounds of
    the composed map ``M = W P`` over the input box, ``M x + b -/+ eps |M| 1``."""
    torch.manual_seed(1)
    pool = nn.AvgPool2d(2, stride=1)
    model = nn.Sequential(pool, nn.Flatten(), nn.Linear(49, 16), nn.ReLU(), nn.Linear(16, 3))
    model = model.double().eval()
    x = 0.1 + 0.8 * torch.rand(3, 1, 8, 8, dtype=torch.float64)
    threat = Threat(eps_x=0.05)
    box = _first_relu_input_box(model, x, threat)
    basis = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)
    p = pool(basis).reshape(64, 49).T  # the pooling as a matrix, from its action on a basis
    m = model[2].weight.detach() @ p
    center = x.flatten(1) @ m.T + model[2].bias.detach()
    reach = 0.05 * m.abs().sum(1)
    unstable = (center - reach < 0) & (center + reach > 0)
    assert int(unstable.sum()) > 3
    torch.testing.assert_close(box.lower[unstable], (center - reach)[unstable])
    torch.testing.assert_close(box.upper[unstable], (center + reach)[unstable])


@given(
    worst=st.lists(st.floats(-10, 0), min_size=1, max_size=60),
    seed=st.integers(0, 100),
    batch=st.integers(1, 40),
)
def test_each_pass_takes_every_open_example_its_worst_domains_first(worst, seed, batch):
    from nonsingular.certificates.bab import _fair_share

    gen = torch.Generator().manual_seed(seed)
    worst = torch.tensor(worst)
    example = torch.randint(0, 5, (len(worst),), generator=gen)
    taken = _fair_share(worst, example, batch)
    assert len(set(taken.tolist())) == len(taken)
    open_ = set(example.tolist())
    assert set(example[taken].tolist()) == open_  # every open example moves on
    share = max(1, batch // len(open_))
    for e in open_:
        mine = (example == e).nonzero().flatten()
        got = taken[example[taken] == e]
        assert len(got) == min(share, len(mine))
        left = [i for i in mine.tolist() if i not in set(got.tolist())]
        if left:  # nothing left behind is worse than what was taken
            assert float(worst[left].min()) >= float(worst[got].max())


@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=30), seed=st.integers(0, 100))
def test_the_queue_hands_out_every_domain_once(sizes, seed):
    from nonsingular.certificates.bab import _Open, _Queue

    gen = torch.Generator().manual_seed(seed)
    queue, made, handed = _Queue(torch.device("cpu")), 0, []
    for size in sizes:
        ids = torch.arange(made, made + size, dtype=torch.float64)[:, None]
        queue.add(_Open(torch.zeros(size, dtype=torch.long), {}, {}, {}, {}, ids, ids[:, :0]))
        made += size
        _, _, alive = queue.summary()
        open_ = alive.nonzero().flatten()
        pick = open_[torch.rand(len(open_), generator=gen) < 0.3]
        if len(pick):
            handed += queue.take(pick).lower[:, 0].tolist()
        queue.compact(most=4)
    _, _, alive = queue.summary()
    if bool(alive.any()):
        handed += queue.take(alive.nonzero().flatten()).lower[:, 0].tolist()
    assert sorted(handed) == list(range(made))


def _to_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32's 10 explicit significand bits (to nearest, ties to
    even), as tensor cores read their inputs."""
    bits = t.contiguous().view(torch.int32)
    bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


@given(st.integers(0, 10_000), st.integers(1, 800))
def test_dot_products_in_tf32_stay_within_the_bound_the_certificates_use(seed, n):
    """TF32 products (inputs rounded to 10 bits, summed in float32) are off by at most
    ``dot_gamma`` relative to the sum of the terms' magnitudes; float32's ``gamma`` alone is
    not enough once the inputs' rounding is aligned."""
    from nonsingular.model.operators.base import Unit, dot_gamma, gamma

    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    tf32 = Unit(2.0**-24, matmul_tf32=True)
    for u, v in ((a, b), (torch.full((n,), 1 + 3 * 2.0**-12), torch.ones(n))):
        computed = (_to_tf32(u) * _to_tf32(v)).sum(dtype=torch.float32).double()
        exact = (u.double() * v.double()).sum()
        scale = (u.double() * v.double()).abs().sum()
        assert abs(computed - exact) <= dot_gamma(n, tf32) * scale
    aligned = abs(n * (1 + 3 * 2.0**-12) - float((_to_tf32(u) * _to_tf32(v)).double().sum()))
    assert aligned > gamma(n, 2.0**-24) * n  # the float32-only bound would be broken
    assert dot_gamma(n, 2.0**-24) == gamma(n, 2.0**-24)  # no TF32: float32's bound


@pytest.mark.cuda
def test_default_cuda_settings_cost_a_dense_model_no_certificates():
    """PyTorch's defaults allow TF32 in convolutions, not in matrix products: a dense model
    on a GPU is certified as on the CPU (its rounding is float32's there too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(64, 64)
    y = model(x).argmax(1)
    threat = Threat(eps_x=0.002, eps_w=1e-4)
    on_cpu = ns.certify(model, x, y, threat, "crown", dtype=torch.float32).certified
    assert bool(on_cpu.float().mean() > 0.5)
    on_gpu = ns.certify(model.cuda(), x.cuda(), y.cuda(), threat, "crown", dtype=torch.float32)
    assert torch.equal(on_gpu.certified.cpu(), on_cpu)


def test_the_bounds_revision_follows_the_bound_code(tmp_path):
    """``REVISION`` is a digest of the bound code: an unchanged copy of the package has the
    same one, a copy with one operator file changed another."""
    import shutil
    from pathlib import Path

    import nonsingular
    from nonsingular.certificates import REVISION, bound_code_digest

    root = Path(nonsingular.__file__).resolve().parent
    copy = tmp_path / "nonsingular"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    assert bound_code_digest(copy) == REVISION
    relu = copy / "model" / "operators" / "relaxations.py"
    relu.write_text(relu.read_text() + "\n# a change\n")
    assert bound_code_digest(copy) != REVISION


class _Split(nn.Module):
    """``torch.split`` of the input: a tuple of tensors the bounds cannot follow as boxes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, 3, dim=1)
        return self.fc(a * b)


@pytest.mark.parametrize("zoo_name", ["lstm", "gru", "split"])
@pytest.mark.parametrize("method", ["ibp", "crown", "closed-form"])
def test_a_value_read_from_the_input_outside_a_tensor_is_refused_by_name(zoo_name, method):
    """An LSTM returns (output, (h, c)): bounds once held it fixed at one point of the input
    region, and 'certified' margins an attack beat. Now an UnsupportedLayerError naming it,
    while the attack still runs."""
    from .zoo import DIGIT_MODELS

    if zoo_name == "split":
        torch.manual_seed(0)
        model, x = _Split().eval(), torch.rand(4, 6)
    else:
        model, x = DIGIT_MODELS[zoo_name]().eval(), torch.rand(4, 1, 8, 8)
    y = model(x).argmax(1)
    threat = Threat(eps_x=0.3)
    name = "split" if zoo_name == "split" else "rnn"
    # refused by name: as a value that is not one tensor, or as an operation without bounds
    refused = f"{name}.*(not one tensor|has no interval bounds)"
    with pytest.raises(UnsupportedLayerError, match=refused):
        ns.certify(model, x, y, threat, method, dtype=torch.float32)
    assert ns.attack(model, x, y, threat, steps=5).margins.shape == (4,)


def _weight_term_model(third: float = 1.0, bias: float = 5.05, flatten: bool = True) -> nn.Module:
    """Flatten, then ``z = (x, 5, -x) + u`` with ``|u_i| <= 0.1 |x|`` (the first layer's
    weights perturbed by 0.1), ReLU, margin ``5.05 + h_1 - h_2 + h_3``: on ``x`` in [-1, 1] it
    is at least ``0.05 + 0.8 |x| > 0``, smallest at ``x = 0``, where ``|x| = 0``. With every
    ReLU fixed the weight term's chord above ``|x|`` on [-1, 1] still costs 0.1 there: only a
    split of ``x`` at 0 (the weight term's input) makes the domain exact. ``third``, ``bias``:
    the margin's weight on ``h_3`` and its bias, in place of 1 and 5.05; ``flatten=False``:
    the first layer reads the model's input itself."""
    first, last = nn.Linear(1, 3), nn.Linear(3, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0], [0.0], [-1.0]]))
        first.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
        last.weight.copy_(torch.tensor([[1.0, -1.0, third], [0.0, 0.0, 0.0]]))
        last.bias.copy_(torch.tensor([bias, 0.0]))
    layers = [nn.Flatten()] if flatten else []
    return nn.Sequential(*layers, first, nn.ReLU(), last).double().eval()


WEIGHT_TERM_THREAT = Threat(eps_x=1.0, eps_w=0.1, bounds=(-1.0, 1.0), layers=("1",))


@pytest.mark.parametrize("flatten", [True, False])
def test_weight_splits_decide_what_relu_splits_cannot(flatten):
    model = _weight_term_model(flatten=flatten)
    x, y = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    threat = (
        WEIGHT_TERM_THREAT
        if flatten
        else Threat(**{**WEIGHT_TERM_THREAT.__dict__, "layers": ("0",)})
    )
    samples = random_margins(model, x, y, threat)[:, 0, 1]
    assert float(samples.min()) >= 0.05 - 1e-9  # robust, as the docstring computes
    relu_only = ns.bab(
        model, x, y, threat, time_limit=60.0, steps=20, restarts=1, weight_splits=False
    )
    # every ReLU split and still unproved: stuck, long before the time limit
    assert relu_only.status == ["unknown"] and float(relu_only.seconds[0]) < 60.0
    assert float(relu_only.lower[0, 1]) <= 0
    both = ns.bab(model, x, y, threat, time_limit=60.0, steps=20, restarts=1)
    assert both.status == ["certified"], both.lower
    assert 0 < float(both.lower[0, 1]) <= float(samples.min()) + TOL


@st.composite
def signed_networks(draw):
    """A random small network on inputs of both signs whose perturbed dense layers may read
    values of both signs (the input, or a Linear with no activation after it): Flatten or
    not, then 1-3 hidden Linear layers each followed by a ReLU or nothing, then the output
    Linear."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    width, classes = draw(st.integers(1, 4)), draw(st.integers(2, 4))
    layers: list[nn.Module] = [nn.Flatten()] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(1, 8))
        layers.append(nn.Linear(width, out, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.ReLU())
        width = out
    layers.append(nn.Linear(width, classes))
    model = nn.Sequential(*layers).double().eval()
    first = next(m for m in layers if isinstance(m, nn.Linear))
    x = torch.rand(2, first.in_features, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, classes, (2,), generator=torch.Generator().manual_seed(seed + 1))
    return model, (2 * x - 1).double(), y


def _node_values_sampled(model, x, threat, n, generator):
    """For ``n`` random joint perturbations of one example of a ``Sequential``: its logits
    ``(n, K)`` and every node's value, flat ``(n, width)`` (node ``k`` is the output of the
    ``k``-th module; node 0 the input), through the unmodified model, weights materialized."""
    params = sample_parameters(model, x, threat, n, generator)
    xs = sample_inputs(x[0], threat, n, generator)
    seen, found = [], []
    hooks = [m.register_forward_hook(lambda _m, _a, out: found.append(out)) for m in model]
    try:
        for s in range(n):
            found[:] = [xs[s : s + 1]]
            functional_call(model, {k: v[s] for k, v in params.items()}, (xs[s : s + 1],))
            seen.append([v[0].flatten() for v in found])
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.stack(c) for c in zip(*seen, strict=True)]


def _check_split_leaves(model, x, y, threat, rounds):
    """Split every example's domains ``rounds`` times (ReLUs and weight terms' inputs, every
    leaf kept): every sampled perturbation falls in some leaf, and in each leaf it falls in,
    every margin is at least that leaf's bound. Returns how many weight-term splits were made."""
    from nonsingular.certificates.bab import _Domains, _splittable
    from nonsingular.certificates.rounding import certificate_unit, exact_products

    graph = read_model(model, x).cast(torch.float64)
    budgets = {b.index: b for b in perturbed_layers(graph, threat)}
    unit = certificate_unit(torch.float64, x.device, torch.float64)
    classes = int(model(x).shape[1])
    generator, weight_splits = torch.Generator().manual_seed(0), 0
    for i in range(len(x)):
        one = _Domains(graph, budgets, x[i : i + 1], y[i : i + 1], threat, unit, classes)
        with torch.no_grad(), exact_products():
            unknown = torch.full((classes,), -float("inf"), dtype=torch.float64)
            leaves = one.start(unknown.scatter(0, y[i : i + 1], float("inf"))[None])
            for _ in range(rounds):
                split = _splittable(leaves) & (leaves.worst <= 0)
                splittable, kept = split.nonzero().flatten(), (~split).nonzero().flatten()
                if len(splittable) == 0:
                    break
                made = one.children(leaves.rows(splittable))
                leaves = leaves.rows(kept).cat(one.bound(made, 3))
        weight_splits += sum(int((leaves.splits[k] != 0).sum()) for k in one.weighted.values())
        values = _node_values_sampled(model, x[i : i + 1], threat, 64, generator)
        logits = values[-1]
        margins = logits[:, y[i] : y[i] + 1] - logits  # (n, K)
        inside = torch.ones(len(margins), len(leaves.lower), dtype=torch.bool)
        for node in one.nodes:
            signs, z = leaves.splits[node].flatten(1)[None], values[node][:, None]
            inside &= (((signs >= 0) | (z <= 1e-9)) & ((signs <= 0) | (z >= -1e-9))).all(2)
        assert bool(inside.any(1).all()), "a perturbation outside every domain"
        lower = leaves.lower.nan_to_num(posinf=-float("inf"))  # (D, K); the label's own: skip
        gap = torch.where(inside[:, :, None], lower[None] - margins[:, None], -float("inf"))
        assert float(gap.max()) <= TOL, float(gap.max())
    return weight_splits


@settings(max_examples=12, deadline=None)
@given(
    case=signed_networks(),
    threat=threats(modes=DENSE_MODES, input_norms=("linf",)),
    rounds=st.integers(1, 4),
)
def test_weight_split_domains_bound_the_points_inside_them(case, threat, rounds):
    """Branch and bound's domains with weight-term splits (inputs of perturbed dense layers
    split at 0), on inputs of both signs: the leaves cover the perturbations and bound them."""
    model, x, y = case
    _check_split_leaves(model, x, y, Threat(**{**threat.__dict__, "bounds": (-1.0, 1.0)}), rounds)


class _ConcatHead(nn.Module):
    """A leaky ReLU layer whose outputs (of both signs) reach the head through a concatenation:
    the head's weight term is split on the concatenation's values."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.head = nn.Linear(3, 6), nn.LeakyReLU(0.2), nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x))
        return self.head(torch.cat([h, h], 1))


@pytest.mark.parametrize("seed", [1, 5])
def test_weight_splits_after_a_concatenation_are_optimized_and_sound(seed):
    """A split multiplier on a concatenation's values reaches the bound only through the
    concatenation's backward step: bab optimizes it there (it used to stop with a
    RuntimeError: nothing to differentiate) and its bounds hold."""
    torch.manual_seed(seed)
    model = _ConcatHead().eval()
    x = torch.rand(16, 3)
    y = model(x).argmax(1)
    threat = Threat(eps_x=0.05, eps_w=0.02)
    found = ns.bab(model, x, y, threat, time_limit=0.3)
    assert int(found.domains.sum()) > 0  # some example was split
    assert violation(found.lower, random_margins(model, x, y, threat)) <= TOL
    assert found.certified.tolist() == (found.lower.min(1).values > 0).tolist()


class _ShapeRead(nn.Module):
    """A ReLU layer, and a dense layer on inputs of both signs, whose outputs are read only
    for their shapes: no coefficient of a backward pass reaches them. The logits come from a
    ReLU (``relu_head``) or a tanh layer beside them."""

    def __init__(self, relu_head: bool) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(3, 6), nn.Linear(6, 5)
        self.b, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        self.act = torch.relu if relu_head else torch.tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        g = self.c(torch.tanh(self.a(x)))
        return self.head(self.act(self.b(x))) * (h.shape[1] * g.shape[1] / 30)


@pytest.mark.parametrize("relu_head", [True, False])
def test_layers_read_only_for_their_shape_are_neither_split_nor_optimized(relu_head):
    """alpha-crown optimized the slopes of a ReLU read only for its shape (a RuntimeError when
    it was the only ReLU: nothing to differentiate), and bab scored such a ReLU or dense
    layer for a split (a KeyError: no coefficients recorded): both run, and hold."""
    torch.manual_seed(2)
    model = _ShapeRead(relu_head).eval()
    x = torch.rand(16, 3)
    y = model(x).argmax(1)
    threat = Threat(eps_x=0.1, eps_w=0.05)
    found = ns.bab(model, x, y, threat, time_limit=0.3)
    assert int(found.domains.sum()) > 0 or not relu_head  # the ReLU head is split
    alpha = ns.certify(model, x, y, threat, "alpha-crown")
    samples = random_margins(model, x, y, threat)
    assert violation(found.lower, samples) <= TOL
    assert violation(alpha.lower, samples) <= TOL


@pytest.mark.parametrize("flatten", [True, False])
def test_a_weight_split_whose_constraint_is_dropped_is_caught(monkeypatch, flatten):
    """The same check on the weight-term model without ``h_3`` (margin ``5 - 0.1 |x|`` for
    ``x <= 0``): it splits ``x`` at 0 (a node, or the input region itself), and is caught when
    the ``x <= 0`` half's box is taken as the ``x >= 0`` half's (its constraint dropped for
    the other's): the chord then prices ``|x|`` as ``x`` where ``x < 0``."""
    import importlib

    from nonsingular.certificates import crown

    bab = importlib.import_module("nonsingular.certificates.bab")  # the module, not ns.bab
    model = _weight_term_model(third=0.0, bias=5.0, flatten=flatten)
    x, y = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    threat = Threat(**{**WEIGHT_TERM_THREAT.__dict__, "layers": ("1" if flatten else "0",)})
    assert _check_split_leaves(model, x, y, threat, 6) > 0
    real = crown.split_box

    def dropped(box, signs):
        if box.lower.shape[1:] == (1,):  # the input's value: both halves become ``x >= 0``
            signs = signs.abs()
        return real(box, signs)

    monkeypatch.setattr(crown, "split_box", dropped)
    monkeypatch.setattr(bab, "split_box", dropped)
    with pytest.raises(AssertionError):
        _check_split_leaves(model, x, y, threat, 6)


@pytest.mark.cuda
@settings(max_examples=6, deadline=None)
@given(case=signed_networks(), threat=threats(modes=DENSE_MODES, input_norms=("linf",)))
def test_weight_split_bab_is_sound_on_cuda_as_the_model_runs_there(case, threat):
    """bab with weight-term splits on a GPU, on inputs of both signs: its margin bounds hold for
    the model as it runs there; and the weight-term model is certified there as on the CPU."""
    model, x, y = case
    threat = Threat(**{**threat.__dict__, "bounds": (-1.0, 1.0)})
    samples = random_margins(model, x, y, threat, device="cuda")
    found = ns.bab(copy.deepcopy(model).cuda(), x.cuda(), y.cuda(), threat, time_limit=0.5)
    assert violation(found.lower, samples) <= TOL
    one = _weight_term_model().cuda()
    x1, y1 = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    result = ns.bab(one, x1.cuda(), y1.cuda(), WEIGHT_TERM_THREAT, time_limit=60.0, steps=20)
    assert result.status == ["certified"], result.lower


def test_a_chord_is_made_once_per_box_and_again_for_another():
    """The passes over the same bounds take a dense node's chord again; a box made again (a
    domain's, after a split) gets its own, never the stale one."""
    from nonsingular.certificates.crown_engine import Bounds
    from nonsingular.model.lemma import chord
    from nonsingular.model.operators.base import Box

    bounds = Bounds([None], [None], [(0.0, None)], unit=2.0**-24)
    first = Box(torch.tensor([[-1.0, 0.5, -2.0]]), torch.tensor([[1.0, 2.0, -1.0]]))
    line = bounds.chord(3, first)
    assert bounds.chord(3, first) is line
    other = Box(torch.tensor([[-0.5, 0.0, -2.0]]), torch.tensor([[2.0, 2.0, 1.0]]))
    for got, want in zip(bounds.chord(3, other), chord(other, 2.0**-24), strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(bounds.chord(3, other)[0], line[0])
    live = Box(first.lower.clone().requires_grad_(True), first.upper)
    assert bounds.chord(3, live) is not bounds.chord(3, live)  # a box with gradients: no cache
