"""Training state for ``--resume``: model, optimizer, schedule and metrics in ONE safetensors
file, written atomically at the end of every epoch, so a process killed at any moment leaves
either the previous epoch's state or the new one, never a mix. Nothing is unpickled."""

from __future__ import annotations

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
        "epoch": str(epoch),
        "history": json.dumps(history),
        "config": json.dumps(config),
        "param_groups": json.dumps(optim["param_groups"]),
        "optim_state": json.dumps(plain_state),
        "schedule": json.dumps(schedule.state_dict()),
    }
    write_bytes(path, st_save(tensors, metadata=meta))


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a state file; CheckpointError when unreadable."""
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"training state {path} is corrupted or truncated: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nonsingular training state")
    try:
        parsed = {
            "epoch": int(meta["epoch"]),
            "history": json.loads(meta["history"]),
            "config": json.loads(meta["config"]),
            "param_groups": json.loads(meta["param_groups"]),
            "optim_state": json.loads(meta["optim_state"]),
            "schedule": json.loads(meta["schedule"]),
        }
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"training state {path} has a broken header: {exc}") from None
    return tensors, parsed


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
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value  # load_state_dict moves it
    for index, slots in meta["optim_state"].items():
        state.setdefault(int(index), {}).update(slots)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    schedule.load_state_dict(meta["schedule"])
