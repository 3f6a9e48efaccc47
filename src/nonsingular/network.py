"""A supported ``nn.Sequential`` read into a flat list of layers (``layers.py``).

Attacks, certificates and training never call the user's module: they run these layers with
the model's parameters (or perturbed copies built on the fly), so the model itself is never
touched. Every layer computes the deployed (eval-mode) function: Dropout is the identity and
BatchNorm uses its running statistics, whatever mode the model is in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import InputError, UnsupportedLayerError
from .layers import Affine, AvgPool, ChannelAffine, Flatten, Identity, Layer, ReLU

SUPPORTED = (
    "Linear, Conv2d, ReLU, Flatten, AvgPool2d, Identity, Dropout, "
    "BatchNorm1d/BatchNorm2d (eval statistics), nested nn.Sequential"
)


Override = Callable[[Tensor], Tensor]


@dataclass
class Network:
    """The layers of a supported model, in order, holding the model's parameter tensors."""

    layers: list[Layer]

    def cast(self, dtype: torch.dtype) -> Network:
        """A copy computing in ``dtype``."""
        return Network([layer.cast(dtype) for layer in self.layers])

    @property
    def affine_layers(self) -> list[tuple[int, Affine]]:
        return [(k, lay) for k, lay in enumerate(self.layers) if isinstance(lay, Affine)]

    def nonnegative_inputs(self, input_nonnegative: bool) -> set[int]:
        """Indices of the layers whose input is >= 0 (after a ReLU, or the input itself)."""
        found, nonneg = set(), input_nonnegative
        for k, layer in enumerate(self.layers):
            if nonneg:
                found.add(k)
            if isinstance(layer, ReLU):
                nonneg = True
            elif isinstance(layer, (Affine, ChannelAffine)):
                nonneg = False
        return found

    def forward(self, x: Tensor, overrides: Mapping[int, Override] | None = None) -> Tensor:
        """Logits; ``overrides[k](h)`` replaces layer k (this is how perturbations enter)."""
        h = x
        for k, layer in enumerate(self.layers):
            h = overrides[k](h) if overrides and k in overrides else layer.forward(h)
        return h

    __call__ = forward

    @classmethod
    def from_module(cls, model: nn.Module, detach: bool = True) -> Network:
        """Read ``model`` (an ``nn.Sequential`` of supported layers); raise on anything else."""
        if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
            raise UnsupportedLayerError(
                f"nonsingular supports nn.Sequential models built from {SUPPORTED}; "
                f"got {type(model).__name__}"
            )
        layers: list[Layer] = []
        _read(model, "", layers, detach)
        if not any(isinstance(lay, Affine) for lay in layers):
            raise UnsupportedLayerError("the model has no Linear or Conv2d layer")
        return cls(layers)


def _read(module: nn.Sequential, prefix: str, out: list[Layer], detach: bool) -> None:
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(child, nn.Sequential):
            if type(child).forward is not nn.Sequential.forward:
                raise UnsupportedLayerError(
                    f"layer '{name}' ({type(child).__name__}) overrides forward; "
                    f"supported layers: {SUPPORTED}"
                )
            _read(child, name + ".", out, detach)
        else:
            out.append(_layer(name, child, detach))


def _layer(name: str, m: nn.Module, detach: bool) -> Layer:
    def p(t: Tensor | None) -> Tensor | None:
        return None if t is None else (t.detach() if detach else t)

    kind = type(m)
    if kind is nn.Linear:
        return Affine(name, p(m.weight), p(m.bias))  # type: ignore[arg-type]
    if kind is nn.Conv2d:
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise UnsupportedLayerError(
                f"layer '{name}' (Conv2d) uses padding={m.padding!r}, padding_mode="
                f"{m.padding_mode!r}; only numeric zero padding is supported"
            )
        conv = {
            "stride": m.stride,
            "padding": m.padding,
            "dilation": m.dilation,
            "groups": m.groups,
        }
        return Affine(name, p(m.weight), p(m.bias), conv)  # type: ignore[arg-type]
    if kind is nn.ReLU:
        return ReLU(name)
    if kind is nn.Flatten:
        return Flatten(name, m.start_dim, m.end_dim)
    if kind is nn.AvgPool2d:
        options = {
            "kernel_size": m.kernel_size,
            "stride": m.stride,
            "padding": m.padding,
            "ceil_mode": m.ceil_mode,
            "count_include_pad": m.count_include_pad,
            "divisor_override": m.divisor_override,
        }
        return AvgPool(name, options)
    if kind in (nn.Identity, nn.Dropout):
        return Identity(name)
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        if m.running_mean is None or m.running_var is None:
            raise UnsupportedLayerError(
                f"layer '{name}' ({kind.__name__}) has no running statistics "
                "(track_running_stats=False); its eval-mode function is undefined"
            )
        scale = torch.rsqrt(p(m.running_var) + m.eps)  # type: ignore[operator]
        shift = -p(m.running_mean) * scale  # type: ignore[operator]
        if m.affine:
            scale, shift = scale * p(m.weight), shift * p(m.weight) + p(m.bias)
        return ChannelAffine(name, scale, shift)
    raise UnsupportedLayerError(
        f"layer '{name}' ({kind.__name__}) is not supported; supported layers: {SUPPORTED}"
    )


def move_batch(x: object, y: object, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(x, y)`` on ``device``; InputError for anything but tensors."""
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return x.to(device), y.to(device)  # type: ignore[union-attr]


def check_batch(net: Network, x: Tensor, y: Tensor | None = None, probe: bool = False) -> Tensor:
    """Run ``x`` through ``net`` once and check ``y`` against the logits; return the logits.

    ``probe``: run only the first example (enough to check shapes and the label range).
    Raises InputError for a batch that does not fit the model or labels out of range.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise InputError(
            f"x must be a floating-point tensor, got {type(x).__name__} "
            f"{getattr(x, 'dtype', '')}".rstrip()
        )
    if x.dim() < 2:
        raise InputError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    try:
        with torch.no_grad():
            logits = net.forward(x[:1] if probe else x)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"x of shape {tuple(x.shape)} does not fit the model: {first}") from None
    if logits.dim() != 2:
        raise InputError(
            f"the model must output (batch, classes) logits, got {tuple(logits.shape)}"
        )
    if y is not None:
        if not isinstance(y, Tensor) or y.dtype not in (
            torch.int64,
            torch.int32,
            torch.int16,
            torch.uint8,
            torch.int8,
        ):
            raise InputError(f"y must be an integer tensor of labels, got {getattr(y, 'dtype', y)}")
        if y.shape != (x.shape[0],):
            raise InputError(
                f"y must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, "
                f"got {tuple(y.shape)}"
            )
        classes = logits.shape[1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise InputError(
                f"labels must lie in [0, {classes - 1}] for a model with {classes} outputs, "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )
    return logits
