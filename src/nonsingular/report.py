"""The reproduction's report: ``results.json``, PNG figures and ``report.md``, all from one
``Results``, so every number in the report is one in the JSON (the tests check it)."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed

from .experiment import RECIPES, Measured, Results, Spread
from .files import exclusive, write_bytes, write_json, write_text
from .provenance import provenance
from .training import METHODS
from .verdicts import RULE, Verdict, verdicts

HEATMAP = "cividis"  # perceptually uniform and colour-blind safe (not red-green)


LOSS_NAMES = {
    "ce": "cross-entropy",
    "margin": "margin (CW) loss",
    "dlr": "DLR loss",
    "both": "cross-entropy then margin (CW) loss",
}


def _loss(name: str) -> str:
    return LOSS_NAMES.get(name, name)


def caption(results: Results, certified: bool = False, bands: bool = True) -> str:
    """What a figure shows: examples, seeds and, for line plots, what the bands are."""
    data = results.data
    n = data.certified_examples if certified else data.test_examples
    seeds = results.seeds
    text = f"{n} {data.name} test examples, {seeds} seed{'s' if seeds != 1 else ''}"
    if seeds > 1:
        text += "; mean over seeds" + ("; bands: ± 1 sd over seeds" if bands else "")
    return text


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


@dataclass
class Summary:
    """Means and spreads over seeds of everything the report's tables and figures show (the
    default recipe's models), per method."""

    clean: dict[str, Spread]
    families: dict[str, dict[str, Spread]]  # per one-axis family: per budget
    joint: dict[str, Spread]  # joint-grid matrices
    certified: dict[str, dict[str, Spread]]  # per certificate: joint-grid matrices
    certified_attacked: dict[str, Spread]  # the attack on the certified examples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(results: Results) -> Summary:
    """Every number the report shows, as mean and sd over seeds (``spread``, the one helper)."""
    methods = results.methods()

    def per_method(value: Callable[[Measured], Any]) -> dict[str, Spread]:
        return {m: results.over_seeds(m, value) for m in methods}

    return Summary(
        clean=per_method(lambda r: r.clean),
        families={
            f.name: per_method(lambda r, name=f.name: r.accuracy[name])
            for f in results.experiment.families()
        },
        joint=per_method(lambda r: r.joint),
        certified={
            c: per_method(lambda r, c=c: r.certified[c]) for c in results.experiment.certify
        },
        certified_attacked=per_method(lambda r: r.certified_attacked),
    )


def cell(entry: Spread, *index: int) -> str:
    """``mean`` (``± sd`` when there are several seeds) of one entry of a summary."""
    mean, sd = entry.at(*index).mean, entry.at(*index).sd
    return pct(mean) if sd is None else f"{pct(mean)} ± {100 * sd:.1f}"


def style(method: str) -> tuple[str, str]:
    """The colour and marker of ``method``'s lines: its registry entry's."""
    return METHODS[method].color, METHODS[method].marker


def _plot_lines(ax: Any, budgets: tuple[float, ...], lines: dict[str, Spread], label: str) -> None:
    for method, entry in lines.items():
        color, marker = style(method)
        ax.plot(
            budgets, [100 * v for v in entry.mean], marker=marker, ms=4, label=method, color=color
        )
        if entry.sd is not None:
            ax.fill_between(
                budgets,
                [100 * (m - s) for m, s in zip(entry.mean, entry.sd, strict=True)],
                [100 * (m + s) for m, s in zip(entry.mean, entry.sd, strict=True)],
                color=color,
                alpha=0.15,
            )
    ax.set_xticks(
        budgets, [f"{b:g}" for b in budgets], rotation=45 if len(budgets) > 4 else 0, fontsize=8
    )
    ax.set_xlabel(label)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)


