"""Matplotlib figures for the report, returned as ``data:image/png;base64,...`` URIs.

Plots take plain data (no records) so each can be tested and reused on its own. Figures
are built with ``matplotlib.figure.Figure`` and drawn by the Agg canvas directly: no
pyplot, no global backend switch, nothing left open.
"""

from __future__ import annotations

import base64
import functools
import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from matplotlib import rc_context
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


def _plain_text(plot):
    """`plot` with matplotlib's mathtext off: a "$" in a name (a run's directory, a model, a checkpoint) is a dollar
    sign, not TeX, which stopped the report where it did not parse."""

    @functools.wraps(plot)
    def drawn(*args, **kwargs):
        with rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return drawn


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
    color: str | None = None  # default: the palette colour of the series' position
    linestyle: str = "-"
    marker: str = "o"
    yerr: list[float] | None = None  # error bars (one sd over seeds), aligned with y
    partial: list[float] = field(default_factory=list)  # x of points that are means of fewer seeds than ran


@dataclass
class VLine:
    x: float
    label: str
    color: str = "#555555"


LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "^", "s", "D", "v", "P", "X", "*"]


def looks(groups: Sequence[tuple[str, str, str]], markers: bool = True) -> list[tuple[str, str, str]]:
    """(colour, line style, marker) per series, from what each is: (colour group, style group, marker group),
    say (backend, method, evaluation attention). Up to the palette's 10, each series gets a colour of its own;
    past that, colours would repeat, so each channel shows one group instead (the ablation's 28 variants: a
    colour per backend, a line style per method, a marker per evaluation attention). Groups beyond a channel's
    values cycle, and a series that would then look like an earlier one takes a marker, else a line style, that no
    group has (`distinct`). Without `markers` (lines only) the marker is "" and only the line style moves."""
    if len(groups) <= len(PALETTE):
        return [(color(i), "-", "o" if markers else "") for i in range(len(groups))]
    channels = [list(dict.fromkeys(g[i] for g in groups)) for i in range(3)]
    return distinct([(color(channels[0].index(a)), LINESTYLES[channels[1].index(b) % len(LINESTYLES)],
                      MARKERS[channels[2].index(c) % len(MARKERS)] if markers else "") for a, b, c in groups])


