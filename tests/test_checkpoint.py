import json

import pytest
import torch

from nonsingular import CheckpointError, checkpoint
from nonsingular.model.architectures import mlp

from .conftest import malicious_pickle


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = mlp((1, 8, 8), hidden=(16,), classes=10)
    path = checkpoint.save(model, tmp_path / "model.safetensors", method="standard")
    return model, path


def test_round_trip_restores_every_tensor_and_the_metadata(saved):
    model, path = saved
    loaded, info = checkpoint.load(path)
    assert info["method"] == "standard" and info["format"] == "nonsingular-checkpoint"
    assert not loaded.training
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]


def test_missing_files_and_bad_names(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "nope.safetensors")
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="no description model.json"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match=".safetensors"):
        checkpoint.save(mlp((1, 8, 8)), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.save(mlp((1, 8, 8)), tmp_path / "missing" / "model.safetensors")


def test_truncated_or_corrupted_weights_give_a_clear_error(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="SHA-256.*changed or damaged"):
        checkpoint.load(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="SHA-256.*changed or damaged"):
        checkpoint.load(path)


def test_a_pickle_in_place_of_the_weights_is_refused_without_unpickling(saved, tmp_path):
    _, path = saved
    marker = tmp_path / "pwned"
    path.write_bytes(malicious_pickle(marker))
    with pytest.raises(CheckpointError):
        checkpoint.load(path)
    assert not marker.exists()


def test_a_description_that_does_not_match_the_weights(saved):
    model, path = saved
    info = json.loads(path.with_suffix(".json").read_text())
    info["model"][1]["out_features"] = 17
    path.with_suffix(".json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint.load(path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(path)
    path.with_suffix(".json").write_text(json.dumps({"model": []}))
    with pytest.raises(CheckpointError, match="not a nonsingular checkpoint"):
        checkpoint.load(path)
