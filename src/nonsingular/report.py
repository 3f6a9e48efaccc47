"""The reproduction's report: ``results.json``, PNG figures and ``report.md``, all from one
results dict, so every number in the report is one in the JSON (the tests check it)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed

from .files import write_json, write_text
from .provenance import provenance
from .verdicts import RULE, Verdict, at_key_budgets, verdicts

# Okabe-Ito colours (told apart with any colour vision deficiency), and a marker per model so
# the lines also part in greyscale
COLORS = {
    "standard": "#000000",
    "pgd-at": "#0072B2",
    "awp": "#E69F00",
    "joint-at": "#009E73",
    "bound-reg": "#D55E00",
    "ibp": "#CC79A7",
}
MARKERS = {
    "standard": "o",
    "pgd-at": "s",
    "awp": "^",
    "joint-at": "D",
    "bound-reg": "v",
    "ibp": "P",
}
HEATMAP = "cividis"  # perceptually uniform and colour-blind safe (not red-green)


LOSS_NAMES = {
    "ce": "cross-entropy",
    "margin": "margin (CW) loss",
    "dlr": "DLR loss",
    "both": "cross-entropy then margin (CW) loss",
}


def _loss(name: str) -> str:
    return LOSS_NAMES.get(name, name)


def caption(results: dict[str, Any], certified: bool = False, bands: bool = True) -> str:
    """What a figure shows: examples, seeds and, for line plots, what the bands are."""
    data = results["data"]
    n = data["certified_examples"] if certified else data["test_examples"]
    seeds = len(next(iter(results["models"].values())))
    text = f"{n} {data['name']} test examples, {seeds} seed{'s' if seeds != 1 else ''}"
    if seeds > 1:
        text += "; mean over seeds" + ("; bands: ± 1 sd over seeds" if bands else "")
    return text


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _mean_sd(per_seed: dict[str, Any]) -> tuple[Any, Any]:
    """Mean and sd over seeds of numbers, lists or matrices (sd None for a single seed)."""
    values = list(per_seed.values())

    def combine(items: list[Any]) -> tuple[Any, Any]:
        if isinstance(items[0], list):
            pairs = [combine([item[i] for item in items]) for i in range(len(items[0]))]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        return statistics.fmean(items), (statistics.stdev(items) if len(items) > 1 else None)

    return combine(values)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Means and spreads over seeds of everything, plus the verdicts: what the report shows."""
    summary: dict[str, Any] = {"clean": {}, "views": {}, "joint": {}, "certified": {}}
    for method, seeds in results["models"].items():
        mean, sd = _mean_sd({s: info["clean"] for s, info in seeds.items()})
        summary["clean"][method] = {"mean": mean, "sd": sd}
    for name, view in results["views"].items():
        summary["views"][name] = {
            m: dict(zip(("mean", "sd"), _mean_sd(acc), strict=True))
            for m, acc in view["accuracy"].items()
        }
    summary["joint"] = {
        m: dict(zip(("mean", "sd"), _mean_sd(acc), strict=True))
        for m, acc in results["joint"]["accuracy"].items()
    }
    summary["certified"] = {
        c: {m: dict(zip(("mean", "sd"), _mean_sd(acc), strict=True)) for m, acc in per.items()}
        for c, per in results["certified"]["accuracy"].items()
    }
    summary["certified_attacked"] = {
        m: dict(zip(("mean", "sd"), _mean_sd(acc), strict=True))
        for m, acc in results["certified"]["attacked"].items()
    }
    return summary


def cell(entry: dict[str, Any], *index: int) -> str:
    """``mean`` (``± sd`` when there are several seeds) of one entry of a summary."""
    mean, sd = entry["mean"], entry["sd"]
    for i in index:
        mean, sd = mean[i], sd[i]
    return pct(mean) if sd is None else f"{pct(mean)} ± {100 * sd:.1f}"


def _plot_lines(ax: Any, budgets: list[float], summary: dict[str, Any], label: str) -> None:
    for method, entry in summary.items():
        mean, sd = entry["mean"], entry["sd"]
        ax.plot(
            budgets,
            [100 * v for v in mean],
            marker=MARKERS.get(method, "o"),
            ms=4,
            label=method,
            color=COLORS.get(method),
        )
        if sd[0] is not None:
            ax.fill_between(
                budgets,
                [100 * (m - s) for m, s in zip(mean, sd, strict=True)],
                [100 * (m + s) for m, s in zip(mean, sd, strict=True)],
                color=COLORS.get(method),
                alpha=0.15,
            )
    ax.set_xticks(
        budgets, [f"{b:g}" for b in budgets], rotation=45 if len(budgets) > 4 else 0, fontsize=8
    )
    ax.set_xlabel(label)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)


