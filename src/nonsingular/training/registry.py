"""The training methods, in one registry: ``METHODS`` maps each method's name to its
``TrainingMethod`` (its class, defaults, forced threat, and how the report draws it).

Every list of methods is read from it when used: ``TrainConfig``'s choices and defaults, the
experiment's comparison and recipes, the report's colours and markers, the CLI's choices and
help. Adding a method is one entry here plus its class (docs/training.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .flip_at import FlipAdversarial
from .methods import (
    AWP,
    Adversarial,
    BoundRegularized,
    IntervalBound,
    Method,
    Standard,
    WeightAdversarial,
)

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass(frozen=True)
class TrainingMethod:
    """One training method: what trains, with what defaults, and how it is shown."""

    kind: type[Method]  # the class whose ``loss`` trains
    label: str  # what it is, in a few words (CLI help, report)
    color: str  # the report's line colour (Okabe-Ito: told apart with any colour vision)
    marker: str  # the report's line marker (the lines also part in greyscale)
    # the values of fields left unset (None); beside ``TrainConfig``'s common defaults
    defaults: dict[str, Any] = field(default_factory=dict)
    # fields the method trains with whatever is asked: their default, and the only value a
    # config may give (another is refused, so what a run records is what it trained with)
    forced: dict[str, Any] = field(default_factory=dict)
    attacks: bool = False  # its loss needs an inner attack (attack_steps >= 1)
    # its threat is bit flips of the 8-bit per-channel integers, attack_steps of them (the
    # flips a run trains against, and its per-epoch robust accuracy's threat)
    flips: bool = False
    mlp_only: str = ""  # why the experiment trains it for an MLP only ("": any model)
    recipes: bool = False  # retrained under every recipe (standard and the claims' models)


METHODS: dict[str, TrainingMethod] = {
    "standard": TrainingMethod(
        Standard,
        "cross-entropy on clean data",
        "#000000",
        "o",
        defaults={"eps_x": 0.0, "eps_w": 0.0},
        recipes=True,
    ),
    "pgd-at": TrainingMethod(
        Adversarial,
        "input PGD adversarial training, Madry et al.",
        "#0072B2",
        "s",
        defaults={"eps_x": 0.1, "attack_steps": 10},
        forced={"eps_w": 0.0},  # input only: joint-at is the one that perturbs weights too
        attacks=True,
        recipes=True,
    ),
    # AWP (Wu et al. 2020): one step of a weight perturbation relative to each layer's norm,
    # shared by the batch; weight-only unless eps_x > 0 (then input PGD first, as in AWP)
    "awp": TrainingMethod(
        AWP,
        "adversarial weight perturbation, Wu et al.",
        "#E69F00",
        "^",
        defaults={
            "eps_x": 0.0,
            "eps_w": 0.01,
            "w_mode": "relative",
            "w_norm": "l2",
            "scope": "shared",
            "attack_steps": 10,
        },
        attacks=True,
        recipes=True,
    ),
    # the paper's weight threat: per-example l_inf absolute weight perturbations (claim 2)
    "weight-at": TrainingMethod(
        WeightAdversarial,
        "per-example l_inf weight PGD adversarial training",
        "#56B4E9",
        "X",
        defaults={"eps_w": 1e-3, "attack_steps": 10},
        forced={"eps_x": 0.0, "w_mode": "absolute", "w_norm": "linf", "scope": "per-example"},
        attacks=True,
        recipes=True,
    ),
    "joint-at": TrainingMethod(
        Adversarial,
        "joint input and weight PGD adversarial training",
        "#009E73",
        "D",
        defaults={"eps_x": 0.05, "eps_w": 5e-4, "attack_steps": 10},
        attacks=True,
    ),
    "bound-reg": TrainingMethod(
        BoundRegularized,
        "cross-entropy plus the paper's closed-form bound",
        "#D55E00",
        "v",
        # lambdas chosen on a validation split, see benchmarks/bound_reg_sweep.py
        defaults={"eps_x": 0.1, "eps_w": 1e-3, "lambda_x": 1e-3, "lambda_w": 1e-3},
        mlp_only="it regularizes the closed-form bound, which is defined for MLPs only",
        recipes=True,
    ),
    "ibp": TrainingMethod(
        IntervalBound,
        "certified training with the joint IBP bound, Gowal et al.",
        "#CC79A7",
        "P",
        defaults={"eps_x": 0.1, "eps_w": 1e-4, "ramp": 0.5},
    ),
    # training against the worst bit flips of the weights' integers (Stutz et al.'s adversarial
    # bit error training, ranked as Rakin et al.'s bit search ranks): attack_steps = the flips
    "flip-at": TrainingMethod(
        FlipAdversarial,
        "8-bit flip adversarial training (the worst first-order flips), after Stutz et al.",
        "#999999",
        "*",
        defaults={"attack_steps": 10},
        forced={"eps_x": 0.0, "eps_w": 0.0, "scope": "shared", "bias": False},
        attacks=True,
        flips=True,
    ),
}


def make_method(config: TrainConfig) -> Method:
    """The method that trains ``config``."""
    return METHODS[config.method].kind(config)
