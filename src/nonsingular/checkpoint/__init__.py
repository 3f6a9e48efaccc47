"""Checkpoints: weights in ``safetensors``, the architecture and metadata in a JSON sidecar.

Nothing is ever unpickled. ``save`` writes ``NAME.safetensors`` and ``NAME.json`` atomically,
the sidecar holding the SHA-256 of the weights file. ``load`` checks, before allocating
anything: the checksum (bit flips are this library's own threat model), the architecture
(built on PyTorch's ``meta`` device, which allocates nothing) against the tensor names and
shapes the file declares; then that every weight is finite. The sidecar
names the architecture by its factory (``model.architectures.Architecture``: a built-in name or
``package.module:function`` and its arguments), or describes a flat ``nn.Sequential`` layer by
layer. A user factory is imported only when the caller names it too: a sidecar alone never
makes nonsingular import code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .._version import __version__
from ..errors import CheckpointError, ConfigError, QuantizationError, UnsupportedLayerError
from ..files import write_bytes, write_json
from ..flips.grid import ATTRIBUTE, SCALE_SUFFIX, checkpoint_tensors, from_checkpoint
from ..model.architectures import Architecture
from ..nesting import check_depth
from .layers import build, describe

FORMAT = "nonsingular-checkpoint"


def sidecar(path: str | os.PathLike[str]) -> Path:
    """The JSON file that describes the checkpoint at ``path``."""
    return Path(path).with_suffix(".json")


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    architecture: Architecture | None = None,
    **meta: Any,
) -> Path:
    """Write the model's weights and buffers to ``path`` and its description beside it.

    architecture: how to rebuild the model (its factory and arguments). Without it, a flat
    ``nn.Sequential`` of known layers is described layer by layer, and any other model is
    recorded by its class only (loading it then needs ``load(..., model=an_instance)``).
    """
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
        "model": _description(model, architecture),
        **meta,
    }
    grid = checkpoint_tensors(model, tensors)  # a quantized model: integers + scales
    if grid is not None:
        info["quantization"] = grid
    data = st_save(tensors)
    info["sha256"] = hashlib.sha256(data).hexdigest()
    write_bytes(path, data)
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
        text = info_path.read_text()
        check_depth(text, str(info_path), CheckpointError)
        info = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{info_path} is not valid JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or "model" not in info:
        raise CheckpointError(f"{info_path} is not a nonsingular checkpoint description")
    digest = info.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise CheckpointError(f"{info_path} has no SHA-256 of the weights (field sha256)")
    return info


def _description(model: nn.Module, architecture: Architecture | None) -> Any:
    if architecture is not None:
        return architecture.to_dict()
    try:
        return describe(model)
    except UnsupportedLayerError:
        cls = type(model)
        return {"factory": None, "class": f"{cls.__module__}.{cls.__qualname__}"}


def _rebuild(path: Path, spec: Any, factory: str | None, model: nn.Module | None) -> nn.Module:
    """A fresh model for the checkpoint's weights (see ``load``); building it draws initial
    weights, from a forked RNG: the caller's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return _build(path, spec, factory, model)


def _build(path: Path, spec: Any, factory: str | None, model: nn.Module | None) -> nn.Module:
    if model is not None:
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        return deepcopy(model)
    if isinstance(spec, list):
        return build(spec)
    if isinstance(spec, dict) and spec.get("factory") is None:
        raise CheckpointError(
            f"checkpoint {path} holds the weights of a {spec.get('class', 'model')} trained "
            "from an instance: pass load(..., model=an_instance) to load them into"
        )
    architecture = Architecture.from_dict(spec)
    if not architecture.builtin and architecture.factory != factory:
        raise CheckpointError(
            f"checkpoint {path} was built by {architecture.factory}; name that factory to allow "
            f"importing it (--model {architecture.factory}, or factory=...)"
        )
    try:
        return architecture.build()
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None


def load(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    factory: str | None = None,
    model: nn.Module | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode, sidecar info)`` from a checkpoint written by ``save``.

    factory: the ``package.module:function`` the checkpoint names, when it is a user factory:
    naming it is what allows importing it. model: an instance to load the weights into (a copy
    of it is returned; yours is not touched), for checkpoints of models built by hand.
    """
    path = Path(path)
    info = read_info(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} does not match the SHA-256 in {sidecar(path).name}: the file "
            "was changed or damaged after it was written"
        )
    declared = _declared_shapes(path, data)
    grid = info.get("quantization")
    declared = {k: v for k, v in declared.items() if not (grid and k.endswith(SCALE_SUFFIX))}
    with torch.device("meta"):  # the architecture, checked without allocating anything
        shapes = {
            k: tuple(v.shape)
            for k, v in _rebuild(path, info["model"], factory, model).state_dict().items()
        }
    _check_shapes(path, shapes, declared)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated: {exc}") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint {path}: tensor {name} holds NaN or infinite values")
    try:
        quantization = from_checkpoint(tensors, grid) if isinstance(grid, dict) else None
    except QuantizationError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    loaded = _rebuild(path, info["model"], factory, model)
    loaded.load_state_dict(tensors)
    if quantization is not None:
        setattr(loaded, ATTRIBUTE, quantization)
    return loaded.to(device).eval(), info


def _declared_shapes(path: Path, data: bytes) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file's header declares (nothing else is read)."""
    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 + size:
            raise ValueError("the header runs past the end of the file")
        check_depth(data[8 : 8 + size], f"checkpoint {path}'s header", CheckpointError)
        header = json.loads(data[8 : 8 + size])
        return {
            name: _sizes(entry["shape"]) for name, entry in header.items() if name != "__metadata__"
        }
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated: {exc}") from None


def _sizes(shape: object) -> tuple[int, ...]:
    """A declared shape: a list of integers from 0 to 2**48 (no text, no 1e400)."""
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 48 for d in shape
    ):
        raise ValueError(f"a tensor's shape must be a list of sizes, got {shape!r}"[:200])
    return tuple(shape)


def _check_shapes(
    path: Path, expected: dict[str, tuple[int, ...]], declared: dict[str, tuple[int, ...]]
) -> None:
    missing = sorted(set(expected) - set(declared))
    extra = sorted(set(declared) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match its description: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, shape in declared.items():
        if shape != expected[name]:
            raise CheckpointError(
                f"checkpoint {path}: tensor {name} has shape {shape}, "
                f"the description says {expected[name]}"
            )
