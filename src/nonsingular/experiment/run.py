"""Running the experiment: train the comparison's models, measure every one under the same
threats, and gather what was measured into ``Results``.

Everything is cached in the output directory: models in ``models/seed{S}/{method}`` (or
``models/seed{S}/{recipe}/{method}``: training run directories, resumable), evaluations in
``evals/seed{S}/{method}.json`` (or ``{method} ({recipe}).json``) keyed by what was evaluated
and a hash of the weights, so a rerun reuses all finished work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint
from .._version import __version__
from ..attacks import AttackOptions
from ..certificates import REVISION as BOUNDS_REVISION
from ..data import Dataset, load
from ..distributed import alone, gather, mine, ranks
from ..errors import ConfigError
from ..evaluation import EvaluationTable, Outcomes, evaluate
from ..files import exclusive, write_json
from ..revision import PACKAGE, code_digest
from ..threat import Threat, grid
from ..training import train
from .config import JOINT, Experiment
from .flipfamily import FORMAT as FLIP_FORMAT
from .flipfamily import FlipFamily, measure_flips, quantized_digest, quantized_model
from .results import AtKeyBudget, DataInfo, Measured, Results

# the code an attacked number is computed by: the attacks, the model reading under them and
# evaluate's batching and budget continuation
ATTACK_REVISION = code_digest(PACKAGE, ("attacks", "model", "flips", "evaluation"))


def _weights_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


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


@dataclass
class _Trained:
    """A model of the experiment and the facts of its training."""

    model: nn.Module
    reused: bool
    run_dir: str
    checkpoint_sha256: str
    clean_full_test: float
    train_seconds: float


def _model(
    exp: Experiment,
    out: Path,
    method: str,
    seed: int,
    data: Dataset,
    device: torch.device,
    say: Callable[[str], None],
    recipe: str | None = None,
) -> _Trained:
    """The trained model of ``method`` and ``seed``: from its run directory, or trained now."""
    run = out / "models" / f"seed{seed}" / (f"{recipe}/{method}" if recipe else method)
    config = exp.train_config(method, seed, recipe)
    metrics = run / "metrics.jsonl"
    reused = metrics.exists() and len(metrics.read_text().splitlines()) == config.epochs
    say(
        f"  {_name(method, recipe)} (seed {seed}): "
        + (f"reusing {run}" if reused else f"training {config.epochs} epochs")
    )
    # a finished run is loaded, an interrupted one continued (both from their state), and a
    # run made with other options is refused with a clear error rather than silently reused
    resume = (run / "state.safetensors").exists()
    result = train(config, data, out_dir=run, resume=resume, device=device, progress=False)
    return _Trained(
        model=result.model,
        reused=reused,
        run_dir=str(run.relative_to(out)),
        checkpoint_sha256=checkpoint.read_info(run / "model.safetensors")["sha256"],
        clean_full_test=result.history[-1]["test_accuracy"],
        train_seconds=sum(m["seconds"] for m in result.history),
    )


def _name(method: str, recipe: str | None) -> str:
    return f"{method} ({recipe})" if recipe else method


def run_experiment(
    exp: Experiment,
    out: str | Path,
    *,
    device: str | torch.device = "cpu",
    say: Callable[[str], None] = print,
) -> Results:
    """Train and measure everything ``exp`` describes.

    One job at a time works in ``out`` (another gets a clear error). In a torch.distributed
    process group the models are dealt to the processes, each training and evaluating its own
    (and writing only their run directories and caches); every process returns the results.
    """
    out = Path(out)
    data = load(exp.data, seed=0)  # data that cannot load: refused before ``out`` exists
    for seed, method, recipe in exp.work():  # every model's training options, checked now
        exp.train_config(method, seed, recipe).resolved()
    where = ranks()
    if where.lead:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot write to {out}: {exc.strerror}") from None
    with exclusive(out) if where.lead else contextlib.nullcontext():
        gather(None)  # the others start once the directory exists and is held
        return _run(exp, data, out, torch.device(device), say)


def _run(
    exp: Experiment, data: Dataset, out: Path, device: torch.device, say: Callable[[str], None]
) -> Results:
    start = time.perf_counter()
    n = min(exp.eval_size, len(data.x_test))
    nc = min(exp.cert_size, n)
    work = exp.work()
    measured = []
    dealt = mine(work)  # dealt among the processes (all of it to one process)
    with alone():  # each model is one process's work, start to end
        for _, (seed, method, recipe) in dealt:
            measured.append(_study(exp, out, seed, method, recipe, data, n, nc, device, say))
    # processes exchange plain dicts; the results list the models in one order, whoever
    # computed what
    every = [Measured.from_dict(m.to_dict()) for part in gather(measured) for m in part]
    by_key = {(m.seed, m.method, m.recipe): m for m in every}
    info = DataInfo(data.name, n, nc, tuple(data.in_shape), data.classes)
    return Results(
        experiment=exp,
        data=info,
        models=[by_key[key] for key in work],
        seconds=time.perf_counter() - start,
        world_size=ranks().world,
    )


class Measure:
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
        name: str,
        warn: Callable[[str], None],
    ) -> None:
        self.exp, self.model, self.name = exp, model, name
        self.x, self.y = data.x_test[:n].to(device), data.y_test[:n].to(device)
        self.evaluations = {"computed": 0, "reused": 0}
        path = out / "evals" / f"seed{seed}" / f"{name}.json"
        self.cache = _EvalCache(path, self.evaluations, warn)
        self.weights = _weights_hash(model)
        self.seconds: list[float] = []
        self.warnings: list[str] = []

    def table(
        self, threats: list[Threat], rows: int, attack: AttackOptions | None, label: str
    ) -> EvaluationTable:
        """``evaluate`` on the first ``rows`` examples: attacked with ``attack``, or (None)
        certified by the experiment's certificates."""
        exp = self.exp
        key = {
            "kind": "attack" if attack is not None else "certify",
            "threats": [t.to_dict() for t in threats],
            "n": rows,
            "attack": None if attack is None else attack.key(),
            "weights": self.weights,
            "format": 2,  # rows carry per-example outcomes
        }
        if attack is not None:  # attack numbers cached by other attack code are not reused
            key.update(attack_code=ATTACK_REVISION)
        if attack is None:  # bounds cached by other bound code are not reused
            key.update(intermediate=exp.intermediate, dtype=exp.cert_dtype, bounds=BOUNDS_REVISION)

        def compute() -> dict[str, Any]:
            return evaluate(
                self.model,
                (self.x[:rows], self.y[:rows]),
                threats,
                attack,
                certify=list(exp.certify) if attack is None else [],
                certify_options=exp.certify_options(),
                progress=False,
            ).to_dict()

        value = EvaluationTable.from_dict(self.cache.get(key, compute))
        self.seconds.append(sum(sum(r.seconds.values()) for r in value.rows))
        self.warnings += [f"{self.name}, {label}: {w}" for w in value.warnings]
        return value


