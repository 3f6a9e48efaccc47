"""The shared-scope attack (one weight perturbation for every example): it goes below the
single-class floor where a class permutation exists, and it is monotone in the budget."""

from __future__ import annotations

import torch
from torch.func import functional_call

import nonsingular as ns
from nonsingular.attacks import margins
from nonsingular.evaluation import run as evaluation

K, PER_CLASS = 3, 12


def permutable() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """A linear model reading class ``c`` off coordinate ``c`` of its input, beside a constant
    feature (through which one shared change moves every example toward one class)."""
    y = torch.arange(K).repeat_interleave(PER_CLASS)
    x = torch.cat([torch.eye(K)[y], torch.full((K * PER_CLASS, 1), 2.0)], 1)
    model = torch.nn.Linear(K + 1, K, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.cat([torch.eye(K), torch.zeros(K, 1)], 1))
    return model, x, y


def test_a_class_permutation_goes_below_the_single_class_floor():
    model, x, y = permutable()
    eps = 0.6
    threat = ns.Threat(eps_w=eps, scope="shared", bounds=None)
    # the perturbation exists: class c moved to c + 1, every example wrong, within the ball
    delta = torch.zeros(K, K + 1)
    for c in range(K):
        delta[c, c], delta[(c + 1) % K, c] = -eps, eps
    params = {"weight": model.weight.detach() + delta}
    permuted = functional_call(model, params, (x,)).argmax(1)
    assert bool((permuted == (y + 1) % K).all())
    floor = 1 / K  # every example sent to one class: that class's share survives
    found = ns.attack(model, x, y, threat, steps=20)
    assert found.robust_accuracy < floor
    # what it found is real: the unmodified model with the shared delta breaks those examples
    for i in range(len(y)):
        if found.success[i]:
            assert margins(found.replay(model, i), y[i : i + 1]).item() <= 0


def test_a_shared_attack_never_does_worse_than_the_result_it_continues_from(standard_mlp, mnist):
    x, y = mnist.x_test[:200], mnist.y_test[:200]
    small = ns.Threat(eps_w=2e-2, scope="shared")
    strong = ns.attack(standard_mlp, x, y, small, steps=20, loss="margin")
    # a weak attack at a larger budget, from a start it could not find itself
    for eps_w in (2e-2, 2.5e-2, 4e-2):
        larger = small.replace(eps_w=eps_w)
        weak = ns.attack(standard_mlp, x, y, larger, steps=1, random_start=True, seed=3)
        continued = ns.attack(
            standard_mlp, x, y, larger, steps=1, random_start=True, seed=3, start=strong
        )
        assert continued.robust_accuracy <= strong.robust_accuracy
        assert continued.robust_accuracy <= weak.robust_accuracy


def test_evaluate_is_monotone_in_the_budget_of_a_shared_threat(standard_mlp, mnist, monkeypatch):
    starts = {}
    original = evaluation.run_attack

    def spy(model, x, y, threat, *args, start=None, **kwargs):
        starts[threat.eps_w] = None if start is None else start.threat.eps_w
        return original(model, x, y, threat, *args, start=start, **kwargs)

    monkeypatch.setattr(evaluation, "run_attack", spy)
    data = (mnist.x_test[:200], mnist.y_test[:200])
    budgets = (0.0, 5e-3, 1e-2, 1.5e-2, 2e-2, 2.5e-2, 3e-2, 4e-2)
    # budgets given out of order: evaluate takes them by size
    grid = ns.grid(eps_w=budgets[::-1], scope="shared")
    weak = ns.AttackOptions(steps=2, restarts=1)
    table = ns.evaluate(standard_mlp, data, grid, weak, progress=False)
    found = {r.eps_w: r.attacked for r in table.rows}
    ordered = [found[b] for b in budgets]
    assert all(a >= b for a, b in zip(ordered, ordered[1:], strict=False)), ordered
    assert ordered[-1] < ordered[0]  # the attack does something
    # each budget continued from a smaller one (the one where the fewest examples survived)
    assert starts[budgets[0]] is None
    for small, large in zip(budgets, budgets[1:], strict=False):
        assert starts[large] is not None and starts[large] <= small
        assert found[large] <= found[starts[large]]
