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
from .threat import Threat
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
    """The report: one section per function, in reading order."""
    labels = family_labels(results)
    sections = [
        header(results),
        verdict_section(claims, labels),
        stronger_attack(results, labels),
        recipe_section(results, claims, labels),
        what_was_run(results),
        clean_section(results, summary),
        views_section(results, summary, made),
        joint_section(results, summary, made),
        certified_section(results, summary, made),
        matched_section(results),
        checks_section(results, summary),
    ]
    return "\n".join(line for section in sections for line in section) + "\n"


def family_labels(results: dict[str, Any]) -> dict[str, str]:
    """What each threat family is called in the report."""
    labels = {name: view["label"] for name, view in results["views"].items()}
    labels["joint"] = "joint (eps_x x eps_w, absolute per-example)"
    return labels


def header(results: dict[str, Any]) -> list[str]:
    run, reused = results["run"], results["reused"]
    return [
        f"# Non-singular robustness on {results['data']['name']}: the paper's claims, measured",
        "",
        f"Generated by `{run['command']}` on {run['date']} on {run['machine']} "
        f"(nonsingular {run['nonsingular']}, torch {run['torch']}). Training and "
        f"evaluation took {results['compute_seconds'] / 60:.1f} minutes of compute; this "
        f"invocation ran {results['seconds']:.0f} s and reused {reused['models']} of "
        f"{reused['of_models']} trained models and {reused['evaluations']} of "
        f"{reused['of_evaluations']} evaluations from earlier runs in its directory. "
        "Every number below is in `results.json`; the verdicts are computed from those "
        "numbers by the rule stated under them.",
        "",
    ]


def verdict_section(claims: list[Verdict], labels: dict[str, str]) -> list[str]:
    def numbers(c: Verdict) -> list[str]:
        if c.verdict == "not run":
            return ["-"] * 6 + [f"**not run** ({c.reason})"]
        adjusted = c.difference_clean_adjusted
        return [
            pct(c.metric_model),
            pct(c.metric_standard),
            f"{100 * c.difference:+.1f}",
            "-" if adjusted is None else f"{100 * adjusted:+.1f}",
            "-" if c.p_holm is None else f"{c.p_holm:.3g}",
            f"{c.unit} ({c.seeds} seed{'s' if c.seeds != 1 else ''})",
            f"**{c.verdict}**" + (f" ({c.reason})" if c.reason else ""),
        ]

    head = ["claim", "statement", "threat family", "model", "standard", "difference (points)"]
    head += ["difference, clean-adjusted", "p (Holm)", "replicated over", "verdict"]
    rows = [[c.claim, c.statement, labels[c.family], *numbers(c)] for c in claims]
    return [
        "## Verdicts",
        "",
        _table(head, rows),
        "",
        f"Rule: {RULE} The clean-adjusted difference divides each model's robust accuracy by "
        "its clean accuracy first (robust among the examples it gets right); it is shown, "
        "not tested.",
        "",
    ]


def what_was_run(results: dict[str, Any]) -> list[str]:
    exp, data, attack = results["experiment"], results["data"], results["attack"]
    seeds = exp["seeds"]
    return [
        "## What was run",
        "",
        f"- Data: {data['name']}, {data['test_examples']} held-out test examples for attacks, "
        f"the first {data['certified_examples']} of them for certificates.",
        f"- Models: the same {exp['model']} for every method, {exp['epochs']} epochs, "
        f"{seeds} seed{'s' if seeds > 1 else ''} (mean ± sd over seeds where there are "
        "several). Per-method training budgets: `nonsingular train --help` and each "
        "run's `config.json` under `models/`. A model below "
        f"{pct(exp['min_clean'])} clean accuracy is flagged and kept out of verdicts.",
        f"- Attacks: PGD-{attack['steps']}, {attack['restarts']} restart(s) per loss, "
        f"{_loss(attack['loss'])}, per-example best-so-far (an example counts as broken if "
        "any run broke it); shared-scope points attack the whole test set with one "
        "perturbation.",
        f"- Certificates: {', '.join(results['certified']['methods'])} on the joint grid "
        f"(crown's pre-activation bounds by {exp['intermediate']}).",
        "- Budgets: each grid runs from no perturbation to one at which the standard "
        "model is near zero accuracy, so every curve shows the whole fall (see the span "
        "check below).",
        "",
    ]


