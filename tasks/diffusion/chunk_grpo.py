"""``chunk_grpo`` (and ``flow_grpo``): GRPO on the denoiser's SDE steps, grouped into chunks.

The tasks and their config; the trainer (Flow-GRPO, Chunk-GRPO: chunk size 1 is Flow-GRPO) is
:class:`mmpo.trainers.denoising.ChunkGRPOTrainer`, which reads this config through its
``DenoisingTask`` / ``DenoisingConfig`` protocols.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmpo.config import FieldError
from mmpo.diffusion.chunks import check_partition
from mmpo.errors import ConfigError
from mmpo_tasks.diffusion.task import TextToImageConfig, TextToImageTask


@dataclass
class ChunkConfig:
    mode: Literal["uniform", "fixed", "profile"] = field(
        default="uniform",
        metadata={
            "help": "'uniform' (chunks of `size` steps; size 1 = Flow-GRPO), 'fixed' (`sizes`, e.g. [2,3,4,7] over 16 "
            "steps), 'profile' (`num_chunks` chunks from the relative-L1 profile of consecutive latents, "
            "measured once at the start).",
        },
    )
    size: int = field(default=1, metadata={"help": "Steps per chunk in 'uniform' mode.", "min": 1})
    sizes: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Chunk sizes in 'fixed' mode; must sum to sampling.num_steps.",
        },
    )
    num_chunks: int = field(default=4, metadata={"help": "Chunks in 'profile' mode.", "min": 1})
    profile_prompts: int = field(
        default=4,
        metadata={
            "help": "Training prompts sampled (deterministically) to measure the profile.",
            "min": 1,
        },
    )
    weighted_sampling: bool = field(
        default=False,
        metadata={
            "help": "Optimise only `per_step` chunks each step, drawn with probability proportional to (mean noise "
            "level)^power: favours high-noise chunks (Chunk-GRPO's optional weighted sampling).",
        },
    )
    per_step: int = field(default=1, metadata={"help": "Chunks optimised per step under weighted_sampling.", "min": 1})
    power: float = field(
        default=1.0,
        metadata={
            "help": "Exponent of the noise-level weights under weighted_sampling.",
            "min": 0.0,
        },
    )


@dataclass
class ChunkGRPOConfig(TextToImageConfig):
    chunks: ChunkConfig = field(
        default_factory=ChunkConfig,
        metadata={
            "help": "How the denoising steps form action units.",
        },
    )
    timestep_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Train on the first int(num_steps * fraction) steps (Flow-GRPO: 0.99); later steps are sampled but "
            "not trained.",
            "gt": 0.0,
            "max": 1.0,
        },
    )
    kl_std: Literal["sigma_t", "step"] = field(
        default="sigma_t",
        metadata={
            "help": "Std in the closed-form KL |mu - mu_ref|^2 / (2 std^2): 'sigma_t' (Flow-GRPO's code) or 'step' "
            "(the step's own std sigma_t*sqrt(-dt), the exact Gaussian KL).",
        },
    )
    skip_zero_advantage: bool = field(
        default=True,
        metadata={
            "help": "Leave images whose advantage is exactly 0 out of the update (Flow-GRPO); they carry no gradient.",
        },
    )

    def validate_config(self, where: str) -> None:
        """Check the chunks against the sampling steps when the config is read (not only after the
        first rollout, where :meth:`ChunkGRPOTrainer.partition` would find them)."""
        c, steps = self.chunks, self.sampling.num_steps
        key = f"{where}.chunks" if where else "chunks"
        if c.mode == "fixed":
            try:
                check_partition(c.sizes, steps, key=f"{key}.sizes")
            except ConfigError as e:
                raise FieldError(f"{key}.sizes", f"key {e} ({where or 'task'}.sampling.num_steps)") from None
        elif c.mode == "profile" and c.num_chunks > steps:
            raise FieldError(
                f"{key}.num_chunks",
                f"key '{key}.num_chunks' = {c.num_chunks} must be at most the {steps} sampling steps",
            )


class ChunkGRPOTask(TextToImageTask):
    name = "chunk_grpo"
    description = (
        "text-to-image GRPO on chunks of denoising steps (Chunk-GRPO; chunk size 1 = Flow-GRPO) with image rewards"
    )
    Config = ChunkGRPOConfig

    @classmethod
    def trainer_class(cls) -> type:
        from mmpo.trainers.denoising import ChunkGRPOTrainer

        return ChunkGRPOTrainer


class FlowGRPOTask(ChunkGRPOTask):
    """Flow-GRPO: ``chunk_grpo`` with every step its own unit (``chunks.size`` 1)."""

    name = "flow_grpo"
    description = "text-to-image Flow-GRPO (one action unit per SDE step) with image rewards"

    def __init__(self, config: ChunkGRPOConfig, *, seed: int = 0) -> None:
        if config.chunks.mode != "uniform" or config.chunks.size != 1:
            raise ConfigError("task flow_grpo trains every step on its own; use task chunk_grpo for task.chunks")
        super().__init__(config, seed=seed)


__all__ = ["ChunkConfig", "ChunkGRPOConfig", "ChunkGRPOTask", "FlowGRPOTask"]
