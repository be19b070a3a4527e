"""Draw each Grafana dashboard of charts/fieldkube/files/dashboards/ to one PNG from a live Prometheus.

A dashboard change (or a renamed metric) is easiest to review by looking at it, and a Grafana server is a
lot to start for that. This script reads the dashboard JSON that ships with the chart, runs every panel's
PromQL against `--prometheus` (range queries, instant ones for tables; `$variables` set to All unless
`--var name=value`), and lays the panels out on Grafana's 24-column grid with matplotlib: time series
with legends from `legendFormat`, stats as big numbers, tables as rows, values in the panel's unit.
`make dashboards-png PROMETHEUS=http://…` writes dashboards-png/<uid>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.dates import AutoDateLocator, DateFormatter, date2num
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "charts" / "fieldkube" / "files" / "dashboards"
GRID_COLUMNS = 24  # Grafana's grid width
INCH_PER_COLUMN = 0.75
INCH_PER_ROW = 0.42  # one grid row is 30 px in Grafana; a little taller keeps legends readable
TITLE_INCH = 0.7


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str
    instant: bool


@dataclass(frozen=True)
class PanelSpec:
    title: str
    kind: str
    unit: str
    grid: tuple[int, int, int, int]  # x, y, w, h in grid units
    targets: tuple[Target, ...]


@dataclass(frozen=True)
class BoardSpec:
    uid: str
    title: str
    panels: tuple[PanelSpec, ...]
    variables: tuple[str, ...]  # query variables a panel's PromQL may use as $name


@dataclass(frozen=True)
class Series:
    name: str
    times: tuple[float, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    step: float


def read_board(path: Path) -> BoardSpec:
    """The parts of a Grafana dashboard JSON the drawing needs."""
    model: dict[str, Any] = json.loads(path.read_text())
    panels = []
    for panel in model.get("panels", []):
        grid = panel["gridPos"]
        targets = tuple(
            Target(t["expr"], t.get("legendFormat", ""), bool(t.get("instant")) and not t.get("range"))
            for t in panel.get("targets", [])
        )
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        place = (grid["x"], grid["y"], grid["w"], grid["h"])
        panels.append(PanelSpec(panel.get("title", ""), panel["type"], unit, place, targets))
    variables = tuple(v["name"] for v in model.get("templating", {}).get("list", []) if v["type"] == "query")
    return BoardSpec(model["uid"], model.get("title", model["uid"]), tuple(panels), variables)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace `$name` and `${name}` by the chosen value (a regex; All is `.*`)."""
    for name, value in values.items():
        expr = re.sub(rf"\$\{{{name}\}}|\${name}\b", value, expr)
    return expr


