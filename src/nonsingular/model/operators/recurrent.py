"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` unrolled over time in plain tensor operations, so that
``torch.func.vmap`` can run them with one weight copy per example (the fused ``aten::lstm``
kernels have no batching rule). The same function as the module in eval mode (PyTorch's gate
order and formulas), to rounding: attacks use it, ``replay`` runs the module itself.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

_UNROLL = contextvars.ContextVar("unroll_recurrent", default=False)


@contextlib.contextmanager
def unrolled_recurrent() -> Iterator[None]:
    """Inside, module calls of RNNs that are given parameters run ``unrolled``."""
    token = _UNROLL.set(True)
    try:
        yield
    finally:
        _UNROLL.reset(token)


def unrolling(module: nn.Module) -> bool:
    """Whether a call of ``module`` should run ``unrolled`` here."""
    return _UNROLL.get() and isinstance(module, (nn.LSTM, nn.GRU, nn.RNN))


def _cell(mode: str, x: Tensor, state: tuple, w: dict[str, Tensor | None]) -> tuple:
    """One time step: ``x (B, in)``, ``state`` (h,) or (h, c) -> the new state."""
    h = state[0]
    gi = torch.nn.functional.linear(x, w["ih"], w["b_ih"])
    gh = torch.nn.functional.linear(h, w["hh"], w["b_hh"])
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w["hr"] is not None:
            h = torch.nn.functional.linear(h, w["hr"])
        return h, c
    if mode == "GRU":
        ir, iz, in_ = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return ((1 - z) * n + z * h,)
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return (act(gi + gh),)


def unrolled(module: nn.RNNBase, parameters: dict[str, Tensor], args: tuple, kwargs: dict) -> Any:
    """``module(*args, **kwargs)`` with ``parameters`` (its own names) in place of its own, step
    by step. Raises NotImplementedError for what it does not cover (a packed or unbatched
    sequence), where the caller runs the module itself."""
    x = args[0]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise NotImplementedError("unrolled RNNs take a batched (3-d) tensor")
    mode, layers, dirs = module.mode, module.num_layers, 2 if module.bidirectional else 1
    seq = x if module.batch_first else x.transpose(0, 1)  # (B, T, in)
    batch = seq.shape[0]
    out_size = module.proj_size or module.hidden_size
    if hx is None:
        h0 = seq.new_zeros(layers * dirs, batch, out_size)
        c0 = seq.new_zeros(layers * dirs, batch, module.hidden_size)
    else:
        h0, c0 = (hx[0], hx[1]) if mode == "LSTM" else (hx, None)
    finals: list[tuple] = []
    for layer in range(layers):
        outputs = []
        for d in range(dirs):
            suffix = f"_l{layer}{'_reverse' if d else ''}"
            w = {
                k: parameters.get(f"{name}{suffix}", getattr(module, f"{name}{suffix}", None))
                for k, name in (
                    ("ih", "weight_ih"),
                    ("hh", "weight_hh"),
                    ("b_ih", "bias_ih"),
                    ("b_hh", "bias_hh"),
                    ("hr", "weight_hr"),
                )
            }
            k = layer * dirs + d
            state = (h0[k], c0[k]) if mode == "LSTM" else (h0[k],)
            steps = range(seq.shape[1] - 1, -1, -1) if d else range(seq.shape[1])
            hs: list[Tensor] = []
            for t in steps:
                state = _cell(mode, seq[:, t], state, w)
                hs.append(state[0])
            outputs.append(torch.stack(hs[::-1] if d else hs, dim=1))
            finals.append(state)
        seq = torch.cat(outputs, dim=-1) if dirs > 1 else outputs[0]
    out = seq if module.batch_first else seq.transpose(0, 1)
    h_n = torch.stack([s[0] for s in finals])
    if mode == "LSTM":
        return out, (h_n, torch.stack([s[1] for s in finals]))
    return out, h_n
