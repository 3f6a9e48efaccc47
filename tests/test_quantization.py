"""Quantized models: the grid, the integers and scales read back, models quantized elsewhere,
checkpoints, and the arithmetic of one bit flip (checked against Python's own integers)."""

import pytest
import torch
from torch import nn

import nonsingular as ns
from nonsingular import checkpoint
from nonsingular.flips.grid import bit_changes, flip_integers, flipped_weights
from nonsingular.model.architectures import cnn, mlp


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return mlp((1, 6, 6), hidden=(12, 9), classes=4).to(dtype)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantize_puts_weights_on_the_symmetric_grid(granularity, dtype):
    model = _model(dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q_model = ns.quantize(model, bits=8, granularity=granularity)
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k])
    grid = ns.quantized(q_model)
    ints = grid.integers(q_model)
    assert set(ints) == {"1.weight", "3.weight", "5.weight"}
    for name, w in model.named_parameters():
        new = dict(q_model.named_parameters())[name]
        if name not in ints:  # biases stay float, untouched
            assert torch.equal(new, w)
            continue
        rows = w.detach().abs().flatten(1).amax(1) if granularity == "channel" else None
        top = rows[:, None] if rows is not None else w.detach().abs().max()
        scale = grid.scales[name]
        assert torch.equal(scale.expand_as(w), (top / 127).expand_as(w))
        q = ints[name]
        assert int(q.abs().max()) <= 127
        assert torch.equal(q, torch.round(w.detach() / scale).long())  # round(W / scale)
        assert torch.equal(new.detach(), q.to(dtype) * scale)  # exactly scale * q
        assert float((new - w).detach().abs().max()) <= float(scale.max()) / 2 * (1 + 1e-6)


def test_quantize_accepts_a_model_already_on_a_grid_and_rejects_one_off_it():
    model = _model()
    scales = {"1.weight": torch.full((12, 1), 0.01)}
    torch.manual_seed(1)
    q = torch.randint(-128, 128, (12, 36))
    with torch.no_grad():
        model[1].weight.copy_(q.float() * 0.01)
    on = ns.quantize(model, bits=8, scales=scales)
    assert torch.equal(ns.quantized(on).integers(on)["1.weight"], q)
    assert torch.equal(on[1].weight, model[1].weight)  # checked, never rounded
    with torch.no_grad():
        model[1].weight[3, 5] += 0.004  # off the grid
    with pytest.raises(ns.QuantizationError, match="not on its 8-bit grid"):
        ns.quantize(model, bits=8, scales=scales)
    with pytest.raises(ns.QuantizationError, match="not a parameter"):
        ns.quantize(model, scales={"9.weight": torch.ones(())})


@pytest.mark.parametrize(
    "kwargs", [{"bits": 1}, {"bits": 40}, {"granularity": "row"}, {"bits": 8.0}]
)
def test_quantize_rejects_bad_options(kwargs):
    with pytest.raises(ns.QuantizationError):
        ns.quantize(_model(), **kwargs)


def test_quantized_says_what_to_do_for_a_float_model():
    with pytest.raises(ns.QuantizationError, match="not quantized"):
        ns.quantized(_model())


def test_a_weight_edited_after_quantizing_is_not_trusted():
    q_model = ns.quantize(_model())
    with torch.no_grad():
        q_model[3].weight[0, 0] *= 1.001
    with pytest.raises(ns.QuantizationError, match="3.weight"):
        ns.quantized(q_model).integers(q_model)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bit_changes_match_twos_complement(bits):
    q = torch.arange(-(1 << (bits - 1)), 1 << (bits - 1))
    changes = bit_changes(q, bits)
    for value, row in zip(q.tolist(), changes.tolist(), strict=True):
        for b in range(bits):
            u = (value % (1 << bits)) ^ (1 << b)  # Python ints: the definition
            expected = u - (1 << bits) if u >= 1 << (bits - 1) else u
            assert value + row[b] == expected
    # several flips add up exactly, and flipping a bit twice restores it
    q2 = flip_integers(q, torch.tensor([1, 1, 2]), torch.tensor([0, bits - 1, 1]), bits)
    assert int(q2[1]) == int(q[1]) + int(changes[1, 0]) + int(changes[1, bits - 1])
    again = flip_integers(q2, torch.tensor([1, 1, 2]), torch.tensor([0, bits - 1, 1]), bits)
    assert torch.equal(again, q)


