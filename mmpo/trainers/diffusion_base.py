"""The shared half of the diffusion trainers: a loaded pipeline, a group of images per prompt,
image rewards, group-relative advantages, evaluation with PNG grids, and saving.

Subclasses decide what the policy is (the denoiser's SDE steps, :mod:`mmpo.trainers.denoising`;
or the initial-noise distribution, :mod:`mmpo.trainers.noise`): ``build_trainable``,
``generate``, ``rollout`` (sample + reward), ``update`` (through
:meth:`~mmpo.trainers.loop.TrainerBase.update_policy`) and ``save_final_model``.

The task is read through attributes only (``mmpo`` never imports the plugins): what a trainer
needs is written down as :class:`typing.Protocol` classes (:class:`ImageTask` here, extended per
kind) and checked once, at construction, by :func:`check_task`.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from typing_extensions import get_protocol_members

from mmpo.config import RunConfig
from mmpo.diffusion.images import save_image_grid
from mmpo.diffusion.pipeline import DiffusionModel, PromptEmbeds
from mmpo.errors import ConfigError
from mmpo.tasks import RewardOutput, Sample
from mmpo.trainers.kinds import TrainerKind
from mmpo.trainers.loop import TrainerBase, seeded_generator
from mmpo.trainers.update import UpdateShape, update_shape


# -- the contract with the task ---------------------------------------------------------------------
@runtime_checkable
class SamplingSettings(Protocol):
    """``task.config.sampling``: how images are sampled (0 height / width = the pipeline's default)."""

    num_steps: int
    eval_num_steps: int
    guidance_scale: float
    noise_level: float
    eta: float
    height: int
    width: int
    negative_prompt: str


@runtime_checkable
class ImageTaskConfig(Protocol):
    """``task.config`` of every diffusion trainer."""

    sampling: SamplingSettings
    eval_seed: int


@runtime_checkable
class ImageTask(Protocol):
    """A text-to-image task: samples carry ``meta["prompt"]``; ``reward_images`` scores images."""

    config: ImageTaskConfig

    def num_train(self) -> int: ...

    def train_sample(self, index: int) -> Sample: ...

    def eval_samples(self, n: int) -> list[Sample]: ...

    def reward_images(self, images: torch.Tensor, samples: list[Sample]) -> RewardOutput:
        """Rewards of ``images [N, 3, H, W]`` in [0, 1] for ``samples`` (N rows; a group repeats its sample)."""
        ...


#: ``(where, protocol)`` pairs a task must satisfy; ``where`` is a dotted path from the task
Contract = Sequence[tuple[str, type]]


def check_task(task: Any, contract: Contract, kind: TrainerKind) -> None:
    """Raise ConfigError unless every object of ``contract`` (``"task"``, ``"task.config"``, ...)
    is an instance of its Protocol, naming the task, the trainer kind and the missing members."""
    for where, proto in contract:
        obj = task
        for name in where.split(".")[1:]:
            obj = getattr(obj, name, None)
        if not isinstance(obj, proto):
            missing = sorted(m for m in get_protocol_members(proto) if not hasattr(obj, m))
            raise ConfigError(
                f"task {getattr(task, 'name', type(task).__name__)!r} cannot run on the {kind.name} trainer: "
                f"{where} lacks {', '.join(missing) or 'members'} (the {proto.__name__} protocol of {proto.__module__})"
            )


class DiffusionTrainerBase(TrainerBase):
    """See the module docstring. ``contract`` lists the Protocols the task must satisfy."""

    contract: ClassVar[Contract] = (("task", ImageTask), ("task.config", ImageTaskConfig),
                                    ("task.config.sampling", SamplingSettings))
    task: ImageTask  # type: ignore[assignment]
    shape: UpdateShape

    def __init__(self, cfg: RunConfig, run_dir: str | Path) -> None:
        device, precision = self._setup(cfg, run_dir)
        check_task(self.task, self.contract, self.kind)
        # frozen parts in bf16 under bf16 precision; the trained weights stay float32 (autocast)
        weights_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.model = DiffusionModel.load(
            cfg.model.path, device=device, dtype=weights_dtype, seed=cfg.seed, tiny_overrides=cfg.model.tiny
        )
        s = self.task.config.sampling
        self.height = s.height or self.model.default_size()
        self.width = s.width or self.model.default_size()
        self.model.latent_shape(self.height, self.width)  # checks the size early
        trainable = self.build_trainable()
        self.shape = update_shape(cfg, self.rows_per_step(), parts=self.parts())
        self.engine = self.build_engine(trainable, precision)
        self.device = self.engine.device
        self.task.all_gather = self.engine.all_gather_object  # type: ignore[attr-defined]
        self._make_sampler()
        self.states = dict(self.algo.states)
        self._start()

    # -- sizes ------------------------------------------------------------------------------------
    def parts(self) -> int:
        """Loss parts (backward calls) per micro batch; the same every step."""
        return 1

    # -- hooks --------------------------------------------------------------------------------------
    def build_trainable(self) -> torch.nn.Module:
        raise NotImplementedError

    def generate(self, samples: list[Sample], cond: PromptEmbeds, *, eval_mode: bool, generator: torch.Generator) -> torch.Tensor:
        """One image per row of ``samples`` -> ``[N, 3, H, W]`` in [0, 1] (deterministic sampler when
        ``eval_mode``), noise drawn from ``generator``."""
        raise NotImplementedError

    # -- shared pieces ------------------------------------------------------------------------------
    def condition(self, samples: list[Sample]) -> PromptEmbeds:
        return self.model.encode([s.meta["prompt"] for s in samples], negative_prompt=self.task.config.sampling.negative_prompt)

    def draw_prompts(self) -> tuple[list[Sample], torch.Tensor]:
        """``prompts_per_step`` samples, each repeated G times (prompt-major), and ``group_ids [N]``."""
        r = self.cfg.rollout
        prompts = [self.task.train_sample(i) for i in self.sampler.next(r.prompts_per_step)]
        rows = [p for p in prompts for _ in range(r.group_size)]
        return rows, torch.arange(len(prompts)).repeat_interleave(r.group_size)

    def score(self, images: torch.Tensor, rows: list[Sample]) -> RewardOutput:
        """The task's rewards of ``images [N, 3, H, W]``; a non-finite reward is a ConfigError."""
        out = self.task.reward_images(images, rows)
        if not torch.isfinite(out.rewards).all():
            bad = [rows[i].meta["prompt"] for i in torch.nonzero(~torch.isfinite(out.rewards)).flatten().tolist()]
            raise ConfigError(f"a reward component returned a non-finite reward for prompts {bad[:3]}")
        return out

    def advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor, rows: list[Sample]) -> torch.Tensor:
        """``algorithm.advantage`` of ``rewards [N]`` over ``group_ids [N]`` -> ``[N]`` (the prompts name the rows)."""
        return self.algo.advantages(rewards, group_ids, prompt_keys=[s.meta["prompt"] for s in rows])

    # -- evaluation ---------------------------------------------------------------------------------
    def eval_images(self, n: int) -> tuple[list[Sample], torch.Tensor]:
        """The first ``n`` evaluation prompts and their deterministic images ``[n, 3, H, W]``, each
        from fixed noise (seeded by ``task.eval_seed`` and its position, whatever the world size);
        the global RNG is left untouched. Collective under several processes."""
        e = self.cfg.eval
        samples = self.task.eval_samples(n)
        rank, world = self.engine.rank, self.engine.world_size
        per_rank = -(-len(samples) // world)
        first = rank * per_rank
        mine = samples[first : first + per_rank]
        todo = mine or samples[:1]  # every rank runs the same collectives
        images = []
        state = torch.get_rng_state()
        with torch.no_grad(), self.engine.gathered_params():
            for s in range(0, len(todo), e.batch_size):
                part = todo[s : s + e.batch_size]
                gen = seeded_generator(self.task.config.eval_seed + first + s, self.device)
                images.append(self.generate(part, self.condition(part), eval_mode=True, generator=gen).cpu())
        torch.set_rng_state(state)
        gathered = self.engine.all_gather_object(torch.cat(images)[: len(mine)])
        return samples, torch.cat([g for g in gathered if len(g)])[: len(samples)]

    def evaluate(self) -> dict[str, float]:
        """Reward components of the evaluation images as ``eval/<name>``, and a PNG grid
        ``images/eval_step<k>.png`` (one image per prompt)."""
        if self.cfg.eval.num_samples == 0:
            return {}
        samples, images = self.eval_images(self.cfg.eval.num_samples)
        out = self.task.reward_images(images, samples)
        if self.engine.is_main:
            save_image_grid(images, self.run_dir / "images" / f"eval_step{self.step:06d}.png")
        metrics = {"reward": float(out.rewards.mean())}
        metrics.update({k: float(v.float().mean()) for k, v in out.components.items()})
        return {f"eval/{k}": v for k, v in metrics.items()}

    # -- `mmpo eval` ----------------------------------------------------------------------------------
    @classmethod
    def eval_config(cls, cfg: RunConfig, model_dir: Path) -> RunConfig:
        """The run config with which a trained ``model_dir`` (a run's ``model/``) is evaluated."""
        return cfg

    def load_final_model(self, model_dir: Path) -> None:
        """Load what :meth:`save_final_model` wrote beyond ``eval_config``'s model path."""

    @classmethod
    def evaluate_checkpoint(cls, cfg: RunConfig, checkpoint: str | None, run_dir: Path) -> dict[str, Any]:
        """``mmpo eval`` of a diffusion recipe: deterministic images of the evaluation prompts from the
        trained model of ``checkpoint`` (a run folder or its ``model/``; default: the config's
        untrained model.path), scored by the task's rewards. Writes ``<run_dir>/eval/``:
        ``images.png`` (a grid), ``predictions.jsonl`` (each prompt's reward components) and
        ``metrics.json``."""
        import dataclasses
        import json
        import tempfile

        from mmpo.checkpoint import save_json

        model_dir = None
        if checkpoint:
            path = Path(checkpoint)
            model_dir = path / "model" if (path / "model").is_dir() else path
            if not model_dir.is_dir():
                raise ConfigError(f"checkpoint='{checkpoint}' is neither a run folder (with model/) nor a model folder")
            cfg = cls.eval_config(cfg, model_dir)
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, max_steps=1))
        with tempfile.TemporaryDirectory(prefix="mmpo-eval-") as tmp:
            trainer = type(cls.__name__, (cls,), {"track": False})(cfg, Path(tmp))
            if model_dir is not None:
                trainer.load_final_model(model_dir)
            samples, images = trainer.eval_images(cfg.eval.num_samples)
            out = trainer.task.reward_images(images, samples)
        out_dir = Path(run_dir) / "eval"
        save_image_grid(images, out_dir / "images.png")
        pred_path = out_dir / "predictions.jsonl"
        tmp_path = pred_path.with_suffix(".jsonl.tmp")
        with open(tmp_path, "w") as f:
            for i, s in enumerate(samples):
                row = {"id": s.id, "prompt": s.meta["prompt"], "reward": float(out.rewards[i])}
                row.update({k: float(v[i]) for k, v in out.components.items()})
                f.write(json.dumps(row) + "\n")
        tmp_path.replace(pred_path)
        metrics = {"reward": float(out.rewards.mean()), **{k: float(v.float().mean()) for k, v in out.components.items()}}
        save_json(out_dir / "metrics.json", {"checkpoint": str(model_dir or cfg.model.path), **metrics})
        return {"metrics": metrics, "predictions": str(pred_path), "images": str(out_dir / "images.png")}

    # -- one step -----------------------------------------------------------------------------------
    def rollout(self) -> tuple[Any, dict[str, float]]:
        raise NotImplementedError

    def update(self, batch: Any, step: int) -> dict[str, float]:
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        with self.phase_hook("rollout"):
            batch, metrics = self.rollout()
        t1 = time.perf_counter()
        with self.phase_hook("update"):
            metrics.update(self.update(batch, step))
        metrics["update_s"] = time.perf_counter() - t1
        metrics["step_time_s"] = time.perf_counter() - t0
        metrics["lr"] = self.engine.lr()
        return self.reduce_metrics(metrics)


__all__ = ["Contract", "DiffusionTrainerBase", "ImageTask", "ImageTaskConfig", "SamplingSettings", "check_task"]
