"""Training configuration: one frozen dataclass whose field names are the CLI flags
(``eps_x`` is ``--eps-x`` and ``eps-x`` in a TOML file). ``None`` means "the method's default";
``resolved()`` fills every default in, and that resolved config is what a run saves."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..checks import MAX_BATCH, MAX_SEED, MAX_WIDTH, choice, integer, number, options
from ..errors import ConfigError, ThreatError
from ..model.architectures import BUILTIN, Architecture, check_factory_name
from ..nesting import check_depth, check_value_depth
from ..threat import MAX_BUDGET, Threat
from .registry import METHODS

# the allowed range of every numeric option (one source: the CLI and TOML files go through it)
INTEGER_RANGES: dict[str, tuple[int, int]] = {
    "epochs": (1, 100_000),
    "batch_size": (1, MAX_BATCH),
    "augment": (0, 64),
    "seed": (0, MAX_SEED),
    "eval_size": (0, 10_000_000),
    "attack_steps": (0, 10_000),
    "hidden": (1, MAX_WIDTH),
}
NUMBER_RANGES: dict[str, tuple[float, float, bool]] = {  # (low, high, must exceed low)
    "lr": (0.0, 10.0, True),
    "weight_decay": (0.0, 1.0, False),
    "lambda_x": (0.0, 1e6, False),
    "lambda_w": (0.0, 1e6, False),
    "attack_step_size": (0.0, 10.0, True),
    "eps_x": (0.0, MAX_BUDGET, False),
    "eps_w": (0.0, MAX_BUDGET, False),
    "eval_eps_x": (0.0, MAX_BUDGET, False),
    "eval_eps_w": (0.0, MAX_BUDGET, False),
    "kappa": (0.0, 1.0, False),
    "ramp": (0.0, 1.0, False),
}
OPTIMIZERS = ("adam", "sgd")
BOUNDS = ("closed-form", "recursive")

# The defaults every method shares; each method's own (for images in [0, 1], MNIST-like) are in
# its registry entry: the paper's comparison trains every model on the same data and
# architecture and varies only those.
COMMON_DEFAULTS: dict[str, Any] = {
    "w_mode": "absolute",
    "w_norm": "linf",
    "scope": "per-example",
    "attack_steps": 0,
    "lambda_x": 0.0,
    "lambda_w": 0.0,
    "ramp": 0.25,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run: data, model, method, budget, optimizer."""

    data: str = "mnist5k"
    model: str = "mlp"  # a built-in architecture or an importable package.module:function
    model_args: dict[str, Any] | None = None  # keyword arguments of the model's factory
    hidden: tuple[int, ...] = (256, 256)
    method: str = "standard"
    epochs: int = 20
    batch_size: int = 256
    lr: float = 4e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    augment: int = 2
    seed: int = 0
    # the training threat (None: the method's default)
    eps_x: float | None = None
    eps_w: float | None = None
    x_norm: str = "linf"
    w_mode: str | None = None
    w_norm: str | None = None
    scope: str | None = None
    bias: bool = False
    # method options
    attack_steps: int | None = None
    attack_step_size: float | None = None
    lambda_x: float | None = None
    lambda_w: float | None = None
    bound: str = "closed-form"
    kappa: float = 0.5
    ramp: float | None = None
    # the cheap robust accuracy reported every epoch (None: the training threat)
    eval_size: int = 200
    eval_eps_x: float | None = None
    eval_eps_w: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.data, str) or not self.data:
            raise ConfigError(f"data must be a data set name like mnist5k, got {self.data!r}")
        choice("method", self.method, METHODS)
        check_factory_name(self.model)
        if self.model_args is not None:
            Architecture(self.model, self.model_args)  # validates the arguments
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("bound", self.bound, BOUNDS)
        for name, (low, high) in INTEGER_RANGES.items():
            value = getattr(self, name)
            if name == "hidden":
                value = (value,) if isinstance(value, int) else value
                if not isinstance(value, (tuple, list)) or not value:
                    raise ConfigError(f"hidden must be widths like [256, 256], got {value!r}")
                for width in value:
                    integer(name, width, low, high)
                object.__setattr__(self, "hidden", tuple(value))
            elif value is not None:
                integer(name, value, low, high)
        for name, (low, high, positive) in NUMBER_RANGES.items():
            value = getattr(self, name)
            if value is not None:
                number(name, value, low, high, positive=positive)
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be true or false, got {self.bias!r}")
        method = METHODS[self.method]
        for name, value in method.forced.items():
            given = getattr(self, name)
            if given is not None and given != value:
                raise ConfigError(
                    f"method {self.method} trains with {name} = {value} only; got {given} "
                    "(leave it unset)"
                )
        steps = self.attack_steps
        if steps is None:
            steps = {**COMMON_DEFAULTS, **method.defaults}["attack_steps"]
        if method.attacks and steps < 1:
            raise ConfigError(
                f"method {self.method} trains on attacked examples: attack_steps must be >= 1, "
                f"got {steps}"
            )
        if method.flips and self.eval_eps_w:
            raise ConfigError(
                f"method {self.method} is evaluated under bit flips (its attack_steps), not "
                f"eval_eps_w; got eval_eps_w = {self.eval_eps_w} (leave it unset)"
            )
        try:  # the threat fields must make a valid threat
            self.resolved_threat()
        except ThreatError as exc:
            raise ConfigError(str(exc)) from None

    def _defaults(self) -> dict[str, Any]:
        """The method defaults for the fields left at ``None``."""
        method = METHODS[self.method]
        defaults = {**COMMON_DEFAULTS, **method.defaults, **method.forced}
        return {k: v for k, v in defaults.items() if getattr(self, k) is None}

    def resolved(self) -> TrainConfig:
        """This config with every ``None`` replaced by the method's default."""
        return replace(self, **self._defaults())

    def resolved_threat(self) -> Threat:
        """The training threat; for a bit-flip method (``flip-at``), ``attack_steps`` flips
        of the 8-bit integers, one set shared by the batch."""
        c = {**{f.name: getattr(self, f.name) for f in fields(self)}, **self._defaults()}
        if METHODS[self.method].flips:
            return Threat(flips=c["attack_steps"], scope=c["scope"])
        return Threat(
            eps_x=c["eps_x"],
            eps_w=c["eps_w"],
            x_norm=c["x_norm"],
            w_mode=c["w_mode"],
            w_norm=c["w_norm"],
            scope=c["scope"],
            bias=c["bias"],
        )

    def eval_threat(self) -> Threat | None:
        """The threat of the per-epoch robust accuracy (None when it perturbs nothing)."""
        threat = self.resolved_threat()
        if self.eval_eps_x is not None or self.eval_eps_w is not None:
            threat = threat.replace(eps_x=self.eval_eps_x or 0.0, eps_w=self.eval_eps_w or 0.0)
        return threat if threat.perturbs_input or threat.perturbs_weights or threat.flips else None

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """From a dict whose keys are field names or CLI flags (``eps-x``)."""
        clean = options(cls, data, "training")
        if isinstance(clean.get("hidden"), list):
            clean["hidden"] = tuple(clean["hidden"])
        return cls(**clean)

    @classmethod
    def from_toml(cls, path: str | Path, factory: str | None = None) -> TrainConfig:
        """From a TOML file; a user factory in it needs ``factory`` (see ``read_config``)."""
        return cls.from_dict(read_config(path, factory))

    def to_toml(self) -> str:
        """The config as TOML with CLI-flag keys: ``nonsingular train --config`` reads it."""
        lines = []
        for key, value in self.to_dict().items():
            if value is not None:
                lines.append(f"{key.replace('_', '-')} = {_toml(value)}")
        return "\n".join(lines) + "\n"

    def architecture(self, in_shape: tuple[int, ...], classes: int) -> Architecture:
        """The model this config trains, for data of ``in_shape`` with ``classes`` classes."""
        args = {"hidden": list(self.hidden)} if self.model == "mlp" else {}
        return Architecture(self.model, {**args, **(self.model_args or {})}, in_shape, classes)


def _toml(value: Any) -> str:
    """One TOML value (JSON's strings are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return repr(value)


def read_config(path: str | Path, factory: str | None = None) -> dict[str, Any]:
    """A training TOML's values. A file names data, not code: a user factory in it
    (``model = "package.module:function"``) is refused, before anything is imported, unless
    ``factory`` (the command line's ``--model``) names the same one, the rule checkpoints follow."""
    values = read_toml(path)
    named = values.get("model")
    if isinstance(named, str) and named not in BUILTIN and named != factory:
        raise ConfigError(
            f"{path} names the model factory {named!r}; a config file never imports code by "
            "itself: name that factory on the command line to allow importing it "
            f"(--model {named})"
        )
    return values


def read_toml(path: str | Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text()
        check_depth(text, str(path), ConfigError)
        values = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    check_value_depth(values, str(path), ConfigError)  # dotted keys nest without brackets
    return values
