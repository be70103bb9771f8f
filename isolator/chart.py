"""The run's memory as a picture: one self-contained HTML page with an SVG chart.

Each worker is a line of its own memory (USS) over time (it starts near zero:
a fresh fork owns only the pages its start-up wrote to); recycles and crashes are marked where the
worker ended; the budget is a dashed line. No scripts and nothing fetched, so
the page opens anywhere, CI artifact viewers included.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from isolator.sizes import format_size
from isolator.stats import MEASURE, RunMemory

_WIDTH, _HEIGHT = 960, 420
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 30, 50
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")


def _ticks(top: float, count: int = 5) -> list[float]:
    if top <= 0:
        return [0.0]
    raw = top / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(top / step) + 2) if i * step <= top * 1.0001]


def render_svg(memory: RunMemory, budget_bytes: int | None) -> str:
    workers = list(memory.workers.values())
    end_s = max(
        [w.ended_s or 0.0 for w in workers] + [s[0] for w in workers for s in w.samples] + [1e-3]
    )
    top_bytes = max([w.peak_bytes for w in workers] + [budget_bytes or 0, 1])
    top_bytes = int(top_bytes * 1.1)
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def x(seconds: float) -> float:
        return _LEFT + seconds / end_s * plot_w

    def y(num_bytes: float) -> float:
        return _TOP + plot_h - max(num_bytes, 0) / top_bytes * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#999"/>',
    ]
    for tick in _ticks(top_bytes):
        parts.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            'stroke="#e4e4e4"/>'
            f'<text x="{_LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">'
            f"{format_size(tick)}</text>"
        )
    for tick in _ticks(end_s):
        parts.append(
            f'<text x="{x(tick):.1f}" y="{_TOP + plot_h + 16}" text-anchor="middle">'
            f"{tick:.3g}s</text>"
        )
    parts.append(
        f'<text x="{_LEFT + plot_w / 2}" y="{_HEIGHT - 10}" text-anchor="middle">'
        "time since the run started</text>"
    )
    nodes = sorted({w.node for w in workers})
    colour = {node: _COLOURS[i % len(_COLOURS)] for i, node in enumerate(nodes)}
    for worker in workers:
        points = " ".join(f"{x(t):.1f},{y(b):.1f}" for t, b in worker.samples)
        title = html.escape(
            f"{worker.node}/{worker.label}: {worker.tests} tests, peak "
            f"{format_size(worker.peak_bytes)}, {worker.ended}"
        )
        parts.append(
            f'<polyline class="worker" points="{points}" fill="none" '
            f'stroke="{colour[worker.node]}" stroke-width="1.5"><title>{title}</title></polyline>'
        )
        if worker.ended_s is None or not worker.samples:
            continue
        ex, ey = x(worker.samples[-1][0]), y(worker.samples[-1][1])
        if worker.ended.startswith(("recycled", "ceiling")):
            parts.append(
                f'<circle class="recycle" cx="{ex:.1f}" cy="{ey:.1f}" r="4" fill="none" '
                f'stroke="#000"><title>{title}</title></circle>'
            )
        elif worker.crashed:
            parts.append(
                f'<path class="crash" d="M{ex - 4:.1f},{ey - 4:.1f}l8,8m0,-8l-8,8" '
                f'stroke="#d00" stroke-width="2"><title>{title}</title></path>'
            )
    if budget_bytes:
        parts.append(
            f'<line class="budget" x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y(budget_bytes):.1f}" '
            f'y2="{y(budget_bytes):.1f}" stroke="#000" stroke-dasharray="6,4"/>'
            f'<text x="{_LEFT + plot_w - 4}" y="{y(budget_bytes) - 5:.1f}" text-anchor="end">'
            f"budget {format_size(budget_bytes)}</text>"
        )
    legend_x = _LEFT + 8
    for node in nodes:
        parts.append(
            f'<rect x="{legend_x}" y="{_TOP + 8}" width="12" height="3" fill="{colour[node]}"/>'
            f'<text x="{legend_x + 16}" y="{_TOP + 13}">{html.escape(node)}</text>'
        )
        legend_x += 30 + 7 * len(node)
    parts.append("</svg>")
    return "".join(parts)


def write_html(path: str, memory: RunMemory, budget_bytes: int | None, top: int = 10) -> None:
    lines = memory.summary_lines(top=top)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>isolator: memory per worker</title>
<style>body{{font-family:sans-serif;margin:2em}} pre{{background:#f4f4f4;padding:1em}}</style>
</head><body>
<h1>Memory per worker</h1>
<p>{html.escape(MEASURE)}. Circles mark workers recycled at a test boundary,
crosses workers that crashed; the dashed line is the budget.</p>
{render_svg(memory, budget_bytes)}
<pre>{html.escape(chr(10).join(lines))}</pre>
</body></html>
"""
    Path(path).write_text(page)
