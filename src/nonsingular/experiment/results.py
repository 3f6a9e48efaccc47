"""What an experiment measured, typed: one ``Measured`` per trained model (method, seed,
recipe), gathered in ``Results`` with the experiment that asked for them. ``results.json`` is
``Results.to_dict()``; ``Results.from_dict`` reads it back.

Accuracies are fractions in [0, 1]. Per-example outcomes (``Outcomes``: True where the example
survived) are kept per budget, in the family's budget order (the joint grid's eps_x slowest):
what the paired tests compare. JSON writes them as strings of ``0``/``1``.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from ..evaluation import Outcomes
from .config import FLIP_FIELDS, Experiment
from .flipfamily import FlipFamily


@dataclass(frozen=True)
class AtKeyBudget:
    """Per-example outcomes at a family's key budget under the default attack, and under the
    default and the stronger attack together (an example survives only if it survives both;
    for one shared perturbation, the outcomes of the attack that broke more)."""

    default: Outcomes
    stronger: Outcomes

    def to_dict(self) -> dict[str, str]:
        return {"default": self.default.bits, "stronger": self.stronger.bits}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> AtKeyBudget:
        return cls(Outcomes(data["default"]), Outcomes(data["stronger"]))


@dataclass
class Measured:
    """One trained model and everything measured on it."""

    method: str
    seed: int
    recipe: str | None  # None: the default recipe
    clean: float  # on the attacked test examples
    clean_full_test: float
    train_seconds: float
    run_dir: str  # relative to the experiment's output directory
    checkpoint_sha256: str
    reused: bool  # the model was trained by an earlier run
    accuracy: dict[str, list[float]]  # per one-axis family, per budget: robust accuracy
    joint: list[list[float]]  # the joint grid: rows eps_x, columns eps_w
    outcomes: dict[str, list[Outcomes]]  # per family (the joint one too), per budget
    # on the first cert_size examples, as joint-grid matrices: per certificate the certified
    # accuracy, and the attacked accuracy it sits under (not measured for a recipe's model)
    certified: dict[str, list[list[float]]] = field(default_factory=dict)
    certified_attacked: list[list[float]] = field(default_factory=list)
    matched: dict[str, float] = field(default_factory=dict)  # per method's training threat
    stronger: dict[str, AtKeyBudget] = field(default_factory=dict)  # per family
    warnings: list[str] = field(default_factory=list)
    evaluations_computed: int = 0
    evaluations_reused: int = 0
    compute_seconds: float = 0.0  # training and evaluation, whenever they ran
    # the bit-flip family (the default recipe's models of an experiment that measures it)
    bit_flips: FlipFamily | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (``bit_flips`` only where it was measured)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["outcomes"] = {k: [o.bits for o in v] for k, v in self.outcomes.items()}
        out["stronger"] = {k: v.to_dict() for k, v in self.stronger.items()}
        if self.bit_flips is None:
            del out["bit_flips"]
        else:
            out["bit_flips"] = self.bit_flips.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measured:
        values = {f.name: data[f.name] for f in fields(cls) if f.name != "bit_flips"}
        values["outcomes"] = {k: [Outcomes(o) for o in v] for k, v in data["outcomes"].items()}
        values["stronger"] = {k: AtKeyBudget.from_dict(v) for k, v in data["stronger"].items()}
        found = data.get("bit_flips")
        values["bit_flips"] = None if found is None else FlipFamily.from_dict(found)
        return cls(**values)


@dataclass(frozen=True)
class DataInfo:
    """The examples everything was measured on."""

    name: str
    test_examples: int  # the first ones of the test split are attacked
    certified_examples: int  # the first ones of those are certified
    shape: tuple[int, ...]
    classes: int
    split: str = "test"
    split_seed: int = 0  # the same split for every seed and model

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataInfo:
        return cls(**{**data, "shape": tuple(data["shape"])})


@dataclass(frozen=True)
class Spread:
    """Mean and sample sd over seeds of a number, a list or a matrix (elementwise); ``sd`` is
    None with a single seed."""

    mean: Any
    sd: Any

    def at(self, *index: int) -> Spread:
        mean, sd = self.mean, self.sd
        for i in index:
            mean, sd = mean[i], None if sd is None else sd[i]
        return Spread(mean, sd)


def spread(values: list[Any]) -> Spread:
    """The one summary over seeds: ``Spread`` of equally shaped numbers, lists or matrices."""
    if isinstance(values[0], list):
        parts = [spread([v[i] for v in values]) for i in range(len(values[0]))]
        sd = None if len(values) == 1 else [p.sd for p in parts]
        return Spread([p.mean for p in parts], sd)
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)


SHARED_ATTACKS = ("strong", "single-class")  # which shared attack made a run's numbers


@dataclass
class Results:
    """Every model the experiment measured, in the experiment's work order."""

    experiment: Experiment
    data: DataInfo
    models: list[Measured]
    seconds: float = 0.0  # this invocation, wall clock
    world_size: int = 1  # processes that shared the work
    run: dict[str, Any] | None = None  # provenance, added when the report is written
    # the shared attack that made the shared family's numbers: "strong" (loss clipped at broken
    # examples, class-permutation runs, budget continuation) or "single-class" (the earlier one,
    # stopped by a collapse to one class; its floor differs: effects.FLOOR_RULE)
    shared_attack: str = "strong"

    def methods(self, recipe: str | None = None) -> list[str]:
        """The methods measured under ``recipe``, in the experiment's order."""
        present = {m.method for m in self.models if m.recipe == recipe}
        return [m for m in self.experiment.methods if m in present]

    def of(self, method: str, recipe: str | None = None) -> list[Measured]:
        """``method``'s models under ``recipe``, by seed."""
        found = [m for m in self.models if m.method == method and m.recipe == recipe]
        return sorted(found, key=lambda m: m.seed)

    def over_seeds(self, method: str, value: Any, recipe: str | None = None) -> Spread:
        """``spread`` of ``value(model)`` over ``method``'s seeds."""
        return spread([value(m) for m in self.of(method, recipe)])

    @property
    def seeds(self) -> int:
        return len({m.seed for m in self.models})

    @property
    def warnings(self) -> list[str]:
        return [w for m in self.models for w in m.warnings]

    @property
    def compute_seconds(self) -> float:
        return sum(m.compute_seconds for m in self.models)

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment.to_dict(),
            "data": self.data.to_dict(),
            "models": [m.to_dict() for m in self.models],
            "seconds": self.seconds,
            "world_size": self.world_size,
            "run": self.run,
            "shared_attack": self.shared_attack,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Results:
        """Read back ``to_dict()``'s JSON; an experiment recorded without the bit-flip family's
        fields (made before it existed, or without it) has none."""
        experiment = data["experiment"]
        if not set(FLIP_FIELDS) & set(experiment):
            experiment = {**experiment, "flips": []}
        return cls(
            experiment=Experiment.from_dict(experiment),
            data=DataInfo.from_dict(data["data"]),
            models=[Measured.from_dict(m) for m in data["models"]],
            seconds=data["seconds"],
            world_size=data["world_size"],
            run=data["run"],
            shared_attack=_shared_attack(data.get("shared_attack", "strong")),
        )


def _shared_attack(value: object) -> str:
    if value not in SHARED_ATTACKS:
        raise ConfigError(
            f"shared_attack must be one of {', '.join(SHARED_ATTACKS)}, got {value!r}"
        )
    return value  # type: ignore[return-value]
