"""Flip certificates against every single flip: on random small networks (every weight, every
bit), float32 and float64, with and without eps_x, no margin a flip set really produces may fall
below the certified bound; with the flip term removed, the same check finds violations; and
bab's verdicts agree with exhaustive enumeration."""

import pytest
import torch
from torch.func import functional_call

import nonsingular as ns
from nonsingular.attacks.space import margins
from nonsingular.flips import bounds
from nonsingular.flips.grid import bit_changes, dequantize
from nonsingular.flips.space import FlipSpace
from nonsingular.model.architectures import mlp


def network(seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    sizes = [int(torch.randint(2, 6, (1,), generator=g)) for _ in range(2)]
    torch.manual_seed(seed)
    model = mlp((1, 2, 3), hidden=sizes, classes=3).to(dtype)
    bits = int(torch.randint(3, 9, (1,), generator=g))
    granularity = "channel" if seed % 2 else "tensor"
    q_model = ns.quantize(model, bits=bits, granularity=granularity)
    x = torch.rand(4, 1, 2, 3, generator=g, dtype=dtype)
    return q_model, x, q_model(x).argmax(1)


def inputs_in_box(x: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    """``x`` itself, random points and random corners of its eps-box inside [0, 1]:
    ``(1 + 2 * 6, B, ...)``."""
    if eps == 0:
        return x[None]
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(6, *x.shape, generator=g, dtype=x.dtype) * 2 - 1) * eps
    corners = torch.randint(0, 2, (6, *x.shape), generator=g).to(x.dtype) * 2 * eps - eps
    return torch.cat([x[None], (x + noise).clamp(0, 1), (x + corners).clamp(0, 1)])


def single_flip_weights(q_model, space, positions=None):
    """``{name: (F, *W.shape)}``, one weight copy per single flip of ``name`` (every element,
    every bit), each rebuilt from its flipped integer (``dequantize``)."""
    grid = ns.quantized(q_model)
    out = {}
    for name in space.names:
        w, q = space.params[name], space.integers[name].flatten()
        change = bit_changes(q, grid.bits)  # (numel, bits)
        scale = grid.scales[name].expand_as(w).flatten()
        new = dequantize(q[:, None] + change, scale[:, None]).flatten()  # (numel * bits,)
        element = torch.arange(len(q)).repeat_interleave(grid.bits)
        bit = torch.arange(grid.bits).repeat(len(q))
        keep = torch.ones_like(bit, dtype=torch.bool) if positions is None else bit == positions
        new, element = new[keep], element[keep]
        copies = w.flatten().repeat(len(new), 1)
        copies[torch.arange(len(new)), element] = new
        out[name] = copies.view(len(new), *w.shape)
    return out


def worst_single_flip(q_model, x, y, eps, seed, positions=None, layers=None):
    """Per example, the lowest margin over no flip and every single flip (every weight of
    ``layers``, default all, every bit) at the sampled inputs, each through the unmodified
    model (functional_call)."""
    space = FlipSpace(q_model, ns.Threat(flips=1, layers=layers))
    batch = inputs_in_box(x, eps, seed)
    points = len(batch)
    batch, labels = batch.flatten(0, 1), y.repeat(points)
    params = dict(space.params)
    with torch.no_grad():
        worst = margins(functional_call(q_model, params, (batch,)), labels).double()
        for name, copies in single_flip_weights(q_model, space, positions).items():
            for part in copies.split(256):
                run = torch.func.vmap(
                    lambda w, name=name: functional_call(q_model, {**params, name: w}, (batch,))
                )
                m = margins(run(part).flatten(0, 1), labels.repeat(len(part))).double()
                worst = torch.minimum(worst, m.view(-1, len(labels)).min(0).values)
    return worst.view(points, -1).min(0).values


def random_flips(space: FlipSpace, k: int, g: torch.Generator) -> list[tuple[str, int, int]]:
    """``k`` random (weight, index, bit) flips of ``space``, drawn from ``g``; a flip drawn twice
    counts once (fewer flips are inside the budget too)."""
    flips = set()
    for _ in range(k):
        name = space.names[int(torch.randint(len(space.names), (1,), generator=g))]
        index = int(torch.randint(space.params[name].numel(), (1,), generator=g))
        flips.add((name, index, int(torch.randint(space.bits, (1,), generator=g))))
    return sorted(flips)


def below_every_single_flip(build, seeds: int, methods, dtype: torch.dtype, eps: float) -> int:
    """Over ``seeds`` random networks from ``build``: every method's one-flip certificate (with
    ``eps_x``) lies below the worst single flip, asserted; returns how many (example, method)
    pairs it certifies, so a caller can check the bounds are not vacuous."""
    count = 0
    for seed in range(seeds):
        q_model, x, y = build(seed, dtype)
        threat = ns.Threat(flips=1, eps_x=eps)
        truth = worst_single_flip(q_model, x, y, eps, seed)
        for method in methods:
            certified = ns.certify(q_model, x, y, threat, method=method).worst
            assert bool((certified <= truth).all()), (seed, method, certified, truth)
            count += int((certified > 0).sum())
    return count


def certified_at(q_model, x, y, k: int, method: str) -> tuple[FlipSpace, torch.Tensor]:
    """The flip space of ``k`` flips and ``method``'s certified margins under it, checked to be
    no higher than under one flip (a larger budget never certifies more)."""
    certified = ns.certify(q_model, x, y, ns.Threat(flips=k), method=method).worst
    single = ns.certify(q_model, x, y, ns.Threat(flips=1), method=method).worst
    assert bool((certified <= single).all())
    return FlipSpace(q_model, ns.Threat(flips=k)), certified


def violations(build, method: str, layers: list[str] | None = None) -> int:
    """Examples, over 20 random float32 networks from ``build``, where ``method``'s one-flip
    certificate (on ``layers``) lies above the worst single flip."""
    count = 0
    for seed in range(20):
        q_model, x, y = build(seed, torch.float32)
        truth = worst_single_flip(q_model, x, y, 0.0, seed, layers=layers)
        threat = ns.Threat(flips=1, layers=layers)
        certified = ns.certify(q_model, x, y, threat, method=method).worst
        count += int((certified > truth).sum())
    return count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_single_flip_bounds_hold_against_exhaustive_enumeration(dtype, eps):
    assert below_every_single_flip(network, 50, ("ibp", "crown"), dtype, eps) > 0


def digits_model(hidden):
    """An 8-bit MLP trained 60 full-batch steps on sklearn's digits, and its test digits."""
    from nonsingular import data

    d = data.load("digits")
    torch.manual_seed(0)
    model = mlp((1, 8, 8), hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(d.x_train), d.y_train).backward()
        opt.step()
    return ns.quantize(model), d.x_test, d.y_test


def test_single_flip_bounds_hold_on_a_trained_network():
    q_model, x, y = digits_model((12,))
    x, y = x[:20], y[:20]
    truth = worst_single_flip(q_model, x, y, 0.0, 0)
    for method in ("ibp", "crown"):
        certified = ns.certify(q_model, x, y, ns.Threat(flips=1), method=method).worst
        assert bool((certified <= truth).all()), (method, certified, truth)
    assert bool((ns.certify(q_model, x, y, ns.Threat(flips=1)).certified).any())


def test_removing_the_flip_term_breaks_soundness(monkeypatch):
    monkeypatch.setattr(bounds, "largest", lambda flips, k: flips[0].new_zeros(flips[0].shape[:2]))
    assert violations(network, "crown") > 0


@pytest.mark.parametrize("k", [2, 3])
def test_k_flip_bounds_hold_against_random_flip_sets(k):
    for seed in range(10):
        q_model, x, y = network(seed, torch.float32)
        space, certified = certified_at(q_model, x, y, k, "crown")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(100):
                flips = random_flips(space, k, g)
                m = margins(functional_call(q_model, space.weights(flips), (x,)), y).double()
                assert bool((certified <= m).all()), (seed, flips)


def test_bab_verdicts_match_exhaustive_enumeration():
    seen = set()
    for seed in range(25):
        q_model, x, y = network(seed, torch.float32)
        truth = worst_single_flip(q_model, x, y, 0.0, seed)
        result = ns.bab(q_model, x, y, ns.Threat(flips=1), time_limit=30.0)
        assert "unknown" not in result.status
        for i, status in enumerate(result.status):
            seen.add(status)
            assert (status == "certified") == bool(truth[i] > 0), (seed, i)
            assert bool(result.lower[i].min() <= truth[i])
            if status == "broken":
                logits = result.attack.replay(q_model, i)
                assert float(margins(logits, y[i : i + 1])[0]) <= 0
                assert len(result.attack.bit_flips(i)) <= 1
    assert seen == {"certified", "broken"}


def test_bab_replays_flips_that_meet_a_negative_input():
    """Only an exactly-zero input makes a flip harmless: here every breaking flip meets the
    input -1 (the other input is 0), and bab must replay one, not leave the example open."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.5], [0.9, 0.5]]))
        model[0].bias.zero_()
    q_model = ns.quantize(model, bits=4, granularity="tensor")
    x = torch.tensor([[-1.0, 0.0]])
    y = q_model(x).argmax(1)
    result = ns.bab(q_model, x, y, ns.Threat(flips=1, bounds=None), time_limit=30.0)
    assert result.status == ["broken"]
    assert float(margins(result.attack.replay(q_model, 0), y)[0]) <= 0


def test_bab_verdicts_match_exhaustive_enumeration_on_inputs_of_both_signs():
    """Inputs in [-1, 1]: verdicts as exhaustive enumeration gives them, none unknown."""
    seen = set()
    for seed in range(25):
        q_model, x, _ = network(seed, torch.float32)
        x = x * 2 - 1
        y = q_model(x).argmax(1)
        truth = worst_single_flip(q_model, x, y, 0.0, seed)
        result = ns.bab(q_model, x, y, ns.Threat(flips=1, bounds=None), time_limit=30.0)
        assert "unknown" not in result.status, seed
        for i, status in enumerate(result.status):
            seen.add(status)
            assert (status == "certified") == bool(truth[i] > 0), (seed, i)
            if status == "broken":
                logits = result.attack.replay(q_model, i)
                assert float(margins(logits, y[i : i + 1])[0]) <= 0
    assert {"certified", "broken"} <= seen


def test_bab_settles_open_examples_by_ranges_not_flip_by_flip():
    """On a trained 64-64 MLP whose CROWN bound leaves every flip of whole rows open, bab
    settles each example (a breaking flip is replayed as soon as its range is narrowed to it)
    after bounding at most a twentieth as many ranges as there are flips (bounding and
    replaying flip by flip took 50,000 of the 70,656 on two of them)."""
    q_model, x, y = digits_model((64, 64))
    x, y = x[:60], y[:60]
    flips = sum(w.numel() for w in ns.quantized(q_model).integers(q_model).values()) * 8
    result = ns.bab(q_model, x, y, ns.Threat(flips=1), time_limit=60.0)
    assert "unknown" not in result.status
    searched = result.domains > 0
    assert int(searched.sum()) >= 5  # CROWN leaves examples open: the search runs
    assert int(result.domains.max()) <= flips // 20, int(result.domains.max())
    for i in searched.nonzero().flatten().tolist():
        if result.status[i] == "broken":
            logits = result.attack.replay(q_model, i)
            assert float(margins(logits, y[i : i + 1])[0]) <= 0


def test_flip_certificates_refuse_what_they_cannot_bound():
    q_model, x, y = network(0, torch.float32)
    with pytest.raises(ns.ConfigError, match="method"):
        ns.certify(q_model, x, y, ns.Threat(flips=1), method="recursive")
    with pytest.raises(ns.ConfigError, match="flips=1 or 2 only"):
        ns.bab(q_model, x, y, ns.Threat(flips=3))
    from nonsingular.model.architectures import cnn

    conv = ns.quantize(cnn((1, 8, 8), (2, 2), 5, 3))
    with pytest.raises(ns.UnsupportedLayerError, match="Linear/ReLU"):
        ns.certify(conv, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), ns.Threat(flips=1))


def test_bounds_for_the_lowest_bit_only_hold_and_are_tighter_than_for_all_bits():
    tighter = 0
    for seed in range(10):
        q_model, x, y = network(seed, torch.float32)
        truth = worst_single_flip(q_model, x, y, 0.0, seed, positions=0)
        only = ns.certify(q_model, x, y, ns.Threat(flips=1, bits=(0,))).worst
        every = ns.certify(q_model, x, y, ns.Threat(flips=1)).worst
        assert bool((only <= truth).all()), (seed, only, truth)
        assert bool((only >= every).all())
        tighter += int((only > every).sum())
    assert tighter > 0  # the restriction is used, not ignored


def flip_margins(q_model, space, x, y):
    """``{name: (numel * bits, B)}`` the margin of every example under every single flip of
    ``name`` (element-major, bit-minor), each through the unmodified model."""
    params, out = dict(space.params), {}
    with torch.no_grad():
        for name, copies in single_flip_weights(q_model, space).items():
            run = torch.func.vmap(
                lambda w, name=name: functional_call(q_model, {**params, name: w}, (x,))
            )
            logits = torch.cat([run(part) for part in copies.split(256)])
            out[name] = margins(logits.flatten(0, 1), y.repeat(len(copies))).view(len(copies), -1)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_range_bounds_hold_for_every_single_flip(dtype):
    """bab's bound on a range of one row's flips (all of them, and each alone) never exceeds
    the margin any of them gives on the model; the same bound at the unflipped value does."""
    from nonsingular.flips import certify, exact

    nonvacuous, unflipped_violations = 0, 0
    for seed in range(50):
        q_model, x, y = network(seed, dtype)
        threat = ns.Threat(flips=1)
        space, chain, _, _, logits = certify._read(q_model, x, y, threat)
        budget = certify.arithmetic(1, logits.dtype)
        truth = flip_margins(q_model, space, x, y)
        for i in range(len(y)):
            problem = certify.single_problem(space, chain, x[i : i + 1], y[i : i + 1], budget)
            for m, layer in enumerate(chain):
                rows = exact.sorted_rows(problem.changes[m], problem.point, m, budget)
                n_out, width = rows.t.shape
                row = torch.arange(n_out).repeat_interleave(width + 1)
                t_lo = torch.stack([rows.t[:, 0], *rows.t.T]).T.flatten()  # whole row, then each
                t_hi = torch.stack([rows.t[:, -1], *rows.t.T]).T.flatten()
                low = exact.range_bounds(
                    chain, problem.point, m, row, t_lo - rows.rad[row], t_hi + rows.rad[row],
                    problem.c, budget,
                )  # fmt: skip
                low[:, int(y[i])] = float("inf")
                low = low.min(1).values.view(n_out, width + 1)
                bits = problem.changes[m].shape[2]
                element = row.view(n_out, -1)[:, 1:] * layer.fan_in + rows.order // bits
                real = truth[layer.name][element * bits + rows.order % bits, i].double()
                assert bool((low[:, 1:] <= real).all()), (seed, i, m)
                assert bool((low[:, 0] <= real.min(1).values).all()), (seed, i, m)
                nonvacuous += int((low[:, 1:] > 0).sum())
                z = problem.point.z_mid[m][row]  # the flip's change left out
                same = exact.range_bounds(chain, problem.point, m, row, z, z, problem.c, budget)
                same[:, int(y[i])] = float("inf")
                same = same.min(1).values.view(n_out, width + 1)[:, 1:]
                unflipped_violations += int((same > real).sum())
    assert nonvacuous > 0
    assert unflipped_violations > 0


def pair_margins(q_model, x, y):
    """The margin of every example ``(S, B)`` under no flip, every single flip and every pair
    of flips (every weight, every bit; two bits of one integer too), each run on the
    unmodified model (``functional_call``) with its integers flipped one after the other and
    rebuilt by ``dequantize``; and the sets, ``((n, i, b), (n, i, b))`` with ``n`` the
    weight's place in ``FlipSpace.names`` (-1: no flip)."""
    space = FlipSpace(q_model, ns.Threat(flips=2))
    grid = ns.quantized(q_model)
    every = [
        (n, i, b)
        for n, name in enumerate(space.names)
        for i in range(space.params[name].numel())
        for b in range(space.bits)
    ]
    none = (-1, 0, 0)  # no flip
    sets = [(none, none)] + [(f, none) for f in every]
    sets += [(every[i], every[j]) for i in range(len(every)) for j in range(i + 1, len(every))]
    first, second = (torch.tensor([s[k] for s in sets]) for k in (0, 1))
    stacked = {}
    for n, name in enumerate(space.names):
        q = space.integers[name].flatten().repeat(len(sets), 1)
        for which, i, b in (first.T, second.T):
            hit = (which == n).nonzero().flatten()
            change = bit_changes(q[hit, i[hit]], space.bits)[torch.arange(len(hit)), b[hit]]
            q[hit, i[hit]] += change
        w = dequantize(q.view(len(sets), *space.params[name].shape), grid.scales[name])
        stacked[name] = w
    params = dict(space.params)

    def run(weights):
        return functional_call(q_model, {**params, **weights}, (x,))

    with torch.no_grad():
        logits = torch.func.vmap(run)(stacked)  # (sets, B, classes)
    return margins(logits.flatten(0, 1), y.repeat(len(sets))).view(len(sets), -1).double(), sets


def tiny_network(seed):
    torch.manual_seed(seed)
    model = mlp((1, 2, 3), hidden=(3, 3), classes=3)
    q_model = ns.quantize(model, bits=3, granularity="channel" if seed % 2 else "tensor")
    x = torch.rand(4, 1, 2, 3, generator=torch.Generator().manual_seed(seed))
    return q_model, x, q_model(x).argmax(1)


@pytest.mark.parametrize("direct", [True, False])
def test_range_bounds_with_a_spare_flip_hold_for_every_pair(direct, monkeypatch):
    """A single flip's range bound with one more flip allowed in layer s (s at or after the
    first flip's layer) is at most the margin of that flip alone and of it with any flip of
    layer s; on inputs of both signs too, and with the spare flip's moves bounded directly or
    through the unflipped point (``exact.DIRECT``, what large batches use)."""
    from nonsingular.flips import certify, exact

    if not direct:
        monkeypatch.setattr(exact, "DIRECT", 0)
    checked = 0
    for seed in range(6):
        q_model, x, _ = tiny_network(seed)
        x = x * 2 - 1 if seed % 2 else x
        y = q_model(x).argmax(1)
        truth, sets = pair_margins(q_model, x, y)
        threat = ns.Threat(flips=2, bounds=None)
        space, chain, _, _, logits = certify._read(q_model, x, y, threat)
        budget = certify.arithmetic(2, logits.dtype)
        index = {}
        for k, (f1, f2) in enumerate(sets):
            index.setdefault(f1, []).append((f2[0], k))
            index.setdefault(f2, []).append((f1[0], k))
        for i in range(len(y)):
            problem = certify.single_problem(space, chain, x[i : i + 1], y[i : i + 1], budget)
            for m, layer in enumerate(chain):
                rows = exact.sorted_rows(problem.changes[m], problem.point, m, budget)
                n_out, width = rows.t.shape
                row = torch.arange(n_out).repeat_interleave(width)
                t, rad = rows.t.flatten(), rows.rad[row]
                bits = problem.changes[m].shape[2]
                for s in range(m, len(chain)):
                    spare = exact.Spare.of(s, problem.changes[s])
                    low = exact.range_bounds(
                        chain, problem.point, m, row, t - rad, t + rad, problem.c, budget, spare
                    )
                    low[:, int(y[i])] = float("inf")
                    low = low.min(1).values
                    order = rows.order.flatten().tolist()
                    for n, (r, f) in enumerate(zip(row.tolist(), order, strict=True)):
                        f1 = (m, r * layer.fan_in + f // bits, f % bits)
                        ks = [k for other, k in index[f1] if other in (-1, s)]
                        assert float(low[n]) <= float(truth[ks, i].min()), (seed, i, m, s, f1)
                        checked += 1
    assert checked > 1000


def test_bab_for_two_flips_matches_exhaustive_pair_enumeration():
    seen = set()
    for seed in range(12):
        q_model, x, y = tiny_network(seed)
        truth = pair_margins(q_model, x, y)[0].min(0).values
        result = ns.bab(q_model, x, y, ns.Threat(flips=2), time_limit=60.0)
        assert "unknown" not in result.status
        for i, status in enumerate(result.status):
            seen.add(status)
            assert (status == "certified") == bool(truth[i] > 0), (seed, i, truth[i])
            assert bool(result.lower[i].min() <= truth[i])
            if status == "broken":
                assert len(result.attack.bit_flips(i)) <= 2
                logits = result.attack.replay(q_model, i)
                assert float(margins(logits, y[i : i + 1])[0]) <= 0
    assert seen == {"certified", "broken"}


def conv_network(seed: int, dtype: torch.dtype):
    """A random quantized CNN (1x6x6 input, two Conv2d of 2-3 channels, 3 or 8 bits), four
    random inputs and its own predictions."""
    from nonsingular.model.architectures import cnn

    g = torch.Generator().manual_seed(seed)
    channels = [int(torch.randint(2, 4, (1,), generator=g)) for _ in range(2)]
    torch.manual_seed(seed)
    model = cnn((1, 6, 6), channels, hidden=4, classes=3).to(dtype)
    bits = 3 if seed % 2 else 8
    granularity = "channel" if seed % 4 < 2 else "tensor"
    q_model = ns.quantize(model, bits=bits, granularity=granularity)
    x = torch.rand(4, 1, 6, 6, generator=g, dtype=dtype)
    return q_model, x, q_model(x).argmax(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.0, 0.02])
def test_conv_ibp_bounds_hold_for_every_single_flip(dtype, eps):
    assert below_every_single_flip(conv_network, 20, ("ibp",), dtype, eps) > 0


def test_removing_the_conv_flip_term_breaks_soundness(monkeypatch):
    from nonsingular.flips.conv import Conv

    row = Conv.flip_row
    monkeypatch.setattr(Conv, "flip_row", lambda self, h, k: row(self, h, k) * 0)
    assert violations(conv_network, "ibp", layers=["0", "2"]) > 0  # the two convolutions only


@pytest.mark.parametrize("k", [2, 3])
def test_conv_ibp_bounds_hold_against_random_flip_sets(k):
    for seed in range(20):
        q_model, x, y = conv_network(seed, torch.float32)
        space, certified = certified_at(q_model, x, y, k, "ibp")
        g = torch.Generator().manual_seed(seed)
        sets = []
        for _ in range(100):
            sets += [random_flips(space, k, g)] * len(y)
        replayed = space.replay_margins(x.repeat(100, 1, 1, 1), y.repeat(100), sets)
        assert bool((certified.repeat(100) <= replayed.double()).all()), seed


def test_conv_flip_certificates_refuse_crown_and_bab():
    q_model, x, y = conv_network(0, torch.float32)
    with pytest.raises(ns.UnsupportedLayerError, match="ibp' covers Conv2d"):
        ns.certify(q_model, x, y, ns.Threat(flips=1), method="crown")
    with pytest.raises(ns.UnsupportedLayerError, match="ibp' covers Conv2d"):
        ns.bab(q_model, x, y, ns.Threat(flips=1))
    pooled = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 3)
    )
    with pytest.raises(ns.UnsupportedLayerError, match="MaxPool2d"):
        ns.certify(ns.quantize(pooled), x, y, ns.Threat(flips=1), method="ibp")


def test_builtin_cnn_certifies_digits_the_flip_attack_cannot_break():
    from nonsingular import data
    from nonsingular.model.architectures import cnn

    d = data.load("digits")
    torch.manual_seed(0)
    model = cnn((1, 8, 8))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(d.x_train), d.y_train).backward()
        opt.step()
    q_model, x, y = ns.quantize(model), d.x_test[:40], d.y_test[:40]
    threat = ns.Threat(flips=1, bits=[0])  # all bits: the sign bit's flip leaves ibp vacuous
    result = ns.certify(q_model, x, y, threat, method="ibp")
    assert bool(result.certified.any())
    truth = worst_single_flip(q_model, x, y, 0.0, 0, positions=0)
    assert bool((result.worst <= truth).all())
    found = ns.attack(q_model, x, y, ns.Threat(flips=1, bits=[0], scope="per-example"))
    assert bool((result.worst <= found.margins.double()).all())
    assert not bool((result.certified & (found.margins <= 0)).any())
