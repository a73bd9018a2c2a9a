"""``miniwob_grpo``: a VLM GUI agent trained by GRPO on live MiniWoB++ tasks.

Each context is an environment seed (a task instance, ``gym_env.MiniWobGymEnv``); K rollouts start
from it; the reward is MiniWoB's task success; the group-relative advantage (``algorithm.advantage``,
``grpo`` in the recipe) compares the K rollouts; PPO clip on the action tokens. The policy reads the
screenshot and the instruction and clicks: ``click(x, y)`` is two binned tokens (x then y,
``task.policy.bins`` per axis, OpenVLA-style), sampled over the action tokens only.

The rollout machinery is the shared environment trainer (:mod:`mmpo.trainers.environment`: rounds
of K rollouts per context, dynamic sampling of contexts whose K rewards differ, evaluation on
held-out seeds with a Wilson interval, ``mmpo eval`` with GIFs) and its options
(:mod:`mmpo.rollout.env_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmpo.rollout.env_config import EnvTaskConfig, RiptConfig, VLAPolicyConfig
from mmpo.rollout.env_runner import EnvSpec, SeedRange
from mmpo.rollout.env_task import EnvSeedTask
from mmpo_tasks.gui_agent.gym_env import ENV_ID

GUI_PROMPT = "Screen task: {instruction} Click:"


def miniwob_env_spec(
    tasks: list[str] | None = None, max_steps: int = 3, image_size: int = 112, max_envs: int = 16
) -> EnvSpec:
    """The ``EnvSpec`` of ``mmpo/MiniWoB-v0`` on ``tasks``."""
    return EnvSpec(
        id=ENV_ID,
        kwargs={"tasks": list(tasks or ["click-test"])},
        observation="image",
        image_size=image_size,
        instruction_key="instruction",
        max_steps=max_steps,
        success="info_success",
        max_envs=max_envs,
    )


@dataclass
class MiniWobGrpoConfig(EnvTaskConfig):
    env: EnvSpec = field(
        default_factory=miniwob_env_spec,
        metadata={"help": "The MiniWoB environment (kwargs.tasks: which tasks; a seed picks one)."},
    )
    policy: VLAPolicyConfig = field(
        default_factory=lambda: VLAPolicyConfig(
            action_space="binned", bins=16, action_vocab="actions", prompt_template=GUI_PROMPT
        ),
        metadata={"help": "How the VLM acts (binned click coordinates)."},
    )
    ript: RiptConfig = field(
        default_factory=lambda: RiptConfig(dynamic_sampling=True, skip_solved=False),
        metadata={"help": "Context sampling (dynamic: keep contexts whose K rewards differ)."},
    )
    train_seeds: SeedRange = field(
        default_factory=lambda: SeedRange(0, 100_000), metadata={"help": "Training contexts (env seeds)."}
    )
    eval_seeds: SeedRange = field(
        default_factory=lambda: SeedRange(1_000_000, 100),
        metadata={"help": "Held-out contexts; must not overlap train_seeds."},
    )


class MiniWobGrpoTask(EnvSeedTask):
    name = "miniwob_grpo"
    description = "GUI agent: GRPO on live MiniWoB++ tasks in headless Chromium (screenshot + instruction -> click)"
    Config = MiniWobGrpoConfig

    @classmethod
    def trainer_class(cls) -> type:
        from mmpo_tasks.gui_agent.miniwob_trainer import MiniWobTrainer

        return MiniWobTrainer


__all__ = ["GUI_PROMPT", "MiniWobGrpoConfig", "MiniWobGrpoTask", "miniwob_env_spec"]