def test_flipped_weights_are_scale_times_the_flipped_integer():
    q_model = ns.quantize(_model())
    grid = ns.quantized(q_model)
    ints = grid.integers(q_model)
    new = flipped_weights(grid, ints, [("3.weight", 7, 7), ("3.weight", 7, 2)])["3.weight"]
    w = q_model[3].weight.detach()
    changed = (new != w).flatten().nonzero().flatten().tolist()
    assert changed == [7]
    q = int(ints["3.weight"].flatten()[7])
    u = (q % 256) ^ 0b10000100
    expected = torch.tensor(float(u - 256 if u >= 128 else u)) * grid.scales["3.weight"][0, 0]
    assert float(new.flatten()[7]) == float(expected)  # the product in the weight's dtype


@pytest.mark.parametrize("factory", [lambda: _model(), lambda: cnn((1, 8, 8), (4, 4), 10, 3)])
def test_checkpoint_round_trip_is_bit_exact_with_int8_integers(tmp_path, factory):
    torch.manual_seed(0)
    q_model = ns.quantize(factory(), bits=8)
    path = checkpoint.save(q_model, tmp_path / "q.safetensors")
    from safetensors.torch import load_file

    raw = load_file(path)
    for name in ns.quantized(q_model).names:
        assert raw[name].dtype == torch.int8
        assert name + "#scale" in raw
    loaded, info = checkpoint.load(path)
    assert info["quantization"]["bits"] == 8
    for k, v in q_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    grid = ns.quantized(loaded)
    for name, scale in ns.quantized(q_model).scales.items():
        assert torch.equal(grid.scales[name], scale)


def test_a_float_checkpoint_is_unchanged(tmp_path):
    path = checkpoint.save(_model(), tmp_path / "f.safetensors")
    loaded, info = checkpoint.load(path)
    assert "quantization" not in info
    with pytest.raises(ns.QuantizationError):
        ns.quantized(loaded)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"flips": 1, "eps_w": 0.01}, "eps_w and flips"),
        ({"flips": -1}, "flips must be an integer"),
        ({"flips": 1.5}, "flips must be an integer"),
        ({"flips": 1, "bits": (8, 8)}, "distinct"),
        ({"flips": 1, "bits": (16,)}, "bits must be an integer"),
        ({"flips": 1, "bits": "7"}, "list of bit positions"),
        ({"bits": (7,)}, "needs flips"),
        ({"flips": 1, "bias": True}, "biases stay float"),
    ],
)
def test_threat_rejects_bad_flip_budgets(kwargs, message):
    with pytest.raises(ns.ThreatError, match=message):
        ns.Threat(**kwargs)


def test_flip_threat_round_trips_and_leaves_other_threats_dicts_alone():
    t = ns.Threat(flips=3, bits=[7, 0], eps_x=0.1, scope="shared")
    assert t.bits == (0, 7)
    assert ns.Threat.from_dict(t.to_dict()) == t
    assert "3 bit flip(s) of bits 0,7" in t.describe()
    assert "flips" not in ns.Threat(eps_w=0.1).to_dict()


def _digits_checkpoint(tmp_path):
    torch.manual_seed(0)
    return checkpoint.save(mlp((1, 8, 8), hidden=(16,)), tmp_path / "float.safetensors")


def test_cli_quantize_writes_a_quantized_checkpoint(capsys, tmp_path):
    from nonsingular.cli import main

    source = _digits_checkpoint(tmp_path)
    out = tmp_path / "q8.safetensors"
    code = main(["quantize", "--checkpoint", str(source), "--data", "digits", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "8-bit (channel) clean accuracy" in printed and "float" in printed
    loaded, _ = checkpoint.load(out)
    assert ns.quantized(loaded).bits == 8
    expected = ns.quantize(checkpoint.load(source)[0])
    for k, v in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_cli_evaluates_a_grid_of_flips(capsys, tmp_path):
    from nonsingular.cli import main

    source = _digits_checkpoint(tmp_path)
    args = ["evaluate", "--checkpoint", str(source), "--data", "digits", "--test-size", "50"]
    code = main([*args, "--eps-x", "0", "--flips", "0,2", "--bits", "8", "--scope", "shared"])
    printed = capsys.readouterr().out
    assert code == 0 and "2 bit flip(s) (shared)" in printed
    for bad in (["--flip-bits", "7"], ["--flips", "1"], ["--flips", "1", "--bits", "1"]):
        assert main([*args, "--eps-x", "0", *bad, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err
