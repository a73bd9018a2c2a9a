"""The shared half of the diffusion trainers: a loaded pipeline, a group of images per prompt,
image rewards, group-relative advantages (estimated over every rank's rows), evaluation through
the one evaluator (:mod:`mmpo.evaluate`, :class:`mmpo.diffusion.evaluation.ImageEvaluator`)
with PNG grids (each image upscaled and captioned with its prompt and reward), logged rollouts
(:meth:`DiffusionTrainerBase.log_image_samples`: the generated image, its prompt and how it was
sampled), and saving.

Subclasses decide what the policy is (the denoiser's SDE steps, :mod:`mmpo.trainers.denoising`;
or the initial-noise distribution, :mod:`mmpo.trainers.noise`): ``build_trainable``,
``image_sampler`` (evaluation images of the live policy) and ``saved_image_sampler`` (of a saved
one, for ``mmpo eval``), ``rollout`` (sample + reward), ``update`` (through
:meth:`~mmpo.trainers.loop.TrainerBase.update_policy`) and ``save_final_model``.

The task is read through attributes only (``mmpo`` never imports the plugins): what a trainer
needs is written down as :class:`typing.Protocol` classes (:class:`ImageTask` here, extended per
kind) and checked once, at construction, by :func:`check_task`.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from typing_extensions import get_protocol_members

from mmpo.config import RunConfig
from mmpo.diffusion.evaluation import ImageEvaluator, ImageSampler
from mmpo.diffusion.images import to_pil
from mmpo.diffusion.pipeline import TINY_PREFIX, DiffusionModel, PromptEmbeds
from mmpo.errors import ConfigError
from mmpo.evaluate import EvalResult, resolve_model_folder
from mmpo.samples import SampleRow
from mmpo.tasks import RewardOutput, Sample
from mmpo.trainers.kinds import TrainerKind
from mmpo.trainers.loop import TrainerBase, seed_everything
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


def load_pipeline(
    cfg: RunConfig, task: ImageTask, device: torch.device, precision: str, path: str | None = None
) -> tuple[DiffusionModel, int, int]:
    """The pipeline of ``path`` (default ``model.path``; the frozen parts in bf16 under bf16
    precision, the trained weights are cast to float32 by the trainer) and the image ``(height,
    width)`` of ``task.config.sampling`` (0: the pipeline's default), checked against the VAE."""
    path = path or cfg.model.path
    weights_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tiny = cfg.model.tiny if path.startswith(TINY_PREFIX) else None
    model = DiffusionModel.load(path, device=device, dtype=weights_dtype, seed=cfg.seed, tiny_overrides=tiny)
    s = task.config.sampling
    height, width = s.height or model.default_size(), s.width or model.default_size()
    model.latent_shape(height, width)  # checks the size early
    return model, height, width


class DiffusionTrainerBase(TrainerBase):
    """See the module docstring. ``contract`` lists the Protocols the task must satisfy;
    ``model_markers`` the files that mark a model folder of the kind (``mmpo eval checkpoint=``)."""

    contract: ClassVar[Contract] = (
        ("task", ImageTask),
        ("task.config", ImageTaskConfig),
        ("task.config.sampling", SamplingSettings),
    )
    model_markers: ClassVar[tuple[str, ...]] = ("model_index.json",)
    task: ImageTask  # type: ignore[assignment]
    shape: UpdateShape

    def __init__(self, cfg: RunConfig, run_dir: str | Path) -> None:
        device, precision = self._setup(cfg, run_dir)
        check_task(self.task, self.contract, self.kind)
        self.model, self.height, self.width = load_pipeline(cfg, self.task, device, precision)
        trainable = self.build_trainable()
        self.shape = update_shape(cfg, self.rows_per_step(), parts=self.parts())
        self.engine = self.build_engine(trainable, precision)
        self.device = self.engine.device
        self.task.all_gather = self.engine.all_gather_object  # type: ignore[attr-defined]
        self._make_sampler()
        self.states = dict(self.algo.states)
        self.engine_ready()
        self._start()

    # -- sizes ------------------------------------------------------------------------------------
    def parts(self) -> int:
        """Loss parts (backward calls) per micro batch; the same every step."""
        return 1

    # -- hooks --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_trainable(self) -> torch.nn.Module:
        """The module the engine trains (the denoiser, or the noise policy)."""

    def engine_ready(self) -> None:
        """Called once the engine exists, before resuming (state that must start alike on every rank)."""

    @abc.abstractmethod
    def image_sampler(self) -> ImageSampler:
        """The evaluation images of the live policy (``self.engine.module``)."""

    @classmethod
    @abc.abstractmethod
    def saved_image_sampler(
        cls, cfg: RunConfig, task: ImageTask, model_dir: Path | None, device: torch.device, precision: str
    ) -> tuple[ImageSampler, str]:
        """The evaluation images of the model saved in ``model_dir`` (None: the config's untrained
        model), loaded without optimizer or engine; returns ``(sampler, what was loaded)``."""

    # -- shared pieces ------------------------------------------------------------------------------
    def condition(self, samples: list[Sample]) -> PromptEmbeds:
        """The text conditioning of ``samples`` (with the negative prompt's under CFG)."""
        prompts = [s.meta["prompt"] for s in samples]
        return self.model.encode(prompts, negative_prompt=self.task.config.sampling.negative_prompt)

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

    def log_image_samples(
        self,
        rows: list[Sample],
        group_ids: torch.Tensor,
        images: torch.Tensor,
        out: RewardOutput,
        advantages: torch.Tensor,
        describe: Callable[[int], str],
    ) -> None:
        """Put this step's logged rollouts in ``self.step_samples`` (whole groups first, see
        :meth:`~mmpo.trainers.loop.TrainerBase.sample_indices`): per row the prompt, ``describe(i)``
        as the completion, the reward, advantage and components of row ``i``, and its image of
        ``images [N, 3, H, W]`` as a PIL image at the sampled resolution. Nothing is built when no
        sample is wanted."""
        idx = self.sample_indices(group_ids.tolist())
        if not idx:
            return
        pictures = to_pil(images[idx])
        for picture, i in zip(pictures, idx):
            self.step_samples.append(
                SampleRow(
                    prompt_id=str(rows[i].id),
                    group=int(group_ids[i]),
                    prompt=str(rows[i].meta["prompt"]),
                    completion=describe(i),
                    reward=float(out.rewards[i]),
                    advantage=float(advantages[i]),
                    components={k: float(v[i]) for k, v in out.components.items()},
                    media=[picture],
                )
            )

    # -- evaluation ---------------------------------------------------------------------------------
    def live_evaluator(self) -> ImageEvaluator:
        """Deterministic images of the evaluation prompts from the live policy, scored by the task."""
        return image_evaluator(self.cfg, self.task, self.image_sampler(), params=self.engine.gathered_params)

    def on_evaluated(self, result: EvalResult) -> None:
        """A PNG grid ``images/eval_step<k>.png`` of each evaluation (one image per prompt)."""
        if self.engine.is_main and result.rows:
            self._evaluator.save_grid(result.rows, self.run_dir / "images" / f"eval_step{self.step:06d}.png")

    @classmethod
    def checkpoint_evaluator(cls, cfg: RunConfig, checkpoint: str | None) -> tuple[ImageEvaluator, str]:
        """``mmpo eval``: the evaluator of ``checkpoint``'s model (a run folder or its ``model/``;
        ``tiny:<kind>`` or default: the config's untrained model.path), loaded without optimizer or
        training engine. Returns ``(evaluator, what was loaded)``."""
        import dataclasses

        from mmpo.engine import resolve_device, resolve_precision
        from mmpo.tasks import build_task_from

        if checkpoint and checkpoint.startswith(TINY_PREFIX):
            cfg, checkpoint = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=checkpoint)), None
        seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        precision = resolve_precision(cfg.precision, device)
        task = build_task_from(cfg)
        check_task(task, cls.contract, cls.kind)
        model_dir = resolve_model_folder(checkpoint, cls.model_markers) if checkpoint else None
        sampler, label = cls.saved_image_sampler(cfg, task, model_dir, device, precision)
        return image_evaluator(cfg, task, sampler), label

    # -- one step -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def rollout(self) -> tuple[Any, dict[str, float]]:
        """One step's sampled and scored group: ``(batch, metrics)``; ``batch.rewards [N]``, G per
        drawn prompt in draw order, go to the prompt sampler (:meth:`train_step`)."""

    @abc.abstractmethod
    def update(self, batch: Any, step: int) -> dict[str, float]:
        """The policy update of ``batch`` through :meth:`update_policy`; its metrics."""

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        with self.phase_hook("rollout"):
            batch, metrics = self.rollout()
            drawn = self.sampler.last_indices  # the prompts of draw_prompts, each with its G rewards
            self.sampler.observe(drawn, batch.rewards.view(len(drawn), -1))
        t1 = time.perf_counter()
        with self.phase_hook("update"):
            metrics.update(self.update(batch, step))
        metrics["update_s"] = time.perf_counter() - t1
        metrics["step_time_s"] = time.perf_counter() - t0
        metrics["lr"] = self.engine.lr()
        return self.reduce_metrics(metrics)


def image_evaluator(
    cfg: RunConfig, task: ImageTask, sampler: ImageSampler, params: Callable[[], AbstractContextManager] = nullcontext
) -> ImageEvaluator:
    """The evaluator of ``eval.num_samples`` prompts in batches of ``eval.batch_size``, noise from
    ``task.eval_seed``."""
    e = cfg.eval
    return ImageEvaluator(
        task, sampler, num_samples=e.num_samples, batch_size=e.batch_size, seed=task.config.eval_seed, params=params
    )


__all__ = [
    "Contract",
    "DiffusionTrainerBase",
    "ImageTask",
    "ImageTaskConfig",
    "SamplingSettings",
    "check_task",
    "image_evaluator",
    "load_pipeline",
]
