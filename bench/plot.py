"""Charts of the benchmarks' figures (`--plot PATH` of bench.py and reload.py).

A chart is one PNG: a title, a legend, one grouped bar panel per measure and a small
caption (the command line, when and where). Each bar is a median with its range (min–max)
as an error bar, taken from the same figures the scripts' tables print. matplotlib is
imported only when a chart is drawn, so the scripts start (and answer --help) without it.
"""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PANEL_SIZE = (5.6, 3.5)  # inches per panel
HEADER_IN = 0.5  # inches above the panels: title and legend
CAPTION_LINE_IN = 0.16  # inches per caption line
CAPTION_CHAR_IN = 7 * 0.65 / 72  # width of a 7 pt monospace character, inches, with a margin
DPI = 110
HEADROOM = 1.2  # the y axis goes this far above the highest whisker: room for the labels
WIDE_BARS = 8  # a panel of more bars than this takes a whole row
GROUPS_PER_COLUMN = 5  # more groups than this per column spanned: tick labels turned
NEUTRAL = "#6b6b6b"  # bars of a panel whose series are not the chart's shared ones


@dataclass(frozen=True)
class Bar:
    """One bar: a median (None: nothing to draw) and its range; `note` is written instead
    of the value (e.g. FAILED)."""

    value: float | None
    low: float | None = None
    high: float | None = None
    note: str | None = None

    @classmethod
    def of_stats(cls, st: Mapping[str, Any] | None) -> Bar:
        """From bench.py's stats dict ({median, min, max, values}); {} or None: no bar."""
        if not st or st.get("median") is None:
            return cls(None)
        return cls(st["median"], st.get("min"), st.get("max"))

    @classmethod
    def of_values(cls, values: Iterable[float | None], scale: float = 1.0) -> Bar:
        """Median and range of raw samples (None left out), each times `scale`."""
        got = [v * scale for v in values if v is not None]
        if not got:
            return cls(None)
        return cls(statistics.median(got), min(got), max(got))


@dataclass(frozen=True)
class Panel:
    """One subplot: a bar per series in each group (x position)."""

    title: str
    ylabel: str  # with the unit
    groups: tuple[str, ...]
    series: dict[str, tuple[Bar, ...]]  # legend name -> one bar per group
    spec: str = ".3g"  # format of the value written above a bar
    reference: float | None = None  # a dashed horizontal line (1.0 for a ratio)
    shared: bool = True  # series are the chart's shared names (colors, figure legend)
    xlabel: str = ""


@dataclass
class Chart:
    title: str
    panels: list[Panel]
    caption: list[str] = field(default_factory=list)  # lines, wrapped if too long


