"""Hostile files in directories the library writes: a symbolic link at any path it writes (to
a file outside, or dangling) never changes or creates a file outside; figures are written
atomically; a config file's model factory is never imported unless the command line names it.

The lists of written files are not hand-kept: each is what a clean tiny run wrote."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from nonsingular import ConfigError
from nonsingular.cli import main
from nonsingular.experiment import Results, report
from nonsingular.files import _open_lock, exclusive
from nonsingular.training import TrainConfig, train

from .test_hostile import one_line_error

TRAIN = ["train", "--quiet", "--device", "cpu", "--data", "digits", "--hidden", "8"]
TRAIN += ["--epochs", "1", "--eval-size", "0"]
PROBE = ".write-test"  # train's writability probe: written and removed, so no run leaves it
EXPERIMENT = """\
data = "digits"
epochs = 1
eval-size = 40
cert-size = 8
attack-steps = 2
min-clean = 0.0
recipes = []
stronger = false
certify = ["ibp"]
eps-x = [0.0, 0.05]
eps-w-absolute = [0.0, 1e-3]
eps-w-relative = [0.0, 0.05]
eps-w-shared = [0.0, 1e-2]
joint-eps-x = [0.0, 0.05]
joint-eps-w = [0.0, 1e-3]
flips = [0, 2]
flip-draws = 2
flip-limit = 10
"""
LINK = "symbolic link"  # what every refusal says


def written(directory: Path) -> list[str]:
    """Every file under ``directory``, relative to it."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def snapshot(directory: Path) -> dict[str, str | bytes]:
    """Each path under ``directory`` and its bytes (b"" for a folder, its target for a link):
    any change shows."""
    return {
        str(p.relative_to(directory)): os.readlink(p)
        if p.is_symlink()
        else (b"" if p.is_dir() else p.read_bytes())
        for p in sorted(directory.rglob("*"))
    }


class Outside:
    """A folder outside the run directory: one file a link can point to, one path a
    dangling link can point to (it must stay absent)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "outside"
        self.root.mkdir()
        self.victim = self.root / "victim.bin"
        self.victim.write_bytes(b"precious, and not the library's")
        self.absent = self.root / "absent.bin"
        self.before = snapshot(self.root)

    def link(self, path: Path, dangling: bool) -> None:
        """Put a link at ``path`` to the victim, or to the absent file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(self.absent if dangling else self.victim)

    def unchanged(self) -> bool:
        return snapshot(self.root) == self.before


