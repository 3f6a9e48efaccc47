"""The training loop shared by every method, and the run directory it keeps.

Every epoch's randomness is seeded by ``(seed, epoch)``: the data order for the whole epoch,
and each example's augmentation and attack start by its place in the training set too (so
the draws never depend on how a batch is split). A run resumed after being killed continues
exactly where an uninterrupted run would be. A run directory holds:

- ``config.json``: the resolved config, data, model description, library and torch versions;
- ``config.toml``: the same config with CLI-flag keys (``nonsingular train --config``);
- ``model.safetensors`` + ``model.json``: the weights after the last completed epoch;
- ``metrics.jsonl``: one line per completed epoch;
- ``state.safetensors``: model, optimizer and schedule, for ``--resume``.

Every file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from copy import deepcopy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import checkpoint
from ..attacks import attack
from ..data import Dataset, Examples, load, training_set
from ..distributed import Ranks, part, ranks, sum_gradient
from ..distributed import total as distributed_total
from ..errors import ConfigError, TrainingError
from ..files import exclusive, refuse_links, write_json, write_text
from ..flips.grid import ATTRIBUTE as QUANTIZATION
from ..flips.grid import quantize
from ..model import model_dtype, read_model, with_gradients
from ..model.architectures import Architecture
from ..model.select import Selector, check_selector, selecting, unselected
from ..provenance import provenance
from ..seeds import mix
from .augment import random_shift
from .config import TrainConfig
from .fit import check_fits
from .methods import Batch, deployed
from .registry import make_method
from .state import load_state, restore, save_state

STATE = "state.safetensors"


@dataclass
class TrainResult:
    """The trained model (eval mode), its resolved config and one metrics dict per epoch."""

    model: nn.Module
    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None


def build_model(config: TrainConfig, data: Dataset) -> nn.Module:
    """A freshly initialized model for ``config``, seeded without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return config.architecture(data.in_shape, data.classes).build()


