"""What every trainer shares: the step loop, the objective built once (:mod:`mmpo.trainers.algorithm`),
optimizer-step bookkeeping, atomic checkpoints and exact resume. A trainer (one per kind of action
unit, see :mod:`mmpo.trainers`) implements one step, evaluation and the final save; its updates go
through :func:`mmpo.trainers.update.run_update`.

A task picks its trainer (``Task.trainer_class``), so ``mmpo train`` runs any plugin the same way.
"""

from __future__ import annotations

import abc
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch

from mmpo import checkpoint as ckpt
from mmpo import faults, run_folder, shared_checkpoint
from mmpo.config import RunConfig
from mmpo.engine import Engine, EngineOptions
from mmpo.errors import TrainingError
from mmpo.evaluate import EvalResult, Evaluator, run_evaluation, truncate_step_evals, write_step_evaluation
from mmpo.hf_logging import quiet_libraries
from mmpo.progress import RunProgress, eval_count, eval_index, format_results
from mmpo.report import write_report_safely
from mmpo.rollout import prompt_samplers
from mmpo.samples import SampleLog, SampleRow, pick_sample_rows
from mmpo.seeding import seed_everything, seeded_generator
from mmpo.tasks import Task
from mmpo.tracking import Tracker
from mmpo.trainers.algorithm import Algorithm, build_algorithm
from mmpo.trainers.kinds import TrainerKind
from mmpo.trainers.method_inputs import gather_rows
from mmpo.trainers.update import RowSizes, TermsFn, UpdateShape, run_update

#: metrics that are per-rank wall-clock times (not averaged across ranks)
TIMING_KEYS = ("step_time_s", "rollout_s", "reward_s", "update_s", "eval_s", "weight_sync_s")


