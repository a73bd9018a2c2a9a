"""The base task of environment tasks (RIPT-VLA, MiniWoB GRPO, ScreenExplorer): contexts are
environment seeds, rewards come from the environment, the trainer is
:class:`mmpo.trainers.environment.EnvironmentTrainer` (or a plugin's subclass of it), the options
are :class:`mmpo.rollout.env_config.EnvTaskConfig` (or a plugin's extension of it).
"""

from __future__ import annotations

from typing import ClassVar

from mmpo.data_rows import LoadSummary
from mmpo.errors import ConfigError
from mmpo.rollout.env_config import AUTO_DEMOS, EnvTaskConfig
from mmpo.rollout.env_runner import check_disjoint
from mmpo.tasks import RewardOutput, Sample, Task


class EnvSeedTask(Task):
    """Base of a task whose contexts are environment seeds and whose rewards come from the
    environment (it satisfies :class:`mmpo.trainers.environment.EnvironmentTask`).

    ``train_seeds`` / ``eval_seeds`` are disjoint lists of env seeds; ``unit_densities`` is set
    for a Laplace head (its log-probs are densities, which the algorithm builder checks).
    """

    Config = EnvTaskConfig
    #: whether ``task.sft.demos: auto`` (demonstrations built on first use) is available
    builds_demos: ClassVar[bool] = False

    @classmethod
    def trainer_class(cls) -> type:
        """The environment trainer (a plugin returns its subclass, e.g. one reading its demonstrations)."""
        from mmpo.trainers.environment import EnvironmentTrainer

        return EnvironmentTrainer

    def __init__(self, config: EnvTaskConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        self.train_seeds: list[int] = config.train_seeds.seeds()
        self.eval_seeds: list[int] = config.eval_seeds.seeds()
        check_disjoint(self.train_seeds, self.eval_seeds)
        if config.sft.demos == AUTO_DEMOS and not self.builds_demos:
            raise ConfigError(
                f"task.sft.demos: {self.name} builds no demonstrations itself ('auto'); give a folder or "
                "episodes file of demonstrations, or leave it empty for no SFT stage"
            )
        p = config.policy
        if p.action_space == "discrete" and p.action_values and len(p.action_values) != len(p.actions):
            raise ConfigError(
                f"task.policy.action_values has {len(p.action_values)} entries for {len(p.actions)} actions"
            )
        if len(p.low) != len(p.high):
            raise ConfigError(f"task.policy.low ({len(p.low)}) and task.policy.high ({len(p.high)}) differ in length")
        self.unit_densities = p.action_space == "laplace"
        self.data_summary = LoadSummary(
            self.name,
            unit="environment seeds",
            splits={"train": len(self.train_seeds), "eval": len(self.eval_seeds)},
            held_out_why="eval_seeds, disjoint from train_seeds",
            notes=[f"demonstrations: {config.sft.demos} (read by the SFT stage)"] if config.sft.demos else [],
        )
        self.data_summary.print()

    def num_train(self) -> int:
        return len(self.train_seeds)

    def train_sample(self, index: int) -> Sample:
        seed = self.train_seeds[index]
        return Sample(id=str(seed), messages=[], meta={"seed": seed})

    def eval_samples(self, n: int) -> list[Sample]:
        return [Sample(id=str(s), messages=[], meta={"seed": s}) for s in self.eval_seeds[: n or None]]

    def reward(self, samples: list[Sample], completions: list[str]) -> RewardOutput:
        raise ConfigError(
            f"{self.name} is rewarded by its environment; it runs on its own trainer (mmpo train picks it)"
        )


__all__ = ["EnvSeedTask"]
