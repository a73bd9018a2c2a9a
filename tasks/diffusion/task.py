"""The shared part of the text-to-image tasks: prompts, image rewards, sampler settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import torch

from mmpo.data_rows import KeyCheck, LoadSummary
from mmpo.errors import ConfigError
from mmpo.tasks import RewardOutput, Sample, Task
from mmpo_tasks.diffusion.data import Prompt, load_prompts


@dataclass
class SamplingConfig:
    """How images are sampled (Flow-GRPO ``config.sample`` defaults unless said otherwise)."""

    num_steps: int = field(
        default=10,
        metadata={
            "help": "Denoising steps while training (Flow-GRPO: 10; Chunk-GRPO: 16).",
            "min": 1,
        },
    )
    eval_num_steps: int = field(
        default=40,
        metadata={
            "help": "Deterministic (ODE / DDIM eta=0) steps at evaluation (Flow-GRPO: 40).",
            "min": 1,
        },
    )
    guidance_scale: float = field(
        default=4.5,
        metadata={
            "help": "Classifier-free guidance scale (SD3 4.5); for Flux the embedded guidance (3.5 for FLUX.1-dev). "
            "<=1 turns CFG off.",
        },
    )
    noise_level: float = field(
        default=0.7,
        metadata={
            "help": "Flow-GRPO SDE noise a in sigma_t = a*sqrt(t/(1-t)) (flow models).",
            "min": 0.0,
        },
    )
    eta: float = field(default=1.0, metadata={"help": "DDIM eta for UNet (SD 1.x) pipelines (DDPO: 1.0).", "min": 0.0})
    height: int = field(default=0, metadata={"help": "Image height in pixels; 0 = the pipeline's default.", "min": 0})
    width: int = field(default=0, metadata={"help": "Image width in pixels; 0 = the pipeline's default.", "min": 0})
    negative_prompt: str = field(default="", metadata={"help": "Negative prompt of the CFG branch."})


@dataclass
class TextToImageConfig:
    prompts: Union[str, list[Any]] = field(
        default_factory=list,
        metadata={
            "help": "Training prompts: a .txt file (one a line), a .jsonl file ({'prompt': ..., <meta keys>}) or an "
            "inline list.",
        },
    )
    eval_prompts: Union[str, list[Any], None] = field(
        default=None,
        metadata={
            "help": "Held-out prompts for evaluation (same formats); null = the training prompts with fixed noise "
            "seeds.",
        },
    )
    rewards: list[dict[str, Any]] = field(
        default_factory=lambda: [{"name": "brightness"}],
        metadata={
            "help": "Reward components, each {name, weight, <options>} (target_color, brightness, shape_at, "
            "clip_score, reward_server); their weighted sum is the reward, every component is logged.",
            "items_registry": "mmpo.rewards.image:IMAGE_REWARDS",
        },
    )
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "Sampler settings."})
    eval_seed: int = field(
        default=1234,
        metadata={
            "help": "Seed of the evaluation noise: the i-th evaluation prompt's starting noise is drawn with seed "
            "eval_seed + i, the same at every evaluation and however the prompts are sharded or batched.",
        },
    )


class TextToImageTask(Task):
    """Base of the diffusion tasks: prompts in, images scored by the configured reward components."""

    Config = TextToImageConfig

    def __init__(self, config: TextToImageConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        from mmpo.rewards.image import build_image_rewards

        if not config.prompts:
            raise ConfigError("task.prompts is empty: give a prompt file (.txt / .jsonl) or an inline list")
        self.rewards = build_image_rewards(config.rewards, where="task.rewards")
        # a prompt row may carry the keys the rewards read (None: a reward reads them all)
        read = [c.meta_keys() for c in self.rewards.components.values()]
        meta_keys = None if any(r is None for r in read) else frozenset().union(*read)
        keys = KeyCheck(self.unknown_keys)
        self.prompts: list[Prompt] = load_prompts(
            config.prompts, "task.prompts", meta_keys=meta_keys, unknown_keys=keys
        )
        self.eval_prompt_list: list[Prompt] = (
            load_prompts(config.eval_prompts, "task.eval_prompts", meta_keys=meta_keys, unknown_keys=keys)
            if config.eval_prompts is not None
            else self.prompts
        )
        self.data_summary = LoadSummary(
            self.name,
            unit="prompts",
            splits={"train": len(self.prompts), "eval": len(self.eval_prompt_list)},
            held_out_why="evaluation reads task.eval_prompts"
            if config.eval_prompts is not None
            else "no task.eval_prompts: evaluation reuses the training prompts with fixed noise seeds",
        )
        self.data_summary.print()

    @staticmethod
    def _sample(split: str, index: int, p: Prompt) -> Sample:
        return Sample(id=f"{split}-{index}", messages=[], meta={"prompt": p.text, **p.meta, "index": index})

    def num_train(self) -> int:
        return len(self.prompts)

    def train_sample(self, index: int) -> Sample:
        return self._sample("train", index, self.prompts[index % len(self.prompts)])

    def eval_samples(self, n: int) -> list[Sample]:
        return [self._sample("eval", i, p) for i, p in enumerate(self.eval_prompt_list[:n])]

    def reward_images(self, images: torch.Tensor, samples: list[Sample]) -> RewardOutput:
        """Rewards of ``images [N, 3, H, W]`` in [0, 1] for ``samples`` (N, a group repeats its sample)."""
        return self.rewards(images, [s.meta["prompt"] for s in samples], [s.meta for s in samples])


__all__ = ["SamplingConfig", "TextToImageConfig", "TextToImageTask"]
