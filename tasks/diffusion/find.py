"""``find``: FIND (``vpx-ecnu/FIND``): RL on the initial noise x_T of a frozen text-to-image model.

The task and its config; the trainer is :class:`mmpo.trainers.noise.FindTrainer`, which reads
this config through its ``NoiseTask`` / ``NoiseConfig`` protocols.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmpo_tasks.diffusion.task import TextToImageConfig, TextToImageTask


@dataclass
class FindConfig(TextToImageConfig):
    policy: Literal["per_prompt", "conditioned"] = field(
        default="per_prompt",
        metadata={
            "help": "'per_prompt': a (mu, sigma) per training prompt (FIND); 'conditioned': a linear map from the "
            "pooled prompt embedding (generalises to unseen prompts).",
        },
    )
    sigma_init: float = field(
        default=1.0,
        metadata={
            "help": "Initial sigma (mu starts at 0: the pipeline's own N(0, I)).",
            "gt": 0.0,
        },
    )
    sigma_min: float = field(default=1e-4, metadata={"help": "Lower clamp of sigma (FIND: 1e-4).", "gt": 0.0})
    baseline: Literal["value", "group", "none"] = field(
        default="value",
        metadata={
            "help": "'value': A = R - V(mu, sigma, prompt) with a value net trained by MSE (FIND's reward "
            "calibration; on the rewards of every rank, so the ranks' value nets stay equal); 'group': the "
            "algorithm.advantage estimator over each prompt's G samples; 'none': A = R.",
        },
    )
    value_lr: float = field(default=1e-4, metadata={"help": "Value-net learning rate (FIND: 1e-4).", "gt": 0.0})
    value_steps: int = field(default=5, metadata={"help": "Value-net MSE steps per iteration (FIND: 5).", "min": 1})
    value_hidden: int = field(default=64, metadata={"help": "Value-net hidden width.", "min": 1})
    reg_weight: float = field(
        default=0.01,
        metadata={
            "help": "w_KL of the pull toward N(0, I) (FIND: 0.01).",
            "min": 0.0,
        },
    )
    reg_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Ramp w_KL linearly from 0 over this many steps (FIND's optional warm-up).",
            "min": 0,
        },
    )


class FindTask(TextToImageTask):
    name = "find"
    description = "FIND: RL on the initial noise of a frozen text-to-image model (one-step MDP) with image rewards"
    Config = FindConfig

    @classmethod
    def trainer_class(cls) -> type:
        from mmpo.trainers.noise import FindTrainer

        return FindTrainer


__all__ = ["FindConfig", "FindTask"]
