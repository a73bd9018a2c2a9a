"""The trainer of ``miniwob_grpo``: the shared environment trainer
(:class:`mmpo.trainers.environment.EnvironmentTrainer`) whose supervised stage reads GUI episodes
(``data_prep/miniwob_episodes.py``: the scripted solver's episodes) instead of BabyAI
demonstrations, and whose evaluation adds the success rate per MiniWoB task.

Every ``click(x, y)`` step of an episode becomes an example: the screenshot as the policy sees it
(resized like the environment's observation), the instruction, and the click as the policy's
action units (two bin tokens). Episodes with other actions (typing) are left out, since the
policy only clicks. The demonstrations' (task, seed) instances must not be evaluation instances.

Logged rollouts and evaluation rows name the MiniWoB task and its seed; an episode's GIF shows
each click as ``click(x, y)`` with a ring at the point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmpo.data_rows import LoadSummary
from mmpo.errors import ConfigError
from mmpo.rollout.env_eval import EnvEvaluator
from mmpo.rollout.env_runner import EnvRunner, Episode, Observation, resize_square
from mmpo.trainers.environment import DemoExample, EnvironmentTrainer
from mmpo_tasks.gui_agent.episodes import load_episodes


def episodes_file(path: str) -> Path:
    """``path`` itself, or the ``episodes.jsonl`` inside a folder."""
    p = Path(path)
    return p / "episodes.jsonl" if p.is_dir() else p


def click_point(env_action: Any) -> tuple[float, float] | None:
    """The normalised ``(x, y)`` of a click env action ``[x, y]`` (clipped to [0, 1]), else None
    (a no-op, an action text)."""
    if env_action is None or isinstance(env_action, str):
        return None
    xy = np.asarray(env_action, dtype=np.float64).reshape(-1)
    if xy.shape != (2,) or not np.all(np.isfinite(xy)):
        return None
    x, y = np.clip(xy, 0.0, 1.0)
    return float(x), float(y)


def gui_action_text(env_action: Any) -> str:
    """A GUI env action as text: ``click(x, y)`` for a click ``[x, y]``, an action text as it is,
    ``noop()`` for None (also the world model's action input in ScreenExplorer)."""
    if env_action is None:
        return "noop()"
    if isinstance(env_action, str):
        return env_action
    x, y = np.asarray(env_action, dtype=np.float64).reshape(-1)[:2]
    return f"click({x:.2f}, {y:.2f})"


class MiniWobEvaluator(EnvEvaluator):
    """The environment evaluator plus the success rate per MiniWoB task (``success_rate/<task>``)."""

    @classmethod
    def episode_input(cls, runner: EnvRunner, ep: Episode) -> str:
        """The instruction, the MiniWoB task and its seed, and the context seed."""
        task, task_seed = runner._pool(1)[0].unwrapped.task_of(ep.seed)
        return f"{ep.instruction} (MiniWoB {task}, task seed {task_seed}; context seed {ep.seed})"

    def row(self, ep: Episode, index: int) -> dict[str, Any]:
        """The environment row, with the episode's MiniWoB task under ``_task`` (not written)."""
        row = super().row(ep, index)
        row["_task"] = self.runner._pool(1)[0].unwrapped.task_of(ep.seed)[0]
        return row

    def summarize(self, items: list[int], rows: list[dict[str, Any]]) -> dict[str, float]:
        metrics = super().summarize(items, rows)
        by_task: dict[str, list[float]] = {}
        for r in rows:
            by_task.setdefault(r["_task"], []).append(r["success"])
        metrics.update({f"success_rate/{t}": float(np.mean(v)) for t, v in sorted(by_task.items())})
        return metrics


class MiniWobTrainer(EnvironmentTrainer):
    """See the module docstring."""

    evaluator_class = MiniWobEvaluator

    def action_label(self, env_action: Any) -> str:
        """``click(x, y)`` (see :func:`gui_action_text`)."""
        return gui_action_text(env_action)

    def action_point(self, env_action: Any) -> tuple[float, float] | None:
        """The click point, ringed on the episode's GIF."""
        return click_point(env_action)

    def eval_instances(self) -> set[tuple[str, int]]:
        """(task, task seed) of every evaluation context."""
        env = self.runner._pool(1)[0].unwrapped
        return {env.task_of(s) for s in self.task.eval_seeds}

    def sft_examples(self) -> tuple[list[DemoExample], dict[str, Any]]:
        """Every click step of the GUI episodes of ``task.sft.demos`` as ``(encoding, units [U], mask [U])``."""
        from PIL import Image

        path = episodes_file(self.tc.sft.demos)
        episodes, skipped = load_episodes(path, unknown_keys=self.task.unknown_keys)
        summary = LoadSummary(f"{self.task.name} demonstrations", unit="episodes")
        summary.held_out_why = "evaluation runs the environment's eval_seeds"
        for bad in skipped:
            summary.skip(bad["reason"])
        if self.tc.sft.max_episodes and len(episodes) > self.tc.sft.max_episodes:
            summary.skip(f"beyond max_episodes={self.tc.sft.max_episodes}", len(episodes) - self.tc.sft.max_episodes)
            episodes = episodes[: self.tc.sft.max_episodes]
        summary.splits["sft"] = len(episodes)
        summary.print()
        tasks = set(self.tc.env.kwargs.get("tasks") or [])
        held_out = self.eval_instances()
        used, clicks_only = [], []
        for ep in episodes:
            task, seed = ep.meta.get("task"), ep.meta.get("seed")
            if task not in tasks:
                raise ConfigError(
                    f"task.sft.demos={str(path)!r}: episode {ep.id!r} is from task {task!r}, "
                    f"not one of task.env.kwargs.tasks {sorted(tasks)}"
                )
            if (task, seed) in held_out:
                used.append(f"{task} seed {seed}")
            if all(s.action.kind == "click" for s in ep.steps):
                clicks_only.append(ep)
        if used:
            raise ConfigError(
                f"task.sft.demos={str(path)!r} holds evaluation instances ({', '.join(used[:4])}); "
                "choose task.eval_seeds beyond the demonstration seeds"
            )
        if not clicks_only:
            raise ConfigError(
                f"task.sft.demos={str(path)!r}: no episode of click actions only "
                "(this policy clicks; typing tasks cannot be imitated)"
            )
        size = self.tc.env.image_size
        out = []
        for ep in clicks_only:
            for s in ep.steps:
                with Image.open(s.screenshot) as im:
                    image = resize_square(np.asarray(im.convert("RGB")), size)
                units, mask = self.policy.demo_units(np.array([s.action.x, s.action.y]))
                out.append((self.policy.encode(Observation(image, ep.instruction)), units, mask))
        skipped = len(episodes) - len(clicks_only)
        return out, {"demo_episodes": len(clicks_only), "demo_steps": len(out), "demo_skipped_non_click": skipped}


__all__ = ["MiniWobEvaluator", "MiniWobTrainer", "click_point", "episodes_file", "gui_action_text"]