def _starting_model(
    config: TrainConfig, data: Dataset, model: nn.Module | None, logits: Selector | None = None
) -> tuple[nn.Module, Architecture | None]:
    """The model to train (a copy of the caller's, which is never touched) and how a
    checkpoint can rebuild it (None for an instance of unknown origin)."""
    if model is None:
        return build_model(config, data), config.architecture(data.in_shape, data.classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        copy = deepcopy(selecting(model, logits))
    except Exception as exc:  # a module holding something that cannot be copied
        raise ConfigError(f"cannot copy {type(model).__name__} to train it: {exc}") from None
    if hasattr(copy, QUANTIZATION):  # training moves the weights off the grid: a float model
        delattr(copy, QUANTIZATION)
    return copy, None


def _prepared(
    config: TrainConfig,
    given: Examples | None,
    model: nn.Module | None,
    logits: Selector | None,
    device: str | torch.device,
) -> tuple[Dataset, nn.Module, Architecture | None]:
    """The data (read into a Dataset, in the model's dtype), the model to train (on
    ``device``) and how a checkpoint rebuilds it."""
    data = training_set(given) if given is not None else load(config.data, seed=config.seed)
    check_selector(logits)
    model, architecture = _starting_model(config, data, model, logits)
    model = model.to(device)
    widen = architecture is None and not isinstance(given, Dataset)
    return _fitted(data, model, device, widen), model, architecture


def _fitted(data: Dataset, model: nn.Module, device: str | torch.device, widen: bool) -> Dataset:
    """``data`` in the model's floating dtype; with ``widen`` (classes read from the labels,
    a model given), as many classes as the model outputs where that is more."""
    dtype = model_dtype(model)
    if dtype is not None and data.x_train.is_floating_point() and data.x_train.dtype != dtype:
        data = replace(data, x_train=data.x_train.to(dtype), x_test=data.x_test.to(dtype))
    if widen and len(data.x_train):
        with torch.no_grad(), deployed(model):  # the copy trained, in eval mode: no state moves
            try:
                out = model(data.x_train[:1].to(device))
            except Exception:  # check_fits says what does not fit, and how
                return data
        if isinstance(out, Tensor) and out.dim() == 2 and out.shape[1] > data.classes:
            data = replace(data, classes=int(out.shape[1]))
    return data


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Clean accuracy of ``model`` (call it in eval mode)."""
    with torch.no_grad():
        correct = sum(
            int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
            for i in range(0, len(x), batch_size)
        )
    return correct / max(1, len(x))


def _make_dir(out_dir: Path) -> None:
    """Create ``out_dir``, checking it is writable and holds no link the probe could follow."""
    refuse_links(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to output directory {out_dir}: {exc.strerror}") from None


def _check_dir(out_dir: Path, resume: bool) -> None:
    """A new run needs a directory without one; ``resume`` needs one to continue."""
    has_state = (out_dir / STATE).exists()
    if not resume and (has_state or (out_dir / "model.safetensors").exists()):
        raise ConfigError(
            f"{out_dir} already holds a run: pass --resume to continue it, "
            "or choose another output directory"
        )
    if resume and not has_state:
        raise ConfigError(
            f"nothing to resume in {out_dir}: it holds no training state ({STATE}); "
            "check the directory, or start a new run without --resume"
        )


def _optimizer(config: TrainConfig, model: nn.Module, steps: int) -> tuple[Any, Any]:
    if config.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(
            model.parameters(), config.lr, weight_decay=config.weight_decay
        )
    else:
        opt = torch.optim.SGD(
            model.parameters(),
            config.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=config.weight_decay,
        )
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps)


def _model_info(model: nn.Module, architecture: Architecture | None) -> dict[str, Any]:
    """What the run directory records about the model: how to rebuild it, or its class."""
    if architecture is not None:
        return architecture.to_dict()
    cls = type(model)
    return {"factory": None, "class": f"{cls.__module__}.{cls.__qualname__}"}


def _run_info(
    config: TrainConfig,
    data: Dataset,
    model: nn.Module,
    architecture: Architecture | None,
    split_seed: int | None,
) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "threat": config.resolved_threat().to_dict(),
        "data": {
            "name": data.name,
            "train": len(data.x_train),
            "test": len(data.x_test),
            "shape": list(data.in_shape),
            "classes": data.classes,
        },
        "model": _model_info(model, architecture),
        "world_size": ranks().world,  # processes the global batch was split over
        # versions, machine, date, command, data split
        "provenance": provenance(data=data, split="train", split_seed=split_seed),
    }


def _write_outputs(
    out_dir: Path,
    model: nn.Module,
    architecture: Architecture | None,
    config: TrainConfig,
    history: list[dict[str, Any]],
) -> None:
    checkpoint.save(
        model,
        out_dir / "model.safetensors",
        architecture=architecture,
        method=config.method,
        epochs=len(history),
        config=config.to_dict(),
    )
    write_text(out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))


@with_gradients
def train(
    config: TrainConfig,
    data: Examples | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    model: nn.Module | None = None,
    logits: Selector | None = None,
) -> TrainResult:
    """Train a model with ``config`` on ``data`` (default: ``load(config.data)``).

    data: a nonsingular Dataset (its training split; its test split gives the per-epoch
    metrics), or ``(x, y)`` tensors, a ``torch.utils.data.Dataset`` or a ``DataLoader``
    (read once, whole: all of it is trained on, and the per-epoch test metrics are None).
    Its inputs are cast to the model's floating dtype (float64, bfloat16 models train in it).
    model: train a copy of this module (yours is never touched) instead of building
    ``config.model``; its checkpoint then records its class, and loading it needs an instance.
    A quantized model trains as a float one (its weights leave the grid): quantize the result.
    out_dir: keep a run directory there (see the module docstring); ``resume=True``
    continues the run it holds from its last completed epoch. Returns the model in eval mode.
    logits: for a ``model`` returning a dict or tuple, the key or index of its logits (or a
    function of its output returning them); the model returned returns what yours does.
    """
    config = config.resolved()
    split_seed = config.seed if data is None else None  # None: the caller's data, split its way
    data, model, architecture = _prepared(config, data, model, logits, device)
    check_fits(model, data, config, device, architecture)  # the data too; before any write
    method = make_method(config)
    method.prepare(model, data.x_train[: config.batch_size].to(device))  # before any write
    out = Path(out_dir) if out_dir is not None else None
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    steps_per_epoch = -(-len(x_train) // config.batch_size)
    opt, schedule = _optimizer(config, model, config.epochs * steps_per_epoch)
    history: list[dict[str, Any]] = []
    where = ranks()
    writes = out is not None and where.lead  # other processes never touch the run's files
    objective = _objective(model, method, where, data.x_train[: config.batch_size].to(device))
    with contextlib.ExitStack() as held:
        if out is not None:
            info = _run_info(config, data, model, architecture, split_seed)
            history = _open_run(out, resume, writes, held, info, (config, model, opt, schedule))
        test = (data.x_test.to(device), data.y_test.to(device))
        epochs = _Epochs(objective, model, opt, schedule, config, progress and where.lead)
        with torch.random.fork_rng(devices=[]):  # Dropout's randomness, not the caller's
            for epoch in range(len(history), config.epochs):
                history.append(epochs.run(epoch, (x_train, y_train), test))
                if writes:
                    save_state(
                        out / STATE, model, opt, schedule, epoch + 1, history, config.to_dict()
                    )
                    _write_outputs(out, model, architecture, config, history)
        unselected(model.eval())
        if writes and resume:
            _write_outputs(out, model, architecture, config, history)  # killed after the state
    return TrainResult(model, config, history, out)


@dataclass
class _Epochs:
    """One epoch of training, seeded by its number, then the model's metrics after it."""

    objective: Any
    model: nn.Module
    opt: Any
    schedule: Any
    config: TrainConfig
    progress: bool

    def run(
        self, epoch: int, train_data: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]
    ) -> dict[str, Any]:
        config = self.config
        torch.manual_seed(config.seed * 100_003 + epoch)
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        start = time.perf_counter()
        loss, train_accuracy = _train_epoch(
            self.objective,
            self.model,
            self.opt,
            self.schedule,
            train_data,
            config,
            epoch,
            generator,
            self.progress,
        )
        self.model.eval()
        seconds = time.perf_counter() - start
        return _epoch_metrics(self.model, config, epoch, loss, train_accuracy, seconds, test)


