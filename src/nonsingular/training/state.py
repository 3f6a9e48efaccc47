"""Training state for ``--resume``: model, optimizer, schedule and metrics in ONE safetensors
file, written atomically at the end of every epoch, so a process killed at any moment leaves
either the previous epoch's state or the new one, never a mix. Nothing is unpickled; the
header holds ONE SHA-256 over the tensors and every metadata field, and every field is checked
against the model, optimizer and schedule it resumes before it is used: the weights' names,
shapes, dtypes and finiteness, the optimizer's parameter groups (each hyperparameter as the
schedule sets it at that step), its per-parameter slots, and the schedule's own state."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..errors import CheckpointError
from ..files import write_bytes
from ..nesting import check_depth

FORMAT = "nonsingular-train-state"
_COUNTERS = ("last_epoch", "_step_count", "_last_lr")  # schedule fields that move each step


def save_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    epoch: int,
    history: list[dict[str, Any]],
    config: dict[str, Any],
) -> None:
    """Everything needed to continue after ``epoch`` completed epochs."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    plain_state: dict[str, dict[str, Any]] = {}
    for index, slots in optim["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain_state.setdefault(str(index), {})[key] = value
    meta = {
        "format": FORMAT,
        "epoch": str(epoch),
        "history": json.dumps(history),
        "config": json.dumps(config),
        "param_groups": json.dumps(optim["param_groups"]),
        "optim_state": json.dumps(plain_state),
        "schedule": json.dumps(schedule.state_dict()),
    }
    meta["sha256"] = state_digest(tensors, meta)
    write_bytes(path, st_save(tensors, metadata=meta))


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    return _tensor_hash(tensors).hexdigest()


def _tensor_hash(tensors: dict[str, torch.Tensor]) -> Any:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest


def state_digest(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """SHA-256 over the tensors (as ``tensor_digest``) and then every metadata field but the
    digest itself, in name order: no field can change without the digest changing."""
    digest = _tensor_hash(tensors)
    for key in sorted(k for k in meta if k != "sha256"):
        digest.update(json.dumps([key, meta[key]]).encode())
    return digest.hexdigest()


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a state file; CheckpointError when it is unreadable, damaged
    (its checksum) or malformed (every field's type is checked)."""
    try:
        data = path.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        check_depth(data[8 : 8 + header_len], f"training state {path}'s header", CheckpointError)
        tensors = st_load(data)
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except (OSError, SafetensorError, ValueError, RuntimeError, AttributeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"training state {path} is corrupted or truncated: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nonsingular training state")
    if meta.get("sha256") != state_digest(tensors, meta):
        raise CheckpointError(
            f"training state {path} does not match its SHA-256: it was changed or damaged "
            "after it was written"
        )
    try:
        for key in _FIELDS:
            check_depth(meta[key], f"training state {path}: {key}", CheckpointError)
        parsed = {key: json.loads(meta[key]) for key in _FIELDS}
        parsed["epoch"] = int(meta["epoch"])
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"training state {path} has a broken header: {exc}") from None
    for key, kind in _FIELDS.items():
        if not isinstance(parsed[key], kind):
            raise CheckpointError(
                f"training state {path}: {key} must be a JSON {kind.__name__}, "
                f"got {type(parsed[key]).__name__}"
            )
    history = parsed["history"]
    if parsed["epoch"] != len(history) or not all(
        isinstance(m, dict) and m.get("epoch") == i + 1 for i, m in enumerate(history)
    ):
        raise CheckpointError(
            f"training state {path}: its metrics ({len(history)} epochs) do not match its "
            f"epoch count {parsed['epoch']}"
        )
    return tensors, parsed


_FIELDS: dict[str, type] = {  # header fields other than format, checksum and epoch
    "history": list,
    "config": dict,
    "param_groups": list,
    "optim_state": dict,
    "schedule": dict,
}


def restore(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    steps: int,
) -> None:
    """Load a state into a freshly built model, optimizer and schedule (same config), after
    ``steps`` optimizer steps; CheckpointError naming the first field that does not fit."""
    _check_weights(tensors, model)
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"training state does not fit the model: {exc}") from None
    try:
        _check_schedule(meta["schedule"], schedule, steps)
        state = _optimizer_slots(tensors, meta["optim_state"], optimizer)
        _check_groups(meta["param_groups"], optimizer, schedule, steps)
        if not _same(meta["schedule"]["_last_lr"], _plain(schedule.get_last_lr())):
            raise ValueError("the schedule's last rates are not the ones of its step")
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        schedule.load_state_dict(meta["schedule"])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"training state does not fit the optimizer: {exc}") from None


