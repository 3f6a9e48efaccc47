"""The bit-flip family added to a finished run: ``python -m nonsingular.experiment.addflips
RUN`` (one process, or several under ``torchrun``, which share the models) measures it, with
the experiment's default settings, on every default-recipe model of the run in ``RUN`` (its
checkpoints, checked against the sha256 the run recorded), caches it where ``reproduce``
would, and writes the run's report again with it.

Why not ``reproduce`` again: a resumed run recomputes every attack whose code changed since it
ran (``run.ATTACK_REVISION``), while the family needs only the trained models. The run's other
numbers stay what the run measured; the report says when and by what the family was added
(``Results.run["bit_flips"]``). Methods the run did not train (flip-at, in runs made before
the family existed) are not trained here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, distributed
from ..data import Dataset, load
from ..distributed import alone, gather, mine, ranks
from ..errors import ConfigError, NonsingularError
from ..files import exclusive
from ..provenance import provenance
from .config import FLIP_FIELDS, Experiment
from .flipfamily import FlipFamily
from .results import Measured, Results
from .run import Measure, flip_family


def _family_of(
    exp: Experiment, out: Path, model: Measured, data: Dataset, say: Callable[[str], None]
) -> FlipFamily:
    """The family of one model of the run, from its checkpoint."""
    path = out / model.run_dir / "model.safetensors"
    if not path.is_file() or checkpoint.read_info(path)["sha256"] != model.checkpoint_sha256:
        raise ConfigError(
            f"{path} is missing or is not the checkpoint the run measured (sha256 differs)"
        )
    net = checkpoint.load(path)[0]
    n = len(model.outcomes["input"][0])  # the run's attacked examples
    measure = Measure(exp, out, net, data, n, torch.device("cpu"), model.seed, model.method, say)
    found = flip_family(exp, measure, model.seed)
    say(f"  {model.method} (seed {model.seed}): bit flips done ({found.seconds:.0f} s)")
    return found


def add_flip_family(
    out: str | Path,
    *,
    settings: dict[str, Any] | None = None,
    command: str | None = None,
    say: Callable[[str], None] = print,
) -> Results:
    """Measure the bit-flip family on every default-recipe model of the run in ``out`` and
    write its report again (``write_report(..., rewrite=True)``); the run's results with it.
    ``settings``: the family's fields (``flips``, ``flip_draws``, ``flip_limit``) where they
    differ from ``Experiment``'s defaults."""
    out = Path(out)
    path = out / "results.json"
    if not path.is_file():
        raise ConfigError(f"{out} holds no results.json: not a finished reproduce run")
    results = Results.from_dict(json.loads(path.read_text()))
    chosen = {name: getattr(Experiment(), name) for name in FLIP_FIELDS}
    unknown = sorted(set(settings or {}) - set(FLIP_FIELDS))
    if unknown:
        raise ConfigError(f"unknown bit-flip settings: {', '.join(unknown)}")
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in (settings or {}).items()}
    exp = dataclasses.replace(results.experiment, **{**chosen, **given})
    if not exp.flips:
        raise ConfigError("flips is empty: there is no bit-flip family to add")
    data = load(exp.data, seed=0)
    todo = [m for m in results.models if m.recipe is None]
    lead = ranks().lead
    with exclusive(out) if lead else contextlib.nullcontext():
        gather(None)  # the others start once the directory is held
        dealt = mine(todo)  # dealt among the processes (all of it to one process)
        with alone():  # each model is one process's work
            done = [(i, _family_of(exp, out, m, data, say).to_dict()) for i, m in dealt]
        found = {i: FlipFamily.from_dict(f) for part in gather(done) for i, f in part}
    for i, model in enumerate(todo):
        model.bit_flips = found[i]
        model.compute_seconds += found[i].seconds
    results.experiment = exp
    added = {**provenance(), **({"command": command} if command else {})}
    results.run = {**(results.run or {}), "bit_flips": added}
    if lead:
        from .report import write_report  # matplotlib: imported by what draws

        write_report(results, out, rewrite=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Add the family to the run named by the one argument; a bad one is one line, exit 2."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nonsingular.experiment.addflips RUN_DIR", file=sys.stderr)
        return 2
    try:
        distributed.start(torch.device("cpu"))
        command = "python -m nonsingular.experiment.addflips " + shlex.join(args)
        add_flip_family(args[0], command=command, say=lambda text: print(text, flush=True))
    except NonsingularError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
