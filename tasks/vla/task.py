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

from mmpo.rollout.env_config import DemoConfig, EnvTaskConfig, RiptConfig, VLAPolicyConfig
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

    @classmethod
    def trainer_class(cls) -> type:
        from mmpo_tasks.vla.trainer import RiptTrainer

        return RiptTrainer


__all__ = ["DemoConfig", "RiptConfig", "RiptVlaConfig", "RiptVlaTask", "VLAPolicyConfig"]
