"""The series trainer (kind ``series``): GRPO for autoregressive Gaussian forecast policies.

A task that forecasts a series implements :class:`SeriesTask` (data, model, rewards, evaluation);
this trainer owns the rest. One run:

1. stage 1 (supervised, the model's own predictions fed back) when the run starts from a fresh
   model and the task asks for it (:meth:`SeriesTask.stage_one`), saved to ``<run>/sft/model``;
2. one step: horizon ``H = task.horizon(step)``; ``rollout.prompts_per_step`` start indices drawn
   from ``task.train_starts``, each repeated G = ``rollout.group_size`` times; the policy samples
   ``a_t = mu_t + sigma eps_t`` (noise seeded per step and rank; antithetic pairs ``eps / -eps``
   when ``task.antithetic``) and feeds ``a_t`` back (:meth:`ForecastPolicy.rollout`);
3. rewards ``[N]`` of the sampled paths against the truth over the observed steps, from the task;
   advantages by the configured estimator (``self.algo.advantages``);
4. the update through the one routine (:meth:`TrainerBase.update_policy`): the stored actions are
   replayed with grad (:meth:`ForecastPolicy.replay`); the action unit is one forecast step with
   ``log N(a_t; mu_t, sigma^2)``; the KL to the reference (the model the run started from) is the
   closed form on the means (``kl_estimator: gaussian``, what ``auto`` means here) or a sample
   estimator on the actions' log-probs under both models.

Logged rollouts (``trainer.log_samples``, whole groups first): the window's title from the task
(:meth:`SeriesTask.window_views`), the forecast values as text and a plot of the forecast against
the truth and the history (:mod:`mmpo.trainers.series_samples`).

Several processes (torchrun, optionally DeepSpeed ZeRO): each rank draws its share of the starts;
advantages and the task's state (e.g. Lagrange multipliers) come from the step's rows of all ranks,
so every rank's state moves alike. Evaluation is the one evaluator (:mod:`mmpo.evaluate`) with the
task's :meth:`SeriesTask.evaluator`, during training (the live model) and for ``mmpo eval``.

``mmpo`` never imports a task plugin: everything task-specific comes through :class:`SeriesTask`.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmpo.checkpoint import atomic_folder, latest_checkpoint, save_json, verify_model_folder
from mmpo.config import RunConfig
from mmpo.errors import ConfigError
from mmpo.evaluate import Evaluator
from mmpo.samples import SampleRow
from mmpo.sft import supervised_train
from mmpo.tasks import RewardOutput
from mmpo.trainers.kinds import SERIES
from mmpo.trainers.loop import TrainerBase, seeded_generator
from mmpo.trainers.series_samples import forecast_figure, forecast_text
from mmpo.trainers.series_task import (
    SERIES_TASK_MEMBERS,
    ForecastPolicy,
    SeriesTask,
    StageOne,
    WindowView,
    step_log_probs,
)
from mmpo.trainers.update import RowSizes, UnitTerms, update_shape

#: stage 1's folder in the run: ``sft/model`` (the model) and ``sft/metrics.json``
SFT_DIR = "sft"
#: the file that marks a saved model folder (written by ``save_pretrained``)
MODEL_MARKER = "config.json"


@dataclass
class SeriesBatch:
    """One step's rollouts: N = starts x G rows of H steps, on the trainer's device except ``pred``,
    ``truth``, ``mask_cpu`` and ``starts``.

    ``past [N, W, C]``, ``cov [N, H, F]``, ``actions`` / ``logp_old`` / ``mask`` ``[N, H]``,
    ``group_ids [N]``; ``mu_ref [N, H]`` the reference's means along the actions (None without a KL
    term); ``pred`` (clamped actions) / ``truth`` / ``mask_cpu`` ``[N, H]`` as the task scores them;
    ``advantages [N]`` once scored.
    """

    past: Tensor
    cov: Tensor
    actions: Tensor
    logp_old: Tensor
    mask: Tensor
    group_ids: Tensor
    mu_ref: Tensor | None
    pred: Tensor
    truth: Tensor
    mask_cpu: Tensor
    advantages: Tensor | None = None
    #: ``[N]`` the start index of each row's window (in the training split)
    starts: list[int] | None = None

    def __len__(self) -> int:
        return len(self.actions)


class SeriesTrainer(TrainerBase):
    """See the module docstring."""

    kind = SERIES
    task: SeriesTask  # type: ignore[assignment]  # checked in __init__

    def __init__(self, cfg: RunConfig, run_dir: str | Path) -> None:
        _, precision = self._setup(cfg, run_dir)
        task = self.task
        missing = [m for m in SERIES_TASK_MEMBERS if not hasattr(task, m)]
        if missing:
            raise ConfigError(f"task {cfg.task.name!r} is not a SeriesTask: it lacks {', '.join(missing)}")
        if task.antithetic and cfg.rollout.group_size % 2:
            raise ConfigError(
                f"task.antithetic pairs eps with -eps: it needs an even rollout.group_size, "
                f"got {cfg.rollout.group_size}"
            )
        task.prepare()
        if not len(task.train_starts):
            raise ConfigError(f"task {cfg.task.name!r} has no training start")
        self.sigma = float(task.sigma)
        model, self.sft_metrics = self._initial_model()
        self.ref_model = copy.deepcopy(model).eval().requires_grad_(False) if self.algo.uses_kl else None
        self.shape = update_shape(cfg, self.rows_per_step())
        self.engine = self.build_engine(model, precision)
        self.device = self.engine.device
        if self.ref_model is not None:  # rank 0's (the engine broadcast its policy): ranks agree by construction
            if self.engine.distributed:
                self.ref_model.load_state_dict(
                    self.engine.all_gather_object(self.ref_model.state_dict() if self.engine.is_main else None)[0]
                )
            self.ref_model.to(self.device)
        self._make_sampler(len(task.train_starts))
        own = task.checkpoint_states()
        clash = sorted(set(own) & set(self.algo.states))
        if clash:
            raise ConfigError(f"task {cfg.task.name!r} names its state {clash}, which the algorithm's states use")
        self.states: dict[str, Any] = {**self.algo.states, **own}
        self._start()

    # -- the model the run starts from; stage 1 ----------------------------------------------
    def _initial_model(self) -> tuple[nn.Module, dict[str, Any]]:
        """A saved model (``model.path`` a folder), stage 1's (``<run>/sft/model``, when a fresh
        run was interrupted after it) or a fresh one, trained by stage 1 unless a checkpoint
        exists. Returns ``(model, stage-1 metrics or {})``."""
        path, task = self.cfg.model.path, self.task
        if path != task.fresh_model:
            if path.startswith("tiny:"):
                raise ConfigError(
                    f"model.path={path!r}: {task.name} builds its model with model.path={task.fresh_model!r}, "
                    "or loads a model folder"
                )
            return task.load_model(path), {}
        sft_model = self.run_dir / SFT_DIR / "model"
        if (sft_model / MODEL_MARKER).is_file():
            return task.load_model(sft_model), {}
        torch.manual_seed(self.cfg.seed)
        model = task.build_model()
        stage = task.stage_one() if latest_checkpoint(self.run_dir) is None else None
        return model, (self._stage_one(model, stage, sft_model) if stage is not None else {})

    def _stage_one(self, model: nn.Module, stage: StageOne, out_dir: Path) -> dict[str, Any]:
        """Supervised: autoregressive (own predictions fed back) over ``stage.horizon`` steps, MSE
        (or Gaussian NLL) on the observed steps; saved to ``out_dir`` atomically by rank 0. Every
        rank trains alike (same seed, data and order, on the CPU) before the engine exists; rank 0's
        weights are what the engine broadcasts and what the reference takes."""
        if stage.loss not in ("mse", "nll"):
            raise ConfigError(f"task {self.task.name!r}: stage 1 loss {stage.loss!r}; use 'mse' or 'nll'")
        self.show_phase("stage 1 · sft")
        w, horizon, sigma, seed = stage.windows, stage.horizon, self.sigma, self.cfg.seed
        examples = list(range(len(w["past"])))

        def loss_fn(batch: list[int]) -> Tensor:
            idx = torch.tensor(batch)
            mu, _ = model.rollout(w["past"][idx], w["future_cov"][idx], horizon)
            m = w["target_mask"][idx].float()
            err = (mu - w["target"][idx]) ** 2
            if stage.loss == "nll":
                err = err / (2 * sigma**2)
            return (err * m).sum() / m.sum().clamp(min=1.0)

        t0 = time.perf_counter()
        result = supervised_train(model, examples, loss_fn, stage.config, seed=seed, desc="stage 1 (supervised)")
        result.update(windows=len(examples), sft_s=time.perf_counter() - t0)
        model.eval()
        if int(os.environ.get("RANK", "0")) == 0:
            with atomic_folder(out_dir) as tmp:
                model.save_pretrained(tmp)
            save_json(out_dir.parent / "metrics.json", result)
        return result

    # -- one GRPO step -----------------------------------------------------------------------
    def noise(self, n_groups: int, horizon: int, step: int) -> Tensor:
        """Standard normal ``[n_groups * G, H]`` for ``step`` and this rank (antithetic pairs when
        the task asks)."""
        G = self.cfg.rollout.group_size
        gen = seeded_generator(self.cfg.seed * 1_000_003 + step + self.engine.rank * 7_919_000_017)
        if not self.task.antithetic:
            return torch.randn(n_groups * G, horizon, generator=gen)
        half = torch.randn(n_groups, G // 2, horizon, generator=gen)
        return torch.cat([half, -half], dim=1).reshape(n_groups * G, horizon)

    def rollout(self, step: int) -> SeriesBatch:
        """G sampled paths per start drawn for ``step``, their log-probs and the reference's means."""
        r, task = self.cfg.rollout, self.task
        H, G = task.horizon(step), r.group_size
        starts = [task.train_starts[i] for i in self.sampler.next(r.prompts_per_step)]
        w = task.windows("train", starts, H)
        past, cov, target, mask = (
            w[k].repeat_interleave(G, dim=0).to(self.device) for k in ("past", "future_cov", "target", "target_mask")
        )
        model = self.engine.forward_module()
        with torch.no_grad():
            noise = self.noise(len(starts), H, step).to(self.device)
            mu_old, actions = model.rollout(past, cov, H, sigma=self.sigma, noise=noise)
            logp_old = step_log_probs(actions, mu_old, self.sigma)
            mu_ref = self.ref_model.replay(past, cov, actions) if self.ref_model is not None else None
            pred = model.clamp(actions).cpu()
        group_ids = torch.arange(len(starts)).repeat_interleave(G)
        rows = [s for s in starts for _ in range(G)]
        return SeriesBatch(
            past, cov, actions, logp_old, mask, group_ids, mu_ref, pred, target.cpu(), mask.cpu(), starts=rows
        )

    def score(self, batch: SeriesBatch) -> RewardOutput:
        """The task's rewards ``[n]`` of the batch; sets ``batch.advantages`` ``[n]``, estimated on the
        rows of every rank (a stateful estimator such as ``rank_ema`` then moves alike on all ranks)."""
        out = self.task.reward(batch.pred, batch.truth, batch.mask_cpu)
        batch.advantages = self.advantages(out.rewards, batch.group_ids).to(self.device)
        return out

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        with self.phase_hook("rollout"):
            batch = self.rollout(step)
        t1 = time.perf_counter()
        with self.phase_hook("reward"):
            out = self.score(batch)
            drawn = self.sampler.last_indices  # the starts of this rollout, each with its G rewards
            self.sampler.observe(drawn, out.rewards.view(len(drawn), -1))
        t2 = time.perf_counter()
        beta = self.beta(step)
        with self.phase_hook("update"):
            metrics = self.update(batch, beta, step)
        rows = self.engine.all_gather_object((batch.pred, batch.truth, batch.mask_cpu))  # every rank's
        metrics.update(self.task.after_step(*(torch.cat(t) for t in zip(*rows))))
        self.log_rollouts(batch, out)
        rewards, H = out.rewards.float(), batch.actions.shape[1]
        metrics.update(
            {
                "horizon": float(H),
                "reward": float(rewards.mean()),
                "reward_std": float(rewards.std()),
                "beta": beta,
                "rollout_s": t1 - t0,
                "reward_s": t2 - t1,
                "update_s": time.perf_counter() - t2,
                "step_time_s": time.perf_counter() - t0,
                "lr": self.engine.lr(),
            }
        )
        metrics.update({f"reward/{k}": float(v.float().mean()) for k, v in out.components.items()})
        return self.reduce_metrics(metrics)

    def log_rollouts(self, batch: SeriesBatch, out: RewardOutput) -> None:
        """Put this step's logged rollouts in ``self.step_samples`` (whole groups first): per row
        the window's title (:meth:`SeriesTask.window_views`), the forecast as text, the reward, the
        advantage and the reward components, and a Figure of the forecast against the truth and
        the history. Nothing is built when no sample is wanted."""
        idx = self.sample_indices(batch.group_ids.tolist())
        if not idx or batch.starts is None or batch.advantages is None:
            return
        pick = torch.tensor(idx)
        starts = [batch.starts[i] for i in idx]
        views = self.task.window_views("train", starts, batch.pred[pick], batch.truth[pick], batch.mask_cpu[pick])
        for view, i in zip(views, idx):
            self.step_samples.append(
                SampleRow(
                    prompt_id=str(batch.starts[i]),
                    group=int(batch.group_ids[i]),
                    prompt=view.title,
                    completion=forecast_text(view),
                    reward=float(out.rewards[i]),
                    advantage=float(batch.advantages[i]),
                    components={k: float(v[i]) for k, v in out.components.items()},
                    media=[forecast_figure(view)],
                )
            )

    def unit_terms(self, batch: SeriesBatch, idx: Tensor) -> UnitTerms:
        """The forecast steps of rows ``idx [n]``: the replayed ``logp [n, H]`` (with grad), ``logp_old``,
        advantages ``[n]``, the observed-step mask, and the KL to the reference: the closed form
        ``kl [n, H]`` for ``gaussian``, else the reference's ``logp_ref [n, H]`` of the actions."""
        assert batch.advantages is not None, "score the batch first"
        model = self.engine.forward_module()
        actions = batch.actions[idx]
        mu = model.replay(batch.past[idx], batch.cov[idx], actions)
        logp = step_log_probs(actions, mu, self.sigma)
        kl = logp_ref = None
        if batch.mu_ref is not None:
            if self.algo.kl_estimator == "gaussian":
                kl = self.algo.kl(mu, batch.mu_ref[idx], self.sigma)
            else:
                logp_ref = step_log_probs(actions, batch.mu_ref[idx], self.sigma)
        return UnitTerms(logp, batch.logp_old[idx], batch.advantages[idx], batch.mask[idx], kl=kl, logp_ref=logp_ref)

    def update(self, batch: SeriesBatch, beta: float, step: int) -> dict[str, float]:
        """``trainer.update_epochs`` passes over the batch through the one update routine."""
        return self.update_policy(
            self.shape,
            torch.arange(len(batch)),
            RowSizes.from_mask(batch.mask_cpu),
            lambda idx, padding: [self.unit_terms(batch, idx)],
            beta,
            step,
        )

    # -- evaluation --------------------------------------------------------------------------
    def live_evaluator(self) -> Evaluator:
        """The task's evaluator on the live model."""
        return self.task.evaluator({"model": self.engine.module}, self.device, params=self.engine.gathered_params)

    @classmethod
    def checkpoint_evaluator(cls, cfg: RunConfig, checkpoint: str | None) -> tuple[Evaluator, str]:
        """``mmpo eval`` (no optimizer, no engine): the stage-1 model (``<run>/sft/model``, label
        ``SFT``) and the GRPO model (``<run>/model``, label ``GRPO``) side by side on the task's test
        split (``checkpoint`` a run folder), or one model folder (labelled by its name; default
        ``model.path``). Returns ``(evaluator, what was evaluated)``."""
        from mmpo.engine import resolve_device
        from mmpo.tasks import build_task_from

        task = build_task_from(cfg)
        path = Path(checkpoint or cfg.model.path)
        folders = {
            label: path / sub
            for label, sub in (("SFT", f"{SFT_DIR}/model"), ("GRPO", "model"))
            if (path / sub / MODEL_MARKER).is_file()
        }
        if not folders:
            if not (path / MODEL_MARKER).is_file():
                raise ConfigError(
                    f"mmpo eval of {cfg.task.name} needs checkpoint=<run folder or model folder>; "
                    f"'{path}' has neither {SFT_DIR}/model, model/ nor a model's {MODEL_MARKER}"
                )
            folders[path.name] = path
        for folder in folders.values():
            verify_model_folder(folder)  # CheckpointError when a file changed since it was written
        task.prepare()
        device = resolve_device(cfg.device)
        models = {label: task.load_model(f).to(device).eval() for label, f in folders.items()}
        return task.evaluator(models, device, test=True), ", ".join(f"{k}={v}" for k, v in folders.items())

    # -- saving ------------------------------------------------------------------------------
    def save_final_model(self, folder: Path) -> None:
        """``model/``: the model's own ``save_pretrained`` layout, plus the task's files."""
        self.engine.save_pretrained(folder)
        if self.engine.is_main:
            self.task.save_model_files(folder)


__all__ = [
    "SERIES_TASK_MEMBERS",
    "SFT_DIR",
    "ForecastPolicy",
    "SeriesBatch",
    "SeriesTask",
    "SeriesTrainer",
    "StageOne",
    "WindowView",
    "step_log_probs",
]
