"""``--report``: one self-contained HTML page with the table and plots of a sweep.

Drawn with plotly, whose JavaScript is embedded once in the page, so the file
opens offline and can be mailed or attached to an issue. The page holds:

* for each swept key, virtual time against that key's values (in grid order),
  one line per combination of the other keys' values, so interactions show as
  lines that are not parallel;
* a heatmap of peak utilisation per resource for the best and the worst point,
  which usually says why they differ;
* the full results table, failed points and their errors included.
"""

from __future__ import annotations

import html
import importlib
import itertools
import os
from typing import Any

from .results import PointResult, SweepResults

__all__ = ["write_report"]


def _line_figures(results: SweepResults, axes: dict[str, list[Any]]) -> list[tuple[str, Any]]:
    go: Any = importlib.import_module("plotly.graph_objects")
    ok = [r for r in results if r.virtual_time_ps is not None]
    figures = []
    for key in results.keys:
        others = [k for k in results.keys if k != key]
        fig = go.Figure()
        for combo in itertools.product(*(axes[k] for k in others)):
            fixed = dict(zip(others, combo, strict=True))
            series = {
                r.values[key]: r.virtual_time_ps for r in ok if all(r.values.get(k) == v for k, v in fixed.items())
            }
            if not series:
                continue
            xs = [v for v in axes[key] if v in series]
            name = ", ".join(f"{k}={v}" for k, v in fixed.items()) or "virtual time"
            fig.add_trace(
                go.Scatter(
                    x=[str(x) for x in xs],
                    y=[(series[x] or 0) / 1e6 for x in xs],
                    mode="lines+markers",
                    name=name,
                )
            )
        fig.update_layout(
            title=f"virtual time vs {key}",
            xaxis_title=key,
            yaxis_title="end-to-end virtual time (us)",
            xaxis={"type": "category"},
            height=420,
            margin={"l": 60, "r": 20, "t": 50, "b": 50},
        )
        figures.append((f"time-vs-{key}", fig))
    return figures


def _heatmap(best: PointResult, worst: PointResult) -> Any:
    go: Any = importlib.import_module("plotly.graph_objects")
    resources = sorted(set(best.utilisation) | set(worst.utilisation))
    rows = [("best", best), ("worst", worst)] if best.index != worst.index else [("best = worst", best)]
    fig = go.Figure(
        go.Heatmap(
            z=[[r.utilisation.get(res, 0.0) * 100 for res in resources] for _, r in rows],
            x=resources,
            y=[f"{tag}: #{r.index} {r.label()}" for tag, r in rows],
            zmin=0,
            zmax=100,
            colorscale="Viridis",
            colorbar={"title": "peak %"},
        )
    )
    fig.update_layout(
        title="peak utilisation of the best and the worst point",
        height=160 + 70 * len(rows),
        margin={"l": 40, "r": 20, "t": 50, "b": 120},
        yaxis={"automargin": True},
    )
    return fig


def _table(results: SweepResults) -> str:
    cols = results.columns()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for row in results.rows():
        cls = ' class="failed"' if row.get("error") else ""
        cells = []
        for c in cols:
            v = row.get(c)
            text = "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f'<table id="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def write_report(results: SweepResults, path: str | os.PathLike[str], title: str = "kbus sweep") -> None:
    """Write the HTML report of ``results`` to ``path`` (needs plotly, in the ``sweep`` extra)."""
    try:
        pio: Any = importlib.import_module("plotly.io")
        get_plotlyjs: Any = importlib.import_module("plotly.offline").get_plotlyjs
    except ImportError:
        raise ImportError("the sweep report needs plotly: pip install 'kbus[sweep]'") from None

    axes: dict[str, list[Any]] = {k: [] for k in results.keys}
    for r in sorted(results, key=lambda r: r.index):
        for k in results.keys:
            if r.values[k] not in axes[k]:
                axes[k].append(r.values[k])
    figures = _line_figures(results, axes)
    best, worst = results.best(), results.worst()
    if best is not None and worst is not None:
        figures.append(("utilisation", _heatmap(best, worst)))
    plots = "\n".join(
        f'<div class="plot" id="{html.escape(name)}">{pio.to_html(fig, full_html=False, include_plotlyjs=False)}</div>'
        for name, fig in figures
    )
    n_failed = len(results.failed)
    summary = f"{len(results)} points, {n_failed} failed"
    if best is not None and worst is not None:
        summary += (
            f"; best #{best.index} ({html.escape(best.label())}), worst #{worst.index} ({html.escape(worst.label())})"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 12px; }}
th, td {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
tr.failed td {{ background: #fde8e8; }}
td:last-child {{ text-align: left; max-width: 40em; }}
</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>{html.escape(title)}</h1>
<p id="summary">{summary}</p>
{plots}
<h2>Results</h2>
{_table(results)}
</body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
