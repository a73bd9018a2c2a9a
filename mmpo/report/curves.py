"""The report's curves: every numeric metric of ``metrics.jsonl`` as a plotly figure (zoom, pan,
hover), grouped by what it measures. Figures are plain JSON (``{"data", "layout"}``); the page
draws them with the inlined plotly.js (:func:`plotly.offline.get_plotlyjs`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmpo.report.collect import category_of, metric_keys, series, split_categories

#: group titles in page order
GROUPS = ("Reward", "Loss and update", "KL", "Entropy", "Rollout", "Evaluation", "Supervised stage", "Timings", "Other")
#: metrics shown first in their group
PREFERRED = ("reward_mean", "reward_std", "loss", "pg_loss", "kl", "entropy")
TIMING_NAMES = frozenset({"step_time_s", "rollout_s", "reward_s", "update_s", "eval_s", "weight_sync_s"})
#: a series with fewer points than this is drawn with markers
MARKERS_BELOW = 40
#: plotly.js config: no logo link, no "Share chart" (it uploads to Plotly Cloud)
PLOT_CONFIG = {
    "displayModeBar": "hover",
    "displaylogo": False,
    "responsive": True,
    "modeBarButtonsToRemove": ["sendChartToCloud", "select2d", "lasso2d"],
}
COLORWAY = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563"]


@dataclass
class Card:
    """One plot: ``title`` and the metric keys drawn in it (one trace each)."""

    title: str
    keys: list[str]


def group_of(key: str) -> str:
    """The :data:`GROUPS` entry a metric belongs to (by its name)."""
    name = key.lower()
    if name.startswith("eval/"):
        return "Evaluation"
    if name.startswith("sft/"):
        return "Supervised stage"
    if key in TIMING_NAMES or name.endswith("_s") or name.startswith("time"):
        return "Timings"
    if "kl" in name.replace("/", "_").split("_") or name in ("beta", "kl_coef"):
        return "KL"
    if "entropy" in name:
        return "Entropy"
    if name.startswith(("reward", "advantage")) or "advantage" in name or name in ("success", "return"):
        return "Reward"
    if "loss" in name or name.startswith(("grad", "clip", "ratio", "dual_clip", "lr", "optimizer", "skipped")):
        return "Loss and update"
    if name.startswith("rollout") or name in ("response_length", "truncated_frac", "draws") or "kept" in name:
        return "Rollout"
    return "Other"


def cards(records: list[dict[str, Any]]) -> dict[str, list[Card]]:
    """The cards of each group (groups without metrics left out), in :data:`GROUPS` order.

    ``reward/<component>`` keys share one card; an evaluation metric and its categories
    (``eval/accuracy`` with ``eval/accuracy_colour``, see
    :func:`~mmpo.report.collect.split_categories`) share one card."""
    keys = metric_keys(records)
    keys = [k for k in PREFERRED if k in keys] + [k for k in keys if k not in PREFERRED]
    eval_names = [k.removeprefix("eval/") for k in keys if k.startswith("eval/")]
    _, families = split_categories(eval_names)
    in_family = {f"eval/{n}" for names in families.values() for n in names}
    out: dict[str, list[Card]] = {g: [] for g in GROUPS}
    components = [k for k in keys if k.startswith("reward/")]
    for key in keys:
        if key in in_family:
            continue
        if key.startswith("reward/"):
            if key == components[0]:
                out["Reward"].append(Card("reward components", components))
            continue
        name = key.removeprefix("eval/")
        if key.startswith("eval/") and name in families:
            out["Evaluation"].append(Card(f"{key} by category", [key] + [f"eval/{n}" for n in families[name]]))
            continue
        out[group_of(key)].append(Card(key, [key]))
    return {g: c for g, c in out.items() if c}


def figure(records: list[dict[str, Any]], card: Card, *, height: int = 260) -> dict[str, Any]:
    """The plotly.js figure of one card as JSON-ready ``{"data", "layout"}`` (plain dicts in
    plotly's schema: building ``plotly.graph_objects`` with their validation costs seconds a report)."""
    traces: list[dict[str, Any]] = []
    all_steps: list[int] = []
    for key in card.keys:
        steps, values = series(records, key)
        all_steps += steps
        label = plain_text(key if len(card.keys) == 1 else _trace_label(card, key))
        traces.append(
            {
                "type": "scatter",
                "x": steps,
                "y": values,
                "name": label,
                "mode": "lines+markers" if len(steps) < MARKERS_BELOW else "lines",
                "marker": {"size": 5},
                "line": {"width": 1.6},
                "hovertemplate": "step %{x}<br>%{y:.5g}<extra>" + label + "</extra>",
            }
        )
    several = len(card.keys) > 1
    xaxis: dict[str, Any] = {"title": {"text": "step", "font": {"size": 10}}, "gridcolor": "#e5e7eb", "zeroline": False}
    if all_steps and max(all_steps) - min(all_steps) <= 10:
        xaxis["dtick"] = 1  # steps are integers: no tick at 1.5
    layout = {
        "title": {"text": plain_text(card.title), "font": {"size": 13}, "x": 0.02, "xanchor": "left"},
        "height": height + 30 if several else height,
        "margin": {"l": 52, "r": 12, "t": 36, "b": 68 if several else 44},
        "colorway": list(COLORWAY),
        "hovermode": "x unified" if several else "closest",
        "showlegend": several,
        "legend": {"font": {"size": 10}, "orientation": "h", "y": -0.22},
        "xaxis": xaxis,
        "yaxis": {"gridcolor": "#e5e7eb", "zeroline": False, "automargin": True},
        "font": {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 11, "color": "#1f2937"},
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
    }
    return {"data": traces, "layout": layout}


def plain_text(text: str) -> str:
    """``text`` for plotly's labels, which read a subset of HTML (``<a href>``, ``<b>``): entities
    instead of markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _trace_label(card: Card, key: str) -> str:
    if card.title == "reward components":
        return key.removeprefix("reward/")
    base = card.keys[0]
    return "all" if key == base else category_of(base, key)


__all__ = ["Card", "GROUPS", "PLOT_CONFIG", "cards", "figure", "group_of"]