def figures(results: Results, summary: Summary, folder: Path) -> dict[str, str]:
    """Write the PNG figures; return each one's path relative to the report, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "input": input_figure(results, summary, folder),
        "weights": weights_figure(results, summary, folder),
        "heatmaps": heatmaps_figure(results, summary, folder),
        "certified": certified_figure(results, summary, folder),
    }
    for method in summary.joint:
        paths[f"heatmap-{method}"] = heatmap_figure(results, summary, folder, method)
    return paths


def input_figure(results: Results, summary: Summary, folder: Path) -> str:
    """Robust accuracy against eps_x, a line per model."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    budgets = results.experiment.family("input").budgets
    _plot_lines(ax, budgets, summary.families["input"], "eps_x (linf)")
    ax.set_title("Input-only attacks")
    ax.legend(fontsize=8)
    return _save(fig, folder / "accuracy_vs_eps_x.png", caption(results))


def weights_figure(results: Results, summary: Summary, folder: Path) -> str:
    """Robust accuracy against eps_w in each weight-only family, a panel per family."""
    families = [f for f in results.experiment.families() if f.axis == "eps_w"]
    fig = Figure(figsize=(5 * len(families), 4))
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    for ax, family in zip(axes, families, strict=True):
        _plot_lines(ax, family.budgets, summary.families[family.name], "eps_w")
        ax.set_title(family.label.replace("weights only, ", ""), fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("Weight-only attacks in three views")
    return _save(fig, folder / "accuracy_vs_eps_w.png", caption(results))


def heatmap_figure(results: Results, summary: Summary, folder: Path, method: str) -> str:
    """One model's robust accuracy over the joint grid."""
    fig = Figure(figsize=(4.2, 3.6))
    _heatmap(fig.subplots(), results, summary.joint[method].mean, method)
    return _save(fig, folder / f"heatmap_{method}.png", caption(results, bands=False))


def _panels(fig: Figure, count: int) -> list[Any]:
    """``count`` panels, three to a row, the spare ones hidden."""
    cols = 3
    axes = list(fig.subplots(-(-count // cols), cols, squeeze=False).flat)
    for ax in axes[count:]:
        ax.axis("off")
    return axes[:count]


def heatmaps_figure(results: Results, summary: Summary, folder: Path) -> str:
    """Every model's joint-grid heatmap, side by side."""
    methods = list(summary.joint)
    rows = -(-len(methods) // 3)
    fig = Figure(figsize=(4.2 * 3, 3.6 * rows))
    for ax, method in zip(_panels(fig, len(methods)), methods, strict=True):
        _heatmap(ax, results, summary.joint[method].mean, method)
    fig.suptitle("Joint attacks: robust accuracy (%) over eps_x x eps_w")
    return _save(fig, folder / "heatmaps.png", caption(results, bands=False))


def certified_figure(results: Results, summary: Summary, folder: Path) -> str:
    """Attacked (upper bound) and certified (lower bound) accuracy on the same examples, per
    model, against eps_x, a colour per eps_w; the last certificate, the tightest."""
    xs, ws = results.experiment.joint_eps_x, results.experiment.joint_eps_w
    certifier = results.experiment.certify[-1]
    methods = list(summary.joint)
    rows = -(-len(methods) // 3)
    fig = Figure(figsize=(4.2 * 3, 3.4 * rows))
    axes = _panels(fig, len(methods))
    for ax, method in zip(axes, methods, strict=True):
        attacked = summary.certified_attacked[method].mean
        certified = summary.certified[certifier][method].mean
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
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Attacked (solid, upper bound) vs certified by {certifier} (dashed, lower bound)")
    text = caption(results, certified=True, bands=False)
    return _save(fig, folder / "attacked_vs_certified.png", text)


def _heatmap(ax: Any, results: Results, matrix: list[list[float]], title: str) -> None:
    xs, ws = results.experiment.joint_eps_x, results.experiment.joint_eps_w
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
    """Write ``fig`` as a PNG, atomically, with its caption ``text`` along the bottom."""
    fig.text(0.5, 0.005, text, ha="center", va="bottom", fontsize=7, color="#444444")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    write_bytes(path, png.getvalue())
    return f"{path.parent.name}/{path.name}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(
    results: Results, summary: Summary, claims: list[Verdict], figure: dict[str, str]
) -> str:
    """The report: one section per function, in reading order (``figure``: the figures'
    paths, by name)."""
    labels = results.experiment.labels()
    sections = [
        header(results),
        verdict_section(claims, labels),
        stronger_attack(results, labels),
        recipe_section(results, claims, labels),
        what_was_run(results),
        clean_section(results, summary),
        families_section(results, summary, figure),
        joint_section(results, summary, figure),
        certified_section(results, summary, figure),
        matched_section(results),
        checks_section(results, summary),
    ]
    return "\n".join(line for section in sections for line in section) + "\n"


def header(results: Results) -> list[str]:
    run = results.run or provenance()
    models = results.models
    evaluations = sum(m.evaluations_computed + m.evaluations_reused for m in models)
    return [
        f"# Non-singular robustness on {results.data.name}: the paper's claims, measured",
        "",
        f"Generated by `{run['command']}` on {run['date']} on {run['machine']} "
        f"(nonsingular {run['nonsingular']}, torch {run['torch']}). Training and "
        f"evaluation took {results.compute_seconds / 60:.1f} minutes of compute; this "
        f"invocation ran {results.seconds:.0f} s and reused {sum(m.reused for m in models)} "
        f"of {len(models)} trained models and {sum(m.evaluations_reused for m in models)} of "
        f"{evaluations} evaluations from earlier runs in its directory. "
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


def what_was_run(results: Results) -> list[str]:
    exp, data, attack = results.experiment, results.data, results.experiment.attack_options()
    return [
        "## What was run",
        "",
        f"- Data: {data.name}, {data.test_examples} held-out test examples for attacks, "
        f"the first {data.certified_examples} of them for certificates.",
        "- Methods: " + "; ".join(f"{m} ({METHODS[m].label})" for m in exp.methods) + ".",
        f"- Models: the same {exp.model} for every method, {exp.epochs} epochs, "
        f"{exp.seeds} seed{'s' if exp.seeds > 1 else ''} (mean ± sd over seeds where there "
        "are several). Per-method training budgets: `nonsingular train --help` and each "
        "run's `config.json` under `models/`. A model below "
        f"{pct(exp.min_clean)} clean accuracy is flagged and kept out of verdicts.",
        f"- Attacks: PGD-{attack['steps']}, {attack['restarts']} restart(s) per loss, "
        f"{_loss(attack['loss'])}, per-example best-so-far (an example counts as broken if "
        "any run broke it); shared-scope points attack the whole test set with one "
        "perturbation.",
        f"- Certificates: {', '.join(exp.certify)} on the joint grid "
        f"(crown's pre-activation bounds by {exp.intermediate}), in {exp.cert_dtype}.",
        "- Budgets: each grid runs from no perturbation to one at which the standard "
        "model is near zero accuracy, so every curve shows the whole fall (see the span "
        "check below).",
        "",
    ]


def clean_section(results: Results, summary: Summary) -> list[str]:
    floor = results.experiment.min_clean
    rows = []
    for m in results.methods():
        seconds = results.over_seeds(m, lambda r: r.train_seconds).mean
        low = summary.clean[m].mean < floor
        flag = f"**below {pct(floor)}: kept out of verdicts**" if low else ""
        rows.append([m, cell(summary.clean[m]), f"{seconds:.1f}", flag])
    head = ["model", "clean accuracy (attacked test examples)", "training seconds", "flag"]
    return ["## Clean accuracy", "", _table(head, rows), ""]


def families_section(results: Results, summary: Summary, figure: dict[str, str]) -> list[str]:
    """A table per one-axis family (and its figure, where it has one)."""
    out = []
    drawn = {"input": ("accuracy vs eps_x", "input"), "weight-absolute": ("three views", "weights")}
    for family in results.experiment.families():
        out += [f"## {family.label[0].upper() + family.label[1:]}", ""]
        if family.name in drawn:
            alt, key = drawn[family.name]
            out += [f"![{alt}]({figure[key]})", "", f"*{caption(results)}.*", ""]
        head = ["model"] + [f"{family.axis}={b:g}" for b in family.budgets]
        rows = [
            [m] + [cell(summary.families[family.name][m], i) for i in range(len(family.budgets))]
            for m in results.methods()
        ]
        out += [_table(head, rows), ""]
    return out


def _grid_table(results: Results, entries: dict[str, Spread]) -> str:
    """One row per (model, eps_x), one column per eps_w: readable at a glance."""
    xs, ws = results.experiment.joint_eps_x, results.experiment.joint_eps_w
    head = ["model", "eps_x"] + [f"eps_w={w:g}" for w in ws]
    rows = [
        [m, f"{x:g}"] + [cell(entries[m], i, j) for j in range(len(ws))]
        for m in results.methods()
        for i, x in enumerate(xs)
    ]
    return _table(head, rows)


def joint_section(results: Results, summary: Summary, figure: dict[str, str]) -> list[str]:
    links = ", ".join(f"[{m}]({figure[f'heatmap-{m}']})" for m in results.methods())
    return [
        "## Joint attacks",
        "",
        f"![joint heatmaps]({figure['heatmaps']})",
        "",
        f"*{caption(results, bands=False)}; cells: robust accuracy (%).*",
        "",
        f"Per-model heatmaps: {links}.",
        "",
        "Robust accuracy under joint attacks:",
        "",
        _grid_table(results, summary.joint),
        "",
    ]


def certified_section(results: Results, summary: Summary, figure: dict[str, str]) -> list[str]:
    n = results.data.certified_examples
    out = [
        "## Attacked vs certified",
        "",
        f"![attacked vs certified]({figure['certified']})",
        "",
        f"*{caption(results, certified=True, bands=False)}; solid: attacked (an upper bound), "
        "dashed: certified (a lower bound).*",
        "",
    ]
    for c in results.experiment.certify:
        out += [f"Certified by {c}, on the first {n} test examples:", ""]
        out += [_grid_table(results, summary.certified[c]), ""]
    out += [
        "Attacked accuracy on the same examples (the upper bound the certificates sit under):",
        "",
        _grid_table(results, summary.certified_attacked),
        "",
        "The gap: attacked minus certified accuracy on the same examples, in points (what no "
        "bound here can decide), its mean over the joint grid and its largest, with where:",
        "",
        gap_table(results, summary),
        "",
    ]
    return out


def gap_table(results: Results, summary: Summary) -> str:
    """Per model and certificate: attacked minus certified accuracy (mean over seeds), in
    points, averaged over the joint grid, and its largest value with its budgets."""
    xs, ws = results.experiment.joint_eps_x, results.experiment.joint_eps_w
    rows = []
    for m in results.methods():
        row = [m]
        for c in results.experiment.certify:
            gaps = [
                (100 * (a - b), x, w)
                for attacked, certified, x in zip(
                    summary.certified_attacked[m].mean,
                    summary.certified[c][m].mean,
                    xs,
                    strict=True,
                )
                for a, b, w in zip(attacked, certified, ws, strict=True)
            ]
            largest = max(gaps, key=lambda g: g[0])
            mean = sum(g[0] for g in gaps) / len(gaps)
            row.append(f"{mean:.1f}; {largest[0]:.1f} at ({largest[1]:g}, {largest[2]:g})")
        rows.append(row)
    head = ["model"] + [f"{c}: mean; largest at (eps_x, eps_w)" for c in results.experiment.certify]
    return _table(head, rows)


def matched_section(results: Results) -> list[str]:
    """Every model under every method's own training threat: each comparison on the terms
    the method trained for (its own threat in bold)."""
    threats = results.experiment.training_threats()
    if not threats:
        return []
    head = ["model"] + [f"{m}'s: {t.describe()}" for m, t in threats.items()]
    rows = []
    for model in results.methods():
        row = [model]
        for trained in threats:
            value = pct(results.over_seeds(model, lambda r, t=trained: r.matched[t]).mean)
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


def checks_section(results: Results, summary: Summary) -> list[str]:
    out = ["## Checks", ""]
    floor = 1.5 / results.data.classes
    for family in results.experiment.families():
        top = summary.families[family.name]["standard"].mean[-1]
        # one shared perturbation for every example cannot push accuracy much below chance
        limit = floor if results.experiment.shared(family.name) else 0.05
        verdict = "reaches" if top <= limit else "does NOT reach"
        out.append(
            f"- Span, {family.name}: the standard model at the largest budget "
            f"({family.budgets[-1]:g}) has {pct(top)}: {verdict} near zero "
            f"(<= {pct(limit)}{', near chance: one shared Delta' if limit == floor else ''})."
        )
    warnings = results.warnings
    out.append(
        "- Evaluation checks (attacked above clean, loss never moved, accuracy rising "
        "with the budget, certified examples broken): "
        f"{'none' if not warnings else f'{len(warnings)} warning(s):'}"
    )
    out += [f"  - {w}" for w in warnings]
    return out


def _survived(bits: str) -> float:
    return bits.count("1") / len(bits)


def stronger_attack(results: Results, labels: dict[str, str]) -> list[str]:
    """The "Stronger attack" section: each family's key budget attacked again with twice the
    steps and restarts; accuracies under both, and the claims decided at those budgets under
    each, so that a verdict resting on a weak attack shows."""
    exp = results.experiment
    if not exp.stronger:
        return []
    default, strong = exp.attack_options(), exp.attack_options(2)
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
    methods = results.methods()
    rows = []
    for family, t in exp.key_threats().items():
        cells = []
        for m in methods:
            before = results.over_seeds(m, lambda r, f=family: _survived(r.stronger[f].default))
            after = results.over_seeds(m, lambda r, f=family: _survived(r.stronger[f].stronger))
            cells.append(f"{pct(before.mean)} → {pct(after.mean)}")
        rows.append([family, f"eps_x={t.eps_x:g}, eps_w={t.eps_w:g}", *cells])
    out += [_table(["family", "key budget", *methods], rows), ""]
    before = verdicts(results, attack="default")
    after = verdicts(results, attack="stronger")
    changed = [b for b, a in zip(before, after, strict=True) if b.verdict != a.verdict]
    pairs = zip(before, after, strict=True)
    out += [
        "The claims decided at the key budgets alone, by the rule above:",
        "",
        _table(
            ["claim", "threat family", "default attack", "stronger attack"],
            [[b.claim, labels[b.family], _decided(b), _decided(a)] for b, a in pairs],
        ),
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


def recipe_section(results: Results, claims: list[Verdict], labels: dict[str, str]) -> list[str]:
    """The claims decided again on the models each other training recipe made, beside the
    default recipe's verdicts: a claim that moves with the recipe rests on it."""
    recipes = [r for r in results.experiment.recipes if results.methods(r)]
    if not recipes:
        return []
    decided = {r: verdicts(results, recipe=r) for r in recipes}
    head = ["claim", "threat family", "default recipe"] + [
        f"{r} ({', '.join(f'{k}={v}' for k, v in RECIPES[r].items())})" for r in recipes
    ]
    rows = [
        [c.claim, labels[c.family], _decided(c)] + [_decided(decided[r][i]) for r in recipes]
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


def _decided(v: Verdict) -> str:
    """A verdict and its difference, in a few words."""
    points = "-" if v.difference is None else f"{100 * v.difference:+.1f} points"
    return f"{v.verdict} ({points})"


@dataclass
class Report:
    """What ``write_report`` wrote: the report's path, the summary and the verdicts."""

    path: Path
    summary: Summary
    claims: list[Verdict]


def write_report(results: Results, out: str | Path, command: list[str] | None = None) -> Report:
    """Record the provenance in ``results``; write the figures, ``results.json`` (with the
    summary and the verdicts) and ``report.md``. ``command``: the arguments after
    ``nonsingular`` (by default, this process's command). Holds ``out``'s lock, so a directory
    holding a symbolic link, or written by another process, is refused before any write."""
    out = Path(out)
    results.run = {**provenance(command), "minutes": results.seconds / 60}
    summary = summarize(results)
    claims = verdicts(results)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        figure = figures(results, summary, out / "figures")
        document = {
            **results.to_dict(),
            "summary": summary.to_dict(),
            "claims": [c.to_dict() for c in claims],
        }
        write_json(out / "results.json", document)
        path = write_text(out / "report.md", markdown(results, summary, claims, figure))
    return Report(path, summary, claims)
