"""How an attack runs: ``AttackOptions``, the one home of the attack's defaults, taken by
``attack``, ``evaluate``, the command line and the experiment."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..checks import MAX_SEED, choice, integer, number, options
from ..errors import ConfigError

LOSSES = ("ce", "margin", "dlr", "both", "dlr-targeted")
METHODS = ("pgd", "apgd", "strong", "noise")
SCHEDULES = ("constant", "linear")
APGD_STEP = 2.0  # APGD's first step, in radii (Croce & Hein 2020: 2 eps)
LINEAR_STEP = 2.0  # the first step of PGD's linear schedule, in radii


def pgd_step_size(steps: int) -> float:
    """PGD's step as a fraction of each ball's radius: 2.5 radii in all (1 for FGSM)."""
    return 1.0 if steps == 1 else 2.5 / steps


def scheduled(alpha: float, schedule: str, step: int, steps: int) -> float:
    """PGD's step ``step`` (0-based) of ``steps``, in radii: ``alpha`` (``constant``), or
    ``alpha (steps - step) / steps`` (``linear``: from ``alpha`` down to ``alpha / steps``)."""
    return alpha if schedule == "constant" else alpha * (steps - step) / steps


@dataclass(frozen=True)
class AttackOptions:
    """Options of a joint attack (every field is checked when the options are made).

    method:       ``pgd`` (projected gradient ascent), ``apgd`` (APGD, Croce & Hein 2020:
                  momentum, step halved at checkpoints), ``strong`` (the ensemble: APGD with
                  ``ce``, then APGD with ``dlr-targeted`` on the examples still unbroken;
                  ``loss`` is not used) or ``noise`` (``samples`` uniform draws from the ball,
                  weights drawn once per sample: the fault-injection baseline).
    steps:        iterations (gradients) of each run; ``steps=1`` without random start is FGSM.
    restarts:     runs per loss (and per target); later runs attack only the examples still
                  unbroken.
    loss:         ``ce``, ``margin`` (CW), ``dlr``, ``both`` (ce then margin) or
                  ``dlr-targeted`` (targeted DLR, one run per target class, see ``targets``).
    targets:      targeted runs: the ``targets`` classes other than the label with the highest
                  clean logits, each the target of its own run (at most classes - 1 are used).
    step_size:    step as a fraction of each ball's radius (pgd: default ``2.5 / steps``, 1 for
                  FGSM; with ``schedule="linear"`` the first step, default 2; apgd: the first
                  step, default 2, then halved at checkpoints), so the input and every weight
                  variable move in proportion to their budget.
    schedule:     pgd's step sizes: ``constant`` (``step_size`` every step) or ``linear``
                  (from ``step_size`` down to ``step_size / steps`` at the last step, in equal
                  decrements: larger steps first, at the same cost).
    random_start: start inside the ball at random (default: when ``steps > 1``).
    samples:      draws of ``method="noise"``.
    seed:         seeds every random draw, example by example (with each example's position
                  in its data set), so an example's result never depends on its batch.
    """

    method: str = "pgd"
    steps: int = 50
    restarts: int = 1
    loss: str = "ce"
    targets: int = 3
    step_size: float | None = None
    schedule: str = "constant"
    random_start: bool | None = None
    samples: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        choice("method", self.method, METHODS)
        choice("loss", self.loss, LOSSES)
        choice("schedule", self.schedule, SCHEDULES)
        if self.schedule != "constant" and self.method != "pgd":
            raise ConfigError(
                f"schedule {self.schedule!r} is pgd's; method {self.method!r} sets its own steps"
            )
        integer("steps", self.steps, 1, 100_000)
        integer("restarts", self.restarts, 1, 1_000)
        integer("samples", self.samples, 1, 1_000_000)
        integer("targets", self.targets, 1, 1_000)
        integer("seed", self.seed, 0, MAX_SEED)
        if self.step_size is not None:
            number("step_size", self.step_size, 0.0, 10.0, positive=True)
        if self.random_start is not None and not isinstance(self.random_start, bool):
            raise ConfigError(
                f"random_start must be True, False or None, got {self.random_start!r}"
            )

    @classmethod
    def of(cls, base: AttackOptions | None = None, **overrides: Any) -> AttackOptions:
        """``base`` (default: the defaults) with ``overrides``, whose names are checked."""
        if base is not None and not isinstance(base, AttackOptions):
            raise ConfigError(f"attack options must be AttackOptions, got {type(base).__name__}")
        return replace(base or cls(), **options(cls, overrides, "attack"))

    @property
    def alpha(self) -> float:
        """The step as a fraction of each ball's radius: PGD's 2.5 radii in all (1 for FGSM);
        the first step of PGD's linear schedule (2 radii) or of APGD (2 radii)."""
        if self.step_size is not None:
            return self.step_size
        if self.method in ("apgd", "strong"):
            return APGD_STEP
        return LINEAR_STEP if self.schedule == "linear" else pgd_step_size(self.steps)

    @property
    def starts_at_random(self) -> bool:
        return self.steps > 1 if self.random_start is None else self.random_start

    def runs(self) -> list[tuple[str, str, int]]:
        """``(algorithm, loss, target rank)`` of every run, in order (restarts included); the
        target rank is 0 for an untargeted loss."""
        if self.method == "strong":
            plan = [("apgd", "ce", 0)] + [("apgd", "dlr-targeted", t) for t in range(self.targets)]
        elif self.loss == "both":
            plan = [(self.method, "ce", 0), (self.method, "margin", 0)]
        elif self.loss == "dlr-targeted":
            plan = [(self.method, self.loss, t) for t in range(self.targets)]
        else:
            plan = [(self.method, self.loss, 0)]
        return [run for run in plan for _ in range(self.restarts)]

    def stronger(self, factor: int) -> AttackOptions:
        """``factor`` times the steps and the restarts (the step size follows the steps)."""
        return replace(self, steps=self.steps * factor, restarts=self.restarts * factor)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> AttackOptions:
        if not isinstance(data, dict):
            raise ConfigError(f"attack options must be a mapping, got {type(data).__name__}")
        return cls.of(**data)

    def key(self) -> dict[str, Any]:
        """What identifies the attack in a cache: steps, restarts and loss always, the other
        fields where they differ from their defaults (so keys written before those fields were
        recorded still match)."""
        default = AttackOptions()
        out = {"steps": self.steps, "restarts": self.restarts, "loss": self.loss}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in out and value != getattr(default, f.name):
                out[f.name] = value
        return out
