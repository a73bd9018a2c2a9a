"""The noise trainer: FIND (``vpx-ecnu/FIND``, ``dist_train2.py``), RL on the initial noise x_T.

The denoiser and the reward are frozen; the policy is a diagonal Gaussian over x_T, so each
image is a one-step MDP: action x_T, reward of the image the deterministic sampler (ODE / DDIM
eta=0) makes from it. ``A = R - V`` with a small value network ("reward calibration", trained by
MSE), ratio to the previous iteration's Gaussian hard-clamped to [0.8, 1.2] (the core's
``no_clip_pg`` loss with ``mode: clamp``, weight w_R), plus ``w_KL (|mu|^2 + |sigma - 1|^2)``
pulling toward N(0, I) (an extra loss term; the kind holds no reference, so no KL term).

The update is :func:`mmpo.trainers.update.run_update`: rows are noise samples, one unit each.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from mmpo.checkpoint import load_state_tensors, save_state_tensors
from mmpo.config import RunConfig
from mmpo.diffusion.evaluation import ImageSampler, precision_autocast
from mmpo.diffusion.pipeline import DiffusionModel, Schedule
from mmpo.errors import ConfigError
from mmpo.policies.denoising import DenoisingPolicy
from mmpo.policies.gaussian import NoisePolicy, diag_gaussian_log_prob
from mmpo.tasks import Sample
from mmpo.trainers.diffusion_base import (
    Contract,
    DiffusionTrainerBase,
    ImageTask,
    ImageTaskConfig,
    SamplingSettings,
    load_pipeline,
)
from mmpo.trainers.kinds import NOISE
from mmpo.trainers.method_inputs import reward_inputs
from mmpo.trainers.update import RowSizes, UnitTerms


# -- the contract with the task ---------------------------------------------------------------------
@runtime_checkable
class NoiseConfig(ImageTaskConfig, Protocol):
    """``task.config`` of the noise trainer: ``policy`` ('per_prompt' or 'conditioned'),
    ``sigma_init`` / ``sigma_min``, ``baseline`` ('value', 'group' or 'none'), the value net's
    ``value_lr`` / ``value_steps`` / ``value_hidden``, and ``reg_weight`` (w_KL) ramped over
    ``reg_warmup_steps``."""

    policy: str
    sigma_init: float
    sigma_min: float
    baseline: str
    value_lr: float
    value_steps: int
    value_hidden: int
    reg_weight: float
    reg_warmup_steps: int


class PromptText(Protocol):
    text: str


@runtime_checkable
class NoiseTask(ImageTask, Protocol):
    """A text-to-image task with a :class:`NoiseConfig` and its training / evaluation prompts
    (``.text`` each; the per-prompt policy has one Gaussian per training prompt)."""

    config: NoiseConfig
    prompts: Sequence[PromptText]
    eval_prompt_list: Sequence[PromptText]


class ValueNet(nn.Module):
    """``V(features [B, F]) -> [B]``: an MLP over the prompt embedding and summary statistics of (mu, sigma)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats.float()).squeeze(-1)


@dataclass
class NoiseBatch:
    """One step's rollout of N noise samples."""

    rows: list[Sample]
    index: torch.Tensor  # [N] prompt index (per_prompt policy)
    cond: torch.Tensor  # [N, D] pooled prompt embedding
    x_T: torch.Tensor  # [N, C, h, w]
    logp_old: torch.Tensor  # [N]
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]


def prompt_features(model: DiffusionModel, rows: list[Sample]) -> torch.Tensor:
    """Pooled prompt embedding ``[N, D]`` (the token-mean where the pipeline has no pooled one)."""
    e = model.encode([r.meta["prompt"] for r in rows], cfg=False)
    return (e.pooled if e.pooled is not None else e.embeds.mean(1)).float()


def build_noise_policy(
    task: NoiseTask, model: DiffusionModel, height: int, width: int
) -> tuple[NoisePolicy, dict[str, int]]:
    """The untrained noise policy of ``task.config`` over the pipeline's latents, and the index of
    each training prompt (its row of a per-prompt policy). ConfigError when a per-prompt policy
    meets evaluation prompts it has no Gaussian for."""
    c = task.config
    prompt_index = {p.text: i for i, p in enumerate(task.prompts)}
    if c.policy == "per_prompt":
        missing = [p.text for p in task.eval_prompt_list if p.text not in prompt_index]
        if missing:
            raise ConfigError(
                f"task.policy per_prompt learns a noise distribution per training prompt; eval prompts {missing[:3]} "
                "are not training prompts (set task.eval_prompts null, or task.policy conditioned)"
            )
    cond_dim = int(prompt_features(model, [task.train_sample(0)]).shape[-1])
    policy = NoisePolicy(
        model.latent_shape(height, width),
        mode=c.policy,
        num_prompts=len(task.prompts),
        cond_dim=cond_dim,
        sigma_init=c.sigma_init,
        sigma_min=c.sigma_min,
    )
    return policy, prompt_index


