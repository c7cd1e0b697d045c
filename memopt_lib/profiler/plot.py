"""Pictures of memory: a timeline of live bytes and stacked bars of what was alive at the peak."""
from __future__ import annotations

from typing import Mapping, Sequence

from .report import GiB, MemoryReport
from .tracker import CATEGORIES, PHASES

CATEGORY_COLORS = {"weights": "#4C72B0", "gradients": "#DD8452", "optimizer": "#55A868",
                   "activations": "#C44E52", "temporaries": "#8172B3", "unattributed": "#937860"}
PHASE_COLORS = {"forward": "#4C72B0", "backward": "#C44E52", "optimizer": "#55A868"}


def _plt():
    import matplotlib.pyplot as plt
    return plt


def plot_timeline(report: MemoryReport, ax=None):
    """Live bytes after every allocation/free, coloured by phase, with the peak marked."""
    plt = _plt()
    ax = ax or plt.subplots(figsize=(8, 3.5))[1]
    pts = report.timeline
    if not pts:
        ax.text(0.5, 0.5, "no timeline recorded", ha="center", transform=ax.transAxes)
        return ax
    for phase in PHASES:
        xs = [p.event for p in pts if p.phase == phase]
        ys = [p.live_bytes / GiB for p in pts if p.phase == phase]
        if xs:
            ax.scatter(xs, ys, s=2, color=PHASE_COLORS[phase], label=phase)
    ax.plot([p.event for p in pts], [p.live_bytes / GiB for p in pts], color="grey", lw=0.5, zorder=0)
    ax.axhline(report.tracker_peak_bytes / GiB, ls="--", color="black", lw=0.8,
               label=f"peak {report.tracker_peak_bytes / GiB:.3f} GiB")
    ax.set_xlabel("allocation/free event")
    ax.set_ylabel("live tensor memory (GiB)")
    ax.set_title(f"{report.label or 'step'} on {report.device}")
    ax.legend(loc="upper left", fontsize=8, markerscale=4)
    return ax


def plot_breakdowns(reports: Mapping[str, MemoryReport] | Sequence[MemoryReport], ax=None, title: str = ""):
    """Stacked bars: one bar per report, one colour per category of its peak."""
    plt = _plt()
    if not isinstance(reports, Mapping):
        reports = {r.label or f"#{i}": r for i, r in enumerate(reports)}
    ax = ax or plt.subplots(figsize=(max(4, 1.3 * len(reports) + 2), 4))[1]
    cats = list(CATEGORIES) + ["unattributed"]
    bottoms = [0.0] * len(reports)
    labels = list(reports)
    for cat in cats:
        vals = [reports[k].breakdown_bytes.get(cat, 0) / GiB for k in labels]
        if any(vals):
            ax.bar(labels, vals, bottom=bottoms, color=CATEGORY_COLORS[cat], label=cat)
            bottoms = [b + v for b, v in zip(bottoms, vals)]
    for i, k in enumerate(labels):
        ax.text(i, bottoms[i], f"{reports[k].peak_allocated_bytes / GiB:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("memory at peak (GiB)")
    ax.set_title(title or "what is alive at the peak")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=20)
    return ax


def plot_report(report: MemoryReport):
    """Timeline and breakdown side by side; returns the figure."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    plot_timeline(report, a)
    plot_breakdowns({"peak": report}, b)
    fig.tight_layout()
    return fig


def plot_predicted_vs_measured(predicted: Mapping[str, float], measured: Mapping[str, float], ax=None,
                               title: str = "predicted vs measured"):
    """Grouped bars per category (bytes in, GiB shown)."""
    plt = _plt()
    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    cats = list(dict.fromkeys(list(predicted) + list(measured)))
    xs = range(len(cats))
    ax.bar([x - 0.2 for x in xs], [predicted.get(c, 0) / GiB for c in cats], 0.4, label="predicted")
    ax.bar([x + 0.2 for x in xs], [measured.get(c, 0) / GiB for c in cats], 0.4, label="measured")
    ax.set_xticks(list(xs), cats, rotation=15)
    ax.set_ylabel("GiB")
    ax.set_title(title)
    ax.legend()
    return ax
