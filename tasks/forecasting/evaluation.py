"""Evaluation of PM2.5 forecasters: deterministic forecasts, pooled and per-lead-time scores, and
the task's evaluator for the one evaluator (:mod:`mmpo.evaluate`): rows per start hour, the
pooled summary as metrics, and the models side by side by lead time (``table.md``,
``lead_times.json``, ``forecasts.png``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmpo.checkpoint import save_json
from mmpo_tasks.forecasting.data import PM25Series
from mmpo_tasks.forecasting.rewards import contingency

if TYPE_CHECKING:
    from mmpo_tasks.forecasting.task import AirQualityTask

#: a forecast set: ``pred``, ``truth`` (µg/m³) and ``mask`` ``[N, H]``, ``start [N]``
Forecasts = dict[str, torch.Tensor]


def forecast(
    model: torch.nn.Module,
    windows: dict[str, torch.Tensor],
    horizon: int,
    device: torch.device,
    to_ug: Callable[[torch.Tensor], torch.Tensor],
) -> Forecasts:
    """The mean path of ``horizon`` hours from each window (``past [N, W, C]``, ``future_cov
    [N, H, F]``), in µg/m³, with the truth and its mask."""
    with torch.no_grad():
        mu, _ = model.rollout(windows["past"].to(device), windows["future_cov"].to(device), horizon)
    truth, mask = windows["target"], windows["target_mask"]
    return {"pred": to_ug(mu), "truth": to_ug(truth), "mask": mask, "start": windows["start"]}


def lead_table(fc: Forecasts, edges: list[float], high_class: int) -> dict[str, list[float]]:
    """Per lead time (hours 1..H): RMSE, MAE (µg/m³, observed hours), and the high class's FAR,
    POD and F1."""
    m = fc["mask"].float()
    err = (fc["pred"] - fc["truth"]) * m
    n = m.sum(0).clamp(min=1.0)
    c = contingency(fc["pred"], fc["truth"], fc["mask"], edges, high_class, dim=0)
    return {
        "rmse": ((err**2).sum(0) / n).sqrt().tolist(),
        "mae": (err.abs().sum(0) / n).tolist(),
        "far": c.far().tolist(),
        "pod": c.pod().tolist(),
        "f1": c.f1().tolist(),
    }


def summary(fc: Forecasts, edges: list[float], high_class: int) -> dict[str, float]:
    """All lead times pooled: RMSE, MAE, FAR, POD, F1 and the number of forecasts."""
    m = fc["mask"].float()
    err = (fc["pred"] - fc["truth"]) * m
    c = contingency(fc["pred"], fc["truth"], fc["mask"], edges, high_class)
    return {
        "rmse": float(((err**2).sum() / m.sum()).sqrt()),
        "mae": float(err.abs().sum() / m.sum()),
        "far": float(c.far()),
        "pod": float(c.pod()),
        "f1": float(c.f1()),
        "forecasts": float(len(fc["start"])),
    }


class ForecastEvaluator:
    """The series kind's evaluator (see :mod:`mmpo.evaluate`) of the air-quality task: each model
    of ``models`` ``{label: forecaster}`` (the live training module, or saved forecasters for
    ``mmpo eval``) forecasts ``horizon`` hours deterministically from every start hour of
    ``split`` (``starts``, ascending).

    Items: ``(label, start)``, model by model. One row per item: ``id`` the start time
    (``<label>/<start time>`` when several models are compared), ``input`` the start time,
    ``prediction`` the forecast ``[H]`` and ``answer`` the observed truth ``[H]`` (null where
    unobserved) in µg/m³, and the row's ``rmse`` / ``mae`` over its observed hours. The metrics
    are the pooled lead-time summary (:func:`summary`; ``<label>/<name>`` when several models);
    the pictures: ``table.md`` (by lead time, the models side by side, also printed),
    ``lead_times.json`` (the same numbers) and ``forecasts.png``. ``params`` wraps the forecasts
    (ZeRO-3 gathers the sharded parameters there)."""

    def __init__(
        self,
        task: AirQualityTask,
        models: dict[str, torch.nn.Module],
        split: str,
        starts: Sequence[int],
        *,
        horizon: int,
        device: torch.device,
        params: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.task, self.models, self.split, self.starts = task, models, split, [int(s) for s in starts]
        self.horizon, self.device, self.params = horizon, device, params
        r, self.series = task.config.reward, task.splits[split]
        self.edges, self.high_class, self.plot_starts = r.edges, r.high_class, task.config.plot_starts

    def items(self) -> list[tuple[str, int]]:
        return [(label, s) for label in self.models for s in self.starts]

    def start_time(self, start: int) -> str:
        """The hour ``start`` of the split as ``YYYY-MM-DDTHH``."""
        return str(np.datetime_as_string(self.series.times[start], unit="h"))

    def predict(self, items: list[tuple[str, int]], offset: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        with self.params():
            for label, model in self.models.items():
                starts = [s for name, s in items if name == label]
                if not starts:
                    continue
                windows = self.task.windows(self.split, starts, self.horizon)
                fc = forecast(model, windows, self.horizon, self.device, self.task.to_ug)
                for i, start in enumerate(starts):
                    rows.append(self._row(label, start, fc["pred"][i], fc["truth"][i], fc["mask"][i]))
        return rows

    def _row(
        self, label: str, start: int, pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, Any]:
        """One item's row from ``pred``, ``truth`` (µg/m³) and ``mask`` ``[H]``."""
        time = self.start_time(start)
        err = (pred - truth)[mask]
        return {
            "id": time if len(self.models) == 1 else f"{label}/{time}",
            "input": time,
            "prediction": pred.tolist(),
            "answer": [float(v) if m else None for v, m in zip(truth.tolist(), mask.tolist())],
            "rmse": float(err.pow(2).mean().sqrt()),
            "mae": float(err.abs().mean()),
            "_model": label,
            "_start": start,
        }

    def forecasts(self, rows: list[dict[str, Any]]) -> dict[str, Forecasts]:
        """The rows back as forecast sets ``{label: forecasts}`` (values exact: float32 -> float -> float32)."""
        out: dict[str, Forecasts] = {}
        for label in self.models:
            mine = [r for r in rows if r["_model"] == label]
            if mine:
                truth = [[0.0 if v is None else v for v in r["answer"]] for r in mine]
                out[label] = {
                    "pred": torch.tensor([r["prediction"] for r in mine], dtype=torch.float32),
                    "truth": torch.tensor(truth, dtype=torch.float32),
                    "mask": torch.tensor([[v is not None for v in r["answer"]] for r in mine], dtype=torch.bool),
                    "start": torch.tensor([r["_start"] for r in mine], dtype=torch.int64),
                }
        return out

    def summarize(self, items: list[tuple[str, int]], rows: list[dict[str, Any]]) -> dict[str, float]:
        sets = self.forecasts(rows)
        one = len(self.models) == 1
        return {
            (k if one else f"{label}/{k}"): v
            for label, fc in sets.items()
            for k, v in summary(fc, self.edges, self.high_class).items()
        }

    def write_artifacts(
        self, out_dir: Path, items: list[tuple[str, int]], rows: list[dict[str, Any]]
    ) -> dict[str, str]:
        sets = self.forecasts(rows)
        if not sets:
            return {}
        edges, high = self.edges, self.high_class
        results = {
            label: {"summary": summary(fc, edges, high), "by_lead": lead_table(fc, edges, high)}
            for label, fc in sets.items()
        }
        table = format_lead_table(results, cfg_edges=edges, high_class=high, split=self.split)
        tmp = out_dir / "table.md.tmp"  # `mmpo eval` prints it (the "table" artifact); training does not
        tmp.write_text(table + "\n")
        tmp.replace(out_dir / "table.md")
        save_json(out_dir / "lead_times.json", results)
        out = {"table": str(out_dir / "table.md"), "lead_times": str(out_dir / "lead_times.json")}
        plot = plot_forecasts(sets, self.series, self.plot_starts, out_dir / "forecasts.png")
        if plot is not None:
            out["plot"] = str(plot)
        return out


