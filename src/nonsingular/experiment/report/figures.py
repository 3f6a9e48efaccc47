"""The report's PNG figures, drawn with matplotlib's object API and written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed

from ...files import write_bytes
from ..effects import LEVEL
from ..results import Results, Spread
from ..stats import t_half_width
from .summary import Summary, caption, style

HEATMAP = "cividis"  # perceptually uniform and colour-blind safe (not red-green)


def _plot_lines(
    ax: Any, budgets: tuple[float, ...], lines: dict[str, Spread], label: str, seeds: int
) -> None:
    """A line per model (its mean over ``seeds``), with the 95% t interval of that mean as
    a band (``BAND``)."""
    for method, entry in lines.items():
        color, marker = style(method)
        ax.plot(
            budgets, [100 * v for v in entry.mean], marker=marker, ms=4, label=method, color=color
        )
        if entry.sd is not None and seeds > 1:
            half = [t_half_width(s, seeds, LEVEL) for s in entry.sd]
            ax.fill_between(
                budgets,
                [100 * (m - h) for m, h in zip(entry.mean, half, strict=True)],
                [100 * (m + h) for m, h in zip(entry.mean, half, strict=True)],
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
    _plot_lines(ax, budgets, summary.families["input"], "eps_x (linf)", results.seeds)
    ax.set_title("Input-only attacks")
    ax.legend(fontsize=8)
    return save_figure(fig, folder / "accuracy_vs_eps_x.png", caption(results))


def weights_figure(results: Results, summary: Summary, folder: Path) -> str:
    """Robust accuracy against eps_w in each weight-only family, a panel per family."""
    families = [f for f in results.experiment.families() if f.axis == "eps_w"]
    fig = Figure(figsize=(5 * len(families), 4))
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    for ax, family in zip(axes, families, strict=True):
        _plot_lines(ax, family.budgets, summary.families[family.name], "eps_w", results.seeds)
        ax.set_title(family.label.replace("weights only, ", ""), fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("Weight-only attacks in three views")
    return save_figure(fig, folder / "accuracy_vs_eps_w.png", caption(results))


def heatmap_figure(results: Results, summary: Summary, folder: Path, method: str) -> str:
    """One model's robust accuracy over the joint grid."""
    fig = Figure(figsize=(4.2, 3.6))
    _heatmap(fig.subplots(), results, summary.joint[method].mean, method)
    return save_figure(fig, folder / f"heatmap_{method}.png", caption(results, bands=False))


def panels(fig: Figure, count: int) -> list[Any]:
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
    for ax, method in zip(panels(fig, len(methods)), methods, strict=True):
        _heatmap(ax, results, summary.joint[method].mean, method)
    fig.suptitle("Joint attacks: robust accuracy (%) over eps_x x eps_w")
    return save_figure(fig, folder / "heatmaps.png", caption(results, bands=False))


def certified_figure(results: Results, summary: Summary, folder: Path) -> str:
    """Attacked (upper bound) and certified (lower bound) accuracy on the same examples, per
    model, against eps_x, a colour per eps_w; the last certificate, the tightest."""
    xs, ws = results.experiment.joint_eps_x, results.experiment.joint_eps_w
    certifier = results.experiment.certify[-1]
    methods = list(summary.joint)
    rows = -(-len(methods) // 3)
    fig = Figure(figsize=(4.2 * 3, 3.4 * rows))
    axes = panels(fig, len(methods))
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
    return save_figure(fig, folder / "attacked_vs_certified.png", text)


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


def save_figure(fig: Figure, path: Path, text: str) -> str:
    """Write ``fig`` as a PNG, atomically, with its caption ``text`` along the bottom."""
    fig.text(0.5, 0.005, text, ha="center", va="bottom", fontsize=7, color="#444444")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    write_bytes(path, png.getvalue())
    return f"{path.parent.name}/{path.name}"
