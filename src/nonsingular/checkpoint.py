"""Checkpoints: weights in ``safetensors``, the architecture and metadata in a JSON sidecar.

Nothing is ever unpickled. ``save`` writes ``NAME.safetensors`` and ``NAME.json`` atomically;
``load`` rebuilds the model from the JSON and checks that every tensor fits it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ._version import __version__
from .errors import CheckpointError
from .files import write_bytes, write_json
from .models import build, describe

FORMAT = "nonsingular-checkpoint"


def sidecar(path: str | os.PathLike[str]) -> Path:
    """The JSON file that describes the checkpoint at ``path``."""
    return Path(path).with_suffix(".json")


def save(model: nn.Module, path: str | os.PathLike[str], **meta: Any) -> Path:
    """Write the model's weights and buffers to ``path`` and its description beside it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint paths end in .safetensors, got {str(path)!r}")
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: directory {path.parent} does not exist")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = {
        "format": FORMAT,
        "version": __version__,
        "torch": torch.__version__,
        "model": describe(model),
        **meta,
    }
    write_bytes(path, st_save(tensors))
    write_json(sidecar(path), info)
    return path


def read_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar JSON of a checkpoint (raises CheckpointError when missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    info_path = sidecar(path)
    if not info_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no description {info_path.name} beside it")
    try:
        info = json.loads(info_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{info_path} is not valid JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or "model" not in info:
        raise CheckpointError(f"{info_path} is not a nonsingular checkpoint description")
    return info


def load(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[nn.Sequential, dict[str, Any]]:
    """``(model in eval mode, sidecar info)`` from a checkpoint written by ``save``."""
    info = read_info(path)
    model = build(info["model"])
    try:
        tensors = st_load(Path(path).read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated: {exc}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match its description: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(
                f"checkpoint {path}: tensor {name} has shape {tuple(t.shape)}, "
                f"the description says {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors)
    return model.to(device).eval(), info
