"""The trainer of ``miniwob_grpo``: the shared environment trainer
(:class:`mmpo.trainers.environment.EnvironmentTrainer`) whose supervised stage reads GUI episodes (``data_prep/miniwob_episodes.py``: the scripted solver's episodes) instead of
BabyAI demonstrations.

Every ``click(x, y)`` step of an episode becomes an example: the screenshot as the policy sees it
(resized like the environment's observation), the instruction, and the click as the policy's
action units (two bin tokens). Episodes with other actions (typing) are left out, since the
policy only clicks. The demonstrations' (task, seed) instances must not be evaluation instances.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mmpo_tasks.gui_agent.episodes import load_episodes

from mmpo.errors import ConfigError
from mmpo.rollout.env_runner import Episode, Observation, resize_square
from mmpo.trainers.environment import DemoExample, EnvironmentTrainer


def episodes_file(path: str) -> Path:
    """``path`` itself, or the ``episodes.jsonl`` inside a folder."""
    p = Path(path)
    return p / "episodes.jsonl" if p.is_dir() else p


class MiniWobTrainer(EnvironmentTrainer):
    """See the module docstring."""

    def eval_instances(self) -> set[tuple[str, int]]:
        """(task, task seed) of every evaluation context."""
        env = self.runner._pool(1)[0].unwrapped
        return {env.task_of(s) for s in self.task.eval_seeds}

    def evaluate(self) -> dict[str, float]:
        """The held-out success rate, overall and per MiniWoB task (``eval/success_rate/<task>``)."""
        metrics = super().evaluate()
        episodes = getattr(self, "_last_eval", None)
        if episodes:
            env = self.runner._pool(1)[0].unwrapped
            by_task: dict[str, list[bool]] = {}
            for ep in episodes:
                by_task.setdefault(env.task_of(ep.seed)[0], []).append(ep.success)
            metrics.update({f"eval/success_rate/{t}": float(np.mean(v)) for t, v in sorted(by_task.items())})
        return metrics

    def eval_episodes(self, n: int, record: int = 0) -> list[Episode]:
        self._last_eval = super().eval_episodes(n, record)
        return self._last_eval

    def sft_examples(self) -> tuple[list[DemoExample], dict[str, Any]]:
        """Every click step of the GUI episodes of ``task.sft.demos`` as ``(encoding, units [U], mask [U])``."""
        from PIL import Image

        path = episodes_file(self.tc.sft.demos)
        episodes, _ = load_episodes(path)
        if self.tc.sft.max_episodes:
            episodes = episodes[: self.tc.sft.max_episodes]
        tasks = set(self.tc.env.kwargs.get("tasks") or [])
        held_out = self.eval_instances()
        used, clicks_only = [], []
        for ep in episodes:
            task, seed = ep.meta.get("task"), ep.meta.get("seed")
            if task not in tasks:
                raise ConfigError(f"task.sft.demos={str(path)!r}: episode {ep.id!r} is from task {task!r}, not one of task.env.kwargs.tasks {sorted(tasks)}")
            if (task, seed) in held_out:
                used.append(f"{task} seed {seed}")
            if all(s.action.kind == "click" for s in ep.steps):
                clicks_only.append(ep)
        if used:
            raise ConfigError(f"task.sft.demos={str(path)!r} holds evaluation instances ({', '.join(used[:4])}); choose task.eval_seeds beyond the demonstration seeds")
        if not clicks_only:
            raise ConfigError(f"task.sft.demos={str(path)!r}: no episode of click actions only (this policy clicks; typing tasks cannot be imitated)")
        size = self.tc.env.image_size
        out = []
        for ep in clicks_only:
            for s in ep.steps:
                with Image.open(s.screenshot) as im:
                    image = resize_square(np.asarray(im.convert("RGB")), size)
                units, mask = self.policy.demo_units(np.array([s.action.x, s.action.y]))
                out.append((self.policy.encode(Observation(image, ep.instruction)), units, mask))
        return out, {"demo_episodes": len(clicks_only), "demo_steps": len(out), "demo_skipped_non_click": len(episodes) - len(clicks_only)}


__all__ = ["MiniWobTrainer", "episodes_file"]