def figures(results: dict[str, Any], summary: dict[str, Any], folder: Path) -> dict[str, str]:
    """Write the PNG figures; return their paths relative to the report."""
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    views = results["views"]

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    _plot_lines(ax, views["input"]["budgets"], summary["views"]["input"], "eps_x (linf)")
    ax.set_title("Input-only attacks")
    ax.legend(fontsize=8)
    made["input"] = _save(fig, folder / "accuracy_vs_eps_x.png", caption(results))

    weight_views = [v for v in views if v.startswith("weight")]
    fig = Figure(figsize=(5 * len(weight_views), 4))
    axes = fig.subplots(1, len(weight_views), squeeze=False)[0]
    for ax, name in zip(axes, weight_views, strict=True):
        _plot_lines(ax, views[name]["budgets"], summary["views"][name], "eps_w")
        ax.set_title(views[name]["label"].replace("weights only, ", ""), fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("Weight-only attacks in three views")
    made["weights"] = _save(fig, folder / "accuracy_vs_eps_w.png", caption(results))

    xs, ws = results["joint"]["eps_x"], results["joint"]["eps_w"]
    methods = list(summary["joint"])
    for method in methods:
        fig = Figure(figsize=(4.2, 3.6))
        ax = fig.subplots()
        _heatmap(ax, summary["joint"][method]["mean"], xs, ws, method)
        made[f"heatmap-{method}"] = _save(
            fig, folder / f"heatmap_{method}.png", caption(results, bands=False)
        )
    cols = 3
    rows = -(-len(methods) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, method in zip(axes.flat, methods, strict=False):
        _heatmap(ax, summary["joint"][method]["mean"], xs, ws, method)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.suptitle("Joint attacks: robust accuracy (%) over eps_x x eps_w")
    made["heatmaps"] = _save(fig, folder / "heatmaps.png", caption(results, bands=False))

    certifier = results["certified"]["methods"][-1]
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, method in zip(axes.flat, methods, strict=False):
        attacked = summary["certified_attacked"][method]["mean"]  # the same examples
        certified = summary["certified"][certifier][method]["mean"]
        for j, w in enumerate(ws):
            color = matplotlib.colormaps["viridis"](j / max(1, len(ws) - 1))
            ax.plot(
                xs,
                [100 * row[j] for row in attacked],
                color=color,
                marker="o",
                ms=3,
                label=f"eps_w={w:g}",
            )
            ax.plot(xs, [100 * row[j] for row in certified], color=color, ls="--")
        ax.set_title(method)
        ax.set_xlabel("eps_x")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Attacked (solid, upper bound) vs certified by {certifier} (dashed, lower bound)")
    made["certified"] = _save(
        fig, folder / "attacked_vs_certified.png", caption(results, certified=True, bands=False)
    )
    return made


def _heatmap(
    ax: Any, matrix: list[list[float]], xs: list[float], ws: list[float], title: str
) -> None:
    values = [[100 * v for v in row] for row in matrix]
    ax.imshow(values, vmin=0, vmax=100, cmap=HEATMAP, aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):  # dark text on the light (yellow) end, light on the dark
            color = "black" if v > 60 else "white"
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(ws)), [f"{w:g}" for w in ws])
    ax.set_yticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_xlabel("eps_w (absolute, per-example)")
    ax.set_ylabel("eps_x (linf)")
    ax.set_title(title)


