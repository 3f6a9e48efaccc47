"""The README's results: for each shipped results folder, its verdict table and one generated
paragraph per claim, written between the folder's markers so that every number and every
word that states a result comes from the folder's ``results.json``.

``python -m nonsingular.experiment.report.readme README.md`` rewrites every marked block in
place (``make readme``); ``tests/test_docs.py`` checks that the README holds exactly what this
module generates from the committed results.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ...errors import ConfigError
from ...files import write_text
from ..config import FLIPS
from ..results import Results
from ..verdicts import UNDECIDED, FlipVerdict, Verdict, flips_text, interval_text, verdicts
from .summary import pct

START = "<!-- results: {folder} -->"
END = "<!-- end results: {folder} -->"
BLOCK = re.compile(r"<!-- results: (\S+) -->\n(.*?)<!-- end results: \1 -->\n", re.S)
KIND = {"input": "input", "joint": "joint"}  # any other family is a weight family


def _kind(family: str) -> str:
    return KIND.get(family, "weight")


def _short(v: Verdict, previous: Verdict | None) -> str:
    """The claim as the table names it: the model, the direction and the kind of threat."""
    if v.family == FLIPS:
        return f"({v.claim}) {v.model} needs fewer bit flips to collapse than standard"
    if previous is not None and (previous.claim, previous.model) == (v.claim, v.model):
        return f"({v.claim}) same"
    return (
        f"({v.claim}) {v.model} is {v.direction} to {_kind(v.family)} perturbations than standard"
    )


def _shown(v: Verdict) -> str:
    decided = v.verdict not in (*UNDECIDED, "not run", "needs seeds", "excluded")
    words = f"**{v.verdict}**" if decided else v.verdict
    return words + (f" ({v.reason})" if v.verdict in ("not run", "excluded") else "")


def table(claims: list[Verdict], labels: dict[str, str]) -> list[str]:
    """The verdict table: a row per claim and family."""
    out = [
        "| claim | threat family | model | standard | difference (points) | 95% interval "
        "| p (Holm) | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for i, v in enumerate(claims):
        name = _short(v, claims[i - 1] if i else None)
        if v.difference is None:
            numbers = ["-"] * 5
        elif isinstance(v, FlipVerdict):
            numbers = [f"{v.metric_model:.1f} flips", f"{v.metric_standard:.1f} flips"]
            numbers += [f"{v.difference:+.1f} flips", flips_text(v.interval)]
            numbers += ["-" if v.p_holm is None else f"{v.p_holm:.2g}"]
        else:
            numbers = [pct(v.metric_model), pct(v.metric_standard)]  # type: ignore[arg-type]
            numbers += [f"{100 * v.difference:+.1f}", interval_text(v.interval)]
            numbers += ["-" if v.p_holm is None else f"{v.p_holm:.2g}"]
        out.append("| " + " | ".join([name, labels[v.family], *numbers, _shown(v)]) + " |")
    return out


def _cell(entry: dict) -> str:
    parts = [f"eps_x = {entry['eps_x']:g}"] if entry["eps_x"] else []
    parts += [f"eps_w = {entry['eps_w']:g}"] if entry["eps_w"] else []
    return ", ".join(parts) or "no perturbation"


def _by_budget(v: Verdict) -> str:
    """Where the model is below standard, budget by budget (never "never" unless none is)."""
    kept = [c for c in v.per_cell if not c["floor"]]
    below = [c for c in kept if c["difference"] < 0]
    if not below:
        return f"It is below standard at none of the {len(kept)} budgets averaged."
    shown = "; ".join(
        f"{_cell(c)}: {100 * c['difference']:+.1f} points, interval {interval_text(c['interval'])}"
        for c in below[:3]
    )
    more = f", and {len(below) - 3} more" if len(below) > 3 else ""
    return (
        f"It is below standard at {len(below)} of the {len(kept)} budgets averaged ({shown}{more})."
    )


def paragraph(v: Verdict, labels: dict[str, str]) -> str:
    """One claim in words, every number from the verdict: the averaged difference with its
    interval and seeds, where it goes the other way, and the largest budget's accuracies (the
    model "still vulnerable" or not, a statement apart from "more vulnerable than standard")."""
    head = f"- **Claim {v.claim}, {v.model} against standard, {labels[v.family]}: {v.verdict}.**"
    if v.difference is None:
        return f"{head} {v.reason[0].upper() + v.reason[1:]}." if v.reason else head
    if isinstance(v, FlipVerdict):
        return flip_paragraph(v, head)
    ahead = sum(d > 0 for d in v.per_seed_differences)
    left = len(v.floor_cells)
    floor = f", {left} floor budget{'s' if left > 1 else ''} left out" if left else ""
    words = [
        head,
        f"Averaged over {len(v.cells)} budgets{floor}, {v.model} holds "
        f"{pct(v.metric_model)} and standard {pct(v.metric_standard)}: "  # type: ignore[arg-type]
        f"{100 * v.difference:+.1f} points (95% interval {interval_text(v.interval)}), "
        f"{v.model} ahead in {ahead} of {len(v.per_seed_differences)} seeds; "
        f"p {v.p:.2g} over seeds, {v.p_holm:.2g} after Holm.",
        _by_budget(v),
    ]
    last = v.per_cell[-1]
    words.append(
        f"At the largest budget ({_cell(last)}) {v.model} holds {pct(last['model'])} and "
        f"standard {pct(last['standard'])}."
    )
    return " ".join(words)


def flip_paragraph(v: FlipVerdict, head: str) -> str:
    """Claim 1 asked of bit flips in words, every number from the verdict."""
    fewer = sum(d < 0 for d in v.per_seed_differences)
    tested = "" if v.p is None else f"; p {v.p:.2g} over seeds, {v.p_holm:.2g} after Holm"
    target = "" if v.target is None else f" (to {pct(v.target)} or below)"
    seeds = ", ".join(
        f"{a} vs {b}" for a, b in zip(v.per_seed_model, v.per_seed_standard, strict=True)
    )
    return (
        f"{head} To collapse{target}, the shared bit search needs {v.metric_model:.1f} flips "
        f"of {v.model} on average and {v.metric_standard:.1f} of standard: "
        f"{v.difference:+.1f} flips (95% interval {flips_text(v.interval)}), {v.model} needing "
        f"fewer in {fewer} of {len(v.per_seed_differences)} seeds{tested}. Per seed "
        f"({v.model} vs standard): {seeds}."
    )


def sensitivity(results: Results, claims: list[Verdict]) -> str:
    """How many verdicts move with a stronger attack and with each other training recipe
    (the report's "Stronger attack" and "Sensitivity to the recipe" sections)."""
    words = []
    if results.experiment.stronger:
        before = verdicts(results, attack="default")
        after = verdicts(results, attack="stronger")
        moved = sum(b.verdict != a.verdict for b, a in zip(before, after, strict=True))
        words.append(
            f"decided at each family's key budget, {moved} of {len(before)} verdicts change "
            "with an attack twice as strong"
        )
    for recipe in (r for r in results.experiment.recipes if results.methods(r)):
        again = verdicts(results, recipe=recipe)
        attacked = [c for c in claims if c.family != FLIPS]  # the family: default recipe only
        moved = sum(a.verdict != c.verdict for a, c in zip(again, attacked, strict=True))
        words.append(
            f"on the models trained with the {recipe} recipe, {moved} of {len(attacked)} differ"
        )
    if not words:
        return ""
    return "- **Sensitivity:** " + "; ".join(words) + "."


def block(folder: str, results: Results) -> list[str]:
    """The README's lines for ``folder``: its markers, the table and a paragraph per claim."""
    claims = verdicts(results)
    labels = results.experiment.labels()
    lines = [
        START.format(folder=folder),
        *table(claims, labels),
        "",
        *[paragraph(v, labels) for v in claims],
    ]
    found = sensitivity(results, claims)
    return [*lines, *([found] if found else []), END.format(folder=folder)]


def read(root: Path, folder: str) -> Results:
    path = root / folder / "results.json"
    if not path.is_file():
        raise ConfigError(f"the README marks {folder}, which has no results.json")
    return Results.from_dict(json.loads(path.read_text()))


def rewritten(text: str, root: Path) -> str:
    """``text`` (a README) with every marked block generated again from its folder."""
    return BLOCK.sub(lambda m: "\n".join(block(m[1], read(root, m[1]))) + "\n", text)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the README's marked results blocks in place."""
    args = sys.argv[1:] if argv is None else argv
    readme = Path(args[0] if args else "README.md")
    text = readme.read_text()
    write_text(readme, rewritten(text, readme.parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
