import json

import pytest
import torch

import nonsingular as ns
from nonsingular import AttackOptions, ConfigError, InputError, Outcomes, Threat
from nonsingular.evaluation import EvaluationTable, Row, check, evaluate
from nonsingular.evaluation import run as evaluation


def test_grid_evaluation_table(mnist, standard_mlp, tmp_path):
    data = (mnist.x_test[:300], mnist.y_test[:300])
    g = ns.grid(eps_x=[0, 0.05], eps_w=[0, 1e-3])
    table = evaluate(standard_mlp, data, g, AttackOptions(steps=10), batch_size=128, progress=False)
    assert [(r.eps_x, r.eps_w) for r in table.rows] == [(0, 0), (0, 1e-3), (0.05, 0), (0.05, 1e-3)]
    direct = ns.attack(standard_mlp, *data, Threat(eps_x=0.05, eps_w=1e-3), steps=10)
    assert table.accuracy(0.05, 1e-3) == pytest.approx(direct.robust_accuracy, abs=0.01)
    assert all(r.n == 300 and r.attacked <= r.clean for r in table.rows)
    assert table.rows[0].attacked == table.rows[0].clean
    assert table.warnings == []
    xs, ws, cells = table.matrix()
    assert xs == [0, 0.05] and ws == [0, 1e-3] and cells[1][1] == table.accuracy(0.05, 1e-3)
    text = str(table)
    assert "attacked" in text and "eps_x=0.05 (linf) + eps_w=0.001" in text
    assert "eps_x \\ eps_w" in table.matrix_text()
    table.save(tmp_path / "t.json")
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["rows"][3]["attacked"] == table.accuracy(0.05, 1e-3)
    assert saved["attack"]["steps"] == 10
    assert json.loads(table.to_json()) == saved
    head, rule, *body = [
        [c.strip() for c in line.strip("|").split("|")] for line in table.to_markdown().splitlines()
    ]
    assert head == ["eps_x", "eps_w", "threat", "clean", "attacked"] and len(rule) == 5
    assert [(float(c[0]), float(c[1])) for c in body] == [(r.eps_x, r.eps_w) for r in table.rows]
    for cells, r in zip(body, table.rows, strict=True):
        assert cells[2] == r.threat.describe()
        assert float(cells[3].rstrip("%")) == pytest.approx(100 * r.clean, abs=0.05)
        assert float(cells[4].rstrip("%")) == pytest.approx(100 * r.attacked, abs=0.05)


def test_per_example_outcomes_are_each_examples_own_attack_and_certificate(mnist, standard_mlp):
    """Row.outcomes, example by example in data order: attacking or certifying example i alone
    (with its place in the data as its seed) gives the same outcome, whatever the batching."""
    x, y = mnist.x_test[:40], mnist.y_test[:40]
    threat = Threat(eps_x=0.03, eps_w=3e-4)
    options = AttackOptions(steps=8, restarts=2, loss="both")
    table = evaluate(
        standard_mlp, (x, y), [threat], options, certify=["ibp"], batch_size=16, progress=False
    )
    row = table.rows[0]
    assert set(row.outcomes) == {"clean", "attacked", "ibp"}
    assert row.attacked == pytest.approx(row.outcomes["attacked"].rate)
    assert 0 < row.outcomes["attacked"].count < 40  # a mix, or the check shows nothing
    for i in range(40):
        alone = ns.attack(
            standard_mlp, x[i : i + 1], y[i : i + 1], threat, options, positions=torch.tensor([i])
        )
        assert bool(row.outcomes["attacked"][i]) == (not bool(alone.success[0])), i
        cert = ns.certify(standard_mlp, x[i : i + 1], y[i : i + 1], threat, "ibp")
        assert bool(row.outcomes["ibp"][i]) == bool(cert.certified[0]), i
    saved = row.to_dict()["outcomes"]
    assert saved["attacked"] == "".join(
        "1" if row.outcomes["attacked"][i] else "0" for i in range(40)
    )
    assert Outcomes(saved["attacked"]).to_list() == row.outcomes["attacked"].to_list()
    with pytest.raises(InputError, match="0 and 1"):
        Outcomes("01x")


def test_shared_scope_uses_one_perturbation_for_the_whole_data(mnist, standard_mlp, monkeypatch):
    seen = []
    original = evaluation.run_attack

    def spy(model, x, *args, **kwargs):
        seen.append(len(x))
        return original(model, x, *args, **kwargs)

    monkeypatch.setattr(evaluation, "run_attack", spy)
    data = (mnist.x_test[:250], mnist.y_test[:250])
    evaluate(
        standard_mlp,
        data,
        [Threat(eps_w=1e-3, scope="shared"), Threat(eps_w=1e-3)],
        AttackOptions(steps=2),
        batch_size=100,
        progress=False,
    )
    assert seen == [250, 100, 100, 50]


def row(ex, ew, clean, attacked, moved=True, unsound=0):
    return Row(
        Threat(eps_x=ex, eps_w=ew),
        1000,
        clean,
        attacked,
        {"crown": 0.1},
        loss_moved=moved,
        unsound={"crown": unsound},
    )