def distinct(wanted: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """(colour, line style, marker) looks, each that repeats an earlier one moved to the first look of its colour
    not yet taken: its line style with a spare marker, then a spare line style (spare: one that no wanted look
    has, so a marker or a line style keeps meaning what its channel says), then any other line style and marker
    (markers only where it has one). Where every look of its colour is taken, the repeat stays."""
    spare_marks = [x for x in MARKERS if x not in {m for _, _, m in wanted}]
    spare_styles = [x for x in LINESTYLES if x not in {s for _, s, _ in wanted}]
    taken: set[tuple[str, str, str]] = set()
    out = []
    for colour, style, marker in wanted:
        marks = [marker] + spare_marks if marker else [""]
        looks = [(colour, s, m) for s in [style] + spare_styles for m in marks]  # channels keep their meaning
        looks += [(colour, s, m) for s in LINESTYLES for m in (MARKERS if marker else [""])]  # else any free look
        look = next((o for o in looks if o not in taken), (colour, style, marker))
        taken.add(look)
        out.append(look)
    return out


def ring_note(series: Sequence[Series], of: str = "seeds") -> str:
    """The caption's word on rings (`Series.partial`: a mean `of` fewer seeds, or tasks, than ran), where a series
    has one."""
    return (f"A ring around a point: the mean of fewer {of} than ran (the table names the failures)."
            if any(s.partial for s in series) else "")


PRETRAIN_COLOR = "#444444"
FINETUNE_COLOR = "#b8860b"


def perplexity_vs_context(series: Sequence[Series], vlines: Sequence[VLine] = (), *,
                          title: str = "") -> str:
    """Perplexity (log y) against evaluation context (log2 x, ticks at measured lengths)."""
    return line_vs_length(series, vlines, ylabel="perplexity", xlabel="evaluation context (tokens)",
                          title=title)


@_plain_text
def line_vs_length(series: Sequence[Series], vlines: Sequence[VLine] = (), *, ylabel: str,
                   xlabel: str = "length (tokens)", logy: bool = True, ylim: tuple[float, float] | None = None,
                   title: str = "") -> str:
    """A value against sequence length (log2 x, ticks at the measured lengths; log y unless ``logy`` is False or
    a value is not positive, and then "log scale" is added to ``ylabel``).

    Failed cells (OOM, timeout, error) are drawn as 'x' markers at the top of the axes (several at one length
    stacked down from it) with the status written next to them, in the series' colour, and the series' line breaks
    there (it does not join the lengths around a failure); a point that is the mean
    of fewer seeds than ran (``Series.partial``) gets a ring around it.
    """
    fig = Figure(figsize=(8.2, 4.6))
    ax = fig.add_subplot()
    xs = sorted({x for s in series for x in s.x} | {x for s in series for x, _ in s.failed})
    ys = [y for s in series for y in s.y]
    colors = [s.color or color(i) for i, s in enumerate(series)]
    for s, c in zip(series, colors, strict=True):
        pts = sorted(zip(s.x, s.y, s.yerr or [0.0] * len(s.y), strict=True))
        if pts:
            # a NaN at each failed length breaks the line there: it never joins its neighbours across a failure
            line = sorted([(p[0], p[1]) for p in pts] + [(x, math.nan) for x, _ in s.failed
                                                         if pts[0][0] < x < pts[-1][0] and x not in s.x])
            ax.plot([p[0] for p in line], [p[1] for p in line], marker=s.marker, ms=5, lw=1.8,
                    color=c, linestyle=s.linestyle, label=s.label)
            if s.yerr is not None:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="none",
                            ecolor=c, elinewidth=1.2, capsize=3)
            if ring := [p for p in pts if p[0] in s.partial]:
                ax.plot([p[0] for p in ring], [p[1] for p in ring], marker="o", ms=12, mfc="none", mec=c, mew=1.4,
                        linestyle="none")
        elif s.failed:
            ax.plot([], [], marker=s.marker, color=c, linestyle=s.linestyle, label=s.label)  # legend entry only
    ax.set_xscale("log", base=2)
    logy = logy and bool(ys) and min(ys) > 0
    if logy:
        ax.set_yscale("log")
    if xs:
        lo, hi = min(xs + [v.x for v in vlines]), max(xs + [v.x for v in vlines])
        ax.set_xlim(lo / 1.25, hi * 1.25)
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tokens_label(v)))
        ax.xaxis.set_minor_locator(NullLocator())
    if ylim is not None:
        ax.set_ylim(*ylim)
    elif ys and logy:
        lo, hi = min(ys), max(ys)
        ax.set_ylim(lo / 1.12, hi * 1.25)
        _readable_log_ticks(ax, lo / 1.12, hi * 1.25)
    elif ys:
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.15 or abs(hi) * 0.1 or 1.0
        ax.set_ylim(min(0.0, lo - pad) if lo >= 0 else lo - pad, hi + 2 * pad)
    trans = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for v in vlines:  # labelled in the legend: text on the plot would collide with the data
        ax.axvline(v.x, ls=(0, (1.5, 2.5)), lw=1.6, color=v.color, zorder=0, label=v.label)
    # failed cells at one length go one under another, spaced so that the most at any length fit in the axes
    most = max(Counter(x for s in series for x, _ in s.failed).values(), default=1)
    step, drawn = min(0.07, 0.84 / most), Counter()
    for s, c in zip(series, colors, strict=True):
        for x, status in s.failed:
            y = 0.94 - step * drawn[x]
            drawn[x] += 1
            ax.plot([x], [y], marker="X", ms=9, color=c, transform=trans, clip_on=False, linestyle="none")
            ax.annotate(status.upper(), (x, y), xycoords=trans, xytext=(6, -3),
                        textcoords="offset points", fontsize=8, color=c)
    ax.set_xlabel(xlabel)
    if logy:  # "time (ms)" -> "time (ms, log scale)"
        ylabel = f"{ylabel[:-1]}, log scale)" if ylabel.endswith(")") else f"{ylabel} (log scale)"
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if series:
        legend(ax, [s.label for s in series] + [v.label for v in vlines])
    return png_data_uri(fig)


