"""``ript_vla``: RIPT-VLA (``Ariostgx/ript-vla``) — a VLA policy fine-tuned by RL in a gymnasium
environment from binary success, after a supervised stage on demonstrations.

A context is an environment seed (task + initial state); K rollouts start from it; the
leave-one-out (``rloo``) advantage compares them; contexts whose K outcomes are all equal are
discarded and others drawn (dynamic rollout sampling), contexts solved in their latest K
rollouts are skipped (``ript_skip``); PPO clip on the action units, several epochs per batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmpo.errors import ConfigError
from mmpo.rollout.env_runner import EnvSpec, SeedRange, check_disjoint
from mmpo.sft import SFTConfig
from mmpo.tasks import RewardOutput, Sample, Task
from mmpo.policies.vla import DEFAULT_PROMPT


@dataclass
class VLAPolicyConfig:
    """How the VLM acts."""

    action_space: Literal["discrete", "binned", "laplace", "pointer"] = field(
        default="discrete",
        metadata={"help": "'discrete': one reserved token per env action; 'binned': continuous actions as one bin token per dimension (OpenVLA); 'laplace': an MLP-ResNet Laplace head on the last hidden state (OpenVLA-OFT, RIPT); 'pointer': a 2-D point (a GUI click) as the choice of one image token, scored against the last hidden state (GUI-Actor style)."},
    )
    actions: list[str] = field(
        default_factory=lambda: ["left", "right", "forward"],
        metadata={"help": "Discrete actions the policy may take, by name (MiniGrid: names of its Actions enum)."},
    )
    action_values: list[Any] = field(
        default_factory=list, metadata={"help": "Env action of each name; empty = looked up in the env's `actions` enum (MiniGrid)."}
    )
    low: list[float] = field(default_factory=list, metadata={"help": "Continuous action lower bounds; empty = the env's Box action space."})
    high: list[float] = field(default_factory=list, metadata={"help": "Continuous action upper bounds; empty = the env's Box action space."})
    bins: int = field(default=256, metadata={"help": "Bins per dimension of 'binned' (OpenVLA: 256).", "min": 2})
    scale_multiplier: float = field(default=5.0, metadata={"help": "'laplace': rollouts sample with scale b*s (RIPT scripts: s=5).", "gt": 0.0})
    log_scale_init: float = field(default=-3.0, metadata={"help": "'laplace': initial bias of the log-scale output (RIPT: -3)."})
    head_width: int = field(default=256, metadata={"help": "'laplace': MLP-ResNet width.", "min": 1})
    head_blocks: int = field(default=2, metadata={"help": "'laplace': residual blocks.", "min": 0})
    logp_reduce: Literal["sum", "per_dim"] = field(
        default="sum", metadata={"help": "'laplace': one unit per step with log p summed over dimensions (RIPT sum_on_action_dim), or one unit per dimension."}
    )
    pointer_dim: int = field(default=64, metadata={"help": "'pointer': query/key size of the pointer head.", "min": 1})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of action tokens (and of the pointer's cells).", "gt": 0.0})
    action_vocab: Literal["full", "actions"] = field(
        default="full",
        metadata={"help": "'full': sample from the whole vocabulary, a non-action token is an invalid action (a no-op, logged); 'actions': sample and score over the action tokens only (like a VQ codebook policy: no invalid outputs, and pushing an action down cannot leak mass to text tokens)."},
    )
    prompt_template: str = field(default=DEFAULT_PROMPT, metadata={"help": "Text after the image; {instruction} is replaced."})


@dataclass
class RiptConfig:
    """RIPT's rollout-side knobs (ALGORITHMS.md B7, A5 ript_dynamic)."""

    reward: Literal["success", "env_return"] = field(default="success", metadata={"help": "'success': binary task success (RIPT); 'env_return': the environment's summed reward."})
    dynamic_sampling: bool = field(default=True, metadata={"help": "Discard contexts whose K rewards are all equal and draw others."})
    skip_solved: bool = field(default=True, metadata={"help": "Skip contexts whose latest K rollouts all succeeded (their history is dropped after skip_threshold skips)."})
    skip_threshold: int = field(default=3, metadata={"help": "Skips before a solved context is tried again (RIPT: 3).", "min": 0})
    max_draws: int = field(default=4, metadata={"help": "At most this many x rollout.prompts_per_step contexts are drawn per step.", "min": 1})
    early_stop_fraction: float = field(
        default=1.0, metadata={"help": "A rollout round ends once this fraction of rollout.prompts_per_step contexts is kept (RIPT LIBERO-90: 0.8).", "gt": 0.0, "max": 1.0}
    )


