"""Logged rollouts of the series kind: a forecast window (:class:`~mmpo.trainers.series_task.WindowView`)
as the text of a row's completion and as a picture of the forecast against the truth and the history.

The picture is a ``matplotlib.figure.Figure`` drawn without pyplot (no global figure state, no GUI
backend: :mod:`mmpo.samples` renders it with Agg).
"""

from __future__ import annotations

import math
from typing import Any

from mmpo.trainers.series_task import WindowView

#: forecast values written out in a completion (the rest are counted)
MAX_VALUES = 24


def _fmt(value: float) -> str:
    return "?" if math.isnan(value) else f"{value:.3g}"


def forecast_text(view: WindowView) -> str:
    """``"6 h forecast (µg/m³): 35.2, 38.1, ... ; MAE 4.2 over 5 observed h"``: the forecast values
    (the first :data:`MAX_VALUES`) and the mean absolute error over the observed hours."""
    values = [float(v) for v in view.forecast]
    shown = ", ".join(_fmt(v) for v in values[:MAX_VALUES])
    if len(values) > MAX_VALUES:
        shown += f", ... ({len(values) - MAX_VALUES} more)"
    unit = f" ({view.unit})" if view.unit else ""
    observed = [(f, t) for f, t in zip(values, view.truth.tolist()) if not math.isnan(t)]
    mae = (
        f"MAE {sum(abs(f - t) for f, t in observed) / len(observed):.3g} over {len(observed)} observed h"
        if observed
        else "no observed hour"
    )
    return f"{len(values)} h forecast{unit}: {shown}; {mae}"


def forecast_figure(view: WindowView, *, width: float = 6.0, height: float = 2.8) -> Any:
    """A Figure of the window: the history (hours -W..-1, grey), the observed truth (black dots)
    and the forecast (red) over hours 1..H, a dashed line where the forecast starts."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    W, H = len(view.history), len(view.forecast)
    ax.plot(range(-W, 0), view.history.float().numpy(), color="0.55", lw=1.2, label="history")
    ax.plot(range(1, H + 1), view.truth.float().numpy(), "k.-", lw=1.0, ms=5, label="truth")
    ax.plot(range(1, H + 1), view.forecast.float().numpy(), color="tab:red", lw=1.6, marker="o", ms=3, label="forecast")
    ax.axvline(0.5, color="0.3", ls="--", lw=0.8)
    ax.set_title(view.title, fontsize=9)
    ax.set_xlabel("hour (0 = forecast start)", fontsize=8)
    if view.unit:
        ax.set_ylabel(view.unit, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


__all__ = ["MAX_VALUES", "forecast_figure", "forecast_text"]