def bars(path: Path, chart: Chart) -> Path:
    """Draw `chart` and write it to `path` as a PNG; returns `path`."""
    # Figure plus the Agg canvas, not pyplot: no display, no global state between charts
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [p for p in chart.panels if p.series] or [Panel("no figures", "", ("",), {})]
    cols = 1 if len(panels) == 1 else 2
    rows = layout(panels, cols)
    width = PANEL_SIZE[0] * cols
    caption = wrap(chart.caption, int((width - 0.4) / CAPTION_CHAR_IN))
    caption_in = CAPTION_LINE_IN * len(caption) + (0.15 if caption else 0)
    height = PANEL_SIZE[1] * len(rows) + HEADER_IN + caption_in
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    colors = series_colors(panels)
    grid = fig.add_gridspec(len(rows), cols)
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            span = cols if len(row) == 1 and is_wide(panel) else 1
            ax = fig.add_subplot(grid[i, j:j + span])
            draw_panel(ax, panel, colors, span)
    fig.suptitle(chart.title, fontsize=12, fontweight="bold", y=1 - 0.12 / height)
    add_legend(fig, colors, height)
    if caption:
        fig.text(0.01, 0.06 / height, "\n".join(caption), fontsize=7, color="#444444",
                 ha="left", va="bottom", family="monospace")
    fig.tight_layout(rect=(0, caption_in / height, 1, 1 - HEADER_IN / height), h_pad=1.6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def is_wide(panel: Panel) -> bool:
    return len(panel.groups) * len(panel.series) > WIDE_BARS


def layout(panels: Sequence[Panel], cols: int) -> list[list[Panel]]:
    """Rows of panels, in order: `cols` to a row, a wide panel alone on its row."""
    rows: list[list[Panel]] = []
    for panel in panels:
        if is_wide(panel) or not rows or len(rows[-1]) == cols or is_wide(rows[-1][0]):
            rows.append([panel])
        else:
            rows[-1].append(panel)
    return rows


def wrap(lines: Iterable[str], chars: int) -> list[str]:
    out: list[str] = []
    for line in lines:
        out += textwrap.wrap(line, chars, subsequent_indent="    ") or [""]
    return out


def series_colors(panels: Iterable[Panel]) -> dict[str, str]:
    """One color per shared series name, in order of appearance (the same in every panel)."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    names: list[str] = []
    for p in panels:
        if p.shared:
            names += [n for n in p.series if n not in names]
    return {n: to_hex(palette[i % len(palette)]) for i, n in enumerate(names)}


def to_hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb[:3])


def add_legend(fig: Any, colors: Mapping[str, str], height: float) -> None:
    if not colors:
        return
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=n) for n, c in colors.items()]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), frameon=False,
               fontsize=9, bbox_to_anchor=(0.5, 1 - 0.45 / height))


def draw_panel(ax: Any, panel: Panel, colors: Mapping[str, str], span: int = 1) -> None:
    names = list(panel.series)
    n_groups = len(panel.groups)
    width = 0.8 / max(1, len(names))
    top = 0.0
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(n_groups)]
        color = colors.get(name, NEUTRAL) if panel.shared else NEUTRAL
        top = max(top, draw_series(ax, xs, panel.series[name], width, color, panel.spec))
    ax.set_title(panel.title, fontsize=10)
    ax.set_ylabel(panel.ylabel, fontsize=9)
    if panel.xlabel:
        ax.set_xlabel(panel.xlabel, fontsize=9)
    if n_groups == 1 and len(names) > 1:
        # a single group: each bar says whose it is
        ax.set_xticks([(i - (len(names) - 1) / 2) * width for i in range(len(names))], names)
    else:
        ax.set_xticks(range(n_groups), panel.groups)
    if n_groups > GROUPS_PER_COLUMN * span:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    else:
        ax.tick_params(axis="x", labelsize=9)
    ax.tick_params(axis="y", labelsize=8)
    if panel.reference is not None:
        ax.axhline(panel.reference, color="#999999", linestyle="--", linewidth=0.8, zorder=0)
        top = max(top, panel.reference)
    ax.set_ylim(0, top * HEADROOM if top > 0 else 1)
    ax.set_xlim(-0.6, n_groups - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def draw_series(ax: Any, xs: list[float], bars_: Sequence[Bar], width: float, color: str,
                spec: str) -> float:
    """One series' bars with min–max whiskers and value labels; the highest point drawn."""
    top = 0.0
    for x, bar in zip(xs, bars_, strict=True):
        if bar.value is None:
            if bar.note:
                ax.text(x, 0, bar.note, ha="center", va="bottom", fontsize=7, color="#b00000",
                        rotation=90)
            continue
        low = bar.value if bar.low is None else min(bar.low, bar.value)
        high = bar.value if bar.high is None else max(bar.high, bar.value)
        has_range = high > low
        ax.bar(x, bar.value, width * 0.92, color=color,
               yerr=[[bar.value - low], [high - bar.value]] if has_range else None,
               error_kw={"ecolor": "#222222", "capsize": 3, "elinewidth": 1})
        text = bar.note or format(bar.value, spec)
        ax.annotate(text, (x, high), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7)
        top = max(top, high)
    return top
