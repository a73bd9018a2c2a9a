"""The RIPT-VLA trainer: the environment trainer (:class:`mmpo.trainers.environment.EnvironmentTrainer`)
whose supervised stage reads BabyAI-bot demonstrations (``data_prep/babyai_demos.py``).

Every demonstration step becomes an example: the frame and the mission as the policy sees them,
and the demonstrated action as the policy's action units. The demonstrations must come from the
task's environment, and their seeds must not be evaluation seeds.
"""

from __future__ import annotations

from typing import Any

from mmpo.errors import ConfigError
from mmpo.rollout.env_config import AUTO_DEMOS
from mmpo.rollout.env_runner import Observation, check_disjoint
from mmpo.trainers.environment import DemoExample, EnvironmentTrainer


class RiptTrainer(EnvironmentTrainer):
    """See the module docstring."""

    def sft_examples(self) -> tuple[list[DemoExample], dict[str, Any]]:
        """``(encoding, units [U], mask [U])`` of every demonstration step, and their counts."""
        from mmpo.data_rows import LoadSummary
        from mmpo_tasks.vla.data import load_demos

        demos = self.tc.sft.demos
        if demos == AUTO_DEMOS:  # built on first use into the cache (one progress line)
            from mmpo_tasks.vla.demos import cached_demos

            demos = str(cached_demos(self.tc.env, self.tc.sft.max_episodes))
        summary = LoadSummary(f"{self.task.name} demonstrations", unit="steps")
        summary.held_out_why = "evaluation runs the environment's eval_seeds"
        steps, meta = load_demos(demos, self.tc.sft.max_episodes, unknown_keys=self.task.unknown_keys, summary=summary)
        summary.print()
        env_id = meta.get("env", {}).get("id")
        if env_id != self.tc.env.id:
            raise ConfigError(f"task.sft.demos={demos!r} were recorded in {env_id!r}, the task runs {self.tc.env.id!r}")
        used = sorted({s.seed for s in steps})
        what = f"the seeds of the demonstrations in task.sft.demos={demos!r}"
        check_disjoint(used, self.task.eval_seeds, "eval_seeds", what)
        out = []
        for s in steps:
            units, mask = self.policy.demo_units(s.action)
            out.append((self.policy.encode(Observation(s.image, s.instruction)), units, mask))
        return out, {"demo_episodes": len({s.episode for s in steps}), "demo_steps": len(steps)}


__all__ = ["RiptTrainer"]
