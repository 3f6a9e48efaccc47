"""The command line: readable results, and one line with exit code 2 for every bad input."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch

import nonsingular as ns
from nonsingular import checkpoint
from nonsingular.cli import main
from nonsingular.model.architectures import mlp


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, standard_mlp):
    return checkpoint.save(standard_mlp, tmp_path_factory.mktemp("ck") / "model.safetensors")


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_names_the_parameters_the_weight_threat_leaves(
    capsys, ckpt, standard_mlp, tmp_path
):
    common = ["evaluate", "--checkpoint", str(ckpt), "--test-size", "20", "--steps", "2"]
    common += ["--quiet", "--device", "cpu", "--eps-w", "0.002"]
    names = [n for n, _ in standard_mlp.named_parameters()]
    biases = [n for n in names if n.endswith(".bias")]
    assert biases
    out_path = tmp_path / "r.json"
    code, out, err = run(capsys, *common, "--out", str(out_path))
    assert code == 0, err
    assert f"moves {len(names) - len(biases)} parameters and leaves {len(biases)}" in out
    for name in biases:
        assert f"  {name}: a bias: moved with bias=True" in out
    written = json.loads(out_path.read_text())["weights"]  # the JSON says it too
    assert sorted(written["moved"]) == sorted(set(names) - set(biases))
    assert written["untouched"] == {name: "a bias: moved with bias=True" for name in biases}
    code, out, err = run(capsys, *common, "--bias")
    assert code == 0, err
    assert f"the weight threat moves every parameter ({len(names)})" in out


def test_evaluate_a_checkpoint_prints_a_table_and_writes_json(capsys, ckpt, tmp_path):
    out_path = tmp_path / "r.json"
    code, out, err = run(
        capsys,
        "evaluate",
        "--checkpoint",
        str(ckpt),
        "--test-size",
        "200",
        "--eps-x",
        "0,0.05",
        "--eps-w",
        "0,0.002",
        "--steps",
        "5",
        "--out",
        str(out_path),
        "--quiet",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "attacked accuracy (rows eps_x, columns eps_w)" in out
    assert "eps_x=0.05 (linf) + eps_w=0.002 (absolute linf, per-example)" in out
    result = json.loads(out_path.read_text())
    assert len(result["rows"]) == 4 and result["rows"][0]["n"] == 200
    assert result["attack"]["steps"] == 5
    assert result["rows"][3]["attacked"] <= result["rows"][1]["attacked"]
    about = result["provenance"]  # where the numbers came from
    assert about["command"].startswith("nonsingular evaluate --checkpoint")
    assert about["nonsingular"] == ns.__version__ and about["torch"] == torch.__version__
    assert about["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert about["data"] == {"name": "mnist5k", "split": "test", "split_seed": 0, "examples": 200}
    assert about["date"].endswith("+00:00")
    assert len(result["rows"][1]["outcomes"]["attacked"]) == 200


def test_evaluate_with_certified_columns_and_the_certify_command(capsys, ckpt, tmp_path):
    code, out, err = run(
        capsys,
        "evaluate",
        "--checkpoint",
        str(ckpt),
        "--test-size",
        "100",
        "--eps-x",
        "0,0.005",
        "--eps-w",
        "0,1e-5",
        "--steps",
        "5",
        "--certify",
        "ibp,crown",
        "--quiet",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "cert:crown" in out and "certified (crown) accuracy" in out and "WARNING" not in out
    out_path = tmp_path / "c.json"
    code, out, err = run(
        capsys,
        "certify",
        "--checkpoint",
        str(ckpt),
        "--test-size",
        "100",
        "--eps-x",
        "0.005",
        "--eps-w",
        "1e-5",
        "--method",
        "recursive,crown,bab",
        "--time-limit",
        "0.2",
        "--out",
        str(out_path),
        "--quiet",
        "--device",
        "cpu",
    )
    assert code == 0, err
    result = json.loads(out_path.read_text())
    assert result["certify"] == ["recursive", "crown", "bab"] and result["attack"] is None
    row = result["rows"][0]
    assert row["attacked"] is None
    assert 0 <= row["certified"]["recursive"] <= row["certified"]["crown"]
    assert row["certified"]["crown"] <= row["certified"]["bab"]
    assert row["certified"]["crown"] > 0.8
    assert "attacked" not in out and "certified (recursive) accuracy" in out


def test_bound_dtype_reaches_the_certificates(capsys, ckpt, monkeypatch):
    import nonsingular.cli.evaluate as cli_evaluate

    seen = []
    real = cli_evaluate.evaluate

    def recording(*args, **kwargs):
        seen.append(kwargs["certify_options"].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli_evaluate, "evaluate", recording)
    common = ["--checkpoint", str(ckpt), "--test-size", "10", "--eps-x", "0.005"]
    common += ["--eps-w", "1e-5", "--quiet", "--device", "cpu"]
    for command, extra in (("certify", []), ("evaluate", ["--steps", "2", "--certify", "crown"])):
        for flag, dtype in (([], torch.float64), (["--bound-dtype", "float32"], torch.float32)):
            code, out, err = run(capsys, command, *common, *extra, *flag)
            assert code == 0, err
            assert seen.pop() == dtype, (command, flag)
            assert "cert:crown" in out or "certified (crown)" in out


def test_train_quick_then_evaluate(capsys):
    code, out, err = run(
        capsys,
        "evaluate",
        "--train-quick",
        "--data",
        "digits",
        "--eps-x",
        "0.05",
        "--eps-w",
        "0.01",
        "--steps",
        "3",
        "--w-mode",
        "relative",
        "--scope",
        "shared",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "trained a standard MLP" in err and "clean test accuracy" in err
    assert "relative linf, shared" in out


def save_model(tmp_path, model, name):
    return str(checkpoint.save(model, tmp_path / f"{name}.safetensors"))


def bad_cases(tmp_path):
    five_classes = save_model(tmp_path, mlp((1, 28, 28), (8,), classes=5), "five")
    digits_model = save_model(tmp_path, mlp((1, 8, 8), (8,)), "digits")
    unknown = save_model(tmp_path, mlp((1, 28, 28), (8,)), "unknown")
    info = json.loads((tmp_path / "unknown.json").read_text())
    info["model"][2] = {"type": "PixelShuffle"}
    (tmp_path / "unknown.json").write_text(json.dumps(info))
    ok = save_model(tmp_path, mlp((1, 28, 28), (8,)), "ok")
    return {
        "negative eps": (["--checkpoint", ok, "--eps-x=-0.1"], "eps_x must be >= 0"),
        "nan eps": (["--checkpoint", ok, "--eps-w", "nan"], "eps_w must be finite"),
        "not a number": (["--checkpoint", ok, "--eps-w", "abc"], "comma-separated numbers"),
        "unknown data": (["--checkpoint", ok, "--data", "imagenet"], "imagenet"),
        "missing checkpoint": (["--checkpoint", str(tmp_path / "no.safetensors")], "not found"),
        "unsupported layer": (["--checkpoint", unknown], "PixelShuffle"),
        "label out of range": (["--checkpoint", five_classes], "labels must lie in [0, 4]"),
        "shape mismatch": (["--checkpoint", digits_model], "does not fit the model"),
        "no model": (["--eps-x", "0.1"], "one of the arguments --checkpoint --train-quick"),
        "bad method": (["--checkpoint", ok, "--method", "cw"], "invalid choice: 'cw'"),
        "zero steps": (["--checkpoint", ok, "--steps", "0"], "steps must be an integer from 1"),
        "unwritable out": (
            ["--checkpoint", ok, "--out", str(tmp_path / "no" / "r.json")],
            "does not exist",
        ),
        "bad device": (["--checkpoint", ok, "--device", "tpu9"], "device"),
        "unknown certificate": (["--checkpoint", ok, "--certify", "lp"], "unknown certificate"),
        "bad bound dtype": (["--checkpoint", ok, "--bound-dtype", "float16"], "'float16'"),
    }


def exit_code(args):
    """main()'s return code, or argparse's exit code for errors it catches itself."""
    try:
        return main(args)
    except SystemExit as stop:
        return stop.code


def test_every_bad_input_is_one_line_with_exit_code_2(capsys, tmp_path):
    for name, (args, message) in bad_cases(tmp_path).items():
        code = exit_code(["evaluate", "--quiet", "--test-size", "20", *args])
        _, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert code == 2, name
        assert len(lines) == 1, (name, err)
        assert message in lines[0], (name, lines[0])
        assert "Traceback" not in err


def test_certify_refuses_a_threat_its_method_cannot_bound(capsys, ckpt):
    code = exit_code(
        [
            "certify",
            "--checkpoint",
            str(ckpt),
            "--method",
            "closed-form",
            "--eps-w",
            "0.1",
            "--w-norm",
            "l2",
            "--quiet",
            "--test-size",
            "10",
        ]
    )
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "w_norm='l2'" in err


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nonsingular",
            "evaluate",
            "--checkpoint",
            str(tmp_path / "missing.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "checkpoint not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    help_ = subprocess.run(
        [sys.executable, "-m", "nonsingular", "evaluate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert help_.returncode == 0 and "--eps-w" in help_.stdout and "--scope" in help_.stdout


def test_nothing_already_written_is_lost_on_error(capsys, ckpt, tmp_path):
    out_path = tmp_path / "r.json"
    out_path.write_text('{"kept": true}')
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--eps-x",
            "0.1",
            "--eps-w",
            "-1",
            "--out",
            str(out_path),
            "--quiet",
        ]
    )
    assert code == 2
    assert json.loads(out_path.read_text()) == {"kept": True}
