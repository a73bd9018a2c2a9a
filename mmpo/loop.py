"""What every trainer shares: the step loop, optimizer-step bookkeeping, atomic checkpoints and
exact resume. A trainer (token policies in :mod:`mmpo.trainer`, denoisers and noise policies in
:mod:`mmpo.diffusion.trainer`, ...) implements one step, evaluation and the final save.

A task picks its trainer (``Task.trainer_class``), so ``mmpo train`` runs any plugin the same way.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpo import checkpoint as ckpt
from mmpo.config import RunConfig, save_config
from mmpo.data import PromptSampler
from mmpo.engine import Engine
from mmpo.errors import TrainingError
from mmpo.tasks import Task
from mmpo.tracking import Tracker

#: metrics that are per-rank wall-clock times (not averaged across ranks)
TIMING_KEYS = ("step_time_s", "rollout_s", "reward_s", "update_s", "eval_s", "weight_sync_s")


class TrainerBase:
    """The loop of ``mmpo train`` around a subclass's ``train_step`` / ``evaluate``.

    Subclasses set ``cfg``, ``run_dir``, ``task``, ``engine``, ``sampler`` and ``states`` (named
    objects with ``state_dict``/``load_state_dict``), then call :meth:`_start` at the end of
    ``__init__``. They may extend :meth:`trainer_state` / :meth:`load_trainer_state` and
    :meth:`save_extra` / :meth:`load_extra` (tensors beside the engine's) for more state.
    """

    cfg: RunConfig
    run_dir: Path
    task: Task
    engine: Engine
    sampler: PromptSampler
    states: dict[str, Any]
    #: False for a trainer built only to evaluate (`mmpo eval`): no progress bar, no metrics files
    track: bool = True

    def _setup(self, cfg: RunConfig, run_dir: str | Path) -> tuple[torch.device, str]:
        """Seed, resolve device and precision, build the task and the objective's advantage and
        loss (config mistakes fail here, before any model loads). Returns ``(device, precision)``."""
        from mmpo.config import check_options
        from mmpo.core import ADVANTAGES, POLICY_LOSSES
        from mmpo.engine import resolve_device, resolve_precision
        from mmpo.tasks import build_task

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        precision = resolve_precision(cfg.precision, device)
        self.task = build_task(cfg.task.name, cfg.task.options, seed=cfg.seed)
        a = cfg.algorithm
        self.advantage_fn = ADVANTAGES.get(a.advantage)
        self.loss_fn = POLICY_LOSSES.get(a.loss)
        check_options(self.advantage_fn, a.advantage_options, "algorithm.advantage_options", ("state", "prompt_keys"))
        check_options(self.loss_fn, a.loss_options, "algorithm.loss_options")
        self.phase_hook: Any = lambda name: nullcontext()  # `mmpo bench` attributes memory to phases
        return device, precision

    @staticmethod
    def algorithm_states(**fns: Any) -> dict[str, Any]:
        """A fresh state for every stateful core function given (``advantage=fn, kl_schedule=fn``),
        keyed by the argument name; stateless ones get none."""
        from mmpo.core.registry import state_class

        out: dict[str, Any] = {}
        for key, fn in fns.items():
            cls = state_class(fn)
            if cls is not None:
                out[key] = cls()
        return out

    def _make_sampler(self) -> None:
        """The resumable prompt sampler, sharded over ranks."""
        self.sampler = PromptSampler(self.task.num_train(), seed=self.cfg.seed, rank=self.engine.rank, world_size=self.engine.world_size)

    def _start(self) -> None:
        """Resume from the newest complete checkpoint in the run folder; write the config; open the tracker."""
        self.step = 0
        self.bad_steps = 0
        self.resumed_from: Path | None = None
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is not None:
            self._load_checkpoint(latest)
        if self.engine.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.tracker = Tracker(self.run_dir, self.cfg.trainer.max_steps, start_step=self.step, enabled=self.engine.is_main and self.track)

    # -- hooks ----------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def save_final_model(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the run holds beyond the process (servers, browsers, ...)."""

    def trainer_state(self) -> dict[str, Any]:
        """JSON state of the loop (step counters, sampler, stateful algorithm pieces, task)."""
        return {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "sampler": self.sampler.state_dict(),
            "states": {k: v.state_dict() for k, v in self.states.items()},
            "task": self.task.state_dict(),
        }

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.bad_steps = int(state["bad_steps"])
        self.sampler.load_state_dict(state["sampler"])
        for k, v in state["states"].items():
            self.states[k].load_state_dict(v)
        self.task.load_state_dict(state.get("task", {}))

    def save_extra(self, folder: Path) -> None:
        """Write more state into the checkpoint folder being assembled (main rank only)."""

    def load_extra(self, folder: Path) -> None:
        """Read what :meth:`save_extra` wrote."""

    # -- optimizer steps --------------------------------------------------------------------------
    def optimizer_step(self, step: int) -> tuple[float, bool]:
        """``engine.step()``; returns ``(grad_norm or 0, skipped)``. A run of non-finite updates
        (``trainer.max_bad_steps`` in a row) stops training with a TrainingError."""
        result = self.engine.step()
        if result.skipped:
            self.bad_steps += 1
            if self.bad_steps >= self.cfg.trainer.max_bad_steps:
                raise TrainingError(
                    f"{self.bad_steps} updates in a row had a non-finite loss or gradient "
                    f"(trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}); stopping at step {step}. "
                    "Lower trainer.lr, set trainer.max_grad_norm, or check the rewards."
                )
        else:
            self.bad_steps = 0
        return (result.grad_norm if math.isfinite(result.grad_norm) else 0.0), result.skipped

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average every metric over ranks, except per-rank timings."""
        return {k: self.engine.all_reduce_mean(v) if k not in TIMING_KEYS else v for k, v in metrics.items()}

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Everything an exact resume needs, written atomically; keeps the last K."""
        with ckpt.atomic_checkpoint(self.run_dir, self.step, enabled=self.engine.is_main, barrier=self.engine.barrier) as folder:
            self.engine.save(folder / "engine")
            if self.engine.is_main:
                ckpt.save_json(folder / "trainer_state.json", self.trainer_state())
                self.save_extra(folder)
            ckpt.save_rng(folder, name=f"rng_rank{self.engine.rank}")
        if self.engine.is_main:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.trainer.keep_last)
        return ckpt.checkpoint_dir(self.run_dir, self.step)

    def _load_checkpoint(self, folder: Path) -> None:
        self.engine.load(folder / "engine")
        self.load_trainer_state(ckpt.load_json(folder / "trainer_state.json"))
        self.load_extra(folder)
        name = f"rng_rank{self.engine.rank}"
        ckpt.load_rng(folder, name=name if (folder / f"{name}.json").exists() else "rng_rank0")
        self.resumed_from = folder

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run until ``trainer.max_steps`` (resuming from the newest checkpoint in the run folder)."""
        t = self.cfg.trainer
        started = time.perf_counter()
        try:
            if self.step == 0 and t.eval_at_start:
                self.tracker.log(0, self.evaluate())
            last_eval: dict[str, float] = {}
            while self.step < t.max_steps:
                metrics = self.train_step(self.step)
                self.step += 1
                at_end = self.step == t.max_steps
                out_of_time = bool(t.time_limit_s) and time.perf_counter() - started > t.time_limit_s
                if (t.eval_every and self.step % t.eval_every == 0) or at_end or out_of_time:
                    te = time.perf_counter()
                    last_eval = self.evaluate()
                    metrics.update(last_eval)
                    metrics["eval_s"] = time.perf_counter() - te
                if self.step % t.log_every == 0 or at_end or last_eval:
                    self.tracker.log(self.step, metrics)
                if (t.save_every and self.step % t.save_every == 0) or at_end or out_of_time:
                    self.save_checkpoint()
                if out_of_time:
                    break
            self.save_final_model()
        finally:
            self.close()
        plot = self.tracker.close()
        return {"run_dir": str(self.run_dir), "plot": str(plot) if plot else None, "eval": last_eval, "step": self.step}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch Generator on ``device`` seeded with ``seed`` (reproducible sampling streams)."""
    return torch.Generator(device=device).manual_seed(int(seed) % (2**63))


__all__ = ["TrainerBase", "TIMING_KEYS", "seed_everything", "seeded_generator"]
