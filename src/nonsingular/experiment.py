"""The paper's experiment: train the comparison's models, evaluate every one of them under the
same threats, and collect every number in one JSON-able dict (``results.json``).

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

Everything is cached in the output directory: models in ``models/seed{S}/{method}`` (training
run directories, resumable), evaluations in ``evals/seed{S}/{method}.json`` keyed by what was
evaluated and a hash of the weights, so a rerun reuses all finished work.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from ._version import __version__
from .attacks import LOSSES
from .checks import choice, integer, number, options
from .data import Dataset, load
from .distributed import alone, gather, mine, ranks
from .errors import ConfigError
from .evaluation import evaluate
from .files import exclusive, write_json
from .models import BUILTIN
from .threat import Threat, grid
from .training import TrainConfig, train
from .training.config import read_toml

# the experiment's budget lists (eps_x in units of the data's range: every loader gives [0, 1])
BUDGETS = (
    "eps_x",
    "eps_w_absolute",
    "eps_w_relative",
    "eps_w_shared",
    "joint_eps_x",
    "joint_eps_w",
)
COMPARISON = ("standard", "pgd-at", "awp", "joint-at", "bound-reg", "ibp")
ARCHITECTURES = tuple(BUILTIN)
# a recipe: the training options it changes (the default recipe changes none)
RECIPES: dict[str, dict[str, Any]] = {
    "no-augmentation": {"augment": 0}
}  # the experiment's architectures: the built-in ones


@dataclass(frozen=True)
class View:
    """One family of threats: a name, a base threat, and the budgets along one axis."""

    name: str
    label: str
    axis: str  # "eps_x" or "eps_w"
    budgets: tuple[float, ...]
    threat: dict[str, Any] = field(default_factory=dict)

    def threats(self) -> list[Threat]:
        return [Threat(**{**self.threat, self.axis: b}) for b in self.budgets]


@dataclass(frozen=True)
class Experiment:
    """What ``nonsingular reproduce`` runs; ``quick()`` is the few-minute version."""

    data: str = "mnist5k"
    model: str = "mlp"
    seeds: int = 1
    epochs: int = 20
    methods: tuple[str, ...] | None = None  # None: all six (bound-reg for an MLP only)
    eval_size: int = 500  # attacked test examples
    cert_size: int = 100
    attack_steps: int = 50
    attack_restarts: int = 1  # per loss
    attack_loss: str = "both"  # cross-entropy, then the margin (CW) loss: best per example
    stronger: bool = True  # attack each family's key budget again, twice as hard
    min_clean: float = 0.8  # a model below this clean accuracy is flagged, kept out of verdicts
    cert_dtype: str = "float32"  # the bounds' arithmetic (its rounding is bounded too: sound)
    # training recipes besides the default one, under which the claims are decided again (the
    # claims' models only: recipe_methods), shown side by side in the report
    recipes: tuple[str, ...] = ("no-augmentation",)
    recipe_methods: tuple[str, ...] = ("standard", "pgd-at", "awp", "bound-reg")
    eps_x: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2)
    eps_w_absolute: tuple[float, ...] = (0.0, 5e-4, 1e-3, 2e-3, 3e-3, 4e-3)
    eps_w_relative: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
    eps_w_shared: tuple[float, ...] = (0.0, 2e-3, 5e-3, 1e-2, 2e-2, 4e-2)
    joint_eps_x: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1)
    joint_eps_w: tuple[float, ...] = (0.0, 5e-4, 1e-3, 2e-3)
    certify: tuple[str, ...] = ("ibp", "crown")
    # crown's pre-activation bounds: "crown" for an MLP; "ibp" for a CNN, whose thousands of
    # unstable conv neurons make CROWN bounds cost ~30 s per 60 examples per budget (2 cores)
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
        for name in BUDGETS:
            _check_budgets(name, getattr(self, name))
        if self.methods is not None and (
            not isinstance(self.methods, tuple) or not all(isinstance(m, str) for m in self.methods)
        ):
            raise ConfigError(f"methods must be a list of method names, got {self.methods!r}")
        if self.methods is None:  # the paper's bound (closed-form) is defined for MLPs only
            chosen = tuple(m for m in COMPARISON if self.model == "mlp" or m != "bound-reg")
            object.__setattr__(self, "methods", chosen)
        unknown = [m for m in self.methods if m not in COMPARISON]
        if unknown:
            raise ConfigError(f"unknown method {unknown[0]!r}; choose from {', '.join(COMPARISON)}")
        for name in ("standard", "pgd-at", "awp"):
            if name not in self.methods:
                raise ConfigError(f"the comparison needs the {name} model (its claims use it)")
        choice("attack_loss", self.attack_loss, LOSSES)
        number("min_clean", self.min_clean, 0.0, 1.0)
        choice("cert_dtype", self.cert_dtype, ("float32", "float64"))
        for recipe in self.recipes:
            choice("recipes", recipe, tuple(RECIPES))
        for method in self.recipe_methods:
            choice("recipe_methods", method, COMPARISON)
        if self.recipes and "standard" not in self.recipe_methods:
            raise ConfigError("recipe_methods needs standard: every claim compares with it")
        if not isinstance(self.stronger, bool):
            raise ConfigError(f"stronger must be true or false, got {self.stronger!r}")
        if self.intermediate is None:
            object.__setattr__(self, "intermediate", "crown" if self.model == "mlp" else "ibp")
        if self.model != "mlp" and "bound-reg" in self.methods:
            raise ConfigError(
                "bound-reg regularizes the closed-form bound, which is defined for "
                f"MLPs only; leave it out for --model {self.model}"
            )
        for name, high in (
            ("seeds", 1_000),
            ("epochs", 100_000),
            ("eval_size", 10_000_000),
            ("cert_size", 10_000_000),
            ("attack_steps", 100_000),
            ("attack_restarts", 1_000),
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
            if threat is not None and (threat.eps_x > 0 or threat.eps_w > 0):
                out[method] = threat
        return out

    def views(self) -> list[View]:
        """Input-only, the three weight-only views, in report order."""
        return [
            View("input", "input only (linf)", "eps_x", self.eps_x),
            View(
                "weight-absolute",
                "weights only, per-example absolute (the paper's)",
                "eps_w",
                self.eps_w_absolute,
            ),
            View(
                "weight-relative",
                "weights only, per-example relative (multiplicative noise)",
                "eps_w",
                self.eps_w_relative,
                {"w_mode": "relative"},
            ),
            View(
                "weight-shared",
                "weights only, one shared perturbation for the whole test set",
                "eps_w",
                self.eps_w_shared,
                {"scope": "shared"},
            ),
        ]

    def attack_options(self, strength: int = 1) -> dict[str, Any]:
        """The attack's options; ``strength`` times the steps and restarts."""
        return {
            "steps": self.attack_steps * strength,
            "restarts": self.attack_restarts * strength,
            "loss": self.attack_loss,
        }

    def key_threats(self) -> dict[str, Threat]:
        """Each claim family's key budget: the middle of its nonzero budgets (for the joint
        grid, the middle eps_x with the middle eps_w)."""

        def middle(values: tuple[float, ...]) -> float:
            nonzero = [v for v in values if v > 0]
            return nonzero[len(nonzero) // 2] if nonzero else 0.0

        out = {}
        for view in self.views():
            out[view.name] = Threat(**{**view.threat, view.axis: middle(view.budgets)})
        out["joint"] = Threat(eps_x=middle(self.joint_eps_x), eps_w=middle(self.joint_eps_w))
        return out

    def key_index(self, family: str) -> int:
        """Where the key budget of ``family`` sits among its budgets (the joint grid's, eps_x
        slowest)."""
        key = self.key_threats()[family]
        if family == "joint":
            i, j = self.joint_eps_x.index(key.eps_x), self.joint_eps_w.index(key.eps_w)
            return i * len(self.joint_eps_w) + j
        view = next(v for v in self.views() if v.name == family)
        return view.budgets.index(getattr(key, view.axis))

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
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _weights_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _check_budgets(name: str, values: object) -> None:
    """A budget list: numbers from 0 up, increasing, at least one above 0."""
    ok = (
        isinstance(values, tuple)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        and all(math.isfinite(v) and v >= 0 for v in values)
        and all(a < b for a, b in itertools.pairwise(values))
        and any(v > 0 for v in values)
    )
    if not ok:
        raise ConfigError(
            f"{name} must be a list of increasing non-negative numbers with one above 0, "
            f"like [0, 0.05, 0.1]; got {values!r}"
        )


class _EvalCache:
    """Evaluations of one model, keyed by what was asked, the weights' hash and the library
    version. Each entry carries the SHA-256 of its key and value, checked when the file is
    read: a damaged or hand-edited entry (or file) is recomputed, never trusted, and
    ``warn`` says so."""

    def __init__(self, path: Path, counts: dict[str, int], warn: Callable[[str], None]) -> None:
        self.path = path
        self.counts = counts  # "computed" and "reused", shared by every model's cache
        self.entries = self._read(warn)

    def _read(self, warn: Callable[[str], None]) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            warn(f"{self.path} is unreadable ({type(exc).__name__}): recomputing what it held")
            return {}
        if not isinstance(data, dict):
            warn(f"{self.path} is not an evaluation cache: recomputing what it held")
            return {}
        valid = {}
        for digest, entry in data.items():
            whole = isinstance(entry, dict) and set(entry) == {"key", "value", "sha256"}
            if whole and entry["sha256"] == _sha256([entry["key"], entry["value"]]):
                valid[digest] = entry
            else:
                warn(f"{self.path}: entry {str(digest)[:16]} is damaged or was edited: recomputed")
        return valid

    def get(self, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
        key = {**key, "nonsingular": __version__}  # numbers from another version are not reused
        digest = _sha256(key)[:16]
        if digest in self.entries and self.entries[digest]["key"] == key:
            self.counts["reused"] += 1
        else:
            value = compute()
            self.entries[digest] = {"key": key, "value": value, "sha256": _sha256([key, value])}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, self.entries)
            self.counts["computed"] += 1
        return self.entries[digest]["value"]


def _model(
    exp: Experiment,
    out: Path,
    method: str,
    seed: int,
    data: Dataset,
    device: torch.device,
    say: Callable[[str], None],
    recipe: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of ``method`` and ``seed``: from its run directory, or trained now."""
    run = out / "models" / f"seed{seed}" / (f"{recipe}/{method}" if recipe else method)
    config = exp.train_config(method, seed, recipe)
    done = run / "metrics.jsonl"
    reused = done.exists() and len(done.read_text().splitlines()) == config.epochs
    say(
        f"  {_name(method, recipe)} (seed {seed}): "
        + (f"reusing {run}" if reused else f"training {config.epochs} epochs")
    )
    # a finished run is loaded, an interrupted one continued (both from their state), and a
    # run made with other options is refused with a clear error rather than silently reused
    resume = (run / "state.safetensors").exists()
    result = train(config, data, out_dir=run, resume=resume, device=device, progress=False)
    model, history = result.model, result.history
    return model, {
        "reused": reused,
        "run_dir": str(run.relative_to(out)),
        "checkpoint_sha256": checkpoint.read_info(run / "model.safetensors")["sha256"],
        "clean_full_test": history[-1]["test_accuracy"],
        "train_seconds": sum(m["seconds"] for m in history),
    }


def _name(method: str, recipe: str | None) -> str:
    return f"{method} ({recipe})" if recipe else method


def run_experiment(
    exp: Experiment,
    out: str | Path,
    *,
    device: str | torch.device = "cpu",
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and evaluate everything ``exp`` describes; return ``results.json``'s content.

    One job at a time works in ``out`` (another gets a clear error). In a torch.distributed
    process group the models are dealt to the processes, each training and evaluating its own
    (and writing only their run directories and caches); every process returns the results.
    """
    out = Path(out)
    where = ranks()
    if where.lead:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot write to {out}: {exc.strerror}") from None
    with exclusive(out) if where.lead else contextlib.nullcontext():
        gather(None)  # the others start once the directory exists and is held
        return _run(exp, out, torch.device(device), say)


def _run(
    exp: Experiment, out: Path, device: torch.device, say: Callable[[str], None]
) -> dict[str, Any]:
    start = time.perf_counter()
    data = load(exp.data, seed=0)
    n = min(exp.eval_size, len(data.x_test))
    nc = min(exp.cert_size, n)
    work = exp.work()
    done = []
    assigned = mine(work)  # dealt among the processes (all of it to one process)
    with alone():  # each model is one process's work, start to end
        for _, (seed, method, recipe) in assigned:
            if recipe is None:
                done.append(_study(exp, out, seed, method, data, n, nc, device, say))
            else:
                done.append(_recipe_study(exp, out, seed, method, recipe, data, n, device, say))
    studies = {(s["seed"], s["method"], s["recipe"]): s for part in gather(done) for s in part}
    results = _skeleton(exp, data, n, nc)
    for key in work:  # assembled in one order, whoever computed what
        _record(results, exp, studies[key])
    results["seconds"] = time.perf_counter() - start
    every = list(studies.values())
    results["compute_seconds"] = sum(s["compute_seconds"] for s in every)
    results["reused"] = {
        "models": sum(s["info"]["reused"] for s in every),
        "of_models": len(every),
        "evaluations": sum(s["evaluations"]["reused"] for s in every),
        "of_evaluations": sum(sum(s["evaluations"].values()) for s in every),
    }
    results["world_size"] = ranks().world
    return results


def _skeleton(exp: Experiment, data: Dataset, n: int, nc: int) -> dict[str, Any]:
    """``results.json`` before any model has been measured."""
    return {
        "experiment": exp.to_dict(),
        "data": {
            "name": data.name,
            "split": "test",
            "split_seed": 0,  # load(exp.data, seed=0): the same split for every seed and model
            "test_examples": n,
            "certified_examples": nc,
            "shape": list(data.in_shape),
            "classes": data.classes,
        },
        "attack": exp.attack_options(),
        "stronger_attack": exp.attack_options(2) if exp.stronger else None,
        # per family: its key budget (eps_x, eps_w and the threat), and per model and seed
        # the outcomes of the default and the stronger attack there
        "stronger": {
            f: {"threat": t.to_dict(), "outcomes": {m: {} for m in exp.methods}}
            for f, t in (exp.key_threats().items() if exp.stronger else [])
        },
        "models": {m: {} for m in exp.methods},
        "views": {
            v.name: {
                "label": v.label,
                "axis": v.axis,
                "budgets": list(v.budgets),
                "threat": v.threat,
                "accuracy": {m: {} for m in exp.methods},
            }
            for v in exp.views()
        },
        "joint": {
            "eps_x": list(exp.joint_eps_x),
            "eps_w": list(exp.joint_eps_w),
            "accuracy": {m: {} for m in exp.methods},
        },
        "certified": {
            "eps_x": list(exp.joint_eps_x),
            "eps_w": list(exp.joint_eps_w),
            "methods": list(exp.certify),
            "accuracy": {c: {m: {} for m in exp.methods} for c in exp.certify},
            "attacked": {m: {} for m in exp.methods},  # on the same examples
        },
        # per example (a string of 0/1, 1: survived), per budget, per model and seed: what the
        # paired tests compare; the joint family's budgets in grid order (eps_x slowest)
        "outcomes": {
            f: {m: {} for m in exp.methods} for f in [*(v.name for v in exp.views()), "joint"]
        },
        # every model under every method's training threat: comparisons on a threat's own terms
        "matched": {
            "threats": {m: t.to_dict() for m, t in exp.training_threats().items()},
            "accuracy": {m: {} for m in exp.methods},
        },
        # the claims' models trained by each other recipe, measured under the same attacks
        "recipes": {r: _recipe_skeleton(exp, r) for r in exp.recipes},
        "warnings": [],
    }


def _views_skeleton(exp: Experiment) -> dict[str, Any]:
    return {
        v.name: {
            "label": v.label,
            "axis": v.axis,
            "budgets": list(v.budgets),
            "threat": v.threat,
            "accuracy": {},
        }
        for v in exp.views()
    }


def _recipe_skeleton(exp: Experiment, recipe: str) -> dict[str, Any]:
    """A recipe's part of ``results.json``: laid out as the main results, so that the same
    verdicts read it."""
    return {
        "changes": RECIPES[recipe],
        "experiment": exp.to_dict(),
        "models": {},
        "views": _views_skeleton(exp),
        "joint": {"eps_x": list(exp.joint_eps_x), "eps_w": list(exp.joint_eps_w), "accuracy": {}},
        "outcomes": {f: {} for f in [*(v.name for v in exp.views()), "joint"]},
    }


def _record(results: dict[str, Any], exp: Experiment, study: dict[str, Any]) -> None:
    """Put one model's study into ``results`` (a recipe's into ``results["recipes"]``)."""
    method, seed = study["method"], str(study["seed"])
    if study["recipe"] is not None:
        _record_attacks(results["recipes"][study["recipe"]], study)
        results["warnings"] += study["warnings"]
        return
    results["models"][method][seed] = study["info"]
    for name, accuracy in study["views"].items():
        results["views"][name]["accuracy"][method][seed] = accuracy
    results["joint"]["accuracy"][method][seed] = study["joint"]
    for family, bits in study["outcomes"].items():
        results["outcomes"][family][method][seed] = bits
    results["matched"]["accuracy"][method][seed] = study["matched"]
    for family, found in (study["stronger"] or {}).items():
        results["stronger"][family]["outcomes"][method][seed] = found
    certified = results["certified"]
    certified["attacked"][method][seed] = study["certified_attacked"]
    for c in exp.certify:
        certified["accuracy"][c][method][seed] = study["certified"][c]
    results["warnings"] += study["warnings"]


def _record_attacks(into: dict[str, Any], study: dict[str, Any]) -> None:
    """A recipe's model: its clean accuracy and attack outcomes, where verdicts read them."""
    method, seed = study["method"], str(study["seed"])
    into["models"].setdefault(method, {})[seed] = study["info"]
    for name, accuracy in study["views"].items():
        into["views"][name]["accuracy"].setdefault(method, {})[seed] = accuracy
    into["joint"]["accuracy"].setdefault(method, {})[seed] = study["joint"]
    for family, bits in study["outcomes"].items():
        into["outcomes"][family].setdefault(method, {})[seed] = bits


class _Measure:
    """One model's evaluations, each cached under what was asked and the model's weights."""

    def __init__(
        self,
        exp: Experiment,
        out: Path,
        model: nn.Module,
        data: Dataset,
        n: int,
        device: torch.device,
        seed: int,
        method: str,
        warn: Callable[[str], None],
    ) -> None:
        self.exp, self.model, self.method = exp, model, method
        self.x, self.y = data.x_test[:n].to(device), data.y_test[:n].to(device)
        self.evaluations = {"computed": 0, "reused": 0}
        path = out / "evals" / f"seed{seed}" / f"{method}.json"
        self.cache = _EvalCache(path, self.evaluations, warn)
        self.weights = _weights_hash(model)
        self.seconds: list[float] = []
        self.warnings: list[str] = []

    def table(
        self, threats: list[Threat], kind: str, rows: int, attack: dict[str, Any], label: str
    ) -> dict[str, Any]:
        """``evaluate`` on the first ``rows`` examples (certificates too for kind "certify")."""
        exp = self.exp
        key = {
            "kind": kind,
            "threats": [t.to_dict() for t in threats],
            "n": rows,
            "attack": attack,
            "weights": self.weights,
            "format": 2,  # rows carry per-example outcomes
        }
        certifying = kind == "certify"  # certificates alone: the attack is the joint grid's
        if certifying:
            key.update(attack=None, intermediate=exp.intermediate, dtype=exp.cert_dtype)

        def compute() -> dict[str, Any]:
            return evaluate(
                self.model,
                (self.x[:rows], self.y[:rows]),
                threats,
                None if certifying else attack,
                attack=not certifying,
                certify=list(exp.certify) if certifying else [],
                certify_kwargs={
                    "intermediate": exp.intermediate,
                    "dtype": getattr(torch, exp.cert_dtype),
                },
                progress=False,
            ).to_dict()

        value = self.cache.get(key, compute)
        self.seconds.append(sum(sum(r["seconds"].values()) for r in value["rows"]))
        self.warnings += [f"{self.method}, {label}: {w}" for w in value["warnings"]]
        return value


def _study(
    exp: Experiment,
    out: Path,
    seed: int,
    method: str,
    data: Dataset,
    n: int,
    nc: int,
    device: torch.device,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Train (or reuse) one model and measure it under every threat of the experiment: a
    JSON-able record (processes exchange them)."""
    model, info = _model(exp, out, method, seed, data, device, say)
    warnings: list[str] = []

    def warn(text: str) -> None:
        say(f"warning: {text}")
        warnings.append(text)

    measure = _Measure(exp, out, model, data, n, device, seed, method, warn)
    attack = exp.attack_options()
    views, joint_matrix, outcomes = _attacked(exp, measure, n, info)
    joint = grid(exp.joint_eps_x, exp.joint_eps_w)
    certified = measure.table(joint, "certify", nc, attack, "certified")
    attacked_nc = _on_first(outcomes["joint"], nc)  # the attack on the certified examples
    warnings += _unsound(certified, attacked_nc, method)
    own = exp.training_threats()
    evaluated = measure.table(list(own.values()), "attack", n, attack, "training threats")
    matched = {m: r["attacked"] for m, r in zip(own, evaluated["rows"], strict=True)}
    stronger = _stronger(exp, measure, n, outcomes) if exp.stronger else None
    say(f"  {method} (seed {seed}): done")
    return {
        "seed": seed,
        "method": method,
        "recipe": None,
        "info": info,
        "views": views,
        "joint": joint_matrix,
        "outcomes": outcomes,
        "certified_attacked": _shape(exp, [bits.count("1") / nc for bits in attacked_nc]),
        "certified": {
            c: _shape(exp, [r["certified"][c] for r in certified["rows"]]) for c in exp.certify
        },
        "stronger": stronger,
        "matched": matched,
        "warnings": warnings + measure.warnings,
        "evaluations": measure.evaluations,
        "compute_seconds": info["train_seconds"] + sum(measure.seconds),
    }


def _attacked(
    exp: Experiment, measure: _Measure, n: int, info: dict[str, Any]
) -> tuple[dict[str, list[float]], list[list[float]], dict[str, list[str]]]:
    """The four views and the joint grid, attacked: accuracies, the joint matrix, per-example
    outcomes (``info`` gets the clean accuracy)."""
    attack = exp.attack_options()
    views, outcomes = {}, {}
    for view in exp.views():
        evaluated = measure.table(view.threats(), "attack", n, attack, view.name)
        views[view.name] = [r["attacked"] for r in evaluated["rows"]]
        outcomes[view.name] = [r["outcomes"]["attacked"] for r in evaluated["rows"]]
        info["clean"] = evaluated["rows"][0]["clean"]
    joint = grid(exp.joint_eps_x, exp.joint_eps_w)
    evaluated = measure.table(joint, "attack", n, attack, "joint")
    outcomes["joint"] = [r["outcomes"]["attacked"] for r in evaluated["rows"]]  # eps_x slowest
    return views, _shape(exp, [r["attacked"] for r in evaluated["rows"]]), outcomes


def _recipe_study(
    exp: Experiment,
    out: Path,
    seed: int,
    method: str,
    recipe: str,
    data: Dataset,
    n: int,
    device: torch.device,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """A model trained by another recipe, attacked as the main ones (no certificates, no
    stronger or matched attacks: what the verdicts need)."""
    model, info = _model(exp, out, method, seed, data, device, say, recipe)
    measure = _Measure(exp, out, model, data, n, device, seed, f"{recipe}/{method}", say)
    views, joint_matrix, outcomes = _attacked(exp, measure, n, info)
    say(f"  {_name(method, recipe)} (seed {seed}): done")
    return {
        "seed": seed,
        "method": method,
        "recipe": recipe,
        "info": info,
        "views": views,
        "joint": joint_matrix,
        "outcomes": outcomes,
        "warnings": measure.warnings,
        "evaluations": measure.evaluations,
        "compute_seconds": info["train_seconds"] + sum(measure.seconds),
    }


def _stronger(
    exp: Experiment, measure: _Measure, n: int, outcomes: dict[str, list[str]]
) -> dict[str, Any]:
    """Each family's key budget attacked again with twice the steps and restarts: per family,
    the outcomes of the default attack there (taken from ``outcomes``) and of both attacks
    together: an example survives only if it survives both (for a shared perturbation, which
    is one perturbation for all examples, the outcomes of the one that broke more)."""
    out = {}
    for family, threat in exp.key_threats().items():
        harder_table = measure.table(
            [threat], "attack", n, exp.attack_options(2), f"{family}, stronger"
        )
        default = outcomes[family][exp.key_index(family)]
        harder = harder_table["rows"][0]["outcomes"]["attacked"]
        if threat.scope == "shared":  # one perturbation each: the worse of the two, whole
            both = min(default, harder, key=lambda bits: bits.count("1"))
        else:
            both = "".join(
                "1" if a == b == "1" else "0" for a, b in zip(default, harder, strict=True)
            )
        out[family] = {"default": default, "stronger": both}
    return out


def _on_first(outcomes: list[str], n: int) -> list[str]:
    return [bits[:n] for bits in outcomes]


def _unsound(certified: dict[str, Any], attacked: list[str], method: str) -> list[str]:
    """Examples a certificate certified that the attack broke: always none, unless a bound is
    wrong (a soundness bug, reported loudly)."""
    out = []
    for row, broken_by in zip(certified["rows"], attacked, strict=True):
        for c, bits in row["outcomes"].items():
            if c == "clean":
                continue
            both = sum(a == "1" and b == "0" for a, b in zip(bits, broken_by, strict=True))
            if both:
                out.append(
                    f"{method}: {both} examples certified by {c} were broken by the attack at "
                    f"eps_x={row['eps_x']:g}, eps_w={row['eps_w']:g}: a soundness bug"
                )
    return out


def _shape(exp: Experiment, cells: list[float]) -> list[list[float]]:
    """Joint-grid values in grid order (eps_x slowest) as a matrix: rows eps_x, columns eps_w."""
    w = len(exp.joint_eps_w)
    return [cells[i * w : (i + 1) * w] for i in range(len(exp.joint_eps_x))]
