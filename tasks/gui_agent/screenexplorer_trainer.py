"""ScreenExplorer's trainer: the MiniWoB environment trainer (``miniwob_trainer``) with per-step
exploration rewards and an online world model.

One step:
1. K rollouts of each drawn context (MiniWoB seed), observations and DOMs kept per step;
2. every transition (screen, action, next screen) joins the world model's replay buffer and the
   world model trains ``world_model.epochs`` passes over it;
3. per-step rewards (``exploration.episode_rewards``) with its predictions as the curiosity
   baseline; ``algorithm.advantage`` (``flat_batch``) over all steps of the batch;
4. PPO epochs on the action tokens (after ``actor_warmup_steps`` world-model-only steps), with
   ``beta * KL`` to the start policy when ``algorithm.kl_options.beta > 0`` (k3, beta 0.04 in the recipe);
5. every step's observation, action, reward components and return join the experience stream
   (``<run>/experience``, :mod:`mmpo_tasks.gui_agent.experience`); with ``task.distill.enabled`` the
   stream is filtered and behaviour-cloned into the next generation after training (``<run>/distill/model``).

The world model and its buffer are saved with each checkpoint (``world_model.pt``). What differs
from the other environment tasks is expressed through the environment trainer's public hooks
(:class:`mmpo.trainers.environment.EnvironmentTrainer`): ``build_extra_state``, ``run_episodes``,
``episode_reward``, ``step_advantages``, ``trains_policy``, ``save_extra`` / ``load_extra``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpo.rollout.env_runner import Episode
from mmpo_tasks.gui_agent.experience import EXPERIENCE_DIR, ExperienceWriter, distill_generation
from mmpo_tasks.gui_agent.exploration import COMPONENTS, episode_rewards
from mmpo_tasks.gui_agent.miniwob_trainer import MiniWobTrainer, gui_action_text
from mmpo_tasks.gui_agent.screen_embedding import ImageEmbedder, TextEmbedder, dom_text, text_under_box
from mmpo_tasks.gui_agent.world_model import WorldModel

WORLD_MODEL_FILE = "world_model.pt"


#: the text of an env action for the world model (a click ``[x, y]`` or an action text)
action_text = gui_action_text


class ScreenExplorerTrainer(MiniWobTrainer):
    """See the module docstring."""

    def build_extra_state(self) -> None:
        """The screen embedders and the world model (before a checkpoint's ``world_model.pt`` is loaded)."""
        self._last_components: dict[str, float] = {}
        self._episode_components: list[dict[str, float]] = []
        w = self.tc.world_model
        self.image_embedder = ImageEmbedder(w.image_grid)
        self.text_embedder = TextEmbedder(w.text_dim)
        self.world_model = WorldModel(
            self.image_embedder.dim, w.text_dim, hidden=w.hidden, capacity=w.capacity, lr=w.lr, seed=self.cfg.seed
        )
        e = self.tc.experience
        self.experience = ExperienceWriter(self.run_dir / EXPERIENCE_DIR, e, self.engine.rank) if e.enabled else None

    # -- rollouts: keep what the rewards read ----------------------------------------------------
    def run_episodes(self, seeds: list[int], generator: torch.Generator) -> list[Episode]:
        """K rollouts of each seed, keeping each step's observation (the rewards read them)."""
        k = self.cfg.rollout.group_size
        return self.runner.run(self.policy, seeds, k, generator=generator, keep_observations=True)

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
            "pre_img": images[:-1],
            "post_img": images[1:],
            "pre_txt": texts[:-1],
            "post_txt": texts[1:],
            "intent": self.text_embedder.embed([ep.instruction] * ep.length),
            "under": self.text_embedder.embed(under),
            "valid": torch.tensor([s.valid for s in ep.steps]),
            "task": torch.tensor([s.reward for s in ep.steps], dtype=torch.float32),
            "actions": [action_text(s.env_action) for s in ep.steps],
        }

    def step_advantages(self, kept: list[list[Episode]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Episode returns of the step rewards ``[C*K]`` and the advantages ``[S]`` of the step
        rewards (``algorithm.advantage``, ``flat_batch`` in the recipe; each step its own group,
        its prompt key its context's seed), estimated on the steps of every rank. Fits the world
        model first, on the transitions of every rank in rank order (gathered), so each rank's
        world model, buffer and shuffling generator stay the same (rank 0 checkpoints them)."""
        episodes = [e for g in kept for e in g]
        self._episode_components = []
        trans = [self._transitions(ep) for ep in episodes]
        wm, w = self.world_model, self.tc.world_model
        for part in self.engine.all_gather_object(trans):
            for tr in part:
                wm.add(tr["pre_img"], tr["pre_txt"], tr["actions"], tr["post_img"], tr["post_txt"])
        fit = wm.fit(epochs=w.epochs, batch_size=w.batch_size)
        step_rewards, step_comps, sums = [], [], {k: 0.0 for k in (*COMPONENTS, "task")}
        for tr in trans:
            pred_img, pred_txt = wm.predict(tr["pre_img"], tr["pre_txt"], tr["actions"])
            total, comps = episode_rewards(
                tr["pre_img"],
                tr["post_img"],
                tr["pre_txt"],
                tr["post_txt"],
                pred_img,
                pred_txt,
                tr["intent"],
                tr["under"],
                tr["valid"],
                tr["task"],
                self.tc.exploration,
            )
            step_rewards.append(total)
            step_comps.append({k: comps[k] for k in sums})
            self._episode_components.append({k: float(comps[k].sum()) for k in sums})
            for k in sums:
                sums[k] += float(comps[k].sum())
        rewards = torch.cat(step_rewards) if step_rewards else torch.zeros(0)
        if step_rewards:  # a rank that kept no context reports no reward components
            self._last_components = {f"reward/{k}": v / len(rewards) for k, v in sums.items()}
        self._last_components.update({f"world_model/{k}": float(v) for k, v in fit.items()})
        if self.experience is not None:
            rows = self.experience.write(self.step, episodes, step_rewards, step_comps, action_text)
            self._last_components["experience/rows"] = float(rows)
        group_ids = torch.arange(len(rewards))  # flat_batch ignores groups
        keys = [str(ep.seed) for ep in episodes for _ in range(ep.length)]
        adv = self.advantages(rewards, group_ids, keys)
        returns = torch.stack([r.sum() for r in step_rewards]) if step_rewards else torch.zeros(0)
        return returns, adv

    def episode_components(self, kept: list[list[Episode]]) -> list[dict[str, float]]:
        """Each kept episode's step-reward components (unweighted) summed over its steps, from the
        last :meth:`step_advantages`; the reward is their weighted sum (``task.exploration``)."""
        return list(self._episode_components)

    def trains_policy(self, step: int) -> bool:
        """The first ``actor_warmup_steps`` steps only fit the world model."""
        return step >= self.tc.actor_warmup_steps

    def train_step(self, step: int) -> dict[str, float]:
        """The environment trainer's step plus the reward components and the world model's fit
        (averaged over the ranks that report them)."""
        self._last_components = {}
        metrics = super().train_step(step)
        metrics.update(self.reduce_metrics(self._last_components))
        return metrics

    def train(self) -> dict[str, Any]:
        """Training, then (``task.distill.enabled``, on the main rank) the distillation of the
        experience stream into ``<run>/distill/model``."""
        out = super().train()
        if self.tc.distill.enabled and self.engine.is_main:
            self.show_phase("distill")
            out["distill"] = distill_generation(self.cfg, self.run_dir, progress=self.track)
        return out

    # -- checkpoints -----------------------------------------------------------------------------
    def save_extra(self, folder: Path) -> None:
        """``world_model.pt``: the world model, its optimizer and its replay buffer."""
        super().save_extra(folder)
        torch.save(self.world_model.state_dict(), folder / WORLD_MODEL_FILE)

    def load_extra(self, folder: Path) -> None:
        super().load_extra(folder)
        path = Path(folder) / WORLD_MODEL_FILE
        if path.is_file():
            self.world_model.load_state_dict(torch.load(path, weights_only=True))


__all__ = ["ScreenExplorerTrainer", "action_text"]
