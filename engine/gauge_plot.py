"""The OK-vs-NG figure of gauging: one histogram per measurement, with the bands drawn on top.

Used by ``inspectd calibrate-gauges --figure`` and by replay's report. Needs matplotlib, imported only when a figure
is drawn (it is in the ``train`` extra, not in the daemon's dependencies); importing this module needs numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine.gauges import MEASUREMENTS, UNITS, Band, GaugeSet, outside, values
from engine.pose import Measurements


def gauge_figure(
    ok: Sequence[Measurements],
    ng: Mapping[str, Sequence[Measurements]] | Sequence[Measurements],
    gauges: GaugeSet | Sequence[Band] | None,
    names: Sequence[str] = MEASUREMENTS,
) -> bytes:
    """PNG: one histogram per measurement, OK vs NG (stacked by defect type), the bands drawn on top.

    Each panel's title counts the parts outside its band. Drawn with matplotlib's object API on an Agg canvas:
    no pyplot, so no global figure state and no display backend (safe in report threads).
    """
    from io import BytesIO

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = {k: list(g) for k, g in (ng.items() if isinstance(ng, Mapping) else [("NG", ng)]) if len(g)}
    bands = {b.name: b for b in (gauges.bands if isinstance(gauges, GaugeSet) else (gauges or ()))}
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    # Fixed spacing instead of a layout engine, and step histograms (one polygon per group, not one rectangle
    # per bin): together 5× faster to draw, which matters when a report embeds several of these.
    fig = Figure(figsize=(5.0 * cols, 3.4 * rows), dpi=100)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.09, top=0.92, wspace=0.22, hspace=0.5)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        _panel(ax, name, list(ok), groups, bands.get(name))
        if i == 0:
            ax.legend(fontsize=7)
    buf = BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _panel(
    ax: Any, name: str, ok: list[Measurements], groups: dict[str, list[Measurements]], band: Band | None
) -> None:
    v_ok = values(ok, name)
    v_ng = {k: values(g, name) for k, g in groups.items()}
    edges_of_band = [e for e in ((band.low, band.high) if band else ()) if e is not None]
    span = np.concatenate([v_ok, *v_ng.values(), np.array(edges_of_band, np.float64)])
    span = span[np.isfinite(span)]
    lo, hi = (float(span.min()), float(span.max())) if span.size else (0.0, 1.0)
    bins = np.linspace(lo, max(hi, lo + 1.0), 41).tolist()
    ax.hist(v_ok, bins=bins, histtype="stepfilled", color="0.7", label=f"OK ({len(v_ok)})")
    if v_ng:
        labels = [f"{k} ({len(v)})" for k, v in v_ng.items()]
        ax.hist(list(v_ng.values()), bins=bins, histtype="stepfilled", stacked=True, alpha=0.85, label=labels)
    title = f"{name}  (no band)"
    if band is not None:
        for edge in edges_of_band:
            ax.axvline(edge, color="crimson", lw=1.5, ls="--")
        low = band.low if band.low is not None else lo
        ax.axvspan(low, band.high if band.high is not None else hi, color="green", alpha=0.07, lw=0)
        n_ng = sum(len(g) for g in groups.values())
        ng_out = sum(int(outside(g, band).sum()) for g in groups.values())
        title = (
            f"{name}  band {band.describe()}\n"
            f"OK out {int(outside(ok, band).sum())}/{len(ok)}, NG out {ng_out}/{n_ng}"
        )
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(UNITS[name])
    ax.set_ylabel("parts")