@dataclass
class NoiseImages(ImageSampler):
    """Images of the frozen pipeline from ``x_T = mu + sigma * noise`` of ``policy`` (the live
    :class:`NoisePolicy` or a saved one), decoded by ``decoder``'s deterministic sampler."""

    decoder: DenoisingPolicy
    policy: nn.Module
    prompt_index: dict[str, int]

    def index(self, rows: list[Sample]) -> torch.Tensor:
        """``[N]`` the training-prompt row of each sample (0 for an unseen prompt)."""
        return torch.tensor([self.prompt_index.get(r.meta["prompt"], 0) for r in rows])

    def decode(self, rows: list[Sample], x_T: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` of the frozen deterministic sampler from ``x_T [N, C, h, w]`` (one batch)."""
        with self.autocast():
            traj = self.decoder.sample(
                self.model.denoiser, self.condition(rows), x_T.to(self.model.device), schedule, stochastic=False
            )
        return self.model.decode(traj.final)

    def __call__(self, samples: list[Sample], noise: torch.Tensor) -> torch.Tensor:
        """``[n, 3, H, W]`` in [0, 1] from standard-normal ``noise [n, C, h, w]``."""
        device = self.model.device
        cond = prompt_features(self.model, samples).to(device)
        mu, sigma = self.policy(prompt_index=self.index(samples).to(device), cond=cond)
        x_T = (mu.detach() + sigma.detach() * noise.to(mu.device)).float()
        return self.decode(samples, x_T, self.schedule)


class FindTrainer(DiffusionTrainerBase):
    """FIND on a frozen diffusers pipeline: the trained module is the :class:`NoisePolicy`."""

    kind = NOISE

    @classmethod
    def check_requirements(cls, cfg: RunConfig, task: Any) -> None:
        """``algorithm.advantage`` is read only with ``task.baseline: group``; set otherwise, refused."""
        a, baseline = cfg.algorithm, task.config.baseline
        if baseline != "group" and (a.advantage != "grpo" or a.advantage_options):
            raise ConfigError(
                f"algorithm.advantage={a.advantage!r} (options {a.advantage_options}) is read only with "
                f"task.baseline: group; task.baseline is {baseline!r} (A = R - V or A = R)"
            )

    contract: ClassVar[Contract] = (
        ("task", NoiseTask),
        ("task.config", NoiseConfig),
        ("task.config.sampling", SamplingSettings),
    )
    model_markers: ClassVar[tuple[str, ...]] = ("noise_policy.safetensors",)
    task: NoiseTask  # type: ignore[assignment]

    def build_trainable(self) -> torch.nn.Module:
        """The noise policy (mu 0, sigma ``sigma_init``), and the value net with its own Adam."""
        c = self.task.config
        if self.cfg.model.lora is not None:
            raise ConfigError(
                "task find trains the noise distribution; the denoiser is frozen, so model.lora must be null"
            )
        s = c.sampling
        self.decoder = DenoisingPolicy(self.model, guidance_scale=s.guidance_scale)
        self.schedule = self.model.schedule(s.num_steps, self.height, self.width)
        self.eval_schedule = self.model.schedule(s.eval_num_steps, self.height, self.width)
        policy, self.prompt_index = build_noise_policy(self.task, self.model, self.height, self.width)
        cond_dim = self._prompt_features([self.task.train_sample(0)]).shape[-1]
        self.value = ValueNet(cond_dim + 4, c.value_hidden).to(self.model.device)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=c.value_lr)
        return policy

    def engine_ready(self) -> None:
        """Every rank starts from rank 0's value net (the ranks fit it on the same data after)."""
        state = {k: v.cpu() for k, v in self.value.state_dict().items()}
        self.value.load_state_dict(self.engine.all_gather_object(state)[0])
        s = self.task.config.sampling
        self.images = NoiseImages(
            self.model,
            self.eval_schedule,
            self.height,
            self.width,
            s.negative_prompt,
            self.engine.autocast,
            self.decoder,
            self.engine.module,
            self.prompt_index,
        )

    def _prompt_features(self, rows: list[Sample]) -> torch.Tensor:
        """Pooled prompt embedding ``[N, D]`` (the token-mean where the pipeline has no pooled one)."""
        return prompt_features(self.model, rows)

    def _policy_params(self, index: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)``, each ``[N, C, h, w]``, for prompt ``index [N]`` / features ``cond [N, D]``."""
        return self.engine.module(prompt_index=index.to(self.device), cond=cond.to(self.device))

    def _value_features(self, cond: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``[N, D + 4]``: the prompt features and mean |mu|, mean mu, mean sigma, std sigma."""
        mu, sigma = mu.detach().flatten(1).float(), sigma.detach().flatten(1).float()
        sigma_std = sigma.std(1) if sigma.shape[1] > 1 else sigma.mean(1) * 0
        stats = torch.stack([mu.mean(1), mu.abs().mean(1), sigma.mean(1), sigma_std], 1)
        return torch.cat([cond.to(stats.device).float(), stats], 1)

    # -- sampling ----------------------------------------------------------------------------------
    def _index(self, rows: list[Sample]) -> torch.Tensor:
        return self.images.index(rows)

    def _decode(self, rows: list[Sample], x_T: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` of the frozen deterministic sampler from ``x_T [N, C, h, w]`` (in micro batches)."""
        mb = self.shape.micro_batch_size
        parts = [self.images.decode(rows[s : s + mb], x_T[s : s + mb], schedule) for s in range(0, len(rows), mb)]
        return torch.cat(parts)

    def image_sampler(self) -> NoiseImages:
        """The live noise policy's evaluation images."""
        return self.images

    def rollout(self) -> tuple[NoiseBatch, dict[str, float]]:
        """x_T from the current Gaussians, decoded, scored; the advantages of ``task.baseline``."""
        c = self.task.config
        t0 = time.perf_counter()
        rows, group_ids = self.draw_prompts()
        index, cond = self._index(rows), self._prompt_features(rows)
        with torch.no_grad():
            mu, sigma = self._policy_params(index, cond)
            x_T = NoisePolicy.sample(mu, sigma)
            logp_old = diag_gaussian_log_prob(x_T, mu, sigma)
            images = self._decode(rows, x_T, self.schedule)
        t1 = time.perf_counter()
        out = self.score(images, rows)
        rewards = out.rewards.float()
        metrics: dict[str, float] = {}
        if c.baseline == "value":
            feats = self._value_features(cond, mu, sigma)
            with torch.no_grad():
                v = self.value(feats).cpu()
            adv = rewards - v
            metrics["value_loss"] = self._fit_value(feats, rewards)
            metrics["value_mean"] = float(v.mean())
        elif c.baseline == "group":
            inputs = reward_inputs(self.algo.advantage_inputs, out.components, rewards)
            adv = self.advantages(rewards, group_ids, [s.meta["prompt"] for s in rows], inputs)
        else:
            adv = rewards.clone()
        t2 = time.perf_counter()
        if self.samples_wanted():
            mu_abs, sigma_mean = mu.detach().flatten(1).abs().mean(1), sigma.detach().flatten(1).mean(1)
            G = self.cfg.rollout.group_size

            def describe(i: int) -> str:
                return (
                    f"noise sample {i % G + 1} of {G}: x_T ~ N(mu, sigma^2) of the {c.policy} policy "
                    f"(mean |mu| {float(mu_abs[i]):.3f}, mean sigma {float(sigma_mean[i]):.3f}); "
                    f"{self.schedule.num_steps}-step deterministic sampler (guidance {c.sampling.guidance_scale:g}), "
                    f"{self.width}x{self.height} px; baseline {c.baseline}"
                )

            self.log_image_samples(rows, group_ids, images, out, adv, describe)
        batch = NoiseBatch(rows, index, cond.cpu(), x_T.cpu(), logp_old.cpu(), rewards, adv)
        metrics.update(
            {
                "rollout_s": t1 - t0,
                "reward_s": t2 - t1,
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std()) if len(rows) > 1 else 0.0,
                "advantage_abs_mean": float(adv.abs().mean()),
                "sigma_mean": float(sigma.mean()),
                "mu_abs_mean": float(mu.abs().mean()),
            }
        )
        metrics.update({f"reward/{k}": float(v.float().mean()) for k, v in out.components.items()})
        return batch, metrics

    def _fit_value(self, feats: torch.Tensor, rewards: torch.Tensor) -> float:
        """``value_steps`` MSE steps of the value net on this iteration's ``feats [N, F]`` and
        ``rewards [N]`` of every rank (gathered in rank order, so every rank fits the same data
        and the value nets stay equal); the last loss."""
        parts = self.engine.all_gather_object((feats.detach().cpu(), rewards.detach().float().cpu()))
        feats = torch.cat([f for f, _ in parts]).to(self.value_device)
        target = torch.cat([r for _, r in parts]).to(self.value_device)
        loss = torch.zeros(())
        for _ in range(self.task.config.value_steps):
            loss = torch.nn.functional.mse_loss(self.value(feats), target)
            self.value_opt.zero_grad()
            loss.backward()
            self.value_opt.step()
        return float(loss.detach())

    # -- update ------------------------------------------------------------------------------------
    def update(self, batch: NoiseBatch, step: int) -> dict[str, float]:
        """The step's policy update over all N samples: the configured loss of ``logp [n, 1]``
        against ``logp_old [n, 1]`` plus ``reg_weight`` (ramped) times the pull toward N(0, I)."""
        c = self.task.config
        reg_w = c.reg_weight * (min(1.0, (step + 1) / c.reg_warmup_steps) if c.reg_warmup_steps else 1.0)
        n = len(batch.rows)

        def terms(rows: torch.Tensor, padding: bool) -> Iterator[UnitTerms]:
            mu, sigma = self._policy_params(batch.index[rows], batch.cond[rows])
            logp = diag_gaussian_log_prob(batch.x_T[rows].to(self.device), mu, sigma)[:, None]
            reg = NoisePolicy.regulariser(mu, sigma).mean()
            yield UnitTerms(
                logp,
                batch.logp_old[rows].to(self.device)[:, None],
                batch.advantages[rows].to(self.device),
                torch.ones_like(logp, dtype=torch.bool),
                extra_loss=reg_w * reg,
                metrics={"reg": float(reg.detach())},
            )

        sizes = RowSizes.from_mask(torch.ones(n, 1, dtype=torch.bool))
        out = self.update_policy(self.shape, torch.arange(n), sizes, terms, self.beta(step), step, max_len=1)
        out["reg_weight"] = reg_w
        return out

    # -- state -------------------------------------------------------------------------------------
    def save_extra(self, folder: Path) -> None:
        tensors = {f"value.{k}": v for k, v in self.value.state_dict().items()}
        for pid, st in self.value_opt.state_dict()["state"].items():
            tensors.update({f"opt.{pid}.{k}": torch.as_tensor(v) for k, v in st.items()})
        save_state_tensors(folder / "value.safetensors", tensors)

    def load_extra(self, folder: Path) -> None:
        tensors = load_state_tensors(folder / "value.safetensors", device=self.model.device)
        self.value.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("value.")})
        sd = self.value_opt.state_dict()
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v.cpu() if name == "step" else v
        sd["state"] = state
        self.value_opt.load_state_dict(sd)

    @property
    def value_device(self) -> torch.device:
        return next(self.value.parameters()).device

    @classmethod
    def saved_image_sampler(
        cls, cfg: RunConfig, task: NoiseTask, model_dir: Path | None, device: torch.device, precision: str
    ) -> tuple[NoiseImages, str]:
        """model.path's frozen pipeline with the noise policy of ``model_dir`` (``noise_policy.safetensors``;
        None: the untrained N(0, I))."""
        model, height, width = load_pipeline(cfg, task, device, precision)
        policy, prompt_index = build_noise_policy(task, model, height, width)
        policy.to(device)
        if model_dir is not None:
            path = model_dir / "noise_policy.safetensors"
            if not path.is_file():
                raise ConfigError(f"'{model_dir}' has no noise_policy.safetensors (the model folder of a find run)")
            policy.load_state_dict(load_state_tensors(path, device=device))
        s = task.config.sampling
        schedule = model.schedule(s.eval_num_steps, height, width)
        decoder = DenoisingPolicy(model, guidance_scale=s.guidance_scale)
        sampler = NoiseImages(
            model,
            schedule,
            height,
            width,
            s.negative_prompt,
            precision_autocast(device, precision),
            decoder,
            policy,
            prompt_index,
        )
        return sampler, str(model_dir or cfg.model.path)

    def save_final_model(self, folder: Path) -> None:
        """``model/noise_policy.safetensors`` (mu, sigma or the conditioning head) with a JSON
        description; the denoiser is unchanged (the pipeline of model.path)."""

        def save(module: torch.nn.Module, f: Path, state: dict[str, torch.Tensor]) -> None:
            meta = {
                "mode": module.mode,
                "shape": ",".join(map(str, module.shape)),
                "pipeline": str(self.model.folder),
                "prompts": "\n".join(p.text for p in self.task.prompts),
            }
            save_state_tensors(f / "noise_policy.safetensors", state, metadata=meta)

        self.engine.save_pretrained(folder, save_fn=save)


__all__ = [
    "FindTrainer",
    "NoiseBatch",
    "NoiseConfig",
    "NoiseImages",
    "NoiseTask",
    "ValueNet",
    "build_noise_policy",
    "prompt_features",
]