def legend(ax, labels: Sequence[str]) -> None:
    """Legend right of the axes, or under them when labels are long (variant labels with backend options)."""
    if max((len(t) for t in labels), default=0) > 44:
        ax.legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(0.0, -0.16), frameon=False, ncol=1)
    else:
        ax.legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


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


@_plain_text
def loss_curves(curves: Sequence[tuple[str, Sequence[Sequence[float]]]], *, title: str = "",
                styles: Sequence[tuple[str, str, str]] | None = None) -> str:
    """Training loss against step, one line per (label, [[step, loss], ...]); `styles`: a (colour, line style,
    marker) per curve (`looks`), else a colour each."""
    fig = Figure(figsize=(8.2, 4.0))
    ax = fig.add_subplot()
    for i, (label, pts) in enumerate(curves):
        if not pts:
            continue
        colour, style, _ = styles[i] if styles else (color(i), "-", "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.5, color=colour, linestyle=style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    legend(ax, [label for label, pts in curves if pts])
    return png_data_uri(fig)


@_plain_text
def accuracy_heatmap(rows: Sequence[str], cols: Sequence[int], values: Sequence[Sequence[float | None]], *,
                     texts: Sequence[Sequence[str]] | None = None, hatched: Sequence[Sequence[bool]] = (),
                     partial: Sequence[Sequence[bool]] = (), title: str = "") -> str:
    """Accuracy (%) of tasks (rows) x lengths (columns) on a fixed 0-100 colour scale, every cell annotated.

    ``None`` values are drawn grey with ``texts[i][j]`` (e.g. "OOM", "–"); ``hatched`` cells
    get a diagonal hatch (used for "uninformative: base model at chance"); a ``partial`` value (the mean of the
    seeds that did not fail) is annotated with a "*".
    """
    import numpy as np

    data = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    fig = Figure(figsize=(1.9 + 0.72 * max(len(cols), 2), 0.9 + 0.36 * max(len(rows), 2)))
    ax = fig.add_subplot()
    cmap = _accuracy_cmap()
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_facecolor("#e4e7ea")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = data[i, j]
            if np.isnan(v):
                text, fg = (texts[i][j] if texts else "–"), "#b3261e"
                if text in ("–", ""):
                    fg = "#5f6b76"
            else:
                text = (f"{v:.0f}" if v in (0, 100) else f"{v:.1f}") + ("*" if partial and partial[i][j] else "")
                r, g, b, _ = cmap(v / 100)
                fg = "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#ffffff"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=fg)
            if hatched and hatched[i][j]:
                ax.add_patch(_hatch_patch(j, i))
    ax.set_xticks(range(len(cols)), [tokens_label(c) for c in cols])
    ax.set_yticks(range(len(rows)), list(rows))
    ax.tick_params(axis="both", labelsize=8, length=0)
    ax.set_xlabel("length (tokens)", fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xticks(np.arange(-0.5, len(cols)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.2)
    ax.tick_params(which="minor", length=0)
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
    cb.set_label("accuracy (%)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return png_data_uri(fig)


def _accuracy_cmap():
    from matplotlib import colormaps

    return colormaps["viridis"]


def _hatch_patch(x: float, y: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#ffffff", linewidth=0, alpha=0.6)