def legend_name(legend: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: `{{label}}` replaced by the series' value; empty means all labels."""
    if not legend:
        shown = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return labels.get("__name__", "") + "{" + shown + "}"
    return re.sub(r"{{\s*(\w+)\s*}}", lambda m: labels.get(m.group(1), ""), legend).strip()


class Prometheus:
    """The two calls of Prometheus' HTTP API the panels need."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as response:
            answer: dict[str, Any] = json.loads(response.read())
        if answer.get("status") != "success":
            raise RuntimeError(f"{params.get('query')}: {answer}")
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def series(self, target: Target, window: Window, variables: dict[str, str]) -> list[Series]:
        expr = substitute(target.expr, variables)
        out = []
        if target.instant:
            for item in self._get("/api/v1/query", {"query": expr, "time": str(window.end)}):
                stamp, value = item["value"]
                name = legend_name(target.legend, item["metric"])
                out.append(Series(name, (float(stamp),), (float(value),)))
            return out
        params = {"query": expr, "start": str(window.start), "end": str(window.end), "step": str(window.step)}
        for item in self._get("/api/v1/query_range", params):
            points = [(float(t), float(v)) for t, v in item["values"]]
            name = legend_name(target.legend, item["metric"])
            out.append(Series(name, tuple(t for t, _ in points), tuple(v for _, v in points)))
        return out


# Grafana unit id → (scale applied to the value, suffix). `s` and `short` scale themselves below.
UNITS: dict[str, tuple[float, str]] = {
    "percentunit": (100.0, "%"),
    "percent": (1.0, "%"),
    "reqps": (1.0, " req/s"),
    "ops": (1.0, " ops/s"),
    "decmbytes": (1.0, " MB"),
    "watt": (1.0, " W"),
}


def format_value(value: float, unit: str) -> str:
    """A value as Grafana would print it in this unit (3 significant digits)."""
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if unit == "s":
        for limit, scale, suffix in ((1e-3, 1e6, " µs"), (1.0, 1e3, " ms"), (120.0, 1.0, " s")):
            if abs(value) < limit:
                return f"{value * scale:.3g}{suffix}"
        return f"{value / 60:.3g} min"
    if unit in UNITS:
        scale, suffix = UNITS[unit]
        return f"{value * scale:.3g}{suffix}"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "No data", ha="center", va="center", color="0.5", fontsize=12, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_timeseries(ax: Axes, panel: PanelSpec, series: list[Series]) -> None:
    for item in series:
        ax.plot(
            date2num([datetime.fromtimestamp(t) for t in item.times]),
            item.values,
            linewidth=1.4,
            label=item.name,
        )
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v, panel.unit)))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_locator(AutoDateLocator(minticks=3, maxticks=9))
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M:%S"))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(0, -0.12), ncol=3, frameon=False)


def draw_stat(ax: Axes, panel: PanelSpec, series: list[Series]) -> None:
    """The last value of each series, big (Grafana's stat with its default "last not null")."""
    ax.set_axis_off()
    for n, item in enumerate(series):
        x = (n + 0.5) / len(series)
        value = format_value(item.values[-1], panel.unit)
        ax.text(x, 0.55, value, ha="center", va="center", fontsize=26, color="tab:green", weight="bold")
        ax.text(x, 0.2, item.name, ha="center", va="center", fontsize=8, color="0.3")


def draw_table(ax: Axes, panel: PanelSpec, series: list[Series]) -> None:
    ax.set_axis_off()
    rows = [[item.name, format_value(item.values[-1], panel.unit)] for item in series]
    table = ax.table(cellText=rows, colLabels=["series", "value"], loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)


DRAW = {"timeseries": draw_timeseries, "stat": draw_stat, "table": draw_table}


def render_board(
    board: BoardSpec, prometheus: Prometheus, window: Window, variables: dict[str, str], out: Path
) -> dict[str, int]:
    """Draw one dashboard to `out`; returns the number of series each panel got (by title)."""
    values = {name: variables.get(name, ".*") for name in board.variables}
    rows = max((p.grid[1] + p.grid[3] for p in board.panels), default=1)
    width = GRID_COLUMNS * INCH_PER_COLUMN
    height = rows * INCH_PER_ROW + TITLE_INCH
    fig = Figure(figsize=(width, height), dpi=100)
    start, end = (datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") for t in (window.start, window.end))
    fig.suptitle(f"{board.title}    {start} → {end}", x=0.01, y=1 - 0.15 / height, ha="left", fontsize=13)
    counts: dict[str, int] = {}
    for panel in board.panels:
        x, y, w, h = panel.grid
        # Inner margins leave room for the title above, the tick labels left and the legend below.
        left = (x + 1.1) / GRID_COLUMNS
        top = 1 - (TITLE_INCH + (y + 0.9) * INCH_PER_ROW) / height
        bottom = 1 - (TITLE_INCH + (y + h - 2.2) * INCH_PER_ROW) / height
        ax = fig.add_axes((left, bottom, (w - 1.5) / GRID_COLUMNS, top - bottom))
        series = [s for target in panel.targets for s in prometheus.series(target, window, values)]
        series = [s for s in series if s.values]
        counts[panel.title] = len(series)
        ax.set_title(panel.title, loc="left", fontsize=10, weight="bold")
        if series:
            DRAW.get(panel.kind, draw_timeseries)(ax, panel, series)
        else:
            no_data(ax)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return counts


def render_all(
    dashboards: Path, prometheus_url: str, window: Window, variables: dict[str, str], out_dir: Path
) -> dict[Path, dict[str, int]]:
    """Every dashboard JSON in `dashboards` drawn to `out_dir/<uid>.png`."""
    prometheus = Prometheus(prometheus_url)
    drawn = {}
    for path in sorted(dashboards.glob("*.json")):
        board = read_board(path)
        png = out_dir / f"{board.uid}.png"
        drawn[png] = render_board(board, prometheus, window, variables, png)
    return drawn


def window_for(minutes: float, end: float | None = None) -> Window:
    """The last `minutes` up to `end`, in about 240 steps (as a Grafana panel of that width asks)."""
    stop = end if end is not None else time.time()
    return Window(stop - minutes * 60, stop, max(1.0, round(minutes * 60 / 240)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--dashboards", type=Path, default=DASHBOARDS, help="folder of dashboard JSON")
    parser.add_argument("--out", type=Path, default=Path("dashboards-png"), help="folder for the PNGs")
    parser.add_argument("--minutes", type=float, default=30.0, help="time range up to now (default 30)")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=REGEX", help="$NAME's value")
    parser.add_argument(
        "--report",
        type=Path,
        help="also write {dashboard uid: {panel title: series drawn}} to this JSON file",
    )
    args = parser.parse_args(argv)
    variables = dict(item.split("=", 1) for item in args.var)
    drawn = render_all(args.dashboards, args.prometheus, window_for(args.minutes), variables, args.out)
    for png, counts in drawn.items():
        empty = [title for title, n in counts.items() if n == 0]
        print(f"wrote {png}" + (f" (no data: {', '.join(empty)})" if empty else ""))
    if args.report:
        args.report.write_text(json.dumps({png.stem: counts for png, counts in drawn.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
