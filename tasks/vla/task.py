"""``ript_vla``: RIPT-VLA (``Ariostgx/ript-vla``) — a VLA policy fine-tuned by RL in a gymnasium
environment from binary success, after a supervised stage on demonstrations.

A context is an environment seed (task + initial state); K rollouts start from it; the
leave-one-out (``rloo``) advantage compares them; contexts whose K outcomes are all equal are
discarded and others drawn (dynamic rollout sampling), contexts solved in their latest K
rollouts are skipped (``ript_skip``); PPO clip on the action units, several epochs per batch.
The options, the base task and the trainer are the shared environment ones
(:mod:`mmpo.rollout.env_config`, :mod:`mmpo.rollout.env_task`, :mod:`mmpo.trainers.environment`);
this plugin adds the reader of the BabyAI demonstrations.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmpo.errors import ConfigError
from mmpo.rollout.env_config import AUTO_DEMOS, DemoConfig, EnvTaskConfig, RiptConfig, VLAPolicyConfig
from mmpo.rollout.env_task import EnvSeedTask


@dataclass
class RiptVlaConfig(EnvTaskConfig):
    """``task.*`` of ript_vla (the environment task options, see :class:`EnvTaskConfig`)."""


class RiptVlaTask(EnvSeedTask):
    name = "ript_vla"
    description = (
        "RIPT-VLA: VLA policy RL in gymnasium environments (MiniGrid/BabyAI, rendered control) with LOO advantage "
        "and dynamic rollout sampling, after SFT on demonstrations"
    )
    Config = RiptVlaConfig
    builds_demos = True  # task.sft.demos: auto -> BabyAI-bot demonstrations (mmpo_tasks.vla.demos)

    @classmethod
    def trainer_class(cls) -> type:
        from mmpo_tasks.vla.trainer import RiptTrainer

        return RiptTrainer

    def __init__(self, config: RiptVlaConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        if config.sft.demos == AUTO_DEMOS:
            env = config.env
            if not env.id.startswith("BabyAI-") or not env.observation.startswith("minigrid"):
                raise ConfigError(
                    f"task.sft.demos: auto builds BabyAI-bot demonstrations, which need a BabyAI level and a "
                    f"minigrid_* observation (task.env.id={env.id!r}, task.env.observation={env.observation!r}); "
                    "give a demonstrations folder instead"
                )
            if config.sft.max_episodes < 1:
                raise ConfigError(
                    "task.sft.max_episodes: with task.sft.demos: auto it is how many bot episodes to build; "
                    f"give a number >= 1 (got {config.sft.max_episodes})"
                )


__all__ = ["DemoConfig", "RiptConfig", "RiptVlaConfig", "RiptVlaTask", "VLAPolicyConfig"]
