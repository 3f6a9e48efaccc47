"""The README's results are the shipped results: every table marked with the results folder it
comes from shows that folder's verdicts and numbers, and each folder reads back as Results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nonsingular.experiment import Results

ROOT = Path(__file__).parent.parent
MARKER = re.compile(r"<!-- results: (\S+) -->")


def marked_tables() -> dict[str, list[list[str]]]:
    """Per marked results folder, the rows of the Markdown table that follows its marker."""
    lines = (ROOT / "README.md").read_text().splitlines()
    tables = {}
    for i, line in enumerate(lines):
        found = MARKER.search(line)
        if not found:
            continue
        rows = []
        for row in lines[i + 1 :]:
            if not row.startswith("|"):
                if rows:
                    break
                continue
            cells = [c.strip() for c in row.strip("|").split("|")]
            if cells[0] != "claim" and not set(cells[0]) <= {"-", ":"}:
                rows.append(cells)
        tables[found.group(1)] = rows
    return tables


def test_the_readme_marks_an_mlp_and_a_convolutional_run():
    models = {
        json.loads((ROOT / folder / "results.json").read_text())["experiment"]["model"]
        for folder in marked_tables()
    }
    assert "mlp" in models and models & {"cnn", "resnet"}


@pytest.mark.parametrize("folder", sorted(marked_tables()))
def test_the_readme_shows_the_verdicts_and_numbers_of_its_results(folder):
    document = json.loads((ROOT / folder / "results.json").read_text())
    results = Results.from_dict(document)  # the shipped file reads back
    assert results.models and (ROOT / folder / "report.md").exists()
    rows = marked_tables()[folder]
    claims = document["claims"]
    assert len(rows) == len(claims)
    for row, claim in zip(rows, claims, strict=True):
        shown = " ".join(row)
        assert claim["verdict"] in shown, (row, claim["verdict"])
        if claim["difference"] is not None and claim.get("metric") == "flips to collapse":
            assert f"{claim['difference']:+.1f} flips" in row, (row, claim["difference"])
            assert f"{claim['metric_model']:.1f} flips" in row
            assert f"{claim['metric_standard']:.1f} flips" in row
            low, high = claim["interval"]
            assert f"{low:+.1f} to {high:+.1f}" in row, (row, claim["interval"])
        elif claim["difference"] is not None:
            assert f"{100 * claim['difference']:+.1f}" in row, (row, claim["difference"])
            assert f"{100 * claim['metric_model']:.1f}%" in row
            assert f"{100 * claim['metric_standard']:.1f}%" in row
            low, high = (100 * b for b in claim["interval"])
            assert f"{low:+.1f} to {high:+.1f}" in row, (row, claim["interval"])


def test_the_readme_says_never_less_only_where_no_budget_is_below():
    """ "never less" (of a model against standard) only where, in every marked results folder,
    no budget of any claim has the model below standard."""
    readme = (ROOT / "README.md").read_text()
    for folder in marked_tables():
        document = json.loads((ROOT / folder / "results.json").read_text())
        cells = [cell for c in document["claims"] for cell in c["per_cell"]]
        if any(cell["difference"] < 0 for cell in cells):
            assert "never less" not in readme, folder


def test_every_document_the_source_cites_exists():
    """src/ (comments, docstrings, messages), docs/ and the README cite docs by path
    ("docs/models.md"), some with a section ("docs/models.md, 'Supported operations'"): each
    file and section exists, and nothing cites a design file the repository does not ship."""
    cited = re.compile(r"docs/([\w-]+\.md)(?:, '([^']+)')?")
    found = []
    sources = [*(ROOT / "src").rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    for path in sorted(sources):
        text = path.read_text()
        assert "DESIGN" not in text, f"{path.name} cites DESIGN, which is not shipped"
        for name, section in cited.findall(text):
            found.append(name)
            doc = ROOT / "docs" / name
            assert doc.exists(), f"{path.name} cites docs/{name}, which does not exist"
            if section:
                assert f"## {section}\n" in doc.read_text(), (path.name, name, section)
    assert "models.md" in found  # the unsupported-operation message


@pytest.mark.parametrize("folder", sorted(marked_tables()))
def test_the_shipped_report_is_regenerated_from_its_results_with_the_same_numbers(folder, tmp_path):
    """The report's code reads back what it wrote and writes it again unchanged: the same
    per-model numbers, summary, verdicts and Markdown, with the run's own provenance."""
    from nonsingular.experiment.report import write_report

    shipped = json.loads((ROOT / folder / "results.json").read_text())
    write_report(Results.from_dict(shipped), tmp_path, rewrite=True)
    assert json.loads((tmp_path / "results.json").read_text()) == shipped
    assert (tmp_path / "report.md").read_text() == (ROOT / folder / "report.md").read_text()


def test_the_readme_results_are_generated_from_the_shipped_results():
    """Every marked results block of the README (table and claim paragraphs) is exactly what
    ``report.readme`` generates from its folder's results.json: no result is written by hand."""
    from nonsingular.experiment.report import readme

    text = (ROOT / "README.md").read_text()
    assert len(readme.BLOCK.findall(text)) == len(marked_tables()) >= 2
    assert readme.rewritten(text, ROOT) == text, "run `make readme` after changing results"


def _verdict(differences: list[float]):
    from nonsingular.experiment.verdicts import Verdict

    cells = [
        {"eps_x": 0.0, "eps_w": w, "model": 0.5 + d, "standard": 0.5, "difference": d}
        | {"interval": [d - 0.01, d + 0.01], "floor": False}
        for w, d in zip((1e-3, 2e-3, 4e-3), differences, strict=False)
    ]
    mean = sum(differences) / len(differences)
    return Verdict(
        "1",
        "pgd-at is less robust than standard",
        "pgd-at",
        "weight-absolute",
        "less robust",
        "underpowered",
        seeds=3,
        metric_model=0.5 + mean,
        metric_standard=0.5,
        difference=mean,
        interval=(mean - 0.03, mean + 0.03),
        per_seed_differences=(mean, mean, -0.001),
        p=0.2,
        p_holm=0.4,
        cells=[{"eps_x": 0.0, "eps_w": c["eps_w"]} for c in cells],
        per_cell=cells,
    )


def test_the_claim_paragraph_says_where_a_model_is_below_standard():
    """The words follow the numbers: "none" only when no budget is below; otherwise how many
    and which, with their differences; seeds ahead counted from the per-seed differences."""
    from nonsingular.experiment.report.readme import paragraph

    labels = {"weight-absolute": "weights, absolute"}
    above = paragraph(_verdict([0.02, 0.01, 0.03]), labels)
    assert "below standard at none of the 3 budgets" in above
    assert "ahead in 2 of 3 seeds" in above and "+2.0 points (95% interval -1.0 to +5.0)" in above
    below = paragraph(_verdict([0.02, -0.004, 0.03]), labels)
    assert "none" not in below and "below standard at 1 of the 3 budgets" in below
    assert "eps_w = 0.002: -0.4 points, interval -1.4 to +0.6" in below
    assert "At the largest budget (eps_w = 0.004) pgd-at holds 53.0% and standard 50.0%" in below
