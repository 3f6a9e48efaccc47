"""Training state for ``--resume``: model, optimizer, schedule and metrics in ONE safetensors
file, written atomically at the end of every epoch, so a process killed at any moment leaves
either the previous epoch's state or the new one, never a mix. Nothing is unpickled; the
header holds a SHA-256 of the tensors, and every field is checked before it is used."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..errors import CheckpointError
from ..files import write_bytes

FORMAT = "nonsingular-train-state"


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
        "sha256": tensor_digest(tensors),
        "epoch": str(epoch),
        "history": json.dumps(history),
        "config": json.dumps(config),
        "param_groups": json.dumps(optim["param_groups"]),
        "optim_state": json.dumps(plain_state),
        "schedule": json.dumps(schedule.state_dict()),
    }
    write_bytes(path, st_save(tensors, metadata=meta))


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a state file; CheckpointError when it is unreadable, damaged
    (its checksum) or malformed (every field's type is checked)."""
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except (OSError, SafetensorError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"training state {path} is corrupted or truncated: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nonsingular training state")
    if meta.get("sha256") != tensor_digest(tensors):
        raise CheckpointError(
            f"training state {path} does not match its SHA-256: it was changed or damaged "
            "after it was written"
        )
    try:
        parsed = {key: json.loads(meta[key]) for key in _FIELDS}
        parsed["epoch"] = int(meta["epoch"])
    except (KeyError, TypeError, ValueError) as exc:
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
) -> None:
    """Load a state into a freshly built model, optimizer and schedule (same config)."""
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"training state does not fit the model: {exc}") from None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    try:
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, slot = key.split(".", 2)
                param = params[int(index)]
                if value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"{key} has shape {tuple(value.shape)}")
                state.setdefault(int(index), {})[slot] = value  # load_state_dict moves it
        for index, slots in meta["optim_state"].items():
            if not isinstance(slots, dict):
                raise ValueError(f"optimizer state {index} is not a mapping")
            state.setdefault(int(index), {}).update(slots)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        missing = sorted(set(schedule.state_dict()) - set(meta["schedule"]))
        if missing:
            raise ValueError(f"the schedule's state lacks {', '.join(missing[:5])}")
        schedule.load_state_dict(meta["schedule"])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"training state does not fit the optimizer: {exc!r}") from None