def _study(
    exp: Experiment,
    out: Path,
    seed: int,
    method: str,
    recipe: str | None,
    data: Dataset,
    n: int,
    nc: int,
    device: torch.device,
    say: Callable[[str], None],
) -> Measured:
    """Train (or reuse) one model and measure it under every threat of the experiment. A
    recipe's model is attacked as the main ones, and no more (no certificates, no stronger or
    matched attacks): what the verdicts need."""
    trained = _model(exp, out, method, seed, data, device, say, recipe)
    warnings: list[str] = []

    def warn(text: str) -> None:
        say(f"warning: {text}")
        warnings.append(text)

    name = f"{recipe}/{method}" if recipe else method
    measure = Measure(exp, out, trained.model, data, n, device, seed, name, warn)
    accuracy, joint, outcomes, clean = _attacked(exp, measure, n)
    found = Measured(
        method=method,
        seed=seed,
        recipe=recipe,
        clean=clean,
        clean_full_test=trained.clean_full_test,
        train_seconds=trained.train_seconds,
        run_dir=trained.run_dir,
        checkpoint_sha256=trained.checkpoint_sha256,
        reused=trained.reused,
        accuracy=accuracy,
        joint=joint,
        outcomes=outcomes,
    )
    if recipe is None:
        _certified(exp, measure, nc, found)
        own = exp.training_threats()
        evaluated = measure.table(list(own.values()), n, exp.attack_options(), "training threats")
        found.matched = {m: r.attacked for m, r in zip(own, evaluated.rows, strict=True)}
        found.stronger = _stronger(exp, measure, n, outcomes) if exp.stronger else {}
        found.bit_flips = flip_family(exp, measure, seed) if exp.flips else None
    say(f"  {_name(method, recipe)} (seed {seed}): done")
    found.warnings = warnings + measure.warnings
    found.evaluations_computed = measure.evaluations["computed"]
    found.evaluations_reused = measure.evaluations["reused"]
    found.compute_seconds = trained.train_seconds + sum(measure.seconds)
    return found


