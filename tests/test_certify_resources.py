"""Certificates that behave: a time limit (examples not reached are unknown, never certified),
a memory estimate before anything runs (chunks sized to fit, or a MemoryLimitError), and a
progress bar over the examples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nonsingular as ns
from nonsingular import ConfigError, MemoryLimitError, Threat
from nonsingular import certificates as certs
from nonsingular.certificates import resources
from nonsingular.certificates.resources import estimate_memory, run_chunks
from nonsingular.cli import main
from nonsingular.model import read_model

THREAT = Threat(eps_x=0.02, eps_w=1e-4)


@pytest.fixture(scope="module")
def conv():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).eval()
    x = torch.rand(9, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    return model, x, model(x).argmax(1)


class Clock:
    """A clock that moves only when an example is bounded: one second each."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def bound(self, chunk: slice) -> torch.Tensor:
        rows = torch.arange(10)[chunk]
        self.now += len(rows)
        return rows[:, None].float()


def test_a_time_limit_starts_no_chunk_once_its_budget_is_spent(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(resources.time, "perf_counter", clock)
    parts, done = run_chunks(clock.bound, 10, 8, 0.5, "test", progress=False)
    # 5 s for 10 examples: one to measure, then the 4 the rest of the budget fits
    assert [len(p) for p in parts] == [1, 4] and done == 5
    clock.now = 0.0
    parts, done = run_chunks(clock.bound, 10, 8, None, "test", progress=False)
    assert [len(p) for p in parts] == [8, 2] and done == 10


@pytest.mark.parametrize("method", ["ibp", "crown", "recursive"])
def test_examples_not_reached_in_the_time_limit_are_unknown_never_certified(conv, method):
    model, x, y = conv
    threat = Threat(eps_x=0.001)
    if method == "recursive":
        model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 5)).eval()
        y = model(x).argmax(1)
    whole = ns.certify(model, x, y, threat, method, progress=False)
    assert bool(whole.finished.all()) and bool(whole.certified[1:].any())
    cut = ns.certify(model, x, y, threat, method, time_limit=1e-9, progress=False)
    assert cut.finished.tolist() == [True] + [False] * (len(x) - 1)  # the first chunk runs
    # the same bound, up to float64 rounding that differs with the batch's size
    assert torch.allclose(cut.lower[0], whole.lower[0], rtol=1e-9, atol=1e-12)
    assert not bool(cut.certified[1:].any())
    assert bool((cut.worst[1:] == -float("inf")).all())
    table = ns.evaluate(
        model,
        (x, y),
        [threat],
        attack=None,
        certify=[method],
        progress=False,
        certify_options=ns.CertifyOptions(time_limit=1e-9),
    )
    assert table.rows[0].certified[method] <= 1 / len(x)
    assert table.rows[0].unknown == {method: len(x) - 1}
    assert any("not reached by" in w for w in table.warnings)
    again = type(table.rows[0]).from_dict(table.rows[0].to_dict())
    assert again.unknown == table.rows[0].unknown


def test_one_example_that_does_not_fit_in_memory_is_refused_before_anything_runs(conv, monkeypatch):
    model, x, y = conv
    ran = []
    monkeypatch.setattr(certs, "_bounds", lambda *a: ran.append(a) or None)
    with pytest.raises(MemoryLimitError, match="estimated .* for one example.*intermediate='ibp'"):
        ns.certify(model, x, y, THREAT, "crown", memory_limit=1000, progress=False)
    assert not ran
    assert issubclass(MemoryLimitError, ConfigError)


def test_chunks_are_sized_to_the_memory_allowed_with_the_same_bounds(conv, monkeypatch):
    model, x, y = conv
    whole = ns.certify(model, x, y, THREAT, "crown", progress=False)
    graph = read_model(model, x).cast(torch.float64)
    budgets = {b.index: b for b in ns.model.perturbed_layers(graph, THREAT)}
    each = estimate_memory(graph, x.double(), "crown", "crown", budgets, THREAT).per_example
    sizes = []
    real = certs._bounds

    def spy(graph, xs, *args):
        sizes.append(len(xs))
        return real(graph, xs, *args)

    monkeypatch.setattr(certs, "_bounds", spy)
    chunked = ns.certify(model, x, y, THREAT, "crown", memory_limit=2 * each, progress=False)
    assert sizes == [2, 2, 2, 2, 1]
    assert torch.allclose(chunked.lower, whole.lower, rtol=1e-9, atol=1e-12)


def test_the_estimate_counts_crowns_intermediate_passes(conv):
    model, x, _ = conv
    graph = read_model(model, x).cast(torch.float64)
    own = estimate_memory(graph, x.double(), "crown", "crown", {}, THREAT)
    ibp = estimate_memory(graph, x.double(), "crown", "ibp", {}, THREAT)
    zero = estimate_memory(graph, x.double(), "crown", "crown", {}, Threat())
    assert own.per_example > ibp.per_example and "unstable neurons" in own.peak
    assert zero.per_example == ibp.per_example  # at the zero budget no neuron is unstable


def test_certify_shows_progress_over_the_examples(conv, monkeypatch):
    model, x, y = conv
    bars = []

    class Bar:
        def __init__(self, **kwargs) -> None:
            self.kwargs, self.seen = kwargs, 0
            bars.append(self)

        def update(self, n: int) -> None:
            self.seen += n

        def close(self) -> None:
            pass

    monkeypatch.setattr(resources, "tqdm", Bar)
    ns.certify(model, x, y, THREAT, "crown", batch_size=4)
    ns.certify(model, x, y, THREAT, "ibp", progress=False)
    assert bars[0].kwargs["total"] == len(x) and bars[0].seen == len(x)
    assert bars[0].kwargs["disable"] is None and bars[1].kwargs["disable"] is True


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--time-limit", "-1"], "time_limit must be"),
        (["--memory-limit", "nan"], "--memory-limit must be"),
        (["--memory-limit", "0"], "--memory-limit must be"),
    ],
)
@pytest.mark.parametrize("command", ["certify", "evaluate"])
def test_the_cli_checks_its_limits(capsys, command, flags, message):
    code = main([command, "--train-quick", "--data", "digits", *flags])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
