"""Step rewards of GUI actions against the reference action of an episode step (HiconAgent-style:
format + action type + value / grounding, weighted), and step / episode success for evaluation.

Value of a matching action type:
- click: inside the step's target box when it has one, else within ``click_radius`` (normalised
  screen distance; AITW's evaluation uses 14% of the screen) of the reference point;
- type: the same text after case and whitespace folding, or token F1 >= ``text_f1``;
- scroll: the same direction; click_element: the same ref; back / home / enter / finished: the type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mmpo_tasks.gui_agent.actions import Action


@dataclass
class GuiRewardConfig:
    format: float = field(default=0.1, metadata={"help": "Weight of a well-formed action.", "min": 0.0})
    action_type: float = field(default=0.3, metadata={"help": "Weight of the right action type.", "min": 0.0})
    value: float = field(
        default=0.6, metadata={"help": "Weight of the right value / grounding (needs the right type).", "min": 0.0}
    )
    click_radius: float = field(
        default=0.14, metadata={"help": "Click distance (normalised) that counts without a target box.", "gt": 0.0}
    )
    text_f1: float = field(
        default=0.5, metadata={"help": "Token F1 at which a typed text counts.", "min": 0.0, "max": 1.0}
    )


def _fold(text: str) -> list[str]:
    return " ".join(text.lower().split()).split()


def text_f1(a: str, b: str) -> float:
    """Token F1 of two texts (case and whitespace folded)."""
    ta, tb = _fold(a), _fold(b)
    if not ta or not tb:
        return float(ta == tb)
    common = sum(min(ta.count(t), tb.count(t)) for t in set(ta))
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


def value_match(pred: Action, gold: Action, box: Sequence[float] | None, cfg: GuiRewardConfig) -> bool:
    """Whether ``pred`` (of the same type as ``gold``) hits the reference value."""
    if pred.kind != gold.kind:
        return False
    if pred.kind == "click":
        if box is not None:
            x0, y0, x1, y1 = box
            return x0 <= pred.x <= x1 and y0 <= pred.y <= y1  # type: ignore[operator]
        return math.dist((pred.x, pred.y), (gold.x, gold.y)) <= cfg.click_radius  # type: ignore[arg-type]
    if pred.kind == "type":
        return (
            _fold(pred.text or "") == _fold(gold.text or "") or text_f1(pred.text or "", gold.text or "") >= cfg.text_f1
        )
    if pred.kind == "scroll":
        return pred.direction == gold.direction
    if pred.kind == "click_element":
        return pred.ref == gold.ref
    return True


def step_rewards(
    preds: Sequence[Action], golds: Sequence[Action], boxes: Sequence[Sequence[float] | None], cfg: GuiRewardConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards ``[N]`` and components ``[N]`` (format, action_type, value, step_success)."""
    fmt = torch.tensor([float(not p.malformed) for p in preds])
    typ = torch.tensor([float(p.kind == g.kind) for p, g in zip(preds, golds)])
    val = torch.tensor([float(value_match(p, g, b, cfg)) for p, g, b in zip(preds, golds, boxes)])
    reward = cfg.format * fmt + cfg.action_type * typ + cfg.value * val
    return reward, {"format": fmt, "action_type": typ, "value": val, "step_success": val}


def episode_success(step_success: Sequence[float]) -> float:
    """1 when every step of the episode succeeded."""
    return float(len(step_success) > 0 and all(s >= 1.0 for s in step_success))


__all__ = ["GuiRewardConfig", "episode_success", "step_rewards", "text_f1", "value_match"]
