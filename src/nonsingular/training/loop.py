"""The training loop shared by every method: seeded per epoch, so runs are reproducible."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import Dataset
from ..models import cnn, mlp
from .augment import random_shift
from .config import TrainConfig


@dataclass
class TrainResult:
    """The trained model (eval mode) and one metrics dict per epoch."""

    model: nn.Sequential
    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)


def build_model(config: TrainConfig, data: Dataset) -> nn.Sequential:
    """A freshly initialized model for ``config``, seeded without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.model == "mlp":
            return mlp(data.in_shape, config.hidden, data.classes)
        return cnn(data.in_shape, classes=data.classes)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Clean accuracy of ``model`` (as it is: call under eval mode)."""
    with torch.no_grad():
        correct = sum(
            int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
            for i in range(0, len(x), batch_size)
        )
    return correct / max(1, len(x))


def train(
    config: TrainConfig,
    data: Dataset,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Train a new model on ``data.x_train`` with ``config``; returns it in eval mode."""
    model = build_model(config, data).to(device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    steps_per_epoch = -(-len(x_train) // config.batch_size)
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
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, config.lr, total_steps=config.epochs * steps_per_epoch
    )
    result = TrainResult(model, config)
    for epoch in range(config.epochs):
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(len(x_train), generator=generator).to(device)
        model.train()
        total, seen = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=None if progress else True,
            leave=False,
        )
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            xb = random_shift(x_train[idx], config.augment, generator)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
            bar.set_postfix(loss=f"{total / seen:.3f}")
        model.eval()
        result.history.append(
            {
                "epoch": epoch + 1,
                "loss": total / seen,
                "test_accuracy": accuracy(model, data.x_test.to(device), data.y_test.to(device)),
            }
        )
    return result