def _save(fig: Figure, path: Path, text: str) -> str:
    """Write ``fig`` with its caption ``text`` along the bottom."""
    fig.text(0.5, 0.005, text, ha="center", va="bottom", fontsize=7, color="#444444")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    return f"{path.parent.name}/{path.name}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(
    results: dict[str, Any],
    summary: dict[str, Any],
    claims: list[Verdict],
    made: dict[str, str],
) -> str:
    exp, run = results["experiment"], results["run"]
    views, methods = results["views"], list(summary["clean"])
    out = [
        f"# Non-singular robustness on {results['data']['name']}: the paper's claims, measured",
        "",
    ]
    reused = results["reused"]
    out.append(
        f"Generated by `{run['command']}` on {run['date']} on {run['machine']} "
        f"(nonsingular {run['nonsingular']}, torch {run['torch']}). Training and "
        f"evaluation took {results['compute_seconds'] / 60:.1f} minutes of compute; this "
        f"invocation ran {results['seconds']:.0f} s and reused {reused['models']} of "
        f"{reused['of_models']} trained models and {reused['evaluations']} of "
        f"{reused['of_evaluations']} evaluations from earlier runs in its directory. "
        "Every number below is in `results.json`; the verdicts are computed from those "
        "numbers by the rule stated under them."
    )
    out += ["", "## Verdicts", ""]

    def numbers(c: Verdict) -> list[str]:
        if c.verdict == "not run":
            return ["-", "-", "-", "-", "-", f"**not run** ({c.reason})"]
        p = "-" if c.p_holm is None else f"{c.p_holm:.3g}"
        verdict = f"**{c.verdict}**" + (f" ({c.reason})" if c.reason else "")
        return [
            pct(c.metric_model),
            pct(c.metric_standard),
            f"{100 * c.difference:+.1f}",
            p,
            f"{c.unit} ({c.seeds} seed{'s' if c.seeds != 1 else ''})",
            verdict,
        ]

    family = {name: view["label"] for name, view in views.items()}
    family["joint"] = "joint (eps_x x eps_w, absolute per-example)"
    rows = [[c.claim, c.statement, family[c.family], *numbers(c)] for c in claims]
    out.append(
        _table(
            [
                "claim",
                "statement",
                "threat family",
                "model",
                "standard",
                "difference (points)",
                "p (Holm)",
                "replicated over",
                "verdict",
            ],
            rows,
        )
    )
    out += ["", f"Rule: {RULE}", ""]
    out += stronger_attack(results, family)
    out += ["## What was run", ""]
    seeds = exp["seeds"]
    out.append(
        f"- Data: {results['data']['name']}, {results['data']['test_examples']} held-out "
        f"test examples for attacks, the first {results['data']['certified_examples']} of "
        "them for certificates."
    )
    out.append(
        f"- Models: the same {exp['model']} for every method, {exp['epochs']} epochs, "
        f"{seeds} seed{'s' if seeds > 1 else ''} (mean ± sd over seeds where there are "
        "several). Per-method training budgets: `nonsingular train --help` and each "
        "run's `config.json` under `models/`."
    )
    out.append(
        f"- Attacks: PGD-{results['attack']['steps']}, "
        f"{results['attack']['restarts']} restart(s) per loss, "
        f"{_loss(results['attack']['loss'])}, per-example "
        "best-so-far (an example counts as broken if any run broke it); shared-scope points "
        "attack the whole test set with one perturbation."
    )
    out.append(
        f"- Certificates: {', '.join(results['certified']['methods'])} on the joint grid (crown's "
        f"pre-activation bounds by {exp['intermediate']})."
    )
    out.append(
        "- Budgets: each grid runs from no perturbation to one at which the standard "
        "model is near zero accuracy, so every curve shows the whole fall (see the span "
        "check below)."
    )
    out += ["", "## Clean accuracy", ""]
    seconds = {
        m: statistics.fmean(i["train_seconds"] for i in results["models"][m].values())
        for m in methods
    }
    out.append(
        _table(
            ["model", "clean accuracy (attacked test examples)", "training seconds"],
            [[m, cell(summary["clean"][m]), f"{seconds[m]:.1f}"] for m in methods],
        )
    )
    for name, view in views.items():
        title = view["label"][0].upper() + view["label"][1:]
        out += ["", f"## {title}", ""]
        if name == "input":
            out.append(f"![accuracy vs eps_x]({made['input']})")
            out += ["", f"*{caption(results)}.*"]
        elif name == "weight-absolute":
            out.append(f"![accuracy vs eps_w, three views]({made['weights']})")
            out += ["", f"*{caption(results)}.*"]
        out.append("")
        header = ["model"] + [f"{view['axis']}={b:g}" for b in view["budgets"]]
        out.append(
            _table(
                header,
                [
                    [m] + [cell(summary["views"][name][m], i) for i in range(len(view["budgets"]))]
                    for m in methods
                ],
            )
        )
    xs, ws = results["joint"]["eps_x"], results["joint"]["eps_w"]
    out += ["", "## Joint attacks", "", f"![joint heatmaps]({made['heatmaps']})", ""]
    out += [f"*{caption(results, bands=False)}; cells: robust accuracy (%).*", ""]
    out.append(
        "Per-model heatmaps: " + ", ".join(f"[{m}]({made[f'heatmap-{m}']})" for m in methods) + "."
    )

    def grid_table(entries: dict[str, Any]) -> str:
        """One row per (model, eps_x), one column per eps_w: readable at a glance."""
        header = ["model", "eps_x"] + [f"eps_w={w:g}" for w in ws]
        rows = [
            [m, f"{x:g}"] + [cell(entries[m], i, j) for j in range(len(ws))]
            for m in methods
            for i, x in enumerate(xs)
        ]
        return _table(header, rows)

    out += ["", "Robust accuracy under joint attacks:", "", grid_table(summary["joint"])]
    out += [
        "",
        "## Attacked vs certified",
        "",
        f"![attacked vs certified]({made['certified']})",
        "",
        f"*{caption(results, certified=True, bands=False)}; solid: attacked (an upper bound), "
        "dashed: certified (a lower bound).*",
        "",
    ]
    for c in results["certified"]["methods"]:
        out += [
            f"Certified by {c}, on the first {results['data']['certified_examples']} "
            "test examples:",
            "",
            grid_table(summary["certified"][c]),
            "",
        ]
    out += [
        "Attacked accuracy on the same examples (the upper bound the certificates sit under):",
        "",
        grid_table(summary["certified_attacked"]),
    ]
    out += ["", "## Checks", ""]
    floor = 1.5 / results["data"]["classes"]
    for name, view in views.items():
        top = summary["views"][name]["standard"]["mean"][-1]
        # one shared perturbation for every example cannot push accuracy much below chance
        limit = floor if view["threat"].get("scope") == "shared" else 0.05
        verdict = "reaches" if top <= limit else "does NOT reach"
        out.append(
            f"- Span, {name}: the standard model at the largest budget "
            f"({view['budgets'][-1]:g}) has {pct(top)}: {verdict} near zero "
            f"(<= {pct(limit)}{', near chance: one shared Delta' if limit == floor else ''}"
            ")."
        )
    warnings = results.get("warnings", [])
    out.append(
        f"- Evaluation checks (attacked above clean, loss never moved, accuracy rising "
        f"with the budget, certified examples broken): "
        f"{'none' if not warnings else f'{len(warnings)} warning(s):'}"
    )
    out += [f"  - {w}" for w in warnings]
    return "\n".join(out) + "\n"


