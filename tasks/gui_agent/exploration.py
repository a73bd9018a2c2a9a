"""ScreenExplorer's per-step exploration rewards (code niuzaisheng/ScreenExplorer) on screen embeddings.

For one episode of ``T`` steps, step ``t`` goes from the pre-state ``s_t`` to the post-state
``s'_t``; each state has an image embedding and a text embedding
(:mod:`mmpo_tasks.gui_agent.screen_embedding`). With ``sim`` the cosine similarity
(:func:`cosine_sim`), for image and for text each:

- change         ``1 - sim(s_t, s'_t)``
- diversity      ``1 - mean_{j<=t} sim(s_j, s'_t)``: the earlier states of the episode are the
  initial state and the post-states before step ``t`` (``s_j = s'_{j-1}``); we read them from the
  pre-states, so the first step compares with the initial state only
- curiosity      ``1 - sim(s'_t, ŝ'_t)``, ``ŝ'_t`` the world model's prediction

and on text embeddings, with ``intent`` the intent the model wrote with its action:

- intent         ``sim(e_t, intent) + sim(e'_t, intent)`` (pre- and post-screen text)
- intent_click   ``sim(text under the click box, intent)`` (a zero embedding when not a click)

The total is the weighted sum (all weights 1: the paper's unweighted sum), plus the task reward
when asked, forced to 0 on steps whose action was malformed (ScreenExplorer runs them as no-ops).
Embeddings are not guaranteed non-negative, so ``sim`` lies in ``[-1, 1]``: change, diversity and
curiosity in ``[0, 2]``, intent in ``[-2, 2]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_EPS = 1e-8


def cosine_sim(a: torch.Tensor, b: torch.Tensor, *, both_zero: float = 1.0) -> torch.Tensor:
    """Cosine similarity over the last dim: ``[..., D] x [..., D] -> [...]`` (broadcasting),
    clamped to ``[-1, 1]``.

    A zero vector (an empty text, a uniform screen) has no direction: its similarity with a
    non-zero vector is 0, and two zero vectors get ``both_zero`` - 1 for the state-comparing
    rewards (two empty screens are the same screen, so no change), 0 for intent alignment (an
    empty intent aligns with nothing).
    """
    a, b = a.float(), b.float()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    sim = ((a * b).sum(-1) / (na * nb).clamp_min(_EPS)).clamp(-1.0, 1.0)
    return torch.where((na <= _EPS) & (nb <= _EPS), torch.full_like(sim, both_zero), sim)


def change_reward(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """Instantaneous change ``1 - sim(s_t, s'_t)``: ``[T, D], [T, D] -> [T]``."""
    return 1.0 - cosine_sim(pre, post)


def diversity_reward(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """Sequence diversity ``1 - mean_{j<=t} sim(s_j, s'_t)``: ``[T, D], [T, D] -> [T]``.

    ``pre[j]`` is ``s_j``: the initial state for ``j = 0``, the post-state of step ``j - 1`` after.
    """
    t = pre.shape[0]
    sims = cosine_sim(post[:, None, :], pre[None, :, :])  # [T (post t), T (earlier j)]
    mask = torch.ones(t, t, dtype=torch.bool, device=pre.device).tril()
    mean = (sims * mask).sum(1) / mask.sum(1)
    return 1.0 - mean


def curiosity_reward(post: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """World-model curiosity ``1 - sim(s'_t, ŝ'_t)``: ``[T, D], [T, D] -> [T]``."""
    return 1.0 - cosine_sim(post, pred)


def intent_reward(pre_txt: torch.Tensor, post_txt: torch.Tensor, intent_txt: torch.Tensor) -> torch.Tensor:
    """Intent alignment ``sim(e_t, intent) + sim(e'_t, intent)``: three ``[T, Dt]`` -> ``[T]``."""
    return cosine_sim(pre_txt, intent_txt, both_zero=0.0) + cosine_sim(post_txt, intent_txt, both_zero=0.0)


def click_intent_reward(under_click_txt: torch.Tensor, intent_txt: torch.Tensor) -> torch.Tensor:
    """``sim(text under the click box, intent)``: ``[T, Dt], [T, Dt] -> [T]`` (0 where the text
    under the click is empty)."""
    return cosine_sim(under_click_txt, intent_txt, both_zero=0.0)


@dataclass
class ExplorationRewardConfig:
    image_change: float = field(default=1.0, metadata={"help": "Weight of 1 - sim(s, s') on image embeddings."})
    text_change: float = field(default=1.0, metadata={"help": "Weight of 1 - sim(s, s') on text embeddings."})
    image_diversity: float = field(
        default=1.0, metadata={"help": "Weight of 1 - mean sim(earlier states, s') on image embeddings."}
    )
    text_diversity: float = field(
        default=1.0, metadata={"help": "Weight of 1 - mean sim(earlier states, s') on text embeddings."}
    )
    image_curiosity: float = field(
        default=1.0, metadata={"help": "Weight of 1 - sim(s', world-model prediction) on image embeddings."}
    )
    text_curiosity: float = field(
        default=1.0, metadata={"help": "Weight of 1 - sim(s', world-model prediction) on text embeddings."}
    )
    intent: float = field(default=1.0, metadata={"help": "Weight of sim(pre text, intent) + sim(post text, intent)."})
    intent_click: float = field(default=1.0, metadata={"help": "Weight of sim(text under the click box, intent)."})
    use_task_reward: bool = field(
        default=False, metadata={"help": "Add the environment's task reward (ScreenExplorer uses none)."}
    )
    task_reward: float = field(default=1.0, metadata={"help": "Weight of the task reward when use_task_reward."})
    invalid_zero: bool = field(
        default=True, metadata={"help": "Force the total reward of a malformed action to 0 (ScreenExplorer)."}
    )


COMPONENTS = (
    "image_change",
    "text_change",
    "image_diversity",
    "text_diversity",
    "image_curiosity",
    "text_curiosity",
    "intent",
    "intent_click",
)


def episode_rewards(
    pre_img: torch.Tensor,
    post_img: torch.Tensor,
    pre_txt: torch.Tensor,
    post_txt: torch.Tensor,
    pred_img: torch.Tensor | None,
    pred_txt: torch.Tensor | None,
    intent_txt: torch.Tensor,
    under_click_txt: torch.Tensor,
    valid: torch.Tensor,
    task_reward: torch.Tensor,
    cfg: ExplorationRewardConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-step rewards of one episode.

    Shapes: ``pre_img, post_img, pred_img [T, D]``; ``pre_txt, post_txt, pred_txt, intent_txt,
    under_click_txt [T, Dt]``; ``valid [T]`` bool (well-formed action); ``task_reward [T]``.
    ``pred_img`` / ``pred_txt`` may be None (no world model yet): curiosity is then 0.

    Returns ``total [T]`` float32 and the unweighted components ``[T]`` (:data:`COMPONENTS`, plus
    ``task`` and ``valid`` as float), not masked by ``valid`` (for logging);
    ``total = sum_k w_k * c_k (+ w_task * task)``, set to 0 where not valid if ``invalid_zero``.
    """
    t = pre_img.shape[0]
    zeros = torch.zeros(t, device=pre_img.device)
    comps = {
        "image_change": change_reward(pre_img, post_img),
        "text_change": change_reward(pre_txt, post_txt),
        "image_diversity": diversity_reward(pre_img, post_img),
        "text_diversity": diversity_reward(pre_txt, post_txt),
        "image_curiosity": zeros if pred_img is None else curiosity_reward(post_img, pred_img),
        "text_curiosity": zeros if pred_txt is None else curiosity_reward(post_txt, pred_txt),
        "intent": intent_reward(pre_txt, post_txt, intent_txt),
        "intent_click": click_intent_reward(under_click_txt, intent_txt),
    }
    total = sum(getattr(cfg, k) * comps[k] for k in COMPONENTS)
    task = task_reward.float().to(total.device)
    if cfg.use_task_reward:
        total = total + cfg.task_reward * task
    valid_f = valid.to(total.device).float()
    if cfg.invalid_zero:
        total = torch.where(valid_f > 0, total, torch.zeros_like(total))
    return total.float(), {**comps, "task": task, "valid": valid_f}


__all__ = [
    "COMPONENTS",
    "ExplorationRewardConfig",
    "change_reward",
    "click_intent_reward",
    "cosine_sim",
    "curiosity_reward",
    "diversity_reward",
    "episode_rewards",
    "intent_reward",
]