def clean_section(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    floor = results["experiment"]["min_clean"]
    rows = []
    for m, seeds in results["models"].items():
        seconds = statistics.fmean(i["train_seconds"] for i in seeds.values())
        low = summary["clean"][m]["mean"] < floor
        flag = f"**below {pct(floor)}: kept out of verdicts**" if low else ""
        rows.append([m, cell(summary["clean"][m]), f"{seconds:.1f}", flag])
    head = ["model", "clean accuracy (attacked test examples)", "training seconds", "flag"]
    return ["## Clean accuracy", "", _table(head, rows), ""]


def views_section(
    results: dict[str, Any], summary: dict[str, Any], made: dict[str, str]
) -> list[str]:
    out = []
    figure = {
        "input": ("accuracy vs eps_x", "input"),
        "weight-absolute": ("three views", "weights"),
    }
    for name, view in results["views"].items():
        out += [f"## {view['label'][0].upper() + view['label'][1:]}", ""]
        if name in figure:
            alt, key = figure[name]
            out += [f"![{alt}]({made[key]})", "", f"*{caption(results)}.*", ""]
        head = ["model"] + [f"{view['axis']}={b:g}" for b in view["budgets"]]
        rows = [
            [m] + [cell(summary["views"][name][m], i) for i in range(len(view["budgets"]))]
            for m in results["models"]
        ]
        out += [_table(head, rows), ""]
    return out


def _grid_table(results: dict[str, Any], entries: dict[str, Any]) -> str:
    """One row per (model, eps_x), one column per eps_w: readable at a glance."""
    xs, ws = results["joint"]["eps_x"], results["joint"]["eps_w"]
    head = ["model", "eps_x"] + [f"eps_w={w:g}" for w in ws]
    rows = [
        [m, f"{x:g}"] + [cell(entries[m], i, j) for j in range(len(ws))]
        for m in results["models"]
        for i, x in enumerate(xs)
    ]
    return _table(head, rows)


def joint_section(
    results: dict[str, Any], summary: dict[str, Any], made: dict[str, str]
) -> list[str]:
    links = ", ".join(f"[{m}]({made[f'heatmap-{m}']})" for m in results["models"])
    return [
        "## Joint attacks",
        "",
        f"![joint heatmaps]({made['heatmaps']})",
        "",
        f"*{caption(results, bands=False)}; cells: robust accuracy (%).*",
        "",
        f"Per-model heatmaps: {links}.",
        "",
        "Robust accuracy under joint attacks:",
        "",
        _grid_table(results, summary["joint"]),
        "",
    ]


def certified_section(
    results: dict[str, Any], summary: dict[str, Any], made: dict[str, str]
) -> list[str]:
    n = results["data"]["certified_examples"]
    out = [
        "## Attacked vs certified",
        "",
        f"![attacked vs certified]({made['certified']})",
        "",
        f"*{caption(results, certified=True, bands=False)}; solid: attacked (an upper bound), "
        "dashed: certified (a lower bound).*",
        "",
    ]
    for c in results["certified"]["methods"]:
        out += [f"Certified by {c}, on the first {n} test examples:", ""]
        out += [_grid_table(results, summary["certified"][c]), ""]
    out += [
        "Attacked accuracy on the same examples (the upper bound the certificates sit under):",
        "",
        _grid_table(results, summary["certified_attacked"]),
        "",
    ]
    return out


def matched_section(results: dict[str, Any]) -> list[str]:
    """Every model under every method's own training threat: each comparison on the terms
    the method trained for (its own threat in bold)."""
    matched = results.get("matched")
    if not matched or not matched["threats"]:
        return []
    threats = matched["threats"]
    head = ["model"] + [f"{m}'s: {_describe(t)}" for m, t in threats.items()]
    rows = []
    for model, per_seed in matched["accuracy"].items():
        row = [model]
        for trained in threats:
            value = pct(statistics.fmean(seed[trained] for seed in per_seed.values()))
            row.append(f"**{value}**" if trained == model else value)
        rows.append(row)
    return [
        "## Matched comparisons",
        "",
        "Robust accuracy of every model under each method's own training threat (mean over "
        "seeds; the model's own threat in bold), so that a method is also judged on the "
        "threat it was built for, not only on the families above.",
        "",
        _table(head, rows),
        "",
    ]


def _describe(threat: dict[str, Any]) -> str:
    return Threat.from_dict(threat).describe()


def checks_section(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    out = ["## Checks", ""]
    floor = 1.5 / results["data"]["classes"]
    for name, view in results["views"].items():
        top = summary["views"][name]["standard"]["mean"][-1]
        # one shared perturbation for every example cannot push accuracy much below chance
        limit = floor if view["threat"].get("scope") == "shared" else 0.05
        verdict = "reaches" if top <= limit else "does NOT reach"
        out.append(
            f"- Span, {name}: the standard model at the largest budget "
            f"({view['budgets'][-1]:g}) has {pct(top)}: {verdict} near zero "
            f"(<= {pct(limit)}{', near chance: one shared Delta' if limit == floor else ''})."
        )
    warnings = results.get("warnings", [])
    out.append(
        "- Evaluation checks (attacked above clean, loss never moved, accuracy rising "
        "with the budget, certified examples broken): "
        f"{'none' if not warnings else f'{len(warnings)} warning(s):'}"
    )
    out += [f"  - {w}" for w in warnings]
    return out


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


def recipe_section(
    results: dict[str, Any], claims: list[Verdict], labels: dict[str, str]
) -> list[str]:
    """The claims decided again on the models each other training recipe made, beside the
    default recipe's verdicts: a claim that moves with the recipe rests on it."""
    recipes = results.get("recipes") or {}
    if not recipes:
        return []
    decided = {r: verdicts(part) for r, part in recipes.items()}
    head = ["claim", "threat family", "default recipe"] + [
        f"{r} ({', '.join(f'{k}={v}' for k, v in part['changes'].items())})"
        for r, part in recipes.items()
    ]
    rows = [
        [c.claim, labels[c.family], f"{c.verdict} ({_points(c)})"]
        + [f"{decided[r][i].verdict} ({_points(decided[r][i])})" for r in recipes]
        for i, c in enumerate(claims)
    ]
    moved = sum(
        any(decided[r][i].verdict != c.verdict for r in recipes) for i, c in enumerate(claims)
    )
    return [
        "## Sensitivity to the recipe",
        "",
        "The claims' models trained again with each other recipe, attacked the same way, and "
        "decided by the same rule (their own Holm correction):",
        "",
        _table(head, rows),
        "",
        f"**{moved} of {len(claims)} verdicts differ between recipes.**",
        "",
    ]


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