def _attacked(
    exp: Experiment, measure: Measure, n: int
) -> tuple[dict[str, list[float]], list[list[float]], dict[str, list[str]], float]:
    """The one-axis families and the joint grid, attacked: accuracies, the joint matrix,
    per-example outcomes and the clean accuracy."""
    attack = exp.attack_options()
    accuracy, outcomes = {}, {}
    clean = 0.0
    for family in exp.families():
        evaluated = measure.table(family.threats(), n, attack, family.name)
        accuracy[family.name] = [r.attacked for r in evaluated.rows]
        outcomes[family.name] = [r.outcomes["attacked"] for r in evaluated.rows]
        clean = evaluated.rows[0].clean
    joint = grid(exp.joint_eps_x, exp.joint_eps_w)
    evaluated = measure.table(joint, n, attack, JOINT)
    outcomes[JOINT] = [r.outcomes["attacked"] for r in evaluated.rows]  # eps_x slowest
    return accuracy, _shape(exp, [r.attacked for r in evaluated.rows]), outcomes, clean


def _certified(exp: Experiment, measure: Measure, nc: int, found: Measured) -> None:
    """The certificates on the joint grid (the first ``nc`` examples), beside the attack on
    the same examples; a certified example the attack broke is reported as a soundness bug."""
    table = measure.table(grid(exp.joint_eps_x, exp.joint_eps_w), nc, None, "certified")
    attacked = [bits.first(nc) for bits in found.outcomes[JOINT]]
    found.certified_attacked = _shape(exp, [bits.rate for bits in attacked])
    found.certified = {c: _shape(exp, [r.certified[c] for r in table.rows]) for c in exp.certify}
    measure.warnings += _unsound(table, attacked, found.method)


def _stronger(
    exp: Experiment, measure: Measure, n: int, outcomes: dict[str, list[Outcomes]]
) -> dict[str, AtKeyBudget]:
    """Each family's key budget attacked again with twice the steps and restarts: per family,
    the outcomes of the default attack there (taken from ``outcomes``) and of both attacks
    together: an example survives only if it survives both (for a shared perturbation, which
    is one perturbation for all examples, the outcomes of the one that broke more)."""
    out = {}
    for family, threat in exp.key_threats().items():
        harder_table = measure.table([threat], n, exp.attack_options(2), f"{family}, stronger")
        default = outcomes[family][exp.key_index(family)]
        harder = harder_table.rows[0].outcomes["attacked"]
        if threat.scope == "shared":  # one perturbation each: the worse of the two, whole
            both = min(default, harder, key=lambda bits: bits.count)
        else:
            both = default.both(harder)
        out[family] = AtKeyBudget(default=default, stronger=both)
    return out


def flip_family(exp: Experiment, measure: Measure, seed: int) -> FlipFamily:
    """The bit-flip family of the model (``flipfamily``), cached like an evaluation under what
    was asked, the attack code and the quantized model's digest."""
    q = quantized_model(measure.model)
    key = {
        "kind": "bit-flips",
        "n": len(measure.y),
        "flips": list(exp.flips),
        "draws": exp.flip_draws,
        "limit": exp.flip_limit,
        "seed": seed,
        "weights": measure.weights,
        "quantized": quantized_digest(q),
        "attack_code": ATTACK_REVISION,
        "format": FLIP_FORMAT,
    }

    def compute() -> dict[str, Any]:
        return measure_flips(q, measure.x, measure.y, exp, seed).to_dict()

    found = FlipFamily.from_dict(measure.cache.get(key, compute))
    measure.seconds.append(found.seconds)
    return found


def _unsound(certified: EvaluationTable, attacked: list[Outcomes], method: str) -> list[str]:
    """Examples a certificate certified that the attack broke: always none, unless a bound is
    wrong (a soundness bug, reported loudly)."""
    out = []
    for row, survived in zip(certified.rows, attacked, strict=True):
        for c, bits in row.outcomes.items():
            if c == "clean":
                continue
            both = sum(a and not b for a, b in zip(bits.to_list(), survived.to_list(), strict=True))
            if both:
                out.append(
                    f"{method}: {both} examples certified by {c} were broken by the attack at "
                    f"eps_x={row.eps_x:g}, eps_w={row.eps_w:g}: a soundness bug"
                )
    return out


def _shape(exp: Experiment, cells: list[float]) -> list[list[float]]:
    """Joint-grid values in grid order (eps_x slowest) as a matrix: rows eps_x, columns eps_w."""
    w = len(exp.joint_eps_w)
    return [cells[i * w : (i + 1) * w] for i in range(len(exp.joint_eps_x))]
