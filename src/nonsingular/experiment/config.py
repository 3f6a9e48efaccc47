"""What the experiment runs: its methods, budgets, attacks and recipes (``Experiment``), and
the threat families it measures (``Family``).

Budgets (for [0, 1] images, checked against the standard model in every report): each grid
runs from no perturbation to one at which a standard MLP on mnist5k is near zero accuracy, so
the curves show the whole fall and differences between models are visible somewhere.

- input, linf ``eps_x``: 0.02 barely moves a standard model; at 0.1-0.2 it is near 0%.
- weights, per-example absolute ``eps_w`` (the paper's view): 5e-4 costs a few points; 3e-3
  to 4e-3 breaks nearly everything (every weight of a 784-wide layer may move by eps_w).
- weights, per-example relative (multiplicative hardware noise, ``|Delta| <= eps_w |W|``): 1%
  to 20%.
- weights, shared absolute (one fault for the whole test set): a single Delta must hurt every
  example at once, so it needs about ten times the per-example budget.
- joint: the product of the first four input and weight budgets, where both matter.
- bit flips (``flips``): counts of flipped bits of the 8-bit per-channel integers of
  ``ns.quantize(model)``, doubling from 1; a standard MLP on mnist5k collapses to chance after
  about 100-200 flips of the shared bit search, while random flips barely move it.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..attacks import LOSSES, AttackOptions
from ..certificates import METHODS as CERTIFY_METHODS
from ..certificates import CertifyOptions
from ..checks import choice, integer, number, options
from ..errors import ConfigError
from ..model.architectures import BUILTIN
from ..threat import MAX_BUDGET, MAX_FLIPS, Threat
from ..training import METHODS, TrainConfig
from ..training.config import read_toml

# the experiment's budget lists (eps_x in units of the data's range: every loader gives [0, 1])
BUDGETS = (
    "eps_x",
    "eps_w_absolute",
    "eps_w_relative",
    "eps_w_shared",
    "joint_eps_x",
    "joint_eps_w",
)
COMPARISON = METHODS  # the methods it can compare: every registered one (the registry itself)
ARCHITECTURES = tuple(BUILTIN)  # the experiment's architectures: the built-in ones
# a recipe: the training options it changes (the default recipe changes none)
RECIPES: dict[str, dict[str, Any]] = {"no-augmentation": {"augment": 0}}


# the bit-flip family: every model quantized as ``ns.quantize(model, FLIP_BITS,
# FLIP_GRANULARITY)``, attacked by the shared progressive bit search and by random flips at each
# count of ``Experiment.flips``, and its flips to collapse (chance + 1 point) counted
FLIPS = "bit-flips"
FLIPS_LABEL = "bit flips of the 8-bit per-channel integers (one shared flip set)"
FLIP_BITS = 8
FLIP_GRANULARITY = "channel"

JOINT = "joint"  # the joint family: the grid joint_eps_x x joint_eps_w, absolute per-example
JOINT_LABEL = "joint (eps_x x eps_w, absolute per-example)"


@dataclass(frozen=True)
class Family:
    """One family of threats along one axis: a name, a label for the report, a base threat,
    and the budgets (the joint family is the grid of ``Experiment.joint_eps_x/_w``)."""

    name: str
    label: str
    axis: str  # "eps_x" or "eps_w"
    budgets: tuple[float, ...]
    threat: dict[str, Any] = field(default_factory=dict)

    def threats(self) -> list[Threat]:
        return [Threat(**{**self.threat, self.axis: b}) for b in self.budgets]


def default_methods(model: str, flips: bool = True) -> tuple[str, ...]:
    """Every registered method, MLP-only ones for an MLP only; bit-flip ones only when the
    experiment measures the bit-flip family (``flips``), the threat they train for."""
    return tuple(
        m
        for m, entry in METHODS.items()
        if (model == "mlp" or not entry.mlp_only) and (flips or not entry.flips)
    )


@dataclass(frozen=True)
class Experiment:
    """What ``nonsingular reproduce`` runs; ``quick()`` is the few-minute version."""

    data: str = "mnist5k"
    model: str = "mlp"
    seeds: int = 1
    epochs: int = 20
    methods: tuple[str, ...] | None = None  # None: every method (MLP-only ones for an MLP only)
    eval_size: int = 500  # attacked test examples
    cert_size: int = 100
    attack_steps: int = 50
    attack_restarts: int = 1  # per loss
    attack_loss: str = "both"  # cross-entropy, then the margin (CW) loss: best per example
    stronger: bool = True  # attack each family's key budget again, twice as hard
    min_clean: float = 0.8  # a model below this clean accuracy is flagged, kept out of verdicts
    cert_dtype: str = "float32"  # the bounds' arithmetic (its rounding is bounded too: sound)
    # training recipes besides the default one, under which the claims are decided again (the
    # claims' models only: recipe_methods, None: those marked so in the registry), shown side
    # by side in the report
    recipes: tuple[str, ...] = ("no-augmentation",)
    recipe_methods: tuple[str, ...] | None = None
    eps_x: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2)
    eps_w_absolute: tuple[float, ...] = (0.0, 5e-4, 1e-3, 2e-3, 3e-3, 4e-3)
    eps_w_relative: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
    eps_w_shared: tuple[float, ...] = (0.0, 2e-3, 5e-3, 1e-2, 2e-2, 4e-2)
    joint_eps_x: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1)
    joint_eps_w: tuple[float, ...] = (0.0, 5e-4, 1e-3, 2e-3)
    certify: tuple[str, ...] = ("ibp", "crown")
    # the bit-flip family (empty: not measured): flip counts of the accuracy curve, random
    # draws per count, and the most flips the flips-to-collapse search may take
    flips: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128)
    flip_draws: int = 50
    flip_limit: int = 1000
    # crown's pre-activation bounds: "crown" for the MLP and the CNN (on the CNN 3-18 CPU
    # seconds per 60 examples per joint budget in float32, one thread, load 4-5; over interval
    # boxes it certifies far fewer: 25 against 50 of 53 at eps_x = 0.02); "ibp" for the ResNet,
    # whose backward passes cost about a second per example per budget
    intermediate: str | None = None

    @classmethod
    def quick(cls, **changes: Any) -> Experiment:
        """Fewer epochs, smaller grids and test sets: minutes instead of a quarter hour."""
        settings: dict[str, Any] = {
            "epochs": 5,
            "eval_size": 300,
            "cert_size": 60,
            "attack_steps": 20,
            "attack_restarts": 1,
            "eps_x": (0.0, 0.05, 0.1, 0.2),
            "eps_w_absolute": (0.0, 1e-3, 2e-3, 4e-3),
            "eps_w_relative": (0.0, 0.02, 0.05, 0.2),
            "eps_w_shared": (0.0, 5e-3, 1e-2, 4e-2),
            "joint_eps_x": (0.0, 0.05, 0.1),
            "joint_eps_w": (0.0, 1e-3, 2e-3),
            "flips": (0, 1, 4, 16, 64),
            "flip_draws": 20,
            "flip_limit": 500,
        }
        return cls(**{**settings, **changes})

    @classmethod
    def from_dict(cls, data: dict[str, Any], quick: bool = False) -> Experiment:
        """From a dict (a TOML file's tables flattened) whose keys are field names, with ``-``
        or ``_``; lists become tuples. ``quick``: start from ``quick()``'s settings."""
        clean = options(cls, data, "experiment")
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in clean.items()}
        return cls.quick(**clean) if quick else cls(**clean)

    @classmethod
    def from_toml(cls, path: str | Path, quick: bool = False) -> Experiment:
        """From an experiment TOML file (``reproduce --config``; see docs/reproduce.md)."""
        return cls.from_dict(read_toml(path), quick=quick)

    def __post_init__(self) -> None:
        _check_kinds(self)
        for name in BUDGETS:
            _check_budgets(name, getattr(self, name))
        if self.methods is not None and (
            not isinstance(self.methods, tuple) or not all(isinstance(m, str) for m in self.methods)
        ):
            raise ConfigError(f"methods must be a list of method names, got {self.methods!r}")
        _check_flips(self.flips)
        if self.methods is None:
            object.__setattr__(self, "methods", default_methods(self.model, bool(self.flips)))
        if self.recipe_methods is None:
            chosen = tuple(m for m in METHODS if METHODS[m].recipes)
            object.__setattr__(self, "recipe_methods", chosen)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        for name in ("standard", "pgd-at", "awp"):
            if name not in self.methods:
                raise ConfigError(f"the comparison needs the {name} model (its claims use it)")
        choice("attack_loss", self.attack_loss, LOSSES)
        number("min_clean", self.min_clean, 0.0, 1.0)
        choice("cert_dtype", self.cert_dtype, ("float32", "float64"))
        for recipe in self.recipes:
            choice("recipes", recipe, tuple(RECIPES))
        for method in self.recipe_methods:
            choice("recipe_methods", method, METHODS)
        _check_certify(self.certify)
        if self.recipes and "standard" not in self.recipe_methods:
            raise ConfigError("recipe_methods needs standard: every claim compares with it")
        if not isinstance(self.stronger, bool):
            raise ConfigError(f"stronger must be true or false, got {self.stronger!r}")
        if self.intermediate is None:
            own = self.model in ("mlp", "cnn")
            object.__setattr__(self, "intermediate", "crown" if own else "ibp")
        self.attack_options(2)  # both attacks' options are checked now, before any training
        self.certify_options()
        mlp_only = [m for m in self.methods if METHODS[m].mlp_only]
        if self.model != "mlp" and mlp_only:
            raise ConfigError(
                f"{mlp_only[0]}: {METHODS[mlp_only[0]].mlp_only}; leave it out for "
                f"--model {self.model}"
            )
        for name, high in (
            ("seeds", 1_000),
            ("epochs", 100_000),
            ("eval_size", 10_000_000),
            ("cert_size", 10_000_000),
            ("attack_steps", 100_000),
            ("attack_restarts", 1_000),
            ("flip_draws", 100_000),
            ("flip_limit", MAX_FLIPS),
        ):
            integer(name, getattr(self, name), 1, high)
        if self.model not in ARCHITECTURES:
            raise ConfigError(
                f"model must be one of {', '.join(ARCHITECTURES)}, got {self.model!r}"
            )

    def training_threats(self) -> dict[str, Threat]:
        """Each method's own training threat (methods that train against one)."""
        out = {}
        for method in self.methods:
            threat = self.train_config(method, 0).resolved_threat()
            if threat.perturbs_input or threat.perturbs_weights:
                out[method] = threat
        return out

    def families(self) -> list[Family]:
        """Input-only and the three weight-only views, in report order (the joint family is
        the grid ``joint_eps_x`` x ``joint_eps_w``)."""
        return [
            Family("input", "input only (linf)", "eps_x", self.eps_x),
            Family(
                "weight-absolute",
                "weights only, per-example absolute (the paper's)",
                "eps_w",
                self.eps_w_absolute,
            ),
            Family(
                "weight-relative",
                "weights only, per-example relative (scale-invariant; multiplicative noise)",
                "eps_w",
                self.eps_w_relative,
                {"w_mode": "relative"},
            ),
            Family(
                "weight-shared",
                "weights only, one shared perturbation for the whole test set",
                "eps_w",
                self.eps_w_shared,
                {"scope": "shared"},
            ),
        ]

    def family(self, name: str) -> Family:
        """The one-axis family called ``name``."""
        return next(f for f in self.families() if f.name == name)

    def labels(self) -> dict[str, str]:
        """What each family is called in the report."""
        return {
            **{f.name: f.label for f in self.families()},
            JOINT: JOINT_LABEL,
            FLIPS: FLIPS_LABEL,
        }

    def shared(self, family: str) -> bool:
        """Whether ``family`` is one perturbation for every example (only seeds replicate)."""
        return family != JOINT and self.family(family).threat.get("scope") == "shared"

    def attack_options(self, strength: int = 1) -> AttackOptions:
        """The attack's options; ``strength`` times the steps and restarts."""
        options = AttackOptions(
            steps=self.attack_steps, restarts=self.attack_restarts, loss=self.attack_loss
        )
        return options.stronger(strength)

    def certify_options(self) -> CertifyOptions:
        """The certificates' options: the bounds' intermediate method and arithmetic."""
        return CertifyOptions(intermediate=self.intermediate, dtype=getattr(torch, self.cert_dtype))

    def key_threats(self) -> dict[str, Threat]:
        """Each claim family's key budget: the middle of its nonzero budgets (for the joint
        grid, the middle eps_x with the middle eps_w)."""

        def middle(values: tuple[float, ...]) -> float:
            nonzero = [v for v in values if v > 0]
            return nonzero[len(nonzero) // 2] if nonzero else 0.0

        out = {}
        for fam in self.families():
            out[fam.name] = Threat(**{**fam.threat, fam.axis: middle(fam.budgets)})
        out[JOINT] = Threat(eps_x=middle(self.joint_eps_x), eps_w=middle(self.joint_eps_w))
        return out

    def key_index(self, family: str) -> int:
        """Where the key budget of ``family`` sits among its budgets (the joint grid's, eps_x
        slowest)."""
        key = self.key_threats()[family]
        if family == JOINT:
            i, j = self.joint_eps_x.index(key.eps_x), self.joint_eps_w.index(key.eps_w)
            return i * len(self.joint_eps_w) + j
        fam = self.family(family)
        return fam.budgets.index(getattr(key, fam.axis))

    def train_config(self, method: str, seed: int, recipe: str | None = None) -> TrainConfig:
        """How ``method`` is trained with ``seed`` (under ``recipe``'s changes, if any)."""
        return TrainConfig(
            data=self.data,
            model=self.model,
            method=method,
            epochs=self.epochs,
            seed=seed,
            eval_size=0,
            **(RECIPES[recipe] if recipe else {}),
        )

    def work(self) -> list[tuple[int, str, str | None]]:
        """Every model to train and measure: (seed, method, recipe or None), in one order."""
        out: list[tuple[int, str, str | None]] = [
            (seed, m, None) for seed in range(self.seeds) for m in self.methods
        ]
        for recipe in self.recipes:
            out += [
                (seed, m, recipe)
                for seed in range(self.seeds)
                for m in self.methods
                if m in self.recipe_methods
            ]
        return out

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values; without the bit-flip family, its fields are left out
        (so ``results.json`` of runs made before it existed read back and write unchanged)."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if not self.flips:
            for name in FLIP_FIELDS:
                del out[name]
        return out


FLIP_FIELDS = ("flips", "flip_draws", "flip_limit")  # the bit-flip family's fields


def _check_kinds(exp: Experiment) -> None:
    """The fields whose later checks assume a kind: names are strings, lists are lists of
    strings (TOML's ``recipes = 5`` or ``data = 5`` is one line, not a traceback)."""
    for name in ("data", "model", "attack_loss", "cert_dtype"):
        value = getattr(exp, name)
        if not isinstance(value, str):
            kind = "a data set name" if name == "data" else "a name"
            raise ConfigError(f"{name} must be {kind} (a string), got {value!r}")
    for name in ("methods", "recipes", "recipe_methods", "certify"):
        value = getattr(exp, name)
        if value is not None and (
            not isinstance(value, tuple) or not all(isinstance(v, str) for v in value)
        ):
            what = "method names" if name != "recipes" else "names"
            raise ConfigError(f"{name} must be a list of {what}, got {value!r}")


def _increasing(values: object, kinds: tuple[type, ...], high: float) -> bool:
    """A tuple of numbers of ``kinds`` from 0 up to ``high``, increasing, one above 0."""
    return (
        isinstance(values, tuple)
        and all(isinstance(v, kinds) and not isinstance(v, bool) for v in values)
        and all(0 <= v <= high for v in values)  # NaN and inf fail it too
        and all(a < b for a, b in itertools.pairwise(values))
        and any(v > 0 for v in values)
    )


def _check_certify(methods: Any) -> None:
    """The certificate methods: a non-empty list of known names."""
    if not isinstance(methods, tuple) or not methods:
        raise ConfigError(f"certify must be a non-empty list of methods, got {methods!r}")
    for method in methods:
        choice("certify", method, CERTIFY_METHODS)


def _check_flips(values: object) -> None:
    """The flip counts: empty (no bit-flip family), or integers from 0 increasing, one above 0."""
    if values != () and not _increasing(values, (int,), MAX_FLIPS):
        raise ConfigError(
            f"flips must be a list of increasing flip counts from 0 up to {MAX_FLIPS} with one "
            f"above 0, like [0, 1, 4, 16], or [] for no bit-flip family; got {values!r}"
        )


def _check_budgets(name: str, values: object) -> None:
    """A budget list: numbers from 0 up to the threat's limit, increasing, one above 0."""
    if not _increasing(values, (int, float), MAX_BUDGET):
        raise ConfigError(
            f"{name} must be a list of increasing non-negative numbers up to {MAX_BUDGET:g} "
            f"with one above 0, like [0, 0.05, 0.1]; got {values!r}"
        )
