"""Schedules for the KL coefficient beta (OThink-MR1 arXiv 2503.16081, FAKER-Air, ARES), in ``KL_SCHEDULES``.

Every entry: ``fn(step: int, total_steps: int, **options) -> beta: float``. ``pi_target`` and
``ares_bucket`` keep state (``fn.state_cls``); pass ``state=`` to carry it across steps.
``ares_bucket`` (ARES per-difficulty KL, :mod:`mmpo.core.ares`) returns the global coefficient;
its per-sample multipliers come from :func:`mmpo.core.ares.ares_bucket_betas`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from mmpo.core.ares import ares_bucket
from mmpo.core.registry import Registry
from mmpo.errors import ConfigError

KL_SCHEDULES: Registry[Callable[..., float]] = Registry("KL schedule")


@KL_SCHEDULES.register("constant")
def constant(step: int, total_steps: int, *, beta: float = 0.0) -> float:
    """``beta`` at every step (0.04 in DeepSeekMath-style GRPO; 0 in DAPO / Dr. GRPO / GSPO)."""
    return float(beta)


constant.state_cls = None


@KL_SCHEDULES.register("grpo_d", "othink_v")
def grpo_d(
    step: int,
    total_steps: int,
    *,
    beta_min: float = 0.04,
    beta_max: float = 0.1,
    explore_frac: float = 0.3,
) -> float:
    """OThink-MR1 GRPO-D V-shaped beta (arXiv 2503.16081).

    ``w = explore_frac * total_steps``, ``beta_mid = (beta_min + beta_max) / 2``;
    ``0 <= s <= w``: ``beta_mid - (beta_mid - beta_min) s / w`` (explore, down to beta_min);
    ``w < s <= total``: ``beta_min + (beta_max - beta_min) (s - w) / (total - w)`` (exploit).
    So beta(0)=beta_mid, beta(w)=beta_min, beta(total)=beta_max; steps past total stay at
    beta_max. Defaults: visual counting (0.04 / 0.1); geometry used 0.0 / 0.02.
    """
    if total_steps <= 0:
        raise ConfigError(f"grpo_d: total_steps must be > 0, got {total_steps}")
    if not 0.0 <= explore_frac <= 1.0:
        raise ConfigError(f"grpo_d: explore_frac must be in [0, 1], got {explore_frac}")
    s = min(max(float(step), 0.0), float(total_steps))
    w = explore_frac * total_steps
    mid = 0.5 * (beta_min + beta_max)
    if s <= w:
        return mid - (mid - beta_min) * (s / w) if w > 0 else mid
    return beta_min + (beta_max - beta_min) * (s - w) / (total_steps - w)


grpo_d.state_cls = None


@dataclass
class PIControllerState:
    """State of the ``pi_target`` controller. ``beta=None`` until the first call sets beta_init."""

    beta: float | None = None
    err_i: float = 0.0
    kl_ema: float | None = None
    updates: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "err_i": self.err_i, "kl_ema": self.kl_ema, "updates": self.updates}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.beta = None if d.get("beta") is None else float(d["beta"])
        self.err_i = float(d.get("err_i", 0.0))
        self.kl_ema = None if d.get("kl_ema") is None else float(d["kl_ema"])
        self.updates = int(d.get("updates", 0))


@KL_SCHEDULES.register("pi_target")
def pi_target(
    step: int,
    total_steps: int,
    *,
    state: PIControllerState | None = None,
    kl: float | None = None,
    target: float = 10.0,
    kp: float = 0.08,
    ki: float = 0.02,
    decay: float = 0.95,
    ema_alpha: float = 0.05,
    beta_init: float = 5e-4,
    beta_min: float = 5e-6,
    beta_max: float = 0.1,
) -> float:
    """Multiplicative PI controller toward a target KL (FAKER-Air ``PIKLController``).

    With an observed ``kl`` (the batch's mean KL): ``kl_ema`` = kl on the first update, else
    ``(1 - ema_alpha) kl_ema + ema_alpha kl``; ``e = kl_ema - target``;
    ``I <- decay I + e``; ``beta <- clip(beta exp(kp e + ki I), beta_min, beta_max)``.
    Without ``kl`` the current beta is returned unchanged. Defaults as the code (kp 0.08,
    ki 0.02, decay 0.95, EMA 0.05) and README (target 10, beta_init 5e-4, bounds [5e-6, 0.1]).
    """
    state = PIControllerState() if state is None else state
    if state.beta is None:
        state.beta = float(beta_init)
    if kl is None:
        return state.beta
    kl = float(kl)
    state.kl_ema = kl if state.kl_ema is None else (1 - ema_alpha) * state.kl_ema + ema_alpha * kl
    err = state.kl_ema - target
    state.err_i = decay * state.err_i + err
    # np.exp overflows to inf in the reference and is then clipped; keep the float finite here
    beta = state.beta * math.exp(min(kp * err + ki * state.err_i, 700.0))
    state.beta = float(min(max(beta, beta_min), beta_max))
    state.updates += 1
    return state.beta


pi_target.state_cls = PIControllerState


KL_SCHEDULES.add("ares_bucket", ares_bucket)  # stateful: ares_bucket.state_cls = AresKLState