def format_lead_table(
    results: dict[str, dict[str, Any]], *, cfg_edges: list[float], high_class: int, split: str = "test"
) -> str:
    """Markdown: one row per lead time, the models' RMSE / MAE / FAR / POD / F1 side by side
    (``results``: ``{label: {"summary", "by_lead"}}``)."""
    names = list(results)
    keys = ("rmse", "mae", "far", "pod", "f1")
    threshold = cfg_edges[high_class - 1]
    head = "| lead (h) | " + " | ".join(f"{k.upper()} {n}" for k in keys for n in names) + " |"
    lines = [
        f"High class: PM2.5 >= {threshold:g} µg/m³ ({split} years). RMSE / MAE in µg/m³.",
        "",
        head,
        "|" + "---|" * (1 + len(keys) * len(names)),
    ]
    H = len(results[names[0]]["by_lead"]["rmse"])

    def fmt(v: float) -> str:
        return "nan" if math.isnan(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"

    for h in range(H):
        cells = [fmt(results[n]["by_lead"][k][h]) for k in keys for n in names]
        lines.append(f"| {h + 1} | " + " | ".join(cells) + " |")
    cells = [fmt(results[n]["summary"][k]) for k in keys for n in names]
    lines.append("| all | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_forecasts(forecasts: dict[str, Forecasts], series: PM25Series, n: int, path: Path) -> Path | None:
    """PNG: ``n`` start times, each the observed PM2.5 and every model's forecast."""
    if n == 0 or not forecasts:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = next(iter(forecasts.values()))
    count = len(first["start"])
    picks = np.linspace(0, count - 1, min(n, count)).round().astype(int)
    fig = Figure(figsize=(8, 2.2 * len(picks)))
    FigureCanvasAgg(fig)  # drawn without pyplot: no global figure state, no GUI backend
    axes = fig.subplots(len(picks), 1, squeeze=False)
    for ax, i in zip(axes[:, 0], picks):
        truth, m = first["truth"][i].numpy(), first["mask"][i].numpy()
        hours = np.arange(1, len(truth) + 1)
        ax.plot(hours[m], truth[m], "k.-", label="observed")
        for name, fc in forecasts.items():
            ax.plot(hours, fc["pred"][i].numpy(), label=name)
        start = series.times[int(first["start"][i])]
        ax.set_title(f"forecast from {np.datetime_as_string(start, unit='h')}", fontsize=9)
        ax.set_ylabel("PM2.5 µg/m³")
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("lead time (h)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    return path


__all__ = ["ForecastEvaluator", "Forecasts", "forecast", "format_lead_table", "lead_table", "plot_forecasts", "summary"]