def test_checks_flag_what_looks_broken():
    table = EvaluationTable(
        [
            row(0, 0, 0.9, 0.9),
            row(0.1, 0, 0.9, 0.5),
            row(0.2, 0, 0.9, 0.6),
            row(0, 1e-3, 0.9, 0.95),
            row(0, 2e-3, 0.9, 0.9, moved=False),
            row(0.3, 0, 0.9, 0.1, unsound=2),
        ],
        AttackOptions(),
    )
    found = check(table)
    assert any("rose from 50.0%" in w and "eps_x=0.2" in w for w in found)
    assert any("above clean" in w for w in found)
    assert any("never moved" in w and "eps_w=0.002" in w for w in found)
    assert any("2 examples certified by crown were broken" in w for w in found)
    healthy = EvaluationTable(
        [row(0, 0, 0.9, 0.9), row(0.1, 0, 0.9, 0.5), row(0.2, 0, 0.9, 0.502)], AttackOptions()
    )
    assert check(healthy) == []  # within one example's noise


def test_bad_arguments(mnist, standard_mlp):
    data = (mnist.x_test[:10], mnist.y_test[:10])
    with pytest.raises(ConfigError, match="grid"):
        evaluate(standard_mlp, data, [], progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate(standard_mlp, data, [Threat()], batch_size=0, progress=False)
    with pytest.raises(
        InputError, match="Dataset, an \\(x, y\\) pair of tensors, a torch.utils.data.Dataset"
    ):
        evaluate(standard_mlp, mnist.x_test, [Threat()], progress=False)
    with pytest.raises(InputError, match="no examples"):
        evaluate(
            standard_mlp,
            (torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)),
            [Threat()],
            progress=False,
        )


def test_certified_columns_sit_next_to_the_attacked_ones(mnist, standard_mlp):
    data = (mnist.x_test[:200], mnist.y_test[:200])
    g = ns.grid(eps_x=[0, 0.01], eps_w=[0, 1e-4])
    table = evaluate(
        standard_mlp, data, g, AttackOptions(steps=10), certify=["ibp", "crown"], progress=False
    )
    assert table.methods == ["ibp", "crown"] and table.warnings == []
    for r in table.rows:
        assert r.clean >= r.attacked >= r.certified["crown"] >= r.certified["ibp"]
        assert r.unsound == {"ibp": 0, "crown": 0}
        assert set(r.seconds) == {"attack", "ibp", "crown"}
    assert table.rows[0].certified["crown"] == table.rows[0].clean
    assert "cert:crown" in str(table) and "cert:ibp" in table.to_markdown()
    assert table.matrix("crown")[2][1][1] == table.accuracy(0.01, 1e-4, "crown")
    only = evaluate(standard_mlp, data, g, certify=["crown"], attack=None, progress=False)
    assert only.attack is None and "attacked" not in str(only)
    assert [r.certified for r in only.rows] == [{"crown": r.certified["crown"]} for r in table.rows]
    assert only.rows[0].clean == table.rows[0].clean
    with pytest.raises(ConfigError, match="unknown certificate method 'lp'"):
        evaluate(standard_mlp, data, g, certify=["lp"], progress=False)
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate(standard_mlp, data, g, attack=None, progress=False)


def test_a_table_reads_back_from_its_json(mnist, standard_mlp, tmp_path):
    data = (mnist.x_test[:30], mnist.y_test[:30])
    g = ns.grid(eps_x=[0, 0.05], eps_w=[1e-3], scope="per-example")
    table = evaluate(
        standard_mlp, data, g, AttackOptions(steps=3, loss="both"), certify=["ibp"], progress=False
    )
    table.save(tmp_path / "t.json")
    back = EvaluationTable.from_dict(json.loads((tmp_path / "t.json").read_text()))
    assert back.attack == AttackOptions(steps=3, loss="both")
    assert back.warnings == table.warnings and len(back.rows) == len(table.rows)
    for a, b in zip(back.rows, table.rows, strict=True):
        assert (a.threat, a.n, a.clean, a.attacked, a.certified) == (
            b.threat,
            b.n,
            b.clean,
            b.attacked,
            b.certified,
        )
        assert a.outcomes == b.outcomes and a.unsound == b.unsound and a.loss_moved == b.loss_moved
    assert str(back).splitlines()[:-1] == str(table).splitlines()[:-1]  # the times differ
    with pytest.raises(InputError, match="not an evaluation"):
        EvaluationTable.from_dict({"rows": [{"eps_x": 0}]})


def test_options_are_typed_and_checked_by_name(mnist, standard_mlp):
    data = (mnist.x_test[:10], mnist.y_test[:10])
    with pytest.raises(ConfigError, match="AttackOptions"):
        evaluate(standard_mlp, data, [Threat()], {"steps": 10}, progress=False)
    with pytest.raises(ConfigError, match="unknown attack options: stpes"):
        ns.attack(standard_mlp, *data, Threat(eps_x=0.1), stpes=10)
    with pytest.raises(ConfigError, match="random_start"):
        AttackOptions(random_start="yes")
    with pytest.raises(ConfigError, match="unknown certificate options: time"):
        ns.certify(standard_mlp, *data, Threat(eps_x=0.1), "ibp", time=3)
    with pytest.raises(ConfigError, match="intermediate"):
        ns.CertifyOptions(intermediate="bogus")
    stronger = AttackOptions(steps=7, restarts=2, loss="margin").stronger(3)
    assert (stronger.steps, stronger.restarts, stronger.loss) == (21, 6, "margin")
