"""Class-wise rewards and "high"-class scores of PM2.5 forecasts (FAKER-Air ``aurora/rl/reward.py``).

Values (µg/m³) are bucketed into air-quality classes by ``edges``; classes ``>= high_class`` are
"high". Per forecast hour with an observed truth:

    r = w_high [high(pred) = high(gt)] + w_class [class(pred) = class(gt)] - lambda_fa [high(pred) and not high(gt)]

averaged over the observed hours of a rollout. Optional Lagrangian terms per rollout,
``+ lam_rec (recall - recall_target) - lam_far max(0, FAR - far_target)``, with the multipliers
PI-updated from the batch's recall and FAR (``LagrangeState``, checkpointed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mmpo.errors import ConfigError


@dataclass
class ClassRewardConfig:
    edges: list[float] = field(
        default_factory=lambda: [35.0, 75.0, 150.0],
        metadata={
            "help": "Class edges in µg/m³, increasing (PM2.5 default: 35 / 75 / 150, China's grade I / II 24-h limits "
            "and 'heavy'; FAKER's CMAQ setting: 15 / 35 / 75)."
        },
    )
    high_class: int = field(
        default=2, metadata={"help": "Classes >= this are 'high' (default 2: >= 75 µg/m³).", "min": 1}
    )
    w_class: float = field(
        default=1.0, metadata={"help": "w_e: reward for hitting the true class (FAKER released run: 1).", "min": 0.0}
    )
    w_high: float = field(
        default=0.0,
        metadata={"help": "w_c: reward for the right high / not-high decision (FAKER released run: 0).", "min": 0.0},
    )
    lambda_fa: float = field(
        default=0.1,
        metadata={"help": "Penalty per false-alarm hour (predicted high, observed not high; FAKER: 0.1).", "min": 0.0},
    )
    lagrangian: bool = field(
        default=False, metadata={"help": "Add the recall / FAR Lagrangian terms with PI-updated multipliers."}
    )
    recall_target: float = field(
        default=0.60, metadata={"help": "Recall the Lagrangian pushes toward (FAKER: 0.60).", "min": 0.0, "max": 1.0}
    )
    far_target: float = field(
        default=0.18,
        metadata={"help": "FAR above which the Lagrangian penalises (FAKER: 0.18).", "min": 0.0, "max": 1.0},
    )
    lambda_init: float = field(default=0.2, metadata={"help": "Initial multipliers (FAKER: 0.2).", "min": 0.0})
    lambda_max: float = field(default=3.0, metadata={"help": "Multiplier cap (FAKER: 3).", "min": 0.0})
    kp: float = field(default=0.5, metadata={"help": "Proportional gain of the multiplier update.", "min": 0.0})
    ki: float = field(default=0.05, metadata={"help": "Integral gain of the multiplier update.", "min": 0.0})

    def validate(self) -> None:
        if not self.edges or any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ConfigError(f"task.reward.edges must be increasing; got {self.edges}")
        if self.high_class > len(self.edges):
            raise ConfigError(
                f"task.reward.high_class={self.high_class} but {len(self.edges)} edges make only "
                f"{len(self.edges) + 1} classes (0..{len(self.edges)})"
            )


def classify(values: torch.Tensor, edges: list[float]) -> torch.Tensor:
    """Class index of each value: 0 below ``edges[0]``, k for ``edges[k-1] <= v < edges[k]``."""
    return torch.bucketize(values.float(), torch.tensor(edges, dtype=torch.float32, device=values.device), right=True)


@dataclass
class Contingency:
    """Counts of the high-class decision over observed hours (scalars or per-row tensors)."""

    hits: torch.Tensor
    misses: torch.Tensor
    false_alarms: torch.Tensor
    correct_negatives: torch.Tensor

    def pod(self) -> torch.Tensor:
        """Probability of detection (recall) = hits / (hits + misses); NaN without observed highs."""
        return self.hits / (self.hits + self.misses)

    def far(self) -> torch.Tensor:
        """False-alarm ratio = false alarms / (hits + false alarms); NaN without predicted highs."""
        return self.false_alarms / (self.hits + self.false_alarms)

    def f1(self) -> torch.Tensor:
        """2 hits / (2 hits + misses + false alarms)."""
        return 2 * self.hits / (2 * self.hits + self.misses + self.false_alarms)


def contingency(
    pred: torch.Tensor,
    truth: torch.Tensor,
    mask: torch.Tensor,
    edges: list[float],
    high_class: int,
    dim: int | None = None,
) -> Contingency:
    """High-class contingency counts of ``pred`` vs ``truth`` (µg/m³) over the ``mask``ed hours,
    summed over ``dim`` (None: all)."""
    ph = classify(pred, edges) >= high_class
    th = classify(truth, edges) >= high_class
    m = mask.bool()

    def count(x: torch.Tensor) -> torch.Tensor:
        x = (x & m).float()
        return x.sum() if dim is None else x.sum(dim)

    return Contingency(count(ph & th), count(~ph & th), count(ph & ~th), count(~ph & ~th))


@dataclass
class LagrangeState:
    """PI-controlled multipliers of the recall and FAR constraints."""

    lam_rec: float = 0.2
    lam_far: float = 0.2
    int_rec: float = 0.0
    int_far: float = 0.0

    def update(self, recall: float, far: float, cfg: ClassRewardConfig) -> None:
        """``e_rec = recall_target - recall``, ``e_far = FAR - far_target``; each multiplier
        ``lam <- clip(lam + kp e + ki I, 0, lambda_max)`` with ``I <- I + e``. NaN metrics (no
        high hours in the batch) leave the multiplier alone."""
        if not math.isnan(recall):
            e = cfg.recall_target - recall
            self.int_rec += e
            self.lam_rec = min(max(self.lam_rec + cfg.kp * e + cfg.ki * self.int_rec, 0.0), cfg.lambda_max)
        if not math.isnan(far):
            e = far - cfg.far_target
            self.int_far += e
            self.lam_far = min(max(self.lam_far + cfg.kp * e + cfg.ki * self.int_far, 0.0), cfg.lambda_max)

    def state_dict(self) -> dict[str, Any]:
        return {"lam_rec": self.lam_rec, "lam_far": self.lam_far, "int_rec": self.int_rec, "int_far": self.int_far}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k in ("lam_rec", "lam_far", "int_rec", "int_far"):
            setattr(self, k, float(d[k]))


def classwise_reward(
    pred: torch.Tensor,
    truth: torch.Tensor,
    mask: torch.Tensor,
    cfg: ClassRewardConfig,
    lagrange: LagrangeState | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward ``[N]`` of forecasts ``pred [N, H]`` against ``truth [N, H]`` (µg/m³) over the observed
    hours ``mask [N, H]``, and its components ``[N]`` (class hit rate, high-decision hit rate,
    false-alarm rate, and with a ``lagrange`` state the recall / FAR terms)."""
    m = mask.float()
    n_obs = m.sum(1).clamp(min=1.0)
    pc, tc = classify(pred, cfg.edges), classify(truth, cfg.edges)
    ph, th = pc >= cfg.high_class, tc >= cfg.high_class
    comp = {
        "class_hit": ((pc == tc).float() * m).sum(1) / n_obs,
        "high_hit": ((ph == th).float() * m).sum(1) / n_obs,
        "false_alarm": ((ph & ~th).float() * m).sum(1) / n_obs,
    }
    reward = cfg.w_class * comp["class_hit"] + cfg.w_high * comp["high_hit"] - cfg.lambda_fa * comp["false_alarm"]
    if lagrange is not None:
        c = contingency(pred, truth, mask, cfg.edges, cfg.high_class, dim=1)
        # a rollout without observed (predicted) highs has no recall (FAR): its term is 0
        recall = torch.where(c.hits + c.misses > 0, c.pod(), torch.full_like(c.hits, cfg.recall_target))
        far = torch.where(c.hits + c.false_alarms > 0, c.far(), torch.zeros_like(c.hits))
        comp["recall_term"] = lagrange.lam_rec * (recall - cfg.recall_target)
        comp["far_term"] = -lagrange.lam_far * (far - cfg.far_target).clamp(min=0.0)
        reward = reward + comp["recall_term"] + comp["far_term"]
    return reward, comp


__all__ = ["ClassRewardConfig", "Contingency", "LagrangeState", "classify", "classwise_reward", "contingency"]