@dataclass
class DemoConfig(SFTConfig):
    """The supervised stage before RIPT (skipped when ``demos`` is empty)."""

    demos: str = field(default="", metadata={"help": "ript_vla: folder written by data_prep/babyai_demos.py (demos.jsonl + frames/); miniwob_grpo / screenexplorer: GUI episodes (data_prep/miniwob_episodes.py folder or episodes.jsonl). Empty: no SFT stage."})
    max_episodes: int = field(default=0, metadata={"help": "Use the first N demonstration episodes; 0 = all.", "min": 0})


@dataclass
class RiptVlaConfig:
    env: EnvSpec = field(default_factory=EnvSpec, metadata={"help": "The environment and its observation."})
    policy: VLAPolicyConfig = field(default_factory=VLAPolicyConfig, metadata={"help": "How the VLM acts."})
    ript: RiptConfig = field(default_factory=RiptConfig, metadata={"help": "Dynamic rollout sampling."})
    sft: DemoConfig = field(default_factory=DemoConfig, metadata={"help": "Supervised stage on demonstrations."})
    train_seeds: SeedRange = field(default_factory=lambda: SeedRange(0, 1000), metadata={"help": "Training contexts (env seeds)."})
    eval_seeds: SeedRange = field(default_factory=lambda: SeedRange(100_000, 100), metadata={"help": "Held-out contexts; must not overlap train_seeds (nor the demonstrations)."})
    eval_greedy: bool = field(default=False, metadata={"help": "Evaluate the policy's mode (argmax token / Laplace mean) instead of sampling with a fixed seed."})
    eval_seed: int = field(default=1234, metadata={"help": "Seed of the evaluation sampling (the same draws at every evaluation)."})
    eval_videos: int = field(default=4, metadata={"help": "`mmpo eval` saves a GIF of the first N evaluation episodes.", "min": 0})


class RiptVlaTask(Task):
    name = "ript_vla"
    description = "RIPT-VLA: VLA policy RL in gymnasium environments (MiniGrid/BabyAI, rendered control) with LOO advantage and dynamic rollout sampling, after SFT on demonstrations"
    Config = RiptVlaConfig

    @classmethod
    def trainer_class(cls) -> type:
        from mmpo_tasks.vla.trainer import RiptTrainer

        return RiptTrainer

    def __init__(self, config: RiptVlaConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        self.train_seeds = config.train_seeds.seeds()
        self.eval_seeds = config.eval_seeds.seeds()
        check_disjoint(self.train_seeds, self.eval_seeds)
        p = config.policy
        if p.action_space == "discrete" and p.action_values and len(p.action_values) != len(p.actions):
            raise ConfigError(f"task.policy.action_values has {len(p.action_values)} entries for {len(p.actions)} actions")
        if len(p.low) != len(p.high):
            raise ConfigError(f"task.policy.low ({len(p.low)}) and task.policy.high ({len(p.high)}) differ in length")

    def num_train(self) -> int:
        return len(self.train_seeds)

    def train_sample(self, index: int) -> Sample:
        seed = self.train_seeds[index]
        return Sample(id=str(seed), messages=[], meta={"seed": seed})

    def eval_samples(self, n: int) -> list[Sample]:
        return [Sample(id=str(s), messages=[], meta={"seed": s}) for s in self.eval_seeds[: n or None]]

    def reward(self, samples: list[Sample], completions: list[str]) -> RewardOutput:
        raise ConfigError("ript_vla is rewarded by its environment; it runs on its own trainer (mmpo train picks it)")


__all__ = ["DemoConfig", "RiptConfig", "RiptVlaConfig", "RiptVlaTask", "VLAPolicyConfig"]
