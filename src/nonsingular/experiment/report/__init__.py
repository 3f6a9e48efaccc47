"""The reproduction's report: ``results.json``, PNG figures and ``report.md``, all from one
``Results``, so every number in the report is one in the JSON (the tests check it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...files import exclusive, write_json, write_text
from ...provenance import provenance
from ..effects import single_threat
from ..results import Results
from ..verdicts import Verdict, verdicts
from .figures import figures
from .flips import flip_figure, flip_summary
from .forest import forest_figures
from .summary import Summary, style, summarize
from .text import markdown

__all__ = ["Report", "Summary", "figures", "markdown", "style", "summarize", "write_report"]


@dataclass
class Report:
    """What ``write_report`` wrote: the report's path, the summary and the verdicts."""

    path: Path
    summary: Summary
    claims: list[Verdict]


def write_report(
    results: Results, out: str | Path, command: list[str] | None = None, *, rewrite: bool = False
) -> Report:
    """Record the provenance in ``results``; write the figures, ``results.json`` (with the
    summary and the verdicts) and ``report.md``. ``command``: the arguments after
    ``nonsingular`` (by default, this process's command). ``rewrite``: the report of results
    read back from a ``results.json``, written again by this code: the provenance stays the
    run's that measured them. Holds ``out``'s lock, so a directory holding a symbolic link, or
    written by another process, is refused before any write."""
    out = Path(out)
    if not (rewrite and results.run):
        results.run = {**provenance(command), "minutes": results.seconds / 60}
    summary = summarize(results)
    claims = verdicts(results)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        figure = figures(results, summary, out / "figures")
        figure.update(forest_figures(results, claims, out / "figures"))
        flips = flip_summary(results)  # only for runs with the bit-flip family
        if flips:
            figure["flips"] = flip_figure(results, flips, out / "figures")
        document = {
            **results.to_dict(),
            "summary": summary.to_dict(),
            "claims": [c.to_dict() for c in claims],
            "single_threat": [e.to_dict() for e in single_threat(results)],
            **({"bit_flips": [e.to_dict() for e in flips]} if flips else {}),
        }
        write_json(out / "results.json", document)
        path = write_text(out / "report.md", markdown(results, summary, claims, figure))
    return Report(path, summary, claims)
