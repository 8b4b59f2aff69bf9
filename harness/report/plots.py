"""Matplotlib figures for the report, returned as ``data:image/png;base64,...`` URIs.

Plots take plain data (no records) so each can be tested and reused on its own. Figures
are built with ``matplotlib.figure.Figure`` and drawn by the Agg canvas directly: no
pyplot, no global backend switch, nothing left open.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

DPI = 110
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22"]


def png_data_uri(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def tokens_label(n: float) -> str:
    """2048 -> '2K', 1536 -> '1.5K', 1048576 -> '1M', 300 -> '300'."""
    n = int(n)
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % (size // 4) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]
    failed: list[tuple[float, str]] = field(default_factory=list)  # (x, status) of cells with no value


@dataclass
class VLine:
    x: float
    label: str
    color: str = "#555555"


PRETRAIN_COLOR = "#444444"
FINETUNE_COLOR = "#b8860b"


def perplexity_vs_context(series: Sequence[Series], vlines: Sequence[VLine] = (), *,
                          title: str = "") -> str:
    """Perplexity (log y) against evaluation context (log2 x, ticks at measured lengths).

    Failed cells (OOM, timeout, error) are drawn as 'x' markers at the top of the axes
    with the status written next to them, in the series' colour.
    """
    fig = Figure(figsize=(8.2, 4.6))
    ax = fig.add_subplot()
    xs = sorted({x for s in series for x in s.x} | {x for s in series for x, _ in s.failed})
    ys = [y for s in series for y in s.y]
    for i, s in enumerate(series):
        pts = sorted(zip(s.x, s.y, strict=True))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=5, lw=1.8,
                    color=color(i), label=s.label)
        elif s.failed:
            ax.plot([], [], marker="o", color=color(i), label=s.label)  # legend entry only
    ax.set_xscale("log", base=2)
    if ys:
        ax.set_yscale("log")
    if xs:
        lo, hi = min(xs + [v.x for v in vlines]), max(xs + [v.x for v in vlines])
        ax.set_xlim(lo / 1.25, hi * 1.25)
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tokens_label(v)))
        ax.xaxis.set_minor_locator(NullLocator())
    if ys:
        lo, hi = min(ys), max(ys)
        ax.set_ylim(lo / 1.12, hi * 1.25)
        _readable_log_ticks(ax, lo / 1.12, hi * 1.25)
    trans = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for v in vlines:  # labelled in the legend: text on the plot would collide with the data
        ax.axvline(v.x, ls=(0, (1.5, 2.5)), lw=1.6, color=v.color, zorder=0, label=v.label)
    for i, s in enumerate(series):
        for x, status in s.failed:
            ax.plot([x], [0.94], marker="X", ms=9, color=color(i), transform=trans, clip_on=False,
                    linestyle="none")
            ax.annotate(status.upper(), (x, 0.94), xycoords=trans, xytext=(6, -3),
                        textcoords="offset points", fontsize=8, color=color(i))
    ax.set_xlabel("evaluation context (tokens)")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(True, which="major", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if series:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return png_data_uri(fig)


def _readable_log_ticks(ax, lo: float, hi: float) -> None:
    """Plain-number ticks on a log y axis spanning less than a few decades."""
    import math

    if hi / lo > 1000:
        return
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ticks: list[float] = []
    for mantissas in ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 1.5, 2, 3, 4, 5, 7), (1, 2, 3, 5), (1, 2, 5), (1,)):
        ticks = [m * 10.0**e for e in range(e0, e1 + 1) for m in mantissas if lo <= m * 10.0**e <= hi]
        if len(ticks) <= 6:
            break
    if len(ticks) < 2:
        return
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def loss_curves(curves: Sequence[tuple[str, Sequence[Sequence[float]]]]) -> str:
    """Training loss against step, one line per (label, [[step, loss], ...])."""
    fig = Figure(figsize=(8.2, 4.0))
    ax = fig.add_subplot()
    for i, (label, pts) in enumerate(curves):
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.5, color=color(i), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return png_data_uri(fig)
