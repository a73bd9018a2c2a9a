"""The options of environment tasks: a VLM policy acting in a gymnasium environment, trained by
:class:`mmpo.trainers.environment.EnvironmentTrainer` (RIPT-VLA, MiniWoB GRPO, ScreenExplorer).

A context is an environment seed (task + initial state); K rollouts start from it. The config
names the environment (``env``), how the VLM acts (``policy``), RIPT's context sampling
(``ript``), an optional supervised stage on demonstrations (``sft``) and the training /
held-out seeds. A plugin's task config extends :class:`EnvTaskConfig` (and its task subclasses
:class:`mmpo.rollout.env_task.EnvSeedTask`), so plugins share these pieces through ``mmpo`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmpo.policies.vla import DEFAULT_PROMPT
from mmpo.rollout.env_runner import EnvSpec, SeedRange
from mmpo.sft import SFTConfig


def _help(text: str, **bounds: float) -> dict[str, object]:
    return {"help": text, **bounds}


@dataclass
class VLAPolicyConfig:
    """How the VLM acts."""

    action_space: Literal["discrete", "binned", "laplace", "pointer"] = field(
        default="discrete",
        metadata=_help(
            "'discrete': one reserved token per env action; 'binned': continuous actions as one bin token per "
            "dimension (OpenVLA); 'laplace': an MLP-ResNet Laplace head on the last hidden state (OpenVLA-OFT, RIPT); "
            "'pointer': a 2-D point (a GUI click) as the choice of one image token, scored against the last hidden "
            "state (GUI-Actor style)."
        ),
    )
    actions: list[str] = field(
        default_factory=lambda: ["left", "right", "forward"],
        metadata=_help("Discrete actions the policy may take, by name (MiniGrid: names of its Actions enum)."),
    )
    action_values: list[Any] = field(
        default_factory=list,
        metadata=_help("Env action of each name; empty = looked up in the env's `actions` enum (MiniGrid)."),
    )
    low: list[float] = field(
        default_factory=list, metadata=_help("Continuous action lower bounds; empty = the env's Box action space.")
    )
    high: list[float] = field(
        default_factory=list, metadata=_help("Continuous action upper bounds; empty = the env's Box action space.")
    )
    bins: int = field(default=256, metadata=_help("Bins per dimension of 'binned' (OpenVLA: 256).", min=2))
    scale_multiplier: float = field(
        default=5.0, metadata=_help("'laplace': rollouts sample with scale b*s (RIPT scripts: s=5).", gt=0.0)
    )
    log_scale_init: float = field(
        default=-3.0, metadata=_help("'laplace': initial bias of the log-scale output (RIPT: -3).")
    )
    head_width: int = field(default=256, metadata=_help("'laplace': MLP-ResNet width.", min=1))
    head_blocks: int = field(default=2, metadata=_help("'laplace': residual blocks.", min=0))
    logp_reduce: Literal["sum", "per_dim"] = field(
        default="sum",
        metadata=_help(
            "'laplace': one unit per step with log p summed over dimensions (RIPT sum_on_action_dim), or one unit "
            "per dimension."
        ),
    )
    pointer_dim: int = field(default=64, metadata=_help("'pointer': query/key size of the pointer head.", min=1))
    temperature: float = field(
        default=1.0, metadata=_help("Sampling temperature of action tokens (and of the pointer's cells).", gt=0.0)
    )
    action_vocab: Literal["full", "actions"] = field(
        default="full",
        metadata=_help(
            "'full': sample from the whole vocabulary, a non-action token is an invalid action (a no-op, logged); "
            "'actions': sample and score over the action tokens only (like a VQ codebook policy: no invalid outputs, "
            "and pushing an action down cannot leak mass to text tokens)."
        ),
    )
    prompt_template: str = field(
        default=DEFAULT_PROMPT, metadata=_help("Text after the image; {instruction} is replaced.")
    )


@dataclass
class RiptConfig:
    """RIPT's rollout-side knobs (RIPT-VLA, arXiv 2505.17016: dynamic rollout sampling)."""

    reward: Literal["success", "env_return"] = field(
        default="success",
        metadata=_help("'success': binary task success (RIPT); 'env_return': the environment's summed reward."),
    )
    dynamic_sampling: bool = field(
        default=True, metadata=_help("Discard contexts whose K rewards are all equal and draw others.")
    )
    skip_solved: bool = field(
        default=True,
        metadata=_help(
            "Skip contexts whose latest K rollouts all succeeded (their history is dropped after skip_threshold skips)."
        ),
    )
    skip_threshold: int = field(
        default=3, metadata=_help("Skips before a solved context is tried again (RIPT: 3).", min=0)
    )
    max_draws: int = field(
        default=4, metadata=_help("At most this many x rollout.prompts_per_step contexts are drawn per step.", min=1)
    )
    early_stop_fraction: float = field(
        default=1.0,
        metadata=_help(
            "A rollout round ends once this fraction of rollout.prompts_per_step contexts is kept "
            "(RIPT LIBERO-90: 0.8).",
            gt=0.0,
            max=1.0,
        ),
    )


#: ``task.sft.demos: auto``: demonstrations the task builds itself on first use (ript_vla: BabyAI's bot)
AUTO_DEMOS = "auto"


@dataclass
class DemoConfig(SFTConfig):
    """The supervised stage before RL (skipped when ``demos`` is empty)."""

    demos: str = field(
        default="",
        metadata=_help(
            "ript_vla: folder written by data_prep/babyai_demos.py (demos.jsonl + frames/), or 'auto': "
            "max_episodes BabyAI-bot episodes of task.env, built on first use into the cache; miniwob_grpo / "
            "screenexplorer: GUI episodes (data_prep/miniwob_episodes.py folder or episodes.jsonl). "
            "Empty: no SFT stage."
        ),
    )
    max_episodes: int = field(default=0, metadata=_help("Use the first N demonstration episodes; 0 = all.", min=0))


@dataclass
class EnvTaskConfig:
    """The options every environment task has (``task.*`` of ript_vla, miniwob_grpo, screenexplorer)."""

    env: EnvSpec = field(default_factory=EnvSpec, metadata=_help("The environment and its observation."))
    policy: VLAPolicyConfig = field(default_factory=VLAPolicyConfig, metadata=_help("How the VLM acts."))
    ript: RiptConfig = field(default_factory=RiptConfig, metadata=_help("Dynamic rollout sampling."))
    sft: DemoConfig = field(default_factory=DemoConfig, metadata=_help("Supervised stage on demonstrations."))
    train_seeds: SeedRange = field(
        default_factory=lambda: SeedRange(0, 1000), metadata=_help("Training contexts (env seeds).")
    )
    eval_seeds: SeedRange = field(
        default_factory=lambda: SeedRange(100_000, 100),
        metadata=_help("Held-out contexts; must not overlap train_seeds (nor the demonstrations)."),
    )
    eval_greedy: bool = field(
        default=False,
        metadata=_help(
            "Evaluate the policy's mode (argmax token / Laplace mean) instead of sampling with a fixed seed."
        ),
    )
    eval_seed: int = field(
        default=1234, metadata=_help("Seed of the evaluation sampling (the same draws at every evaluation).")
    )
    eval_videos: int = field(
        default=4, metadata=_help("`mmpo eval` saves a GIF of the first N evaluation episodes.", min=0)
    )


__all__ = ["DemoConfig", "EnvTaskConfig", "RiptConfig", "VLAPolicyConfig"]
