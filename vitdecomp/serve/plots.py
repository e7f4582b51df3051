"""Small inline SVG charts for the explorer (no JavaScript library, no network): bars of per-group
accuracy before/after and mean-ablation curves. Every label is escaped; each mark carries a
``<title>`` (hover tooltip) and ``data-`` attributes that the page script and the browser test read."""
from __future__ import annotations

from typing import Optional, Sequence

from markupsafe import Markup, escape

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def grouped_bars(groups: Sequence[str], series: dict[str, Sequence[Optional[float]]], title: str,
                 width: int = 640, height: int = 260) -> Markup:
    """Bars per group (x) for each series (e.g. before/after), y in [0, 1]."""
    left, bottom, top = 40, 60, 24
    plot_w, plot_h = width - left - 10, height - bottom - top
    n_g, n_s = max(1, len(groups)), max(1, len(series))
    gw = plot_w / n_g
    bw = gw * 0.8 / n_s
    parts = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f'<text x="{left}" y="16" class="chart-title">{escape(title)}</text>']
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - t)
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" class="tick">{t:.2f}</text>')
    for gi, g in enumerate(groups):
        for si, (name, vals) in enumerate(series.items()):
            v = vals[gi]
            if v is None:
                continue
            x = left + gi * gw + gw * 0.1 + si * bw
            h = plot_h * max(0.0, min(1.0, float(v)))
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bw:.1f}" height="{h:.1f}" '
                         f'fill="{COLORS[si % len(COLORS)]}" data-group="{escape(g)}" data-series="{escape(name)}" '
                         f'data-value="{float(v):.6f}">'
                         f'<title>{escape(g)} — {escape(name)}: {float(v):.4f}</title></rect>')
        parts.append(f'<text x="{left + gi * gw + gw / 2:.1f}" y="{top + plot_h + 14}" text-anchor="middle" '
                     f'class="tick">{escape(g)}</text>')
    for si, name in enumerate(series):
        parts.append(f'<rect x="{left + si * 110}" y="{height - 18}" width="10" height="10" '
                     f'fill="{COLORS[si % len(COLORS)]}"/><text x="{left + 14 + si * 110}" y="{height - 9}" '
                     f'class="tick">{escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def lines(curves: dict[str, Sequence[tuple[float, float]]], title: str, xlabel: str, baseline: Optional[float] = None,
          width: int = 640, height: int = 260) -> Markup:
    """One polyline per curve of ``(x, accuracy)`` points, y in [0, 1]."""
    left, bottom, top = 40, 50, 24
    plot_w, plot_h = width - left - 10, height - bottom - top
    xs = [x for pts in curves.values() for x, _ in pts] or [0, 1]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    X = lambda x: left + plot_w * (x - x0) / (x1 - x0)          # noqa: E731
    Y = lambda y: top + plot_h * (1 - max(0.0, min(1.0, y)))     # noqa: E731
    parts = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f'<text x="{left}" y="16" class="chart-title">{escape(title)}</text>']
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{Y(t) + 4:.1f}" text-anchor="end" class="tick">{t:.2f}</text>')
    if baseline is not None:
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{Y(baseline):.1f}" y2="{Y(baseline):.1f}" '
                     f'class="baseline"><title>no ablation: {baseline:.4f}</title></line>')
    for ci, (name, pts) in enumerate(curves.items()):
        c = COLORS[ci % len(COLORS)]
        path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for x, y in pts:
            parts.append(f'<circle class="point" cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3.5" fill="{c}" '
                         f'data-series="{escape(name)}" data-x="{x}" data-value="{y:.6f}">'
                         f'<title>{escape(name)}, {escape(xlabel)} {x}: {y:.4f}</title></circle>')
        parts.append(f'<rect x="{left + ci * 110}" y="{height - 18}" width="10" height="10" fill="{c}"/>'
                     f'<text x="{left + 14 + ci * 110}" y="{height - 9}" class="tick">{escape(name)}</text>')
    parts.append(f'<text x="{width - 10}" y="{height - 22}" text-anchor="end" class="tick">{escape(xlabel)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def score_color(v: Optional[float], vmax: float) -> str:
    """A diverging background colour for a score in [-vmax, vmax] (red positive, blue negative)."""
    if v is None or v != v:
        return "#eeeeee"
    t = max(-1.0, min(1.0, v / vmax if vmax > 0 else 0.0))
    if t >= 0:
        r, g, b = 255, int(255 - 180 * t), int(255 - 180 * t)
    else:
        r, g, b = int(255 + 180 * t), int(255 + 180 * t), 255
    return f"#{r:02x}{g:02x}{b:02x}"