def stronger_attack(results: dict[str, Any], family: dict[str, str]) -> list[str]:
    """The "Stronger attack" section: each family's key budget attacked again with twice the
    steps and restarts; accuracies under both, and the claims decided at those budgets under
    each, so that a verdict resting on a weak attack shows."""
    if not results.get("stronger"):
        return []
    default, strong = results["attack"], results["stronger_attack"]
    out = [
        "## Stronger attack",
        "",
        f"Each family's key budget attacked again with PGD-{strong['steps']}, "
        f"{strong['restarts']} restarts per loss ({_loss(strong['loss'])}) "
        f"instead of PGD-{default['steps']}, {default['restarts']} restart(s); an example "
        "counts as robust under the stronger attack only if it survives both (for one shared "
        "perturbation: the outcomes of whichever broke more). Robust accuracy under each "
        "(mean over seeds):",
        "",
    ]
    methods = list(results["models"])
    rows = []
    for name, entry in results["stronger"].items():
        t = entry["threat"]
        cells = []
        for m in methods:
            found = entry["outcomes"][m]
            acc = {
                a: statistics.fmean(b[a].count("1") / len(b[a]) for b in found.values())
                for a in ("default", "stronger")
            }
            cells.append(f"{pct(acc['default'])} → {pct(acc['stronger'])}")
        rows.append([name, f"eps_x={t['eps_x']:g}, eps_w={t['eps_w']:g}", *cells])
    out += [_table(["family", "key budget", *methods], rows), ""]
    before, after = at_key_budgets(results, "default"), at_key_budgets(results, "stronger")
    changed = [b for b, a in zip(before, after, strict=True) if b.verdict != a.verdict]
    out.append("The claims decided at the key budgets alone, by the rule above:")
    out.append("")
    out.append(
        _table(
            ["claim", "threat family", "default attack", "stronger attack"],
            [
                [
                    b.claim,
                    family[b.family],
                    f"{b.verdict} ({_points(b)})",
                    f"{a.verdict} ({_points(a)})",
                ]
                for b, a in zip(before, after, strict=True)
            ],
        )
    )
    out += [
        "",
        f"**{len(changed)} of {len(before)} verdicts change with the stronger attack**"
        + (
            "."
            if not changed
            else ": " + ", ".join(f"claim {c.claim} ({c.family})" for c in changed) + "."
        ),
        "",
    ]
    return out


def _points(v: Verdict) -> str:
    return "-" if v.difference is None else f"{100 * v.difference:+.1f} points"


def write_report(
    results: dict[str, Any], out: str | Path, command: list[str] | None = None
) -> Path:
    """Add the provenance, summary and verdicts to ``results``; write figures, JSON and Markdown.
    ``command``: the arguments after ``nonsingular`` (by default, this process's command)."""
    out = Path(out)
    results["run"] = {**provenance(command), "minutes": results["seconds"] / 60}
    summary = summarize(results)
    claims = verdicts(results)
    results["summary"], results["claims"] = summary, [c.to_dict() for c in claims]
    made = figures(results, summary, out / "figures")
    write_json(out / "results.json", results)
    return write_text(out / "report.md", markdown(results, summary, claims, made))