@pytest.fixture
def outside(tmp_path):
    return Outside(tmp_path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 1-epoch ``train`` run directory and the files it holds."""
    out = tmp_path_factory.mktemp("train") / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out, written(out)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A finished tiny ``reproduce --quick`` directory (about 20 s on 2 cores), its config."""
    root = tmp_path_factory.mktemp("reproduce")
    config = root / "experiment.toml"
    config.write_text(EXPERIMENT)
    out = root / "out"
    args = ["reproduce", "--quick", "--quiet", "--device", "cpu", "--config", str(config)]
    assert main([*args, "--out", str(out)]) == 0
    return out, [*args, "--out", str(out)]


def test_the_written_files_are_the_ones_the_tests_link(finished_run, reproduced):
    _, files = finished_run
    # the run's files: a new one is found by written() and linked by the tests below
    assert {".lock", "config.json", "config.toml", "model.safetensors"} <= set(files)
    assert {"metrics.jsonl", "model.json", "state.safetensors"} <= set(files)
    out, _ = reproduced
    every = written(out)
    assert {"report.md", "results.json", "figures/heatmaps.png", ".lock"} <= set(every)
    assert any(f.startswith("evals/") for f in every)
    assert "models/seed0/standard/state.safetensors" in every


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_train_refuses_a_run_directory_holding_a_link(capsys, tmp_path, outside, dangling):
    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0  # learn what a fresh run writes
    capsys.readouterr()
    for name in [*written(out), PROBE]:
        fresh = tmp_path / f"fresh-{name}"
        outside.link(fresh / name, dangling)
        one_line_error(capsys, [*TRAIN, "--out", str(fresh)], LINK)
        assert outside.unchanged(), name
        assert os.listdir(fresh) == [name], name  # nothing written beside it


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_resume_refuses_a_run_directory_holding_a_link(
    capsys, tmp_path, outside, finished_run, dangling
):
    run, files = finished_run
    for name in [*files, PROBE]:
        copy = tmp_path / f"copy-{name}"
        shutil.copytree(run, copy)
        (copy / name).unlink(missing_ok=True)
        outside.link(copy / name, dangling)
        before = snapshot(copy)
        one_line_error(capsys, [*TRAIN, "--out", str(copy), "--resume"], LINK)
        assert outside.unchanged(), name
        assert snapshot(copy) == before, name


def test_train_in_python_refuses_a_run_directory_holding_a_link(tmp_path, outside, finished_run):
    _, files = finished_run
    config = TrainConfig(data="digits", hidden=(8,), epochs=1, eval_size=0)
    for name in files:
        out = tmp_path / f"api-{name}"
        outside.link(out / name, dangling=True)
        with pytest.raises(ConfigError, match=LINK):
            train(config, out_dir=out, progress=False)
        assert outside.unchanged(), name


def test_train_in_python_never_writes_its_probe_through_a_link(tmp_path, outside):
    out = tmp_path / "api"
    outside.link(out / PROBE, dangling=True)
    with pytest.raises(ConfigError, match=LINK):
        train(TrainConfig(data="digits", hidden=(8,), epochs=1, eval_size=0), out_dir=out)
    assert outside.unchanged()


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_reproduce_refuses_an_output_directory_holding_a_link(
    capsys, tmp_path, outside, reproduced, dangling
):
    out, args = reproduced
    runs = sorted({str(Path(f).parent) for f in written(out) if f.endswith("state.safetensors")})
    aside = tmp_path / "aside"
    for name in [*written(out), *(f"{run}/{PROBE}" for run in runs)]:
        path = out / name
        if path.exists():
            path.replace(aside)  # put back below: the output directory is shared
        outside.link(path, dangling)
        try:
            one_line_error(capsys, args, LINK)
        finally:
            path.unlink()
            if aside.exists():
                aside.replace(path)
        assert outside.unchanged(), name


def test_a_linked_figures_folder_is_refused(capsys, tmp_path, reproduced):
    out, args = reproduced
    elsewhere = tmp_path / "elsewhere"
    (out / "figures").rename(elsewhere)
    (out / "figures").symlink_to(elsewhere, target_is_directory=True)
    before = snapshot(elsewhere)
    try:
        one_line_error(capsys, args, LINK)
    finally:
        (out / "figures").unlink()
        elsewhere.rename(out / "figures")
    assert snapshot(out / "figures") == before


def test_figures_are_written_atomically_never_through_a_link(tmp_path, outside, reproduced):
    out, _ = reproduced
    results = Results.from_dict(json.loads((out / "results.json").read_text()))
    folder = tmp_path / "figures"
    outside.link(folder / "heatmaps.png", dangling=False)
    outside.link(folder / "accuracy_vs_eps_x.png", dangling=True)
    # drawn without the directory check (write_report's), so only the atomic writes protect
    paths = report.figures(results, report.summarize(results), folder)
    assert outside.unchanged()
    for relative in paths.values():
        drawn = tmp_path / relative
        assert not drawn.is_symlink() and drawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(folder.glob(".*.tmp"))  # no temporary file left behind


def test_write_report_refuses_a_linked_figure(tmp_path, outside, reproduced):
    out, _ = reproduced
    results = Results.from_dict(json.loads((out / "results.json").read_text()))
    target = tmp_path / "report"
    outside.link(target / "figures" / "heatmaps.png", dangling=False)
    with pytest.raises(ConfigError, match=LINK):
        report.write_report(results, target, ["reproduce", "(test)"])
    assert outside.unchanged()
    assert sorted(os.listdir(target)) == ["figures"]


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_evaluate_out_replaces_a_link_never_writes_through_it(
    capsys, tmp_path, outside, finished_run, dangling
):
    run, _ = finished_run
    path = tmp_path / "results.json"
    outside.link(path, dangling)
    args = ["evaluate", "--checkpoint", str(run / "model.safetensors"), "--data", "digits"]
    args += ["--test-size", "20", "--eps-x", "0,0.05", "--eps-w", "0", "--steps", "1"]
    assert main([*args, "--out", str(path), "--quiet", "--device", "cpu"]) == 0
    assert outside.unchanged()
    assert not path.is_symlink() and json.loads(path.read_text())["rows"]


def test_the_lock_is_never_opened_through_a_link(tmp_path, outside):
    outside.link(tmp_path / "run" / ".lock", dangling=True)
    with pytest.raises(ConfigError, match=LINK):
        _open_lock(tmp_path / "run" / ".lock")  # the race exclusive()'s own check leaves open
    with pytest.raises(ConfigError, match=LINK), exclusive(tmp_path / "run"):
        pass
    assert outside.unchanged()


# --------------------------------------------------------- config files name data, not code
FACTORY = """\
import pathlib
import torch

pathlib.Path({imported!r}).write_text("imported")


def build(in_shape, classes, marker):
    pathlib.Path(marker).write_text("called")
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, classes))
"""


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """A user factory that leaves a marker when imported and another when called."""
    module = "hostile_marker_factory"
    imported, called = tmp_path / "imported", tmp_path / "called"
    (tmp_path / f"{module}.py").write_text(FACTORY.format(imported=str(imported)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    yield f"{module}:build", imported, called
    sys.modules.pop(module, None)


def test_a_config_file_never_imports_a_factory_the_command_line_does_not_name(
    capsys, tmp_path, factory
):
    name, imported, called = factory
    config = tmp_path / "config.toml"
    config.write_text(f'model = "{name}"\nmodel-args = {{ marker = "{called}" }}\n')
    out = tmp_path / "run"
    for also in ([], ["--model", "mlp"]):
        one_line_error(capsys, [*TRAIN, "--config", str(config), *also, "--out", str(out)], name)
        assert not imported.exists() and not called.exists() and not out.exists()
    system = tmp_path / "system.toml"  # the audit's case
    system.write_text(f'model = "os:system"\nmodel-args = {{ command = "touch {called}" }}\n')
    one_line_error(capsys, [*TRAIN, "--config", str(system), "--out", str(out)], "os:system")
    assert not called.exists() and not out.exists()
    with pytest.raises(ConfigError, match="--model"):
        TrainConfig.from_toml(config)
    assert not imported.exists()


def test_a_run_directorys_config_toml_needs_its_factory_named_again(capsys, tmp_path, factory):
    name, imported, called = factory
    run = tmp_path / "run"
    named = ["--model", name, "--model-args", json.dumps({"marker": str(called)})]
    assert main([*TRAIN, *named, "--out", str(run)]) == 0  # named here: imported and used
    assert imported.exists() and called.exists()
    imported.unlink()
    called.unlink()
    sys.modules.pop(name.split(":")[0], None)
    again = ["--config", str(run / "config.toml")]
    one_line_error(capsys, [*TRAIN, *again, "--out", str(tmp_path / "b")], f"--model {name}")
    assert not imported.exists() and not called.exists() and not (tmp_path / "b").exists()
    assert main([*TRAIN, *again, "--model", name, "--out", str(tmp_path / "c")]) == 0
    assert called.exists()  # the same factory named on the command line: used