def _open_run(
    out: Path,
    resume: bool,
    writes: bool,
    held: contextlib.ExitStack,
    info: dict[str, Any],
    training: tuple[TrainConfig, nn.Module, Any, Any],
) -> list[dict[str, Any]]:
    """Make or check the run directory (held by this writer); the history it resumes."""
    config, model, opt, schedule = training
    if resume and not (out / STATE).exists():
        _check_dir(out, resume)  # nothing to resume: say so before creating anything
    if writes:
        _make_dir(out)
        held.enter_context(exclusive(out))  # one writer per run directory
    _check_dir(out, resume)
    if resume:
        return _resume(out, config, model, opt, schedule)
    if writes:
        write_json(out / "config.json", info)
        write_text(out / "config.toml", config.to_toml())
    return []


def _resume(
    out: Path, config: TrainConfig, model: nn.Module, opt: Any, schedule: Any
) -> list[dict[str, Any]]:
    """Load the run's state into ``model``, ``opt`` and ``schedule``; its metrics so far."""
    tensors, meta = load_state(out / STATE)
    if meta["config"] != config.to_dict():
        changed = sorted(k for k, v in config.to_dict().items() if meta["config"].get(k) != v)
        raise ConfigError(
            f"the run in {out} was started with other options ({', '.join(changed)}): "
            "resume it with the same ones, or choose another output directory"
        )
    steps = meta["epoch"] * (schedule.total_steps // config.epochs)  # one per batch
    restore(tensors, meta, model, opt, schedule, steps)
    return meta["history"]


class _Objective(nn.Module):
    """A method's loss on a model, as a module: what DistributedDataParallel wraps, so that
    every backward pass averages the gradients over the processes."""

    def __init__(self, model: nn.Module, method: Any) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, progress: float, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.method.loss(self.model, x, y, progress, batch)


def _objective(model: nn.Module, method: Any, where: Ranks, x: torch.Tensor) -> nn.Module:
    """The loss module, wrapped for several processes (told whether some parameters never
    reach the output, which DistributedDataParallel must know and otherwise warns about)."""
    objective = _Objective(model, method)
    if not where.many:
        return objective
    with deployed(model):
        used = read_model(model, x).uses()
    unused = any(name not in used for name, _ in model.named_parameters())
    return DistributedDataParallel(objective, find_unused_parameters=unused)


def _train_epoch(
    objective: nn.Module,
    model: nn.Module,
    opt: Any,
    schedule: Any,
    train_set: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    epoch: int,
    generator: torch.Generator,
    progress: bool,
) -> tuple[float, float]:
    """One epoch in the data order drawn from ``generator``: mean loss, accuracy.

    Every process draws the same order and takes its share of each global batch; the loss is
    scaled so that the averaged gradient is the one of the whole batch (shares may differ by
    one example), and the epoch's figures are summed over the processes.
    """
    x_train, y_train = train_set
    where = ranks()
    steps = -(-len(x_train) // config.batch_size)
    order = torch.randperm(len(x_train), generator=generator).to(x_train.device)
    model.train()
    total = correct = seen = 0.0
    bar = tqdm(
        range(steps),
        desc=f"{config.method} {epoch + 1}/{config.epochs}",
        disable=None if progress else True,
        leave=False,
    )
    seed = mix(config.seed, "epoch", epoch)
    reduce = sum_gradient if where.many else None
    for step in bar:
        batch = order[step * config.batch_size : (step + 1) * config.batch_size]
        idx = batch[part(len(batch), where)]
        positions = idx.cpu()
        xb = random_shift(x_train[idx], config.augment, seed, positions)
        yb = y_train[idx]
        done = (epoch + step / steps) / config.epochs
        loss, logits = objective(xb, yb, done, Batch(positions, seed, reduce))
        scaled = loss * (len(idx) * where.world / len(batch)) if where.many else loss
        opt.zero_grad(set_to_none=True)
        scaled.backward()
        opt.step()
        schedule.step()
        value, hits = distributed_total(
            [loss.item() * len(idx), float((logits.detach().argmax(1) == yb).sum())]
        )
        value /= len(batch)
        _check_step(model, value, epoch, step)
        total += value * len(batch)
        correct += hits
        seen += len(batch)
        bar.set_postfix(loss=f"{total / seen:.3f}", acc=f"{correct / seen:.1%}")
    return total / seen, correct / seen


def _check_step(model: nn.Module, loss: float, epoch: int, step: int) -> None:
    """Raise TrainingError when a step's loss, or the weights it leaves, are not finite."""
    where = f"in epoch {epoch + 1}, step {step + 1}"
    if not math.isfinite(loss):
        what = f"the training loss became {loss} {where}"
    else:
        params = dict(model.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for p in params.values()])
        if bool(finite.all()):  # one device sync per step, not one per parameter
            return
        bad = [n for n, ok in zip(params, finite.tolist(), strict=True) if not ok]
        what = f"the weights became NaN or infinite {where} (first: {bad[0]})"
    raise TrainingError(
        f"{what}: the learning rate, the method's budget or its weights (lambda_x, "
        "lambda_w) are too large; the run directory keeps the last completed epoch"
    )


def _epoch_metrics(
    model: nn.Module,
    config: TrainConfig,
    epoch: int,
    loss: float,
    train_accuracy: float,
    seconds: float,
    test_set: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, Any]:
    """The metrics line of one epoch: its loss and accuracies, and a cheap robust accuracy
    (PGD-10 on ``eval_size`` test examples) under the config's evaluation threat (bit flips:
    the shared bit search on the model quantized to 8 bits per channel)."""
    start = time.perf_counter()
    x_test, y_test = test_set
    eval_threat = config.eval_threat()
    metrics: dict[str, Any] = {
        "epoch": epoch + 1,
        "loss": loss,
        "train_accuracy": train_accuracy,
        "test_accuracy": accuracy(model, x_test, y_test) if len(x_test) else None,
        "robust_accuracy": None,
        "eval_threat": None,
        "seconds": seconds,
    }
    if eval_threat is not None and config.eval_size > 0 and len(x_test):
        n = min(config.eval_size, len(x_test))
        target = quantize(model) if eval_threat.flips else model  # flips: of its integers
        res = attack(target, x_test[:n], y_test[:n], eval_threat, steps=10, seed=0)
        metrics["robust_accuracy"] = res.robust_accuracy
        metrics["eval_threat"] = eval_threat.describe()
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics
