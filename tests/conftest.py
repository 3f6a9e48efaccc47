"""Shared fixtures: the real data and small models trained once per session."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

from nonsingular.data import Dataset, load
from nonsingular.training import TrainConfig, train

settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=40)
settings.load_profile("ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where no GPU is present (the one place that says so)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mnist() -> Dataset:
    return load("mnist5k")


@pytest.fixture(scope="session")
def standard_mlp(mnist: Dataset) -> torch.nn.Sequential:
    """The standard 784-256-256-10 MLP, trained on the 4,000 mnist5k training digits."""
    return train(TrainConfig(epochs=20, seed=0), mnist, progress=False).model


@pytest.fixture(scope="session")
def small_cnn(mnist: Dataset) -> torch.nn.Sequential:
    """The small CNN, trained briefly (its accuracy is not what its tests are about)."""
    return train(TrainConfig(model="cnn", epochs=4, seed=0), mnist, progress=False).model


def malicious_pickle(marker) -> bytes:
    """A pickle that creates ``marker`` if anything ever unpickles it."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Evil())


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"parameter {k} changed"
