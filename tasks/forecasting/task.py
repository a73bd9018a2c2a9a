"""``airquality_grpo``: FAKER-Air (``kaist-cvml/FAKER-Air``) on one station's hourly PM2.5:
a supervised forecaster (stage 1), then GRPO on its Gaussian autoregressive rollouts with a
class-wise reward that penalises false alarms (stage 2).

A group is G forecast rollouts from one start time; the action unit is one forecast hour.
Advantage ``rank_ema``, loss ``-A log pi`` (the core's ``no_clip_pg``, plain) plus ``beta``
times the closed-form Gaussian KL to the stage-1 model, beta by the ``pi_target`` controller;
the horizon grows by the curriculum ``min(max, base + inc * floor(epoch / every))``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mmpo.errors import ConfigError
from mmpo.sft import SFTConfig
from mmpo.tasks import RewardOutput, Sample, Task
from mmpo_tasks.forecasting.rewards import ClassRewardConfig


@dataclass
class CurriculumConfig:
    base: int = field(default=3, metadata={"help": "Horizon (hours) at epoch 0 (FAKER: 3 steps).", "min": 1})
    inc: int = field(default=1, metadata={"help": "Hours added every `every` epochs (FAKER: 1).", "min": 0})
    every: int = field(default=1, metadata={"help": "Epochs between increments (FAKER: 1).", "min": 1})
    max: int = field(default=12, metadata={"help": "Largest training horizon (FAKER: 12 steps).", "min": 1})
    steps_per_epoch: int = field(default=10, metadata={"help": "Trainer steps that make one curriculum epoch.", "min": 1})

    def horizon(self, epoch: int) -> int:
        """``min(max, base + inc * floor(epoch / every))``."""
        return min(self.max, self.base + self.inc * (epoch // self.every))


@dataclass
class StageOneConfig(SFTConfig):
    loss: str = field(default="mse", metadata={"help": "'mse' or 'nll' (Gaussian NLL with the policy's sigma) on the observed hours."})
    horizon: int = field(default=12, metadata={"help": "Hours rolled out autoregressively (own predictions fed back) per training window.", "min": 1})
    max_windows: int = field(default=4000, metadata={"help": "Training windows drawn (evenly) from the training years; 0 = all.", "min": 0})


@dataclass
class ForecastConfig:
    data: str = field(default="", metadata={"help": "The UCI Beijing PM2.5 CSV, or the folder / series.parquet written by data_prep/beijing_pm25.py; empty: the copy bundled in tasks/forecasting/data_sources/."})
    train_years: list[int] = field(default_factory=lambda: [2010, 2011, 2012], metadata={"help": "Training years (also the normalisation statistics)."})
    val_years: list[int] = field(default_factory=lambda: [2013], metadata={"help": "Validation years (evaluation during training)."})
    test_years: list[int] = field(default_factory=lambda: [2014], metadata={"help": "Test years (`mmpo eval`)."})
    window: int = field(default=48, metadata={"help": "Past hours the forecaster reads.", "min": 1})
    min_observed_frac: float = field(default=0.75, metadata={"help": "A start time needs this fraction of its window observed.", "min": 0.0, "max": 1.0})
    hidden: int = field(default=64, metadata={"help": "GRU width.", "min": 1})
    layers: int = field(default=1, metadata={"help": "Encoder GRU layers.", "min": 1})
    sigma: float = field(default=3.0, metadata={"help": "Policy std in µg/m³ (FAKER PM2.5: 3.0).", "gt": 0.0})
    antithetic: bool = field(default=False, metadata={"help": "Pair rollouts with noise eps and -eps (G must be even)."})
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig, metadata={"help": "Training horizon schedule."})
    reward: ClassRewardConfig = field(default_factory=ClassRewardConfig, metadata={"help": "Class-wise reward."})
    sft: StageOneConfig = field(default_factory=StageOneConfig, metadata={"help": "Stage 1 (supervised) when model.path is 'tiny:forecaster' (a fresh forecaster); skipped when it is a trained forecaster folder."})
    eval_horizon: int = field(default=24, metadata={"help": "Lead times evaluated (hours).", "min": 1})
    eval_stride: int = field(default=24, metadata={"help": "Hours between evaluation start times.", "min": 1})
    eval_split: str = field(default="val", metadata={"help": "Split evaluated during training ('val'); `mmpo eval` uses 'test'."})
    plot_starts: int = field(default=4, metadata={"help": "`mmpo eval` plots this many forecasts against the truth.", "min": 0})


class AirQualityTask(Task):
    name = "airquality_grpo"
    description = "FAKER-Air: GRPO on an autoregressive PM2.5 forecaster (Beijing hourly series) with class-wise rewards, false-alarm penalty and curriculum rollout"
    Config = ForecastConfig

    @classmethod
    def trainer_class(cls) -> type:
        from mmpo_tasks.forecasting.trainer import ForecastTrainer

        return ForecastTrainer

    def __init__(self, config: ForecastConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        config.reward.validate()
        if config.sft.loss not in ("mse", "nll"):
            raise ConfigError(f"task.sft.loss={config.sft.loss!r}: use 'mse' or 'nll'")
        if config.eval_split not in ("train", "val", "test"):
            raise ConfigError(f"task.eval_split={config.eval_split!r}: use train, val or test")
        self.starts: list[int] = []  # set by the trainer (valid training start hours)

    def num_train(self) -> int:
        return len(self.starts)

    def train_sample(self, index: int) -> Sample:
        return Sample(id=str(self.starts[index]), messages=[], meta={"start": self.starts[index]})

    def eval_samples(self, n: int) -> list[Sample]:
        raise ConfigError("airquality_grpo evaluates on its own trainer")

    def reward(self, samples: list[Sample], completions: list[str]) -> RewardOutput:
        raise ConfigError("airquality_grpo scores forecasts on its own trainer (mmpo train picks it)")


__all__ = ["AirQualityTask", "CurriculumConfig", "ForecastConfig", "StageOneConfig"]