def _check_weights(tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Every ``model.`` tensor has the name, shape and dtype of the model's own, and finite
    floating values (``load_state_dict`` would cast a float64 silently)."""
    own = model.state_dict()
    for key, value in tensors.items():
        if not key.startswith("model."):
            continue
        name = key[len("model.") :]
        if name in own and (value.dtype != own[name].dtype or value.shape != own[name].shape):
            raise CheckpointError(
                f"training state: weight {name} is {value.dtype} {tuple(value.shape)}, the "
                f"model's is {own[name].dtype} {tuple(own[name].shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"training state: weight {name} holds NaN or infinite values")


def _plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples as lists)."""
    return json.loads(json.dumps(value))


def _same(a: Any, b: Any) -> bool:
    """JSON values equal, floats up to rounding of the last bits."""
    numbers = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)]
    if all(numbers) and float in (type(a), type(b)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _check_schedule(saved: dict[str, Any], schedule: Any, steps: int) -> None:
    """The schedule's state is the fresh schedule's, ``steps`` steps on."""
    fresh = _plain(schedule.state_dict())
    if saved.keys() != fresh.keys():
        raise ValueError(f"the schedule's fields are {sorted(saved)}, expected {sorted(fresh)}")
    for key in fresh:
        if key not in _COUNTERS and not _same(saved[key], fresh[key]):
            raise ValueError(f"the schedule's {key} is {saved[key]!r}, expected {fresh[key]!r}")
    if saved["last_epoch"] != steps or saved["_step_count"] != steps + 1:
        raise ValueError(
            f"the schedule took {saved['last_epoch']!r} steps, expected {steps} for its epochs"
        )


def _check_groups(
    saved: list[Any], optimizer: torch.optim.Optimizer, schedule: Any, steps: int
) -> None:
    """Each parameter group is the fresh optimizer's, its rate and momentum (beta1) as the
    schedule sets them after ``steps`` steps: nothing edited is used silently."""
    with warnings.catch_warnings():  # stepping a schedule with no optimizer step first
        warnings.simplefilter("ignore")
        schedule.last_epoch = steps - 1
        schedule.step()  # sets every group's scheduled values for step ``steps``
    expected = _plain(optimizer.state_dict()["param_groups"])
    if len(saved) != len(expected):
        raise ValueError(f"{len(saved)} parameter groups, the optimizer has {len(expected)}")
    for i, (group, fresh) in enumerate(zip(saved, expected, strict=True)):
        if not isinstance(group, dict) or group.keys() != fresh.keys():
            raise ValueError(f"parameter group {i} does not have the optimizer's fields")
        for key in fresh:
            if not _same(group[key], fresh[key]):
                raise ValueError(
                    f"parameter group {i}: {key} is {group[key]!r}, expected {fresh[key]!r}"
                )


def _slots_of(optimizer: torch.optim.Optimizer) -> dict[str, bool]:
    """The per-parameter slots this optimizer keeps (name -> is a tensor), read from one step
    of a twin optimizer on a scratch parameter."""
    scratch = torch.zeros(2, requires_grad=True)
    twin = type(optimizer)([scratch], **optimizer.defaults)
    scratch.grad = torch.ones(2)
    twin.step()
    return {k: isinstance(v, torch.Tensor) for k, v in twin.state[scratch].items()}


def _optimizer_slots(
    tensors: dict[str, torch.Tensor], plain: dict[str, Any], optimizer: torch.optim.Optimizer
) -> dict[int, dict[str, Any]]:
    """The optimizer's per-parameter state, each slot checked: a parameter index of this
    optimizer, the slots it keeps (all of them), the parameter's shape and dtype, finite."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    slots = _slots_of(optimizer)
    state: dict[int, dict[str, Any]] = {}
    entries = [(k.split(".", 2)[1:], v) for k, v in tensors.items() if k.startswith("optim.")]
    for index, values in plain.items():
        if not isinstance(values, dict):
            raise ValueError(f"optimizer state {index} is not a mapping")
        entries += [([index, slot], v) for slot, v in values.items()]
    for (index, slot), value in entries:
        if not index.isdigit() or int(index) >= len(params):
            raise ValueError(f"optimizer state for parameter {index!r}: it has {len(params)}")
        param = params[int(index)]
        if slots.get(slot) is not isinstance(value, torch.Tensor):
            raise ValueError(f"optimizer slot {index}.{slot}: it keeps {', '.join(slots)}")
        if isinstance(value, torch.Tensor):
            if value.dim() > 0 and (value.shape != param.shape or value.dtype != param.dtype):
                raise ValueError(
                    f"optimizer slot {index}.{slot} is {value.dtype} {tuple(value.shape)}, its "
                    f"parameter {param.dtype} {tuple(param.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"optimizer slot {index}.{slot} holds NaN or infinite values")
        state.setdefault(int(index), {})[slot] = value  # load_state_dict moves it
    for index, kept in state.items():
        if kept.keys() != slots.keys():
            raise ValueError(f"optimizer state {index} has {sorted(kept)}, not {sorted(slots)}")
    return state
