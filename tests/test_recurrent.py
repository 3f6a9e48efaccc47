"""RNNs unrolled over time (what attacks vmap) compute what the modules compute."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, vmap

from nonsingular.model.operators.recurrent import unrolled


def _flat(out):
    rest = out[1] if isinstance(out[1], tuple) else (out[1],)
    return [out[0], *rest]


@settings(max_examples=25, deadline=None)
@given(
    cell=st.sampled_from(["lstm", "gru", "rnn-tanh", "rnn-relu"]),
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    proj=st.booleans(),
    with_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_unrolled_equals_the_module(
    cell, layers, bidirectional, batch_first, bias, proj, with_state, seed
):
    torch.manual_seed(seed)
    options = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    options["bias"] = bias
    if cell == "lstm":
        module = nn.LSTM(4, 5, proj_size=3 if proj else 0, **options)
    elif cell == "gru":
        module = nn.GRU(4, 5, **options)
    else:
        module = nn.RNN(4, 5, nonlinearity=cell[4:], **options)
    module.eval()
    x = torch.randn((3, 6, 4) if batch_first else (6, 3, 4))
    args = (x,)
    if with_state:
        h = torch.randn(
            layers * (2 if bidirectional else 1), 3, 3 if cell == "lstm" and proj else 5
        )
        c = torch.randn(layers * (2 if bidirectional else 1), 3, 5)
        args = (x, (h, c) if cell == "lstm" else h)
    params = {n: p.detach() for n, p in module.named_parameters()}
    with torch.no_grad():
        expected = _flat(module(*args))
        got = _flat(unrolled(module, params, args, {}))
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unrolled_vmaps_over_weight_copies_as_the_module_runs_each():
    torch.manual_seed(0)
    module = nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True).eval()
    params = {n: p.detach() for n, p in module.named_parameters()}
    x = torch.randn(3, 6, 4)
    deltas = {n: 0.1 * torch.randn(3, *p.shape) for n, p in params.items()}

    def one(row, delta):
        moved = {n: params[n] + delta[n] for n in params}
        return unrolled(module, moved, (row[None],), {})[0][0]

    batched = vmap(one)(x, deltas)
    with torch.no_grad():
        for i in range(3):
            moved = {n: params[n] + deltas[n][i] for n in params}
            each = functional_call(module, moved, (x[i : i + 1],))[0][0]
            torch.testing.assert_close(batched[i], each, rtol=1e-5, atol=1e-5)


def test_what_it_does_not_cover_is_left_to_the_module():
    module = nn.GRU(4, 5).eval()
    params = dict(module.named_parameters())
    with pytest.raises(NotImplementedError, match="batched"):
        unrolled(module, params, (torch.randn(6, 4),), {})  # one unbatched sequence
