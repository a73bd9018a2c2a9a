"""``screenexplorer``: ScreenExplorer (code niuzaisheng/ScreenExplorer) on live MiniWoB++ — a VLM GUI agent
trained by RL on per-step exploration rewards.

Each step's reward is the (weighted) sum of: screen change, diversity over the episode, the
curiosity of a small world model trained online (it predicts the next screen embedding from the
screen and the action; 3 epochs on its replay buffer after every rollout, before the rewards are
computed, as ScreenExplorer does), and intent alignment; optionally plus MiniWoB's task reward.
Advantages are ``flat_batch`` (normalised over all steps of the batch), PPO clip on the action
tokens. Invalid actions get reward 0.

What differs from ScreenExplorer, and why:
- screen embeddings are a pixel thumbnail and hashed DOM text (``screen_embedding.py``), not
  Cosmos image tokens and OCR embeddings, which need downloaded models;
- the policy clicks through binned coordinate tokens and writes no intent string, so the intent is
  the task's instruction (MiniWoB gives one; ScreenExplorer's desktop has none);
- a MiniWoB task episode ends when the task does, not after a fixed 10 steps;
- the experience-stream distillation ("-E1" generation; not in ScreenExplorer's code) keeps, by
  default, the top quarter of episodes by return (``task.distill``, :mod:`.experience`): a design choice.

The KL term (ScreenExplorer: k3, beta 0.04) is to a frozen copy of the start policy
(:mod:`mmpo.trainers.env_reference`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmpo.errors import ConfigError
from mmpo.rollout.env_config import RiptConfig
from mmpo.rollout.env_runner import EnvSpec
from mmpo_tasks.gui_agent.experience import DistillConfig, ExperienceConfig, check_experience_options
from mmpo_tasks.gui_agent.exploration import ExplorationRewardConfig
from mmpo_tasks.gui_agent.miniwob_task import MiniWobGrpoConfig, MiniWobGrpoTask, miniwob_env_spec


@dataclass
class WorldModelConfig:
    hidden: int = field(default=256, metadata={"help": "MLP width.", "min": 1})
    lr: float = field(
        default=1e-3, metadata={"help": "Adam learning rate (ScreenExplorer: 4e-5 for its 1B model).", "gt": 0.0}
    )
    epochs: int = field(
        default=3, metadata={"help": "Passes over the replay buffer after each rollout (ScreenExplorer: 3).", "min": 0}
    )
    batch_size: int = field(default=32, metadata={"help": "Transitions per world-model step.", "min": 1})
    capacity: int = field(default=4096, metadata={"help": "Replay buffer size (transitions).", "min": 1})
    image_grid: int = field(
        default=16, metadata={"help": "Screen thumbnail side (image embedding = 3 * grid^2).", "min": 2}
    )
    text_dim: int = field(default=512, metadata={"help": "Hashed text embedding size.", "min": 8})


@dataclass
class ScreenExplorerConfig(MiniWobGrpoConfig):
    env: EnvSpec = field(
        default_factory=lambda: miniwob_env_spec(["click-test", "focus-text"], max_steps=5),
        metadata={"help": "The MiniWoB environment (kwargs.tasks: which tasks; a seed picks one)."},
    )
    ript: RiptConfig = field(
        default_factory=lambda: RiptConfig(dynamic_sampling=False, skip_solved=False),
        metadata={"help": "Context sampling (no dynamic sampling: step rewards are rarely equal)."},
    )
    exploration: ExplorationRewardConfig = field(
        default_factory=lambda: ExplorationRewardConfig(use_task_reward=True),
        metadata={"help": "Weights of the step reward components."},
    )
    world_model: WorldModelConfig = field(
        default_factory=WorldModelConfig, metadata={"help": "The online world model (curiosity)."}
    )
    actor_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Training steps that only fit the world model before the policy is updated "
            "(ScreenExplorer: 5 episodes).",
            "min": 0,
        },
    )
    experience: ExperienceConfig = field(
        default_factory=ExperienceConfig, metadata={"help": "The recorded experience stream (<run>/experience)."}
    )
    distill: DistillConfig = field(
        default_factory=DistillConfig,
        metadata={"help": "Distillation of the experience stream into the next generation (<run>/distill/model)."},
    )


class ScreenExplorerTask(MiniWobGrpoTask):
    name = "screenexplorer"
    description = (
        "ScreenExplorer: GUI exploration RL on live MiniWoB++ with state-change, diversity, world-model curiosity "
        "and intent rewards"
    )
    Config = ScreenExplorerConfig

    @classmethod
    def trainer_class(cls) -> type:
        from mmpo_tasks.gui_agent.screenexplorer_trainer import ScreenExplorerTrainer

        return ScreenExplorerTrainer

    def __init__(self, config: ScreenExplorerConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        if config.ript.dynamic_sampling:
            raise ConfigError("task.ript.dynamic_sampling: screenexplorer rewards steps, not episodes; set it to false")
        check_experience_options(config.experience, config.distill)


__all__ = ["ScreenExplorerConfig", "ScreenExplorerTask", "WorldModelConfig"]