class TrainerBase(abc.ABC):
    """The loop of ``mmpo train`` around a subclass's ``train_step`` / ``evaluate``.

    Subclasses set ``kind``; their ``__init__`` calls :meth:`_setup` first (task and objective),
    sets ``engine``, ``sampler`` and ``states`` (named objects with ``state_dict`` /
    ``load_state_dict``; start from ``dict(self.algo.states)``), then calls :meth:`_start`. They
    may extend :meth:`trainer_state` / :meth:`load_trainer_state` and :meth:`save_extra` /
    :meth:`load_extra` (tensors beside the engine's) for more state. Their updates go through
    :meth:`update_policy` (the one update routine).
    """

    cfg: RunConfig
    run_dir: Path
    task: Task
    engine: Engine
    sampler: prompt_samplers.PromptSamplerBase
    states: dict[str, Any]
    shape: UpdateShape
    #: the kind of action unit this trainer optimises (checked against the objective at load)
    kind: ClassVar[TrainerKind]
    algo: Algorithm
    #: False for a trainer built only to evaluate (`mmpo eval`): no progress bar, no metrics files
    track: bool = True

    def _setup(self, cfg: RunConfig, run_dir: str | Path) -> tuple[torch.device, str]:
        """Seed, resolve device and precision, build the task and the objective (``self.algo``,
        checked against this trainer's kind: config mistakes fail here, before any model loads).
        Returns ``(device, precision)``."""
        from mmpo.engine import resolve_device, resolve_precision

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        precision = resolve_precision(cfg.precision, device)
        quiet_libraries(device)
        self.task, self.algo = self.prepare(cfg)
        self.config_changes = run_folder.check_rerun(cfg, self.run_dir, self.task) if self.track else []
        # the bar shows from here on (config and task are fine), its description naming the phase
        self.progress = RunProgress(cfg.trainer.max_steps, enabled=self.track and os.environ.get("RANK", "0") == "0")
        self.advantage_fn = self.algo.advantage_fn
        self.loss_fn = self.algo.loss_fn
        self.last_kl: float | None = None
        self.sft_metrics: dict[str, Any] = {}  # a supervised stage's results, logged with the first evaluation
        self._evaluator: Evaluator | None = None
        self.phase_hook: Any = self._train_phase  # `mmpo bench` replaces it to attribute memory to phases
        return device, precision

    @classmethod
    def prepare(cls, cfg: RunConfig) -> tuple[Task, Algorithm]:
        """What ``mmpo train`` checks before any model loads: the task (its data read, or built on
        first use), the objective against this trainer's kind, and :meth:`check_requirements`.
        Returns ``(task, objective)``; a mistake raises ConfigError / DataError."""
        from mmpo.tasks import build_task_from

        task = build_task_from(cfg)
        algo = build_algorithm(cfg, cls.kind, task)
        cls.check_requirements(cfg, task)
        return task, algo

    @classmethod
    def check_requirements(cls, cfg: RunConfig, task: Task) -> None:
        """Refuse, before any model loads, what this trainer cannot run with ``cfg`` (e.g. the
        token trainer's rollout engine without its environment); ConfigError."""

    def show_phase(self, name: str) -> None:
        """Name the current phase in the progress bar (``stage 1 · warm start``, ``eval 2/5``, ...)."""
        self.progress.phase(name)

    @contextmanager
    def _train_phase(self, name: str) -> Iterator[None]:
        """The trainers' ``with self.phase_hook("rollout"):`` blocks: shown as ``train · rollout``."""
        self.show_phase(f"train · {name}")
        yield

    def _make_sampler(self, num_samples: int | None = None) -> None:
        """``rollout.prompt_sampler`` over ``num_samples`` (default: the task's train samples), sharded over ranks."""
        r, e, self._rank_samplers = self.cfg.rollout, self.engine, None
        n, opts = self.task.num_train() if num_samples is None else num_samples, r.prompt_sampler_options
        kw = dict(seed=self.cfg.seed, rank=e.rank, world_size=e.world_size, group_size=r.group_size)
        self.sampler = prompt_samplers.build_prompt_sampler(r.prompt_sampler, opts, n, **kw)

    def _start(self) -> None:
        """Resume from the newest complete checkpoint in the run folder; write the config; open the tracker."""
        self.step = 0
        self.bad_steps = 0
        self.resumed_from: Path | None = None
        latest = shared_checkpoint.agreed_checkpoint(self.run_dir, self.engine)  # verified, the same on every rank
        if latest is not None:
            self.show_phase("load checkpoint")
            self._load_checkpoint(latest)
            self.progress.start_at(self.step)
        if self.engine.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run_folder.save_run_config(self.cfg, self.run_dir, self.config_changes, self.step)
        self.tracker = Tracker(
            self.run_dir,
            self.cfg.trainer.max_steps,
            start_step=self.step,
            enabled=self.engine.is_main and self.track,
            progress=self.progress.bar if self.progress.bar is not None else False,
            report_to=self.cfg.trainer.report_to,
            config=run_folder.written_config(self.cfg),
        )
        logging = self.engine.is_main and self.track
        self.sample_log = SampleLog(self.run_dir, self.cfg.trainer.log_samples if logging else 0, self.tracker)
        if logging:
            self.sample_log.truncate(self.step)
            truncate_step_evals(self.run_dir, self.step)
        #: the rollouts of the current step to log (a trainer's ``train_step`` fills it, at most
        #: :meth:`samples_wanted` rows)
        self.step_samples: list[SampleRow] = []

    # -- hooks ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def train_step(self, step: int) -> dict[str, float]:
        """One step (rollout, reward, advantage, update); its metrics, reduced over ranks."""

    @abc.abstractmethod
    def live_evaluator(self) -> Evaluator:
        """The evaluator of the live policy (built once, at the first evaluation); the same class
        ``checkpoint_evaluator`` builds for ``mmpo eval``."""

    def samples_wanted(self) -> int:
        """How many of this step's rollouts to put in ``self.step_samples`` (0 off the main rank
        or with ``trainer.log_samples: 0``): build media for these rows only."""
        return self.sample_log.limit

    def sample_indices(self, group_ids: Sequence[int]) -> list[int]:
        """The rows (indices into ``group_ids``, one group id per rollout) to log this step: at
        most :meth:`samples_wanted`, by :func:`pick_sample_rows` (whole groups first)."""
        return pick_sample_rows(group_ids, self.samples_wanted())

    def _report_after_eval(self) -> None:
        """``trainer.report: true``: rewrite ``report.html`` after an in-training evaluation (main rank)."""
        if self.cfg.trainer.report and self.engine.is_main and self.track:
            write_report_safely(self.run_dir, kind=self.kind.name)

    def on_evaluated(self, result: EvalResult) -> None:
        """Called on every rank after each in-training evaluation (e.g. to save a picture)."""

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics as ``eval/<name>`` (the one evaluator, items sharded over ranks; {}
        when ``eval.num_samples`` is 0); at step 0 also the supervised stage's as ``sft/<name>``."""
        if self.cfg.eval.num_samples == 0:
            return {}
        if self._evaluator is None:
            self._evaluator = self.live_evaluator()
        e, t = self.engine, self.cfg.trainer
        i = eval_index(self.step, t.max_steps, t.eval_every, t.eval_at_start)
        n = eval_count(t.max_steps, t.eval_every, t.eval_at_start)
        self.show_phase(f"eval {i}/{n}")
        share = math.ceil(len(self._evaluator.items()) / e.world_size)  # what this rank predicts
        with self.progress.items(share, f"eval {i}/{n}") as advance:
            result = run_evaluation(
                self._evaluator,
                rank=e.rank,
                world_size=e.world_size,
                gather=e.all_gather_object,
                chunk_size=self.cfg.eval.batch_size,
                progress=advance,
            )
        self.on_evaluated(result)
        if self.engine.is_main and self.track:
            write_step_evaluation(self.run_dir, self.step, result, self._evaluator)
        faults.fault_point("evaluation")
        metrics = {f"eval/{k}": float(v) for k, v in result.metrics.items()}
        if self.step == 0 and self.sft_metrics:
            metrics.update({f"sft/{k}": float(v) for k, v in self.sft_metrics.items() if isinstance(v, (int, float))})
        self.progress.write(format_results(self.step, metrics))
        self.show_phase("train")
        return metrics

    @abc.abstractmethod
    def save_final_model(self, folder: Path) -> None:
        """Write the final model into ``folder`` (a folder the ecosystem loads; it becomes ``model/``)."""

    @classmethod
    @abc.abstractmethod
    def checkpoint_evaluator(cls, cfg: RunConfig, checkpoint: str | None) -> tuple[Any, str]:
        """``mmpo eval``: ``(evaluator, what was loaded)`` for ``checkpoint`` (see :mod:`mmpo.evaluate`),
        built without an optimizer or a training engine."""

    def close(self) -> None:
        """Release what the run holds beyond the process (servers, browsers, ...)."""

    def trainer_state(self) -> dict[str, Any]:
        """JSON state of the loop (step counters, sampler, stateful algorithm pieces, task)."""
        return {
            "step": self.step,
            "bad_steps": self.bad_steps,
            **prompt_samplers.sampler_checkpoint(self.sampler, getattr(self, "_rank_samplers", None)),  # every rank's
            "states": {k: v.state_dict() for k, v in self.states.items()},
            "task": self.task.state_dict(),
            "last_kl": self.last_kl,
        }

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.bad_steps = int(state["bad_steps"])
        prompt_samplers.resume_sampler(self.sampler, state, self.engine.rank, self.engine.world_size)
        for k, v in state["states"].items():
            self.states[k].load_state_dict(v)
        self.task.load_state_dict(state.get("task", {}))
        last_kl = state.get("last_kl")
        self.last_kl = None if last_kl is None else float(last_kl)

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

    def build_engine(self, module: torch.nn.Module, precision: str) -> Engine:
        """The engine that steps ``module``'s weights, sized from ``trainer.*`` and ``self.shape``
        (optimizer steps for the LR schedule; backward calls per step and micro-batch rows for
        DeepSpeed's batch fields); DeepSpeed ZeRO when the config names a file."""
        t = self.cfg.trainer
        return Engine.build(
            module,
            EngineOptions(
                lr=t.lr,
                weight_decay=t.weight_decay,
                adam_betas=tuple(t.adam_betas),
                max_grad_norm=t.max_grad_norm,
                lr_schedule=t.lr_schedule,
                warmup_steps=t.warmup_steps,
                total_steps=t.max_steps * self.shape.optimizer_steps,
                grad_accum_steps=self.shape.backwards_per_step,
                micro_batch_size=self.shape.micro_batch_size,
                device=self.cfg.device,
                precision=precision,
                deepspeed_config=self.cfg.deepspeed,
            ),
        )

    def advantages(
        self,
        rewards: torch.Tensor,
        group_ids: torch.Tensor,
        keys: list[str] | None = None,
        inputs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``algorithm.advantage`` of this rank's ``rewards [N]`` (groups ``group_ids [N]``, prompt
        keys ``keys`` for ``dcpo_sas``, per-row ``inputs`` the estimator declares) estimated on the
        rows of every rank, each rank's groups kept apart (collective): batch statistics and a
        stateful estimator's state then agree on every rank. Returns this rank's ``[N]`` / ``[N, T]``."""
        mine = (rewards.float().cpu(), group_ids.cpu(), list(keys) if keys is not None else None)
        parts = self.engine.all_gather_object((*mine, {k: v.cpu() for k, v in (inputs or {}).items()}))
        first = sum(len(p[0]) for p in parts[: self.engine.rank])
        offsets = torch.tensor([0] + [int(p[1].max()) + 1 if len(p[1]) else 0 for p in parts]).cumsum(0)
        groups = torch.cat([p[1] + o for p, o in zip(parts, offsets)])
        all_keys = None if keys is None else [k for p in parts for k in p[2]]
        adv = self.algo.advantages(
            torch.cat([p[0] for p in parts]), groups, prompt_keys=all_keys, inputs=gather_rows([p[3] for p in parts])
        )
        return adv[first : first + len(rewards)].to(rewards.device)

    def rows_per_step(self) -> int:
        """Trajectories a step trains on when nothing is filtered: prompts (contexts) x G."""
        return self.cfg.rollout.prompts_per_step * self.cfg.rollout.group_size

    def beta(self, step: int) -> float:
        """The KL coefficient at ``step`` (0 without a KL term), from the built objective."""
        return self.algo.beta(step, self.cfg.trainer.max_steps, self.last_kl)

    def update_policy(
        self,
        shape: UpdateShape,
        rows: torch.Tensor,
        sizes: RowSizes,
        terms: TermsFn,
        beta: float,
        step: int,
        *,
        max_len: int | None = None,
        stand_in: int = 0,
    ) -> dict[str, float]:
        """One step's policy update through :func:`mmpo.trainers.update.run_update` (this engine's
        backward and optimizer step, the run's seed); records the KL measured over all ranks for the schedule."""
        out = run_update(
            shape=shape,
            rows=rows,
            sizes=sizes,
            terms=terms,
            algo=self.algo,
            beta=beta,
            step=step,
            seed=self.cfg.seed,
            backward=self.engine.backward,
            optimizer_step=self.optimizer_step,
            max_len=max_len,
            stand_in=stand_in,
        )
        if self.algo.uses_kl:  # every rank joins the mean, so every rank's schedule moves alike
            self.last_kl = self.engine.all_reduce_mean(out.get("kl", 0.0))
        return out

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average every metric over the ranks that report it (one collective, so ranks whose
        metrics differ, e.g. one left without rows by a filter, never mismatch); per-rank
        timings stay this rank's."""
        gathered = self.engine.all_gather_object(metrics)
        out: dict[str, float] = {}
        for k in sorted(set().union(*gathered)):
            if k in TIMING_KEYS and k in metrics:
                out[k] = metrics[k]
            else:
                values = [float(m[k]) for m in gathered if k in m]
                out[k] = sum(values) / len(values)
        return out

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Everything an exact resume needs, written atomically; keeps the last K."""
        self._rank_samplers = prompt_samplers.gather_states(self.sampler, self.engine)  # collective
        with ckpt.atomic_checkpoint(
            self.run_dir, self.step, enabled=self.engine.is_main, barrier=self.engine.barrier
        ) as folder:
            self.engine.save(folder / "engine")
            if self.engine.is_main:
                ckpt.save_json(folder / "trainer_state.json", self.trainer_state())
                self.save_extra(folder)
            ckpt.save_rng(folder, name=f"rng_rank{self.engine.rank}")
        if self.engine.is_main:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.trainer.keep_last, newest=self.step)
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
                self._report_after_eval()
            last_eval: dict[str, float] = {}
            while self.step < t.max_steps:
                self.step_samples = []
                self.show_phase("train")
                self.sampler.begin_step(self.step)
                metrics = self.train_step(self.step)
                self.step += 1
                if self.step_samples:
                    self.sample_log.write(self.step, self.step_samples)
                    self.step_samples = []
                faults.fault_point("step")
                at_end = self.step == t.max_steps
                out_of_time = bool(t.time_limit_s) and time.perf_counter() - started > t.time_limit_s
                if (t.eval_every and self.step % t.eval_every == 0) or at_end or out_of_time:
                    te = time.perf_counter()
                    last_eval = self.evaluate()
                    metrics.update(last_eval)
                    metrics["eval_s"] = time.perf_counter() - te
                if self.step % t.log_every == 0 or at_end or last_eval:
                    self.tracker.log(self.step, metrics)
                if "eval_s" in metrics and not (at_end or out_of_time):  # the final report comes below
                    self._report_after_eval()
                if (t.save_every and self.step % t.save_every == 0) or at_end or out_of_time:
                    self.show_phase("save checkpoint")
                    self.save_checkpoint()
                if out_of_time:
                    break
            self.show_phase("save model")
            ckpt.save_model_atomically(self.run_dir, self.save_final_model, self.engine.is_main, self.engine.barrier)
        finally:
            self.close()
        plot = self.tracker.close()
        report = write_report_safely(self.run_dir, kind=self.kind.name) if self.engine.is_main and self.track else None
        return {
            "run_dir": str(self.run_dir),
            "plot": str(plot) if plot else None,
            "report": str(report) if report else None,
            "eval": last_eval,
            "step": self.step,
        }


__all__ = ["TrainerBase", "TIMING_KEYS", "seed_everything", "seeded_generator"]
