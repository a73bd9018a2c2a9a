"""A small autoregressive PM2.5 forecaster and its Gaussian policy (FAKER-Air's stochastic
rollout, on one station's series instead of a 3-D field).

``PM25Forecaster``: a GRU reads the past window ``[N, W, C]`` (PM2.5, its observed mask, weather
and calendar covariates); a GRU cell then steps through the forecast hours, each step reading the
previous value and that hour's known covariates, and predicts the mean ``mu_t``.

As a policy each step samples ``a_t = mu_t + sigma * eps_t`` (sigma from the config, in
normalised units) and feeds ``a_t`` back as the next step's input: the action unit is one
forecast step, ``log pi(a_t) = log N(a_t; mu_t, sigma^2)`` (:func:`step_log_probs`, the series
trainer's). Replaying the stored actions with grad (teacher forcing on the actions) gives the
same ``mu`` as the rollout, so stored and recomputed log-probs agree. The KL to a reference model is the core's \
closed form
(``KL_ESTIMATORS['gaussian']``), ``(mu - mu_ref)^2 / (2 sigma^2)`` per step, or a sample
estimator on the actions' log-probs (``algorithm.kl_estimator``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from mmpo.trainers.series import step_log_probs  # the action unit's log-density (re-exported)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ForecasterConfig:
    in_channels: int
    cov_dim: int
    hidden: int = 64
    layers: int = 1
    #: normalised value of 0 µg/m³: means stay above it (a smooth floor) and values fed back are
    #: clamped to it, so no forecast is negative; None: unbounded
    floor: float | None = None


class PM25Forecaster(nn.Module):
    """``forward(past [N, W, C], future_cov [N, H, F], inputs [N, H]) -> mu [N, H]``.

    ``inputs[:, t]`` is the value fed in at step t: the previous step's value (step 0 reads the
    last value of the window). Sampling uses :meth:`rollout`.
    """

    def __init__(self, config: ForecasterConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = nn.GRU(config.in_channels, config.hidden, num_layers=config.layers, batch_first=True)
        self.cell = nn.GRUCell(1 + config.cov_dim, config.hidden)
        self.head = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.SiLU(), nn.Linear(config.hidden, 1))

    def encode(self, past: torch.Tensor) -> torch.Tensor:
        """``past [N, W, C]`` -> hidden ``[N, hidden]``."""
        _, h = self.encoder(past)
        return h[-1]

    def step(self, h: torch.Tensor, value: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forecast hour: ``h [N, D]``, ``value [N]`` (the previous value), ``cov [N, F]`` ->
        ``(mu [N], h [N, D])``. The prediction is a residual on the previous value."""
        h = self.cell(torch.cat([value[:, None], cov], dim=-1), h)
        mu = value + self.head(h).squeeze(-1)
        if self.config.floor is not None:  # identity well above the floor, never below it
            mu = self.config.floor + torch.nn.functional.softplus(mu - self.config.floor, beta=20.0)
        return mu, h

    def clamp(self, values: torch.Tensor) -> torch.Tensor:
        """Values as fed back and scored: not below the floor (a sample may fall under it)."""
        return values if self.config.floor is None else values.clamp(min=self.config.floor)

    def forward(self, past: torch.Tensor, future_cov: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        h = self.encode(past)
        mus = []
        for t in range(inputs.shape[1]):
            mu, h = self.step(h, inputs[:, t], future_cov[:, t])
            mus.append(mu)
        return torch.stack(mus, dim=1)

    @staticmethod
    def last_value(past: torch.Tensor) -> torch.Tensor:
        """The value the first step reads: channel 0 of the window's last hour ``[N]``."""
        return past[:, -1, 0]

    def rollout(
        self,
        past: torch.Tensor,
        future_cov: torch.Tensor,
        horizon: int,
        *,
        sigma: float = 0.0,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Autoregressive forecast of ``horizon`` steps.

        ``noise [N, H]`` (standard normal) gives ``a_t = mu_t + sigma * noise_t``, fed back
        (clamped to the floor; the log-prob is of the unclamped ``a_t``);
        ``sigma = 0`` or no noise is the deterministic forecast. Returns ``(mu [N, H], actions [N, H])``.
        """
        h = self.encode(past)
        value = self.last_value(past)
        mus, acts = [], []
        for t in range(horizon):
            mu, h = self.step(h, value, future_cov[:, t])
            a = mu if noise is None or sigma == 0 else mu + sigma * noise[:, t]
            mus.append(mu)
            acts.append(a)
            value = self.clamp(a)
        return torch.stack(mus, dim=1), torch.stack(acts, dim=1)

    def replay(self, past: torch.Tensor, future_cov: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``mu [N, H]`` when the stored ``actions [N, H]`` are fed back (teacher forcing on actions)."""
        inputs = torch.cat([self.last_value(past)[:, None], self.clamp(actions[:, :-1])], dim=1)
        return self(past, future_cov, inputs)

    # -- files ----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(
            json.dumps({"model_type": "mmpo_pm25_forecaster", **asdict(self.config)}, indent=1)
        )
        state = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> PM25Forecaster:
        from safetensors.torch import load_file

        from mmpo.errors import ConfigError

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ConfigError(f"'{folder}' is not a forecaster folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        cfg.pop("model_type", None)
        model = cls(ForecasterConfig(**cfg))
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return model


__all__ = ["ForecasterConfig", "PM25Forecaster", "step_log_probs"]
