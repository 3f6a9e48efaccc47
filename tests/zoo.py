"""Models a new user brings: each kind the issue tracker listed, small enough for every test.

Each builder returns ``(model in eval mode, x)`` with ``x`` a batch in [0, 1] that fits it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights, BatchNorm statistics that are not the identity."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def _images(seed: int, *shape: int) -> torch.Tensor:
    return torch.rand(4, *shape, generator=torch.Generator().manual_seed(seed))


class Normalized(nn.Module):
    """A custom forward: normalization with buffers, functional calls, view(size(0), -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4]))
        self.register_buffer("std", torch.tensor([0.3]))
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc1 = nn.Linear(3 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - self.mean) / self.std
        h = F.relu(self.conv(h))
        h = F.avg_pool2d(h, 2)
        h = h.view(h.size(0), -1)
        h = torch.relu(self.fc1(h)) * 0.5 + 0.1
        return self.fc2(h)


class Block(nn.Module):
    """A residual block: conv-bn-relu-conv-bn plus the skip (a 1x1 conv when shapes change)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Conv2d(c_in, c_out, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block1 = Block(4, 4)
        self.block2 = Block(4, 6, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(F.relu(self.stem(x))))
        return self.head(torch.flatten(self.pool(h), 1))


class Branches(nn.Module):
    """Two branches joined by torch.cat, one of them reusing a module."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(6, 4)
        self.act = nn.Tanh()
        self.out = nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.act(self.a(x)), self.act(self.b(x))], dim=1)
        return self.out(h - 0.25)


class Sequence(nn.Module):
    """Linear over a sequence (B, T, F), LayerNorm, GELU, a mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(x))
        h = h + F.gelu(self.mix(h))
        return self.head(h.mean(dim=1))


class Tied(nn.Module):
    """One Linear applied twice (weight tying): one tensor, perturbed once."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.shared(F.relu(self.shared(x)))))


def maxpool_cnn() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3)
    )
    torch.manual_seed(1)
    return _init(model, 1), _images(1, 1, 8, 8)


def same_padding() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 4, padding="same"),
        nn.GELU(),
        nn.Conv2d(3, 4, 3, stride=2, padding="valid", dilation=1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", groups=2),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )
    return _init(model, 2), _images(2, 1, 8, 8)


def conv1d() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding="same", padding_mode="circular"),
        nn.BatchNorm1d(4),
        nn.ELU(),
        nn.MaxPool1d(2),
        nn.Conv1d(4, 4, 2, stride=2),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    return _init(model, 3), _images(3, 2, 8)


def activations() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(4)
    layers: list[nn.Module] = [nn.Flatten()]
    width = 6
    for act in (nn.Tanh(), nn.Sigmoid(), nn.ELU(0.5), nn.Softplus(2.0), nn.Hardtanh(), nn.ReLU6()):
        layers += [nn.Linear(width, 7), act]
        width = 7
    layers.append(nn.Linear(width, 3))
    return _init(nn.Sequential(*layers), 4), _images(4, 6)


def custom_forward() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(5)
    return _init(Normalized(), 5), _images(5, 1, 8, 8)


def residual() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(6)
    return _init(Residual(), 6), _images(6, 1, 8, 8)


def branches() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(7)
    return _init(Branches(), 7), _images(7, 6)


def sequence() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(8)
    return _init(Sequence(), 8), _images(8, 3, 5)


def tied() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(9)
    return _init(Tied(), 9), _images(9, 6)


def reused_relu() -> tuple[nn.Module, torch.Tensor]:
    """One ReLU instance used twice in a Sequential (named_children lists it once)."""
    torch.manual_seed(10)
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(6, 8), relu, nn.Linear(8, 8), relu, nn.Linear(8, 3))
    return _init(model, 10), _images(10, 6)


ZOO = {
    "maxpool-cnn": maxpool_cnn,
    "same-padding-conv": same_padding,
    "conv1d": conv1d,
    "activations": activations,
    "custom-forward": custom_forward,
    "residual": residual,
    "branches-cat": branches,
    "sequence-layernorm": sequence,
    "tied-linear": tied,
    "reused-relu": reused_relu,
}


