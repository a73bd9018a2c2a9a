"""The series kind's contract: what a forecasting task gives :class:`mmpo.trainers.series.SeriesTrainer`
(:class:`SeriesTask`), the policy it trains (:class:`ForecastPolicy`), the action unit's log-prob,
and how a task shows a forecast window in logged rollouts (:class:`WindowView`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mmpo.evaluate import Evaluator
from mmpo.policies.gaussian import diag_gaussian_log_prob
from mmpo.sft import SFTConfig
from mmpo.tasks import RewardOutput


def step_log_probs(actions: Tensor, mu: Tensor, sigma: float) -> Tensor:
    """``log N(a_t; mu_t, sigma^2)`` of every step: ``actions [N, H]``, ``mu [N, H]`` -> ``[N, H]``
    (the shared diagonal-Gaussian density, one dimension per step; gradients reach ``mu``)."""
    n, h = mu.shape
    std = torch.full((n * h, 1), float(sigma), device=mu.device)
    return diag_gaussian_log_prob(actions.reshape(-1, 1), mu.reshape(-1, 1), std).view(n, h)


class ForecastPolicy(Protocol):
    """What the trainer calls on the task's model (an ``nn.Module``). ``past [N, W, C]`` is the
    input window, ``future_cov [N, H, F]`` the known covariates of the forecast steps."""

    def rollout(
        self, past: Tensor, future_cov: Tensor, horizon: int, *, sigma: float = 0.0, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(mu [N, H], actions [N, H])``: ``a_t = mu_t + sigma noise_t`` fed back step by step
        (``noise [N, H]`` standard normal); without noise the deterministic mean path."""
        ...

    def replay(self, past: Tensor, future_cov: Tensor, actions: Tensor) -> Tensor:
        """``mu [N, H]`` (with grad) when the stored ``actions [N, H]`` are fed back; equals the
        rollout's ``mu`` for the same weights."""
        ...

    def clamp(self, values: Tensor) -> Tensor:
        """``values [N, H]`` as fed back and scored (e.g. not below a physical floor)."""
        ...


@dataclass
class WindowView:
    """One forecast window as logged rollouts show it, in display units (NaN where unobserved):
    ``history [W]`` the input window, ``truth [H]`` and ``forecast [H]`` the forecast hours;
    ``title`` says where and when (the prompt of the row, e.g. the station and the start time);
    ``unit`` labels the values (e.g. ``µg/m³``)."""

    title: str
    history: Tensor
    truth: Tensor
    forecast: Tensor
    unit: str = ""


@dataclass
class StageOne:
    """Stage 1 as a task asks for it. ``windows``: as :meth:`SeriesTask.windows` with ``horizon``
    steps (``past``, ``future_cov``, ``target``, ``target_mask``); ``loss``: ``mse`` on the
    observed steps, or ``nll`` (Gaussian NLL with the policy's sigma, up to a constant);
    ``config``: epochs, batch size and optimizer of :func:`mmpo.sft.supervised_train`."""

    config: SFTConfig
    windows: dict[str, Tensor]
    horizon: int
    loss: str = "mse"


class SeriesTask(Protocol):
    """What :class:`SeriesTrainer` calls on its task (besides ``name``, ``state_dict`` and
    ``load_state_dict`` of :class:`mmpo.tasks.Task`). Values live in the model's units (e.g.
    normalised); the task converts them for its rewards and reports."""

    name: str
    #: ``model.path`` value asking for a fresh model from :meth:`build_model` (stage 1 first)
    fresh_model: str
    #: the training start indices the sampler cycles over (set by :meth:`prepare`)
    train_starts: Sequence[int]
    #: the policy's std in the model's units (set by :meth:`prepare`)
    sigma: float
    #: pair the rollouts of a group with noise ``eps`` and ``-eps`` (G must be even)
    antithetic: bool

    def prepare(self) -> None:
        """Load the data (ConfigError / DataError naming the file); sets ``train_starts`` and ``sigma``."""
        ...

    def build_model(self) -> nn.Module:
        """A fresh :class:`ForecastPolicy` (the trainer seeds torch first)."""
        ...

    def load_model(self, path: str | Path) -> nn.Module:
        """The :class:`ForecastPolicy` saved in folder ``path`` (ConfigError if it is none)."""
        ...

    def stage_one(self) -> StageOne | None:
        """Stage 1 for a fresh model, or None to start GRPO from the fresh weights."""
        ...

    def horizon(self, step: int) -> int:
        """Forecast steps H rolled out at training step ``step`` (a curriculum)."""
        ...

    def windows(self, split: str, starts: Sequence[int], horizon: int) -> dict[str, Tensor]:
        """Windows at ``starts [n]`` of ``split``: ``past [n, W, C]``, ``future_cov [n, H, F]``,
        ``target [n, H]``, ``target_mask [n, H]`` bool (observed steps; the units of the loss)
        and ``start [n]``."""
        ...

    def reward(self, pred: Tensor, truth: Tensor, mask: Tensor) -> RewardOutput:
        """Rewards ``[N]`` (and components ``[N]``) of paths ``pred [N, H]`` (clamped actions)
        against ``truth [N, H]`` over the observed steps ``mask [N, H]``; CPU tensors."""
        ...

    def window_views(
        self, split: str, starts: Sequence[int], pred: Tensor, truth: Tensor, mask: Tensor
    ) -> list[WindowView]:
        """The windows at ``starts [n]`` of ``split`` with paths ``pred [n, H]`` against ``truth
        [n, H]`` (observed where ``mask [n, H]``), as :meth:`reward` gets them, for logged rollouts."""
        ...

    def after_step(self, pred: Tensor, truth: Tensor, mask: Tensor) -> dict[str, float]:
        """After the update, with the step's rollouts of every rank (as :meth:`reward`, gathered):
        update the task's stateful reward pieces (e.g. Lagrange multipliers); returns metrics to log."""
        ...

    def checkpoint_states(self) -> dict[str, Any]:
        """The task's stateful pieces by name (objects with ``state_dict`` / ``load_state_dict``),
        checkpointed with the algorithm's (e.g. ``{"lagrange": ...}``)."""
        ...

    def evaluator(
        self,
        models: dict[str, nn.Module],
        device: torch.device,
        *,
        test: bool = False,
        params: Callable[[], AbstractContextManager] = nullcontext,
    ) -> Evaluator:
        """The :class:`~mmpo.evaluate.Evaluator` of the models ``{label: ForecastPolicy}`` side by
        side: items the evaluation windows (start times) of the test split (``test``: ``mmpo eval``)
        or of the split evaluated during training; rows ``id`` / ``input`` the start time,
        ``prediction`` the deterministic forecast, ``answer`` the truth (null where unobserved) and
        per-row scores; ``params`` wraps the forecasts (ZeRO-3 gathers parameters there)."""
        ...

    def save_model_files(self, folder: Path) -> None:
        """Write what the final model folder needs beside the weights (e.g. the normalizer)."""
        ...


#: the members of :class:`SeriesTask` (checked when the trainer starts)
SERIES_TASK_MEMBERS = (
    "fresh_model",
    "antithetic",
    "prepare",
    "build_model",
    "load_model",
    "stage_one",
    "horizon",
    "windows",
    "reward",
    "window_views",
    "after_step",
    "checkpoint_states",
    "evaluator",
    "save_model_files",
)


__all__ = ["SERIES_TASK_MEMBERS", "ForecastPolicy", "SeriesTask", "StageOne", "WindowView", "step_log_probs"]
