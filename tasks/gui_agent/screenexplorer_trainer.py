"""ScreenExplorer's trainer: the MiniWoB environment trainer (``miniwob_trainer``) with per-step
exploration rewards and an online world model.

One step:
1. K rollouts of each drawn context (MiniWoB seed), observations and DOMs kept per step;
2. every transition (screen, action, next screen) joins the world model's replay buffer and the
   world model trains ``world_model.epochs`` passes over it;
3. per-step rewards (``exploration.episode_rewards``) with its predictions as the curiosity
   baseline; ``algorithm.advantage`` (``flat_batch``) over all steps of the batch;
4. PPO epochs on the action tokens (after ``actor_warmup_steps`` world-model-only steps).

The world model and its buffer are saved with each checkpoint (``world_model.pt``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpo.config import RunConfig
from mmpo.rollout.env_runner import Episode
from mmpo_tasks.gui_agent.exploration import COMPONENTS, episode_rewards
from mmpo_tasks.gui_agent.screen_embedding import ImageEmbedder, TextEmbedder, dom_text, text_under_box
from mmpo_tasks.gui_agent.world_model import WorldModel
from mmpo_tasks.gui_agent.miniwob_trainer import MiniWobTrainer

WORLD_MODEL_FILE = "world_model.pt"


def action_text(env_action: Any) -> str:
    """The text of an env action for the world model (a click ``[x, y]`` or an action text)."""
    if env_action is None:
        return "noop()"
    if isinstance(env_action, str):
        return env_action
    x, y = np.asarray(env_action, dtype=np.float64).reshape(-1)[:2]
    return f"click({x:.2f}, {y:.2f})"


class ScreenExplorerTrainer(MiniWobTrainer):
    """See the module docstring."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path) -> None:
        self._last_components: dict[str, float] = {}
        super().__init__(cfg, run_dir)
        w = self.tc.world_model
        self.image_embedder = ImageEmbedder(w.image_grid)
        self.text_embedder = TextEmbedder(w.text_dim)
        self.world_model = WorldModel(
            self.image_embedder.dim, w.text_dim, hidden=w.hidden, capacity=w.capacity, lr=w.lr, seed=cfg.seed
        )
        if getattr(self, "resumed_from", None) is not None:  # _start() ran before the world model existed
            self.load_extra(self.resumed_from)

    # -- rollouts: keep what the rewards read ----------------------------------------------------
    def run_episodes(self, seeds: list[int], generator: torch.Generator) -> list[Episode]:
        return self.runner.run(self.policy, seeds, self.cfg.rollout.group_size, generator=generator, keep_observations=True)

    def episode_reward(self, ep: Episode) -> float:
        return float(ep.success)  # only for collect()'s statistics; training uses step rewards

    # -- per-step rewards ------------------------------------------------------------------------
    def _transitions(self, ep: Episode) -> dict[str, torch.Tensor]:
        """Embeddings of an episode's transitions (``[T, *]`` each) and its per-step flags."""
        doms = [ep.reset_info.get("dom", [])]
        for s in ep.steps:  # an un-stepped no-op keeps the last screen's DOM
            doms.append(s.info.get("dom", doms[-1]))
        size = ep.reset_info.get("screen_size", (160, 210))
        images = self.image_embedder.embed([o.image for o in ep.observations])
        texts = self.text_embedder.embed([dom_text(d) for d in doms])
        under = []
        for t, s in enumerate(ep.steps):
            a = s.env_action
            if a is None or isinstance(a, str):
                under.append("")
            else:
                x, y = np.asarray(a, dtype=np.float64).reshape(-1)[:2]
                under.append(text_under_box(doms[t], float(x), float(y), tuple(size)))
        return {
            "pre_img": images[:-1], "post_img": images[1:], "pre_txt": texts[:-1], "post_txt": texts[1:],
            "intent": self.text_embedder.embed([ep.instruction] * ep.length), "under": self.text_embedder.embed(under),
            "valid": torch.tensor([s.valid for s in ep.steps]), "task": torch.tensor([s.reward for s in ep.steps], dtype=torch.float32),
            "actions": [action_text(s.env_action) for s in ep.steps],
        }

    def step_advantages(self, kept: list[list[Episode]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Episode returns of the step rewards ``[C*K]`` and ``flat_batch`` advantages ``[S]``."""
        episodes = [e for g in kept for e in g]
        trans = [self._transitions(ep) for ep in episodes]
        wm, w = self.world_model, self.tc.world_model
        for tr in trans:
            wm.add(tr["pre_img"], tr["pre_txt"], tr["actions"], tr["post_img"], tr["post_txt"])
        fit = wm.fit(epochs=w.epochs, batch_size=w.batch_size)
        step_rewards, sums = [], {k: 0.0 for k in (*COMPONENTS, "task")}
        for tr in trans:
            pred_img, pred_txt = wm.predict(tr["pre_img"], tr["pre_txt"], tr["actions"])
            total, comps = episode_rewards(
                tr["pre_img"], tr["post_img"], tr["pre_txt"], tr["post_txt"], pred_img, pred_txt, tr["intent"], tr["under"],
                tr["valid"], tr["task"], self.tc.exploration,
            )
            step_rewards.append(total)
            for k in sums:
                sums[k] += float(comps[k].sum())
        rewards = torch.cat(step_rewards)
        n_steps = max(1, len(rewards))
        self._last_components = {f"reward/{k}": v / n_steps for k, v in sums.items()}
        self._last_components.update({f"world_model/{k}": float(v) for k, v in fit.items()})
        group_ids = torch.arange(len(rewards))  # flat_batch ignores groups
        adv = self.advantage_fn(rewards, group_ids, **self.cfg.algorithm.advantage_options).float()
        returns = torch.stack([r.sum() for r in step_rewards])
        return returns, adv

    def train_step(self, step: int) -> dict[str, float]:
        if step < self.tc.actor_warmup_steps:  # world model only: roll out, fit, no policy update
            kept, metrics = self.collect(step)
            if kept:
                rewards, _ = self.step_advantages(kept)
                metrics["reward"] = float(rewards.mean())
            metrics["optimizer_steps"] = 0.0
            metrics.update(self._last_components)
            return metrics
        metrics = super().train_step(step)
        metrics.update(self._last_components)
        return metrics

    # -- checkpoints -----------------------------------------------------------------------------
    def save_extra(self, folder: Path) -> None:
        super().save_extra(folder)
        if hasattr(self, "world_model"):
            torch.save(self.world_model.state_dict(), folder / WORLD_MODEL_FILE)

    def load_extra(self, folder: Path) -> None:
        super().load_extra(folder)
        path = Path(folder) / WORLD_MODEL_FILE
        if hasattr(self, "world_model") and path.is_file():
            self.world_model.load_state_dict(torch.load(path, weights_only=True))


__all__ = ["ScreenExplorerTrainer", "action_text"]