# ------------------------------------------------------------- weights outside Linear/Conv
class Einsum(nn.Module):
    """Raw ``nn.Parameter``s in einsum, ``@`` (one of them transposed first), F.linear with a
    computed weight; ``shift`` is only added (not a linear map's) and ``unused`` never read."""

    def __init__(self) -> None:
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(6, 8) * 0.5)
        self.shift = nn.Parameter(torch.randn(8) * 0.1)
        self.W2 = nn.Parameter(torch.randn(5, 8) * 0.4)
        self.W3 = nn.Parameter(torch.randn(3, 5) * 0.5)
        self.b3 = nn.Parameter(torch.randn(3) * 0.1)
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.einsum("bi,ij->bj", x, self.W1) + self.shift)
        h = torch.tanh(h @ self.W2.t())
        return F.linear(h, self.W3 * 2.0, self.b3)


class Encoder(nn.Module):
    """A Linear embedding, an ``nn.TransformerEncoder`` (self-attention, feed-forward,
    LayerNorms), a mean over positions and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class Attention(nn.Module):
    """``nn.MultiheadAttention`` called directly (query, key, value), its output's first item."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(5, 1, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out[:, -1])


class Recurrent(nn.Module):
    """An LSTM (bidirectional) or GRU (two layers) over the sequence, a Linear on its last
    output."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        if cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(5, 6, batch_first=True, bidirectional=True)
            width = 12
        else:
            self.rnn = nn.GRU(5, 6, num_layers=2, batch_first=True)
            width = 6
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def einsum() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(11)
    return _init(Einsum(), 11), _images(11, 6)


def transformer() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(12)
    return _init(Encoder(), 12), _images(12, 3, 5)


def attention() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(13)
    return _init(Attention(), 13), _images(13, 3, 5)


def lstm() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(14)
    return _init(Recurrent("lstm"), 14), _images(14, 3, 5)


def gru() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(15)
    return _init(Recurrent("gru"), 15), _images(15, 3, 5)


# weights that enter linear maps other than a Linear/Conv module's: attacks move them (one
# materialized copy per example), bounds refuse them; what stays out, and why it must
OTHER_WEIGHTS = {
    "einsum-matmul": einsum,
    "transformer-encoder": transformer,
    "multihead-attention": attention,
    "lstm": lstm,
    "gru": gru,
}
# the parameters no weight threat moves in each (their names as ``named_parameters`` gives)
NEVER_MOVED = {
    "einsum-matmul": {"shift", "unused"},
    "transformer-encoder": {
        f"encoder.layers.0.norm{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
    },
    "multihead-attention": set(),
    "lstm": set(),
    "gru": set(),
}


# ------------------------------------------------- digit classifiers beyond the lemma's layers
# Models of 8x8 digits (1, 8, 8) -> 10 classes, for training on ``load("digits")``: parameters
# read by einsum/matmul, a TransformerEncoder, an LSTM, a GRU (each row of the image a step).


class EinsumNet(nn.Module):
    """Raw ``nn.Parameter`` weights used through ``torch.einsum`` and ``@``."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.W1 = nn.Parameter(torch.randn(64, 16, generator=gen) / 8)
        self.b1 = nn.Parameter(torch.zeros(16))
        self.W2 = nn.Parameter(torch.randn(16, 10, generator=gen) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.einsum("bi,ij->bj", x.flatten(1), self.W1) + self.b1)
        return h @ self.W2


class RecurrentNet(nn.Module):
    """An LSTM or GRU over the image's rows, its last output to a Linear head."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(8, 12, batch_first=True)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.flatten(1, 2))
        return self.head(out[:, -1])


class AttentionNet(nn.Module):
    """A one-layer ``nn.TransformerEncoder`` (Dropout on) over the image's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.flatten(1, 2))).mean(1))


def _digit_model(build: type[nn.Module], *args: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build(*args)  # training mode, as a user's fresh module is


DIGIT_MODELS = {
    "einsum-matmul": lambda: _digit_model(EinsumNet, seed=11),
    "transformer-encoder": lambda: _digit_model(AttentionNet, seed=12),
    "lstm": lambda: _digit_model(RecurrentNet, "LSTM", seed=13),
    "gru": lambda: _digit_model(RecurrentNet, "GRU", seed=14),
}
