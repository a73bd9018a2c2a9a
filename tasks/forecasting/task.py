"""``airquality_grpo``: FAKER-Air (``kaist-cvml/FAKER-Air``) on one station's hourly PM2.5:
a supervised forecaster (stage 1), then GRPO on its Gaussian autoregressive rollouts with a
class-wise reward that penalises false alarms (stage 2).

A group is G forecast rollouts from one start time; the action unit is one forecast hour.
Advantage ``rank_ema``, loss ``-A log pi`` (the core's ``no_clip_pg``, plain) plus ``beta``
times the closed-form Gaussian KL to the stage-1 model, beta by the ``pi_target`` controller;
the horizon grows by the curriculum ``min(max, base + inc * floor(epoch / every))``.

The run is the series trainer's (:class:`mmpo.trainers.series.SeriesTrainer`); this task is its
:class:`~mmpo.trainers.series.SeriesTask`: the PM2.5 splits and windows, the forecaster, the
class-wise rewards with their Lagrangian state, and the lead-time evaluation (its evaluator for
the one evaluator, :class:`~mmpo_tasks.forecasting.evaluation.ForecastEvaluator`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmpo.data_rows import LoadSummary
from mmpo.errors import ConfigError
from mmpo.sft import SFTConfig
from mmpo.tasks import RewardOutput, Sample, Task
from mmpo_tasks.forecasting.rewards import ClassRewardConfig, LagrangeState, classwise_reward, contingency

if TYPE_CHECKING:  # the data module (pandas) and the model load when a run prepares, not with the plugin list
    from mmpo.trainers.series import StageOne, WindowView
    from mmpo_tasks.forecasting.data import Normalizer, PM25Series
    from mmpo_tasks.forecasting.evaluation import ForecastEvaluator
    from mmpo_tasks.forecasting.model import PM25Forecaster

BUNDLED_CSV = Path(__file__).resolve().parent / "data_sources" / "beijing_pm25.csv"


@dataclass
class CurriculumConfig:
    base: int = field(default=3, metadata={"help": "Horizon (hours) at epoch 0 (FAKER: 3 steps).", "min": 1})
    inc: int = field(default=1, metadata={"help": "Hours added every `every` epochs (FAKER: 1).", "min": 0})
    every: int = field(default=1, metadata={"help": "Epochs between increments (FAKER: 1).", "min": 1})
    max: int = field(default=12, metadata={"help": "Largest training horizon (FAKER: 12 steps).", "min": 1})
    steps_per_epoch: int = field(
        default=10, metadata={"help": "Trainer steps that make one curriculum epoch.", "min": 1}
    )

    def horizon(self, epoch: int) -> int:
        """``min(max, base + inc * floor(epoch / every))``."""
        return min(self.max, self.base + self.inc * (epoch // self.every))


@dataclass
class StageOneConfig(SFTConfig):
    loss: str = field(
        default="mse", metadata={"help": "'mse' or 'nll' (Gaussian NLL with the policy's sigma) on the observed hours."}
    )
    horizon: int = field(
        default=12,
        metadata={
            "help": "Hours rolled out autoregressively (own predictions fed back) per training window.",
            "min": 1,
        },
    )
    max_windows: int = field(
        default=4000, metadata={"help": "Training windows drawn (evenly) from the training years; 0 = all.", "min": 0}
    )


@dataclass
class ForecastConfig:
    data: str = field(
        default="",
        metadata={
            "help": "The UCI Beijing PM2.5 CSV, or the folder / series.parquet written by data_prep/beijing_pm25.py; "
            "empty: the copy bundled in tasks/forecasting/data_sources/."
        },
    )
    train_years: list[int] = field(
        default_factory=lambda: [2010, 2011, 2012],
        metadata={"help": "Training years (also the normalisation statistics)."},
    )
    val_years: list[int] = field(
        default_factory=lambda: [2013], metadata={"help": "Validation years (evaluation during training)."}
    )
    test_years: list[int] = field(default_factory=lambda: [2014], metadata={"help": "Test years (`mmpo eval`)."})
    window: int = field(default=48, metadata={"help": "Past hours the forecaster reads.", "min": 1})
    min_observed_frac: float = field(
        default=0.75,
        metadata={"help": "A start time needs this fraction of its window observed.", "min": 0.0, "max": 1.0},
    )
    hidden: int = field(default=64, metadata={"help": "GRU width.", "min": 1})
    layers: int = field(default=1, metadata={"help": "Encoder GRU layers.", "min": 1})
    sigma: float = field(default=3.0, metadata={"help": "Policy std in µg/m³ (FAKER PM2.5: 3.0).", "gt": 0.0})
    antithetic: bool = field(
        default=False, metadata={"help": "Pair rollouts with noise eps and -eps (G must be even)."}
    )
    curriculum: CurriculumConfig = field(
        default_factory=CurriculumConfig, metadata={"help": "Training horizon schedule."}
    )
    reward: ClassRewardConfig = field(default_factory=ClassRewardConfig, metadata={"help": "Class-wise reward."})
    sft: StageOneConfig = field(
        default_factory=StageOneConfig,
        metadata={
            "help": "Stage 1 (supervised) when model.path is 'tiny:forecaster' (a fresh forecaster); "
            "skipped when it is a trained forecaster folder."
        },
    )
    eval_horizon: int = field(default=24, metadata={"help": "Lead times evaluated (hours).", "min": 1})
    eval_stride: int = field(default=24, metadata={"help": "Hours between evaluation start times.", "min": 1})
    eval_split: str = field(
        default="val", metadata={"help": "Split evaluated during training ('val'); `mmpo eval` uses 'test'."}
    )
    plot_starts: int = field(
        default=4, metadata={"help": "`mmpo eval` plots this many forecasts against the truth.", "min": 0}
    )


def resolve_data(path: str) -> str:
    """``task.data`` as a file: the bundled CSV when empty, ``series.parquet`` in a folder."""
    p = Path(path) if path else BUNDLED_CSV
    if p.is_dir():
        p = p / "series.parquet"
    if not p.exists():
        raise ConfigError(
            f"task.data='{path}' does not exist (the UCI Beijing PM2.5 CSV, or a folder from data_prep/beijing_pm25.py)"
        )
    return str(p)


class AirQualityTask(Task):
    """The forecasting task as a :class:`~mmpo.trainers.series.SeriesTask` (see the module docstring).
    Values the trainer hands over are normalised PM2.5; rewards and reports are in µg/m³."""

    name = "airquality_grpo"
    description = (
        "FAKER-Air: GRPO on an autoregressive PM2.5 forecaster (Beijing hourly series) with class-wise rewards, "
        "false-alarm penalty and curriculum rollout"
    )
    Config = ForecastConfig
    #: ``model.path`` of a fresh forecaster (sizes from the task config), trained by stage 1 first
    fresh_model = "tiny:forecaster"

    @classmethod
    def trainer_class(cls) -> type:
        from mmpo.trainers.series import SeriesTrainer

        return SeriesTrainer

    def __init__(self, config: ForecastConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        config.reward.validate()
        if config.sft.loss not in ("mse", "nll"):
            raise ConfigError(f"task.sft.loss={config.sft.loss!r}: use 'mse' or 'nll'")
        if config.eval_split not in ("train", "val", "test"):
            raise ConfigError(f"task.eval_split={config.eval_split!r}: use train, val or test")
        self.config: ForecastConfig = config
        self.antithetic = bool(config.antithetic)
        r = config.reward
        self.lagrange = LagrangeState(r.lambda_init, r.lambda_init) if r.lagrangian else None
        self.splits: dict[str, PM25Series] = {}
        self._normalizer: Normalizer | None = None
        self.train_starts: list[int] = []  # set by prepare()
        self.sigma = float("nan")  # policy std in normalised units, set by prepare()

    # -- data ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load and split the series (normalizer fitted on the training years), the policy's sigma
        in normalised units and the training start hours (a window of ``curriculum.max`` hours)."""
        from mmpo_tasks.forecasting.data import PM25, load_splits, valid_starts

        if self.splits:
            return
        c = self.config
        self.data_summary = LoadSummary(self.name)
        self.splits, self._normalizer = load_splits(
            resolve_data(c.data),
            train_years=c.train_years,
            val_years=c.val_years,
            test_years=c.test_years,
            unknown_keys=self.unknown_keys,
            summary=self.data_summary,
        )
        self.sigma = c.sigma / float(self._normalizer.std[PM25])
        starts = valid_starts(self.splits["train"], c.window, c.curriculum.max, c.min_observed_frac)
        if len(starts) == 0:
            raise ConfigError(
                f"no training start hour has {c.min_observed_frac:.0%} of a {c.window}-hour window observed"
            )
        self.train_starts = [int(s) for s in starts]
        self.data_summary.notes.append(f"{len(starts)} training start hours")
        self.data_summary.print()

    @property
    def normalizer(self) -> Normalizer:
        if self._normalizer is None:
            raise RuntimeError("airquality_grpo: call prepare() before using the data")
        return self._normalizer

    def windows(self, split: str, starts: Sequence[int] | np.ndarray, horizon: int) -> dict[str, torch.Tensor]:
        """See :func:`mmpo_tasks.forecasting.data.make_windows` (``task.window`` past hours)."""
        from mmpo_tasks.forecasting.data import make_windows

        return make_windows(self.splits[split], np.asarray(starts, dtype=np.int64), self.config.window, horizon)

    def horizon(self, step: int) -> int:
        """The curriculum's horizon at epoch ``step // curriculum.steps_per_epoch``."""
        c = self.config.curriculum
        return c.horizon(step // c.steps_per_epoch)

    def to_ug(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised PM2.5 -> µg/m³ (float32, CPU)."""
        return torch.as_tensor(self.normalizer.inverse_pm25(x.detach().cpu().numpy()), dtype=torch.float32)

    def num_train(self) -> int:
        return len(self.train_starts)

    def train_sample(self, index: int) -> Sample:
        return Sample(id=str(self.train_starts[index]), messages=[], meta={"start": self.train_starts[index]})

    def eval_samples(self, n: int) -> list[Sample]:
        raise ConfigError("airquality_grpo evaluates forecasts on the series trainer (mmpo train / mmpo eval pick it)")

    # -- model ---------------------------------------------------------------------------------
    def build_model(self) -> PM25Forecaster:
        """A fresh forecaster (``task.hidden`` / ``layers``) whose means stay above 0 µg/m³."""
        from mmpo_tasks.forecasting.model import ForecasterConfig, PM25Forecaster

        c = self.config
        cov_dim = self.splits["train"].covariates.shape[1]
        floor = float(self.normalizer.normalize_pm25(0.0))  # 0 µg/m³
        return PM25Forecaster(
            ForecasterConfig(in_channels=2 + cov_dim, cov_dim=cov_dim, hidden=c.hidden, layers=c.layers, floor=floor)
        )

    def load_model(self, path: str | Path) -> PM25Forecaster:
        from mmpo_tasks.forecasting.model import PM25Forecaster

        return PM25Forecaster.from_pretrained(path)

    def stage_one(self) -> StageOne:
        """``task.sft``: autoregressive ``sft.horizon``-hour windows (at most ``sft.max_windows``,
        evenly drawn) from the training years."""
        from mmpo.trainers.series import StageOne
        from mmpo_tasks.forecasting.data import valid_starts

        c, s = self.config, self.config.sft
        starts = valid_starts(self.splits["train"], c.window, s.horizon, c.min_observed_frac)
        if s.max_windows and len(starts) > s.max_windows:
            starts = starts[np.linspace(0, len(starts) - 1, s.max_windows).round().astype(int)]
        return StageOne(config=s, windows=self.windows("train", starts, s.horizon), horizon=s.horizon, loss=s.loss)

    def save_model_files(self, folder: Path) -> None:
        """``normalizer.json`` beside the forecaster (its inputs and outputs are normalised)."""
        (Path(folder) / "normalizer.json").write_text(json.dumps(self.normalizer.to_dict(), indent=1))

    # -- rewards and their state ------------------------------------------------------------------
    # the series trainer's reward hook (values, not texts)
    def reward(self, pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> RewardOutput:
        """Class-wise rewards (+ the Lagrangian terms) of paths ``pred [N, H]`` against ``truth
        [N, H]`` (normalised) over the observed hours ``mask [N, H]``; see :func:`classwise_reward`."""
        rewards, comp = classwise_reward(self.to_ug(pred), self.to_ug(truth), mask, self.config.reward, self.lagrange)
        return RewardOutput(rewards, comp)

    def source_name(self) -> str:
        """The series' name in titles: the data file's stem (``beijing_pm25`` for the bundled station)."""
        path = Path(resolve_data(self.config.data))
        return path.parent.name if path.name == "series.parquet" else path.stem

    def window_views(
        self, split: str, starts: Sequence[int], pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor
    ) -> list[WindowView]:
        """Windows at ``starts`` of ``split`` in µg/m³ for logged rollouts: the ``task.window``
        hours before the start (NaN where not measured), the truth (NaN where ``mask`` is false)
        and the path ``pred [n, H]`` (normalised, as the trainer scores it); titled with the series
        and the start time."""
        from mmpo.trainers.series import WindowView

        series, W = self.splits[split], self.config.window
        forecast = self.to_ug(pred)
        observed = torch.where(mask, self.to_ug(truth), torch.full_like(forecast, float("nan")))
        source = self.source_name()
        views = []
        for i, start in enumerate(starts):
            start = int(start)
            past = np.where(series.mask[start - W : start], series.target[start - W : start], np.nan)
            history = torch.as_tensor(self.normalizer.inverse_pm25(past.astype(np.float32)), dtype=torch.float32)
            when = np.datetime_as_string(series.times[start], unit="h")
            title = f"{source}: PM2.5 for {forecast.shape[1]} h from {when} ({split} split)"
            views.append(WindowView(title, history, observed[i], forecast[i], unit="µg/m³"))
        return views

    def after_step(self, pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """PI update of the Lagrange multipliers (if enabled) from the recall and FAR of the step's
        rollouts ``[N, H]`` (every rank's: the trainer gathers them, so the contingency counts are
        summed over ranks and every rank's multipliers move alike)."""
        if self.lagrange is None:
            return {}
        r = self.config.reward
        c = contingency(self.to_ug(pred), self.to_ug(truth), mask, r.edges, r.high_class)
        self.lagrange.update(float(c.pod()), float(c.far()), r)
        return {"lagrange/lam_rec": self.lagrange.lam_rec, "lagrange/lam_far": self.lagrange.lam_far}

    def checkpoint_states(self) -> dict[str, Any]:
        return {} if self.lagrange is None else {"lagrange": self.lagrange}

    # -- evaluation ------------------------------------------------------------------------------
    def evaluator(
        self,
        models: dict[str, torch.nn.Module],
        device: torch.device,
        *,
        test: bool = False,
        params: Callable[[], AbstractContextManager] = nullcontext,
    ) -> ForecastEvaluator:
        """The evaluator of ``models`` ``{label: forecaster}``: deterministic ``eval_horizon``-hour
        forecasts from start hours every ``eval_stride`` hours of the test split (``test``, for
        ``mmpo eval``) or of ``task.eval_split`` (during training); see :class:`ForecastEvaluator`."""
        from mmpo_tasks.forecasting.data import valid_starts
        from mmpo_tasks.forecasting.evaluation import ForecastEvaluator

        c = self.config
        split = "test" if test else c.eval_split
        starts = valid_starts(self.splits[split], c.window, c.eval_horizon, c.min_observed_frac, stride=c.eval_stride)
        return ForecastEvaluator(self, models, split, starts, horizon=c.eval_horizon, device=device, params=params)


__all__ = ["AirQualityTask", "CurriculumConfig", "ForecastConfig", "StageOneConfig", "resolve_data"]
