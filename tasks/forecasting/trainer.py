"""The air-quality trainer: stage 1 (supervised forecaster) -> GRPO on Gaussian forecast rollouts.

One GRPO step:
1. horizon H from the curriculum at the current epoch;
2. ``rollout.prompts_per_step`` start hours from the training years, each repeated G =
   ``rollout.group_size`` times; every rollout samples ``a_t = mu_t + sigma eps_t`` (seeded,
   antithetic pairs as an option) and feeds it back;
3. class-wise rewards (+ Lagrangian recall / FAR terms), ``algorithm.advantage`` (``rank_ema``);
4. ``trainer.update_epochs`` passes: replay the actions with grad, ``-A log pi`` (the core's
   loss, ``no_clip_pg`` plain by default) aggregated over observed hours, plus beta x the
   closed-form Gaussian KL to the stage-1 model; beta from the KL schedule (``pi_target``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpo.checkpoint import atomic_folder, latest_checkpoint, save_json
from mmpo.config import RunConfig, check_options
from mmpo.core import KL_ESTIMATORS, KL_SCHEDULES, aggregate
from mmpo.engine import Engine, EngineOptions
from mmpo.errors import ConfigError
from mmpo.loop import TrainerBase, seeded_generator
from mmpo.sft import supervised_train
from mmpo_tasks.forecasting.data import PM25, PM25Series, load_splits, make_windows, valid_starts
from mmpo_tasks.forecasting.model import ForecasterConfig, PM25Forecaster, step_log_probs
from mmpo_tasks.forecasting.rewards import LagrangeState, classwise_reward, contingency
from mmpo_tasks.forecasting.task import ForecastConfig

SFT_DIR = "sft"
#: model.path of a fresh forecaster (sizes from the task config), trained by stage 1 first
NEW_MODEL = "tiny:forecaster"


BUNDLED_CSV = Path(__file__).resolve().parent / "data_sources" / "beijing_pm25.csv"


def _resolve_data(path: str) -> str:
    p = Path(path) if path else BUNDLED_CSV
    if p.is_dir():
        p = p / "series.parquet"
    if not p.exists():
        raise ConfigError(f"task.data='{path}' does not exist (the UCI Beijing PM2.5 CSV, or a folder from data_prep/beijing_pm25.py)")
    return str(p)


class ForecastTrainer(TrainerBase):
    """See the module docstring. One process."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path) -> None:
        device, precision = self._setup(cfg, run_dir)
        if cfg.deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("airquality_grpo runs in one process (a 50k-parameter forecaster); drop `deepspeed` / torchrun")
        a = cfg.algorithm
        self.kl_fn = KL_ESTIMATORS.get("gaussian")
        self.kl_schedule = KL_SCHEDULES.get(a.kl_schedule)
        check_options(self.kl_schedule, a.kl_options, "algorithm.kl_options", ("state", "kl"))
        self.tc: ForecastConfig = self.task.config
        tc = self.tc
        if tc.antithetic and cfg.rollout.group_size % 2:
            raise ConfigError(f"task.antithetic pairs eps with -eps: it needs an even rollout.group_size, got {cfg.rollout.group_size}")
        self.splits, self.normalizer = load_splits(
            _resolve_data(tc.data), train_years=tc.train_years, val_years=tc.val_years, test_years=tc.test_years
        )
        self.sigma = tc.sigma / float(self.normalizer.std[PM25])  # policy std in normalised units
        train = self.splits["train"]
        starts = valid_starts(train, tc.window, tc.curriculum.max, tc.min_observed_frac)
        if len(starts) == 0:
            raise ConfigError(f"no training start hour has {tc.min_observed_frac:.0%} of a {tc.window}-hour window observed")
        self.task.starts = [int(s) for s in starts]
        # -- model: a trained forecaster folder, or stage 1 from scratch -------------------------
        sft_model = self.run_dir / SFT_DIR / "model"
        if cfg.model.path != NEW_MODEL:
            if cfg.model.path.startswith("tiny:"):
                raise ConfigError(f"model.path={cfg.model.path!r}: airquality_grpo builds its forecaster with model.path={NEW_MODEL!r}, or loads a forecaster folder")
            model = PM25Forecaster.from_pretrained(cfg.model.path)
            self.sft_metrics: dict[str, Any] = {}
        elif (sft_model / "config.json").is_file():
            model = PM25Forecaster.from_pretrained(sft_model)
            self.sft_metrics = {}
        else:
            torch.manual_seed(cfg.seed)
            cov_dim = train.covariates.shape[1]
            floor = float(self.normalizer.normalize_pm25(0.0))  # 0 µg/m³
            model = PM25Forecaster(ForecasterConfig(in_channels=2 + cov_dim, cov_dim=cov_dim, hidden=tc.hidden, layers=tc.layers, floor=floor))
            self.sft_metrics = self._stage_one(model, sft_model) if latest_checkpoint(self.run_dir) is None else {}
        self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        t = cfg.trainer
        self.engine = Engine.build(
            model,
            EngineOptions(
                lr=t.lr, weight_decay=t.weight_decay, adam_betas=tuple(t.adam_betas), max_grad_norm=t.max_grad_norm,
                lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps, total_steps=t.max_steps * t.update_epochs * self.minibatches(),
                grad_accum_steps=1, micro_batch_size=self.rows_per_step(), device=cfg.device, precision=precision, deepspeed_config=None,
            ),
        )
        self.device = self.engine.device
        self.ref_model.to(self.device)
        self._make_sampler()
        self.states: dict[str, Any] = self.algorithm_states(advantage=self.advantage_fn, kl_schedule=self.kl_schedule)
        if tc.reward.lagrangian:
            self.states["lagrange"] = LagrangeState(tc.reward.lambda_init, tc.reward.lambda_init)
        self.last_kl: float | None = None
        self._start()

    # -- sizes ---------------------------------------------------------------------------------
    def rows_per_step(self) -> int:
        return self.cfg.rollout.prompts_per_step * self.cfg.rollout.group_size

    def minibatches(self) -> int:
        mb = self.cfg.trainer.minibatch_size or self.rows_per_step()
        return math.ceil(self.rows_per_step() / mb)

    def horizon(self, step: int) -> int:
        c = self.tc.curriculum
        return c.horizon(step // c.steps_per_epoch)

    # -- stage 1 ---------------------------------------------------------------------------------
    def windows(self, series: PM25Series, starts: np.ndarray | list[int], horizon: int) -> dict[str, torch.Tensor]:
        return make_windows(series, np.asarray(starts, dtype=np.int64), self.tc.window, horizon)

    def _stage_one(self, model: PM25Forecaster, out_dir: Path) -> dict[str, Any]:
        """Supervised forecaster: autoregressive (own predictions fed back) over ``sft.horizon``
        hours, MSE (or Gaussian NLL) on the observed hours; saved to ``sft/model`` atomically."""
        s = self.tc.sft
        train = self.splits["train"]
        starts = valid_starts(train, self.tc.window, s.horizon, self.tc.min_observed_frac)
        if s.max_windows and len(starts) > s.max_windows:
            starts = starts[np.linspace(0, len(starts) - 1, s.max_windows).round().astype(int)]
        w = self.windows(train, starts, s.horizon)
        examples = list(range(len(starts)))

        def loss_fn(batch: list[int]) -> torch.Tensor:
            idx = torch.tensor(batch)
            mu, _ = model.rollout(w["past"][idx], w["future_cov"][idx], s.horizon)
            m = w["target_mask"][idx].float()
            err = (mu - w["target"][idx]) ** 2
            if s.loss == "nll":
                err = err / (2 * self.sigma**2)
            return (err * m).sum() / m.sum().clamp(min=1.0)

        t0 = time.perf_counter()
        result = supervised_train(model, examples, loss_fn, s, seed=self.cfg.seed, desc="stage 1 (supervised forecaster)")
        result.update(windows=len(starts), sft_s=time.perf_counter() - t0)
        model.eval()
        with atomic_folder(out_dir) as tmp:
            model.save_pretrained(tmp)
        save_json(out_dir.parent / "metrics.json", result)
        return result

    # -- GRPO step -------------------------------------------------------------------------------
    def to_ug(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised PM2.5 -> µg/m³."""
        return torch.as_tensor(self.normalizer.inverse_pm25(x.detach().cpu().numpy()), dtype=torch.float32)

    def noise(self, n_groups: int, horizon: int, step: int) -> torch.Tensor:
        """Standard normal ``[n_groups * G, H]`` for this step (antithetic pairs when configured)."""
        G = self.cfg.rollout.group_size
        gen = seeded_generator(self.cfg.seed * 1_000_003 + step)
        if not self.tc.antithetic:
            return torch.randn(n_groups * G, horizon, generator=gen)
        if G % 2:
            raise ConfigError(f"task.antithetic needs an even rollout.group_size, got {G}")
        half = torch.randn(n_groups, G // 2, horizon, generator=gen)
        return torch.cat([half, -half], dim=1).reshape(n_groups * G, horizon)

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        r, tc, a = self.cfg.rollout, self.tc, self.cfg.algorithm
        H, G = self.horizon(step), r.group_size
        starts = [self.task.starts[i] for i in self.sampler.next(r.prompts_per_step)]
        w = self.windows(self.splits["train"], starts, H)
        rep = lambda x: x.repeat_interleave(G, dim=0).to(self.device)  # noqa: E731
        past, cov, target, mask = rep(w["past"]), rep(w["future_cov"]), rep(w["target"]), rep(w["target_mask"])
        group_ids = torch.arange(len(starts)).repeat_interleave(G)
        model = self.engine.forward_module()
        with self.phase_hook("rollout"), torch.no_grad():
            mu_old, actions = model.rollout(past, cov, H, sigma=self.sigma, noise=self.noise(len(starts), H, step).to(self.device))
            logp_old = step_log_probs(actions, mu_old, self.sigma)
            mu_ref = self.ref_model.replay(past, cov, actions)
        t1 = time.perf_counter()
        with self.phase_hook("reward"):
            pred_ug, truth_ug = self.to_ug(model.clamp(actions)), self.to_ug(target)
            rewards, comp = classwise_reward(pred_ug, truth_ug, mask.cpu(), tc.reward, self.states.get("lagrange"))
            opts = dict(a.advantage_options)
            if "advantage" in self.states:
                opts["state"] = self.states["advantage"]
            adv = self.advantage_fn(rewards, group_ids, **opts).float().to(self.device)
        t2 = time.perf_counter()
        beta = self._beta(step)
        with self.phase_hook("update"):
            metrics = self.update(past, cov, actions, logp_old, mu_ref, adv, mask, beta, step)
        if "lagrange" in self.states:
            c = contingency(pred_ug, truth_ug, mask.cpu(), tc.reward.edges, tc.reward.high_class)
            self.states["lagrange"].update(float(c.pod()), float(c.far()), tc.reward)
            metrics.update({"lagrange/lam_rec": self.states["lagrange"].lam_rec, "lagrange/lam_far": self.states["lagrange"].lam_far})
        metrics.update({
            "horizon": float(H), "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
            "beta": beta, "rollout_s": t1 - t0, "reward_s": t2 - t1, "update_s": time.perf_counter() - t2,
            "step_time_s": time.perf_counter() - t0, "lr": self.engine.lr(),
        })
        metrics.update({f"reward/{k}": float(v.mean()) for k, v in comp.items()})
        return metrics

    def _beta(self, step: int) -> float:
        opts = dict(self.cfg.algorithm.kl_options)
        if "kl_schedule" in self.states:
            opts["state"] = self.states["kl_schedule"]
            opts["kl"] = self.last_kl
        return float(self.kl_schedule(step, self.cfg.trainer.max_steps, **opts))

    def update(self, past, cov, actions, logp_old, mu_ref, adv, mask, beta: float, step: int) -> dict[str, float]:
        t, a = self.cfg.trainer, self.cfg.algorithm
        n = past.shape[0]
        sums: dict[str, float] = {}
        count = 0
        for epoch in range(t.update_epochs):
            order = torch.randperm(n, generator=seeded_generator(self.cfg.seed * 7919 + step * 131 + epoch))
            for rows in torch.tensor_split(order, self.minibatches()):
                if len(rows) == 0:
                    continue
                model = self.engine.forward_module()
                mu = model.replay(past[rows], cov[rows], actions[rows])
                logp = step_log_probs(actions[rows], mu, self.sigma)
                m = mask[rows]
                A = adv[rows][:, None].expand_as(logp)
                loss_mat, lm = self.loss_fn(logp, logp_old[rows], A, m, **a.loss_options)
                pg = aggregate(loss_mat, m, a.loss_agg)
                kl = aggregate(self.kl_fn(mu, mu_ref[rows], self.sigma), m, a.loss_agg)
                loss = pg + beta * kl
                self.engine.backward(loss)
                grad_norm, _ = self.optimizer_step(step)
                vals = {"pg_loss": float(pg.detach()), "kl": float(kl.detach()), "loss": float(loss.detach()), "grad_norm": grad_norm}
                vals.update({k: float(v) for k, v in lm.items()})
                for k, v in vals.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        out = {k: v / max(1, count) for k, v in sums.items()}
        self.last_kl = out.get("kl")
        return out

    # -- evaluation ------------------------------------------------------------------------------
    def forecast(self, model: torch.nn.Module, split: str) -> dict[str, torch.Tensor]:
        """Deterministic forecasts (the mean path) of ``eval_horizon`` hours from start hours every
        ``eval_stride`` hours of ``split``: ``pred``, ``truth`` (µg/m³) and ``mask`` ``[N, H]``, ``start`` [N]."""
        tc = self.tc
        series = self.splits[split]
        starts = valid_starts(series, tc.window, tc.eval_horizon, tc.min_observed_frac, stride=tc.eval_stride)
        w = self.windows(series, starts, tc.eval_horizon)
        with torch.no_grad():
            mu, _ = model.rollout(w["past"].to(self.device), w["future_cov"].to(self.device), tc.eval_horizon)
        return {"pred": self.to_ug(mu), "truth": self.to_ug(w["target"]), "mask": w["target_mask"], "start": w["start"]}

    def lead_table(self, fc: dict[str, torch.Tensor]) -> dict[str, list[float]]:
        """Per lead time (hours 1..H): RMSE, MAE (µg/m³, observed hours), and the high class's
        FAR, POD and F1."""
        m = fc["mask"].float()
        err = (fc["pred"] - fc["truth"]) * m
        n = m.sum(0).clamp(min=1.0)
        c = contingency(fc["pred"], fc["truth"], fc["mask"], self.tc.reward.edges, self.tc.reward.high_class, dim=0)
        return {
            "rmse": ((err**2).sum(0) / n).sqrt().tolist(), "mae": (err.abs().sum(0) / n).tolist(),
            "far": c.far().tolist(), "pod": c.pod().tolist(), "f1": c.f1().tolist(),
        }

    def summary(self, fc: dict[str, torch.Tensor]) -> dict[str, float]:
        """All lead times pooled."""
        m = fc["mask"].float()
        err = (fc["pred"] - fc["truth"]) * m
        c = contingency(fc["pred"], fc["truth"], fc["mask"], self.tc.reward.edges, self.tc.reward.high_class)
        return {
            "rmse": float(((err**2).sum() / m.sum()).sqrt()), "mae": float(err.abs().sum() / m.sum()),
            "far": float(c.far()), "pod": float(c.pod()), "f1": float(c.f1()), "forecasts": float(len(fc["start"])),
        }

    def evaluate(self) -> dict[str, float]:
        if self.cfg.eval.num_samples == 0:
            return {}
        out = {f"eval/{k}": v for k, v in self.summary(self.forecast(self.engine.forward_module(), self.tc.eval_split)).items()}
        if self.step == 0 and self.sft_metrics:
            out.update({f"sft/{k}": float(v) for k, v in self.sft_metrics.items() if isinstance(v, (int, float))})
        return out

    @classmethod
    def evaluate_checkpoint(cls, cfg: RunConfig, checkpoint: str | None, run_dir: Path) -> dict[str, Any]:
        """``mmpo eval``: the stage-1 model (``<run>/sft/model``) and the GRPO model (``<run>/model``)
        side by side on the test years, by lead time. ``checkpoint`` is a run folder (both models)
        or one forecaster folder. Prints the table; writes ``<run_dir>/eval/``: ``table.md``,
        ``metrics.json`` and ``forecasts.png``."""
        if not checkpoint:
            raise ConfigError("mmpo eval of airquality_grpo needs checkpoint=<run folder or forecaster folder>")
        path = Path(checkpoint)
        models: dict[str, Path] = {}
        if (path / SFT_DIR / "model" / "config.json").is_file():
            models["SFT"] = path / SFT_DIR / "model"
        if (path / "model" / "config.json").is_file():
            models["GRPO"] = path / "model"
        if not models:
            if not (path / "config.json").is_file():
                raise ConfigError(f"checkpoint='{checkpoint}' has neither sft/model, model/ nor a forecaster's config.json")
            models[path.name] = path
        opts = dict(cfg.task.options)
        opts["eval_split"] = "test"
        results: dict[str, dict[str, Any]] = {}
        forecasts = {}
        with tempfile.TemporaryDirectory(prefix="mmpo-eval-") as tmp:
            for name, folder in models.items():
                c = dataclasses.replace(
                    cfg, model=dataclasses.replace(cfg.model, path=str(folder)), task=dataclasses.replace(cfg.task, options=opts),
                    trainer=dataclasses.replace(cfg.trainer, max_steps=1),
                )
                trainer = type(cls.__name__, (cls,), {"track": False})(c, Path(tmp) / name)
                fc = trainer.forecast(trainer.engine.forward_module(), "test")
                forecasts[name] = fc
                results[name] = {"summary": trainer.summary(fc), "by_lead": trainer.lead_table(fc), "model": str(folder)}
        out_dir = Path(run_dir) / "eval"
        out_dir.mkdir(parents=True, exist_ok=True)
        table = format_lead_table(results, cfg_edges=trainer.tc.reward.edges, high_class=trainer.tc.reward.high_class)
        print(table)
        tmp_path = out_dir / "table.md.tmp"
        tmp_path.write_text(table + "\n")
        tmp_path.replace(out_dir / "table.md")
        save_json(out_dir / "metrics.json", results)
        plot = plot_forecasts(forecasts, trainer.splits["test"], trainer.tc.plot_starts, out_dir / "forecasts.png")
        first = next(iter(results.values()))["summary"]
        return {"metrics": {f"{n}/{k}": v for n, r in results.items() for k, v in r["summary"].items()} or first,
                "predictions": str(out_dir / "table.md"), "plot": str(plot) if plot else None}

    # -- saving ----------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {**super().trainer_state(), "last_kl": self.last_kl}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        super().load_trainer_state(state)
        self.last_kl = state.get("last_kl")

    def save_final_model(self) -> None:
        """``model/``: the forecaster (``config.json`` + ``model.safetensors``) and ``normalizer.json``."""
        folder = self.run_dir / "model"
        self.engine.save_pretrained(folder, save_fn=lambda module, f, state: module.save_pretrained(f, state))
        if self.engine.is_main:
            (folder / "normalizer.json").write_text(json.dumps(self.normalizer.to_dict(), indent=1))


def format_lead_table(results: dict[str, dict[str, Any]], *, cfg_edges: list[float], high_class: int) -> str:
    """Markdown: one row per lead time, the models' RMSE / MAE / FAR / POD / F1 side by side."""
    names = list(results)
    keys = ("rmse", "mae", "far", "pod", "f1")
    threshold = cfg_edges[high_class - 1]
    head = "| lead (h) | " + " | ".join(f"{k.upper()} {n}" for k in keys for n in names) + " |"
    lines = [f"High class: PM2.5 >= {threshold:g} µg/m³ (test years). RMSE / MAE in µg/m³.", "", head, "|" + "---|" * (1 + len(keys) * len(names))]
    H = len(results[names[0]]["by_lead"]["rmse"])

    def fmt(v: float) -> str:
        return "nan" if v != v else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"

    for h in range(H):
        cells = [fmt(results[n]["by_lead"][k][h]) for k in keys for n in names]
        lines.append(f"| {h + 1} | " + " | ".join(cells) + " |")
    cells = [fmt(results[n]["summary"][k]) for k in keys for n in names]
    lines.append("| all | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_forecasts(forecasts: dict[str, dict[str, torch.Tensor]], series: PM25Series, n: int, path: Path) -> Path | None:
    """PNG: ``n`` start times, each the observed PM2.5 and every model's forecast."""
    if n == 0 or not forecasts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(forecasts.values()))
    count = len(first["start"])
    picks = np.linspace(0, count - 1, min(n, count)).round().astype(int)
    fig, axes = plt.subplots(len(picks), 1, figsize=(8, 2.2 * len(picks)), squeeze=False)
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
    plt.close(fig)
    tmp.replace(path)
    return path


__all__ = ["ForecastTrainer", "format_lead_table", "plot_forecasts"]
