"""The denoising trainer: GRPO on the denoiser's SDE steps, grouped into chunks (Flow-GRPO, Chunk-GRPO).

Flow-GRPO (``yifan123/flow_grpo``, ``scripts/train_sd3.py``): G images per prompt from the SDE
sampler, one advantage per image shared by all its steps, a clipped ratio per step (eps 1e-4),
closed-form Gaussian KL to the reference, the stored sampling log-prob as pi_old.
Chunk-GRPO (arXiv 2510.21583): contiguous chunks of steps are the action units; a chunk's ratio
is the geometric mean of its steps' ratios, ``exp(mean_t log r_t)``. Chunk size 1 is Flow-GRPO,
through the same code.

The update is :func:`mmpo.trainers.update.run_update`: rows are images, each micro batch yields
one :class:`~mmpo.trainers.update.UnitTerms` per trained chunk (one unit per row).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from mmpo.config import RunConfig
from mmpo.core import chunk_log_ratio
from mmpo.diffusion.chunks import (
    check_partition,
    chunk_bounds,
    profile_partition,
    relative_l1_profile,
    sample_chunks,
    uniform_partition,
)
from mmpo.diffusion.evaluation import ImageSampler, precision_autocast
from mmpo.diffusion.pipeline import PromptEmbeds, Schedule, adapters_disabled, quiet_loading
from mmpo.errors import ConfigError
from mmpo.policies.denoising import DenoisingPolicy, Trajectory
from mmpo.tasks import Sample
from mmpo.trainers.diffusion_base import (
    Contract,
    DiffusionTrainerBase,
    ImageTask,
    ImageTaskConfig,
    SamplingSettings,
    load_pipeline,
)
from mmpo.trainers.kinds import DENOISING
from mmpo.trainers.loop import seeded_generator
from mmpo.trainers.method_inputs import reward_inputs
from mmpo.trainers.update import RowSizes, UnitTerms, compose_loss


# -- the contract with the task ---------------------------------------------------------------------
@runtime_checkable
class ChunkSettings(Protocol):
    """``task.config.chunks``: how the sampling steps form action units ('uniform' chunks of
    ``size`` steps, 'fixed' ``sizes``, or 'profile' ``num_chunks`` from the latent profile of
    ``profile_prompts`` prompts); ``weighted_sampling`` trains ``per_step`` chunks drawn with
    weight (mean noise level)^``power``."""

    mode: str
    size: int
    sizes: list[int]
    num_chunks: int
    profile_prompts: int
    weighted_sampling: bool
    per_step: int
    power: float


@runtime_checkable
class DenoisingConfig(ImageTaskConfig, Protocol):
    """``task.config`` of the denoising trainer: ``chunks``; ``timestep_fraction`` (the trained
    leading share of the steps); ``kl_std`` ('sigma_t' or 'step', the std of the closed-form KL);
    ``skip_zero_advantage`` (leave images with advantage 0 out of the update)."""

    chunks: ChunkSettings
    timestep_fraction: float
    kl_std: str
    skip_zero_advantage: bool


@runtime_checkable
class DenoisingTask(ImageTask, Protocol):
    """A text-to-image task whose config is a :class:`DenoisingConfig`."""

    config: DenoisingConfig


@dataclass
class DenoiseBatch:
    """One step's rollout: ``latents [N, S+1, C, h, w]``, ``logp_old [N, S]``, ``rewards [N]``,
    ``advantages [N]``, the rows' conditioning and the rewards' components."""

    rows: list[Sample]
    cond: PromptEmbeds
    traj: Trajectory
    rewards: torch.Tensor
    advantages: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class DenoiserImages(ImageSampler):
    """Images of ``denoiser`` by the deterministic sampler (ODE / DDIM eta=0) of ``policy``."""

    policy: DenoisingPolicy
    denoiser: torch.nn.Module

    def __call__(self, samples: list[Sample], noise: torch.Tensor) -> torch.Tensor:
        """``[n, 3, H, W]`` in [0, 1] from standard-normal ``noise [n, C, h, w]``."""
        x_T = self.model.scale_noise(noise)
        with self.autocast():
            traj = self.policy.sample(self.denoiser, self.condition(samples), x_T, self.schedule, stochastic=False)
        return self.model.decode(traj.final)


class ChunkGRPOTrainer(DiffusionTrainerBase):
    """Flow-GRPO / Chunk-GRPO on a diffusers denoiser (full fine-tuning or LoRA)."""

    kind = DENOISING
    contract: ClassVar[Contract] = (
        ("task", DenoisingTask),
        ("task.config", DenoisingConfig),
        ("task.config.sampling", SamplingSettings),
        ("task.config.chunks", ChunkSettings),
    )
    model_markers: ClassVar[tuple[str, ...]] = ("model_index.json", "pytorch_lora_weights.safetensors")
    task: DenoisingTask  # type: ignore[assignment]

    def build_trainable(self) -> torch.nn.Module:
        """The denoiser (LoRA adapters in float32, or all weights in float32) and, for full
        fine-tuning with a KL term, a frozen copy as the reference."""
        s = self.task.config.sampling
        self.policy = DenoisingPolicy(self.model, noise_level=s.noise_level, eta=s.eta, guidance_scale=s.guidance_scale)
        self.schedule = self.model.schedule(s.num_steps, self.height, self.width)
        self.eval_schedule = self.model.schedule(s.eval_num_steps, self.height, self.width)
        denoiser = self.model.denoiser
        self.ref: torch.nn.Module | None = None
        lora = self.cfg.model.lora
        if lora is not None:
            from peft import LoraConfig as PeftLoraConfig

            # peft's rule for a list of names: a module matches a target t when its name is t or
            # ends with "." + t (a bare suffix would let q_proj match add_q_proj, which peft rejects)
            names = [n for n, _ in denoiser.named_modules()]
            if not any(n == t or n.endswith("." + t) for n in names for t in lora.target_modules):
                raise ConfigError(
                    f"model.lora.target_modules {lora.target_modules} match no module of the "
                    f"{self.model.denoiser_name}; "
                    "diffusers attention uses to_q, to_k, to_v, to_out.0 (and add_q_proj, ... in joint blocks)"
                )
            denoiser.add_adapter(
                PeftLoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules),
                    init_lora_weights="gaussian",
                )
            )
            for p in denoiser.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # adapters train in float32 over bf16 base weights
        else:
            denoiser.float().requires_grad_(True)
            if self.algo.uses_kl:  # with LoRA the reference is the base with adapters disabled
                self.ref = copy.deepcopy(denoiser).requires_grad_(False).to(self.model.dtype)
        denoiser.train(False)
        self.chunk_sizes: list[int] | None = None
        self.partition()  # fixes the number of chunks trained a step (the backward calls per update)
        return denoiser

    def parts(self) -> int:
        """One loss part per trained chunk."""
        return len(self._trained_chunks(0))

    # -- chunks --------------------------------------------------------------------------------
    def partition(self) -> list[int]:
        """Chunk sizes over the S sampling steps (computed once; saved with the run state)."""
        if self.chunk_sizes is None:
            c = self.task.config.chunks
            S = self.schedule.num_steps
            if c.mode == "uniform":
                self.chunk_sizes = uniform_partition(c.size, S)
            elif c.mode == "fixed":
                self.chunk_sizes = check_partition(c.sizes, S)
            else:
                self.chunk_sizes = profile_partition(self._latent_profile(c.profile_prompts), c.num_chunks)
        return self.chunk_sizes

    @torch.no_grad()
    def _latent_profile(self, n: int) -> torch.Tensor:
        """The relative-L1 profile ``[S]`` of the initial model's deterministic latents on ``n`` prompts."""
        rows = [self.task.train_sample(i) for i in range(min(n, self.task.num_train()))]
        gen = seeded_generator(self.cfg.seed + 77, self.model.device)
        x = self.model.init_latents(len(rows), self.height, self.width, gen)
        cond = self.condition(rows)
        # runs before the engine exists: the denoiser as loaded (the profile of the initial model)
        traj = self.policy.sample(self.model.denoiser, cond, x, self.schedule, stochastic=False)
        return relative_l1_profile(traj.latents)

    def trainer_state(self) -> dict[str, Any]:
        return {**super().trainer_state(), "chunk_sizes": self.partition()}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        super().load_trainer_state(state)
        self.chunk_sizes = [int(c) for c in state["chunk_sizes"]]

    def noise_levels(self, schedule: Schedule) -> torch.Tensor:
        """Per-step noise level ``[S]``: sigma for flow models, sqrt(1 - alpha_bar) for DDIM."""
        if schedule.kind == "flow":
            return schedule.sigmas[:-1].double()
        return (1 - schedule.alphas[:-1]).sqrt()

    # -- sampling --------------------------------------------------------------------------------
    def _sample(self, cond: PromptEmbeds, x_T: torch.Tensor, noise: torch.Tensor) -> Trajectory:
        """The live denoiser's SDE trajectories from ``x_T [B, C, h, w]`` with step noise ``noise [B, S, C, h, w]``."""
        with self.engine.autocast():
            return self.policy.sample(self.engine.module, cond, x_T, self.schedule, stochastic=True, noise=noise)

    def image_sampler(self) -> DenoiserImages:
        """The live denoiser's deterministic evaluation images."""
        s = self.task.config.sampling
        return DenoiserImages(
            self.model,
            self.eval_schedule,
            self.height,
            self.width,
            s.negative_prompt,
            self.engine.autocast,
            self.policy,
            self.engine.module,
        )

    def rollout(self) -> tuple[DenoiseBatch, dict[str, float]]:
        """G SDE trajectories per prompt (sampled in micro batches), decoded and scored."""
        t0 = time.perf_counter()
        rows, group_ids = self.draw_prompts()
        cond = self.condition(rows)
        mb = self.shape.micro_batch_size
        # all noise drawn up front, so the samples do not depend on the micro-batch size
        x_T = self.model.init_latents(len(rows), self.height, self.width)
        noise = torch.randn(len(rows), self.schedule.num_steps, *x_T.shape[1:]).to(x_T.device)
        parts, images = [], []
        with torch.no_grad():
            for s in range(0, len(rows), mb):
                idx = list(range(s, min(s + mb, len(rows))))
                part = self._sample(cond.rows(idx), x_T[idx], noise[idx])
                parts.append(part)
                images.append(self.model.decode(part.final))
        traj = Trajectory(torch.cat([p.latents for p in parts]), torch.cat([p.log_probs for p in parts]))
        t1 = time.perf_counter()
        pictures = torch.cat(images)
        out = self.score(pictures, rows)
        inputs = reward_inputs(self.algo.advantage_inputs, out.components, out.rewards)
        adv = self.advantages(out.rewards, group_ids, [s.meta["prompt"] for s in rows], inputs)
        t2 = time.perf_counter()
        self.log_image_samples(rows, group_ids, pictures, out, adv, self.describe_sample)
        batch = DenoiseBatch(rows, cond, traj, out.rewards.float(), adv, out.components)
        metrics = {
            "rollout_s": t1 - t0,
            "reward_s": t2 - t1,
            "reward_mean": float(out.rewards.mean()),
            "reward_std": float(out.rewards.std()) if len(rows) > 1 else 0.0,
            "advantage_abs_mean": float(adv.abs().mean()),
            "zero_advantage_frac": float((adv == 0).float().mean()),
            "rollout_logp_mean": float(traj.log_probs.mean()),
        }
        metrics.update({f"reward/{k}": float(v.float().mean()) for k, v in out.components.items()})
        return batch, metrics

    def describe_sample(self, i: int) -> str:
        """The logged completion of rollout ``i``: its place in the group and how it was sampled
        (SDE steps, noise level, guidance, the chunks and those trained this step)."""
        s, G = self.task.config.sampling, self.cfg.rollout.group_size
        sizes = self.partition()
        chunks = f"{len(sizes)} chunks of " + (f"{sizes[0]} step(s)" if len(set(sizes)) == 1 else f"sizes {sizes}")
        trained = ", ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in self._trained_chunks(self.step))
        return (
            f"SDE sample {i % G + 1} of {G}: {self.schedule.num_steps} denoising steps "
            f"(noise level {s.noise_level:g}, guidance {s.guidance_scale:g}), {self.width}x{self.height} px; "
            f"{chunks}, trained steps {trained}"
        )

    # -- update ----------------------------------------------------------------------------------
    def _trained_chunks(self, step: int) -> list[tuple[int, int]]:
        """Step ranges of the chunks trained this step: those with steps before
        int(num_steps * timestep_fraction) (clipped there); weighted sampling picks ``per_step`` of
        them. The count is the same every step."""
        c = self.task.config
        sizes = self.partition()
        last = max(1, int(self.schedule.num_steps * c.timestep_fraction))
        eligible = [(a, min(b, last)) for a, b in chunk_bounds(sizes) if a < last]
        if not c.chunks.weighted_sampling:
            return eligible
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        lengths = [b - a for a, b in eligible]
        chosen = sample_chunks(self.noise_levels(self.schedule), lengths, c.chunks.per_step, c.chunks.power, gen)
        return [eligible[j] for j in chosen]

    @contextmanager
    def _reference(self) -> Iterator[torch.nn.Module]:
        """The frozen reference denoiser: a copy (full fine-tuning) or the base without adapters."""
        with torch.no_grad():
            if self.ref is not None:
                yield self.ref
            else:
                with adapters_disabled(self.engine.module):
                    yield self.engine.module

    def update(self, batch: DenoiseBatch, step: int) -> dict[str, float]:
        """The step's policy update over the images (those with advantage != 0 under
        ``skip_zero_advantage``; none trained leaves every slot a zero-weight stand-in)."""
        chunks = self._trained_chunks(step)
        n = len(batch.rows)
        skip = self.task.config.skip_zero_advantage
        keep = torch.nonzero(batch.advantages != 0).flatten() if skip else torch.arange(n)
        beta = self.beta(step)

        def terms(rows: torch.Tensor, padding: bool) -> Iterator[UnitTerms]:
            for start, end in chunks:  # built one chunk at a time: one chunk's graph in memory
                yield self._chunk_terms(batch, rows, start, end)

        sizes = RowSizes.from_mask(torch.ones(n, 1, dtype=torch.bool))
        out = self.update_policy(self.shape, keep, sizes, terms, beta, step, max_len=1, stand_in=0)
        out["beta"] = beta
        out["chunks_trained"] = float(len(chunks))
        out["rows_trained_frac"] = len(keep) / n
        return out

    def _chunk_terms(self, batch: DenoiseBatch, rows: torch.Tensor, start: int, end: int) -> UnitTerms:
        """The unit of chunk ``start..end-1`` for ``rows`` (n of them): ``logp`` / ``logp_old`` ``[n, 1]``
        the mean of its steps' log-probs (the log of the geometric-mean ratio), ``advantages [n]``
        and, with a KL term, ``kl [n, 1]`` the closed-form Gaussian KL to the reference averaged
        over the chunk's steps."""
        idx = rows.tolist()
        cond = batch.cond.rows(idx)
        lat = batch.traj.latents[rows].to(self.device)
        logps, kls = [], []
        for i in range(start, end):
            with self.engine.autocast():
                out = self.policy.step(self.engine.module, lat[:, i], self.schedule, i, cond, prev_sample=lat[:, i + 1])
            logps.append(out.log_prob)
            if self.algo.uses_kl:
                with self._reference() as ref, self.engine.autocast():
                    ref_mean = self.policy.step(ref, lat[:, i], self.schedule, i, cond, prev_sample=lat[:, i + 1]).mean
                std = out.kl_sigma if self.task.config.kl_std == "sigma_t" else out.std
                kls.append(self.algo.kl(out.mean[:, None], ref_mean[:, None], std)[:, 0])
        logp = torch.stack(logps, 1)  # [n, steps]
        old = batch.traj.log_probs[rows][:, start:end].to(self.device)
        chunk_logp = chunk_log_ratio(logp, [end - start])  # [n, 1], the mean: log of the geometric mean
        chunk_old = chunk_log_ratio(old, [end - start])
        kl = torch.stack(kls, 1).mean(1, keepdim=True) if kls else None  # [n, 1]
        mask = torch.ones_like(chunk_logp, dtype=torch.bool)
        return UnitTerms(chunk_logp, chunk_old, batch.advantages[rows].to(self.device), mask, kl=kl)

    def _chunk_loss(
        self, batch: DenoiseBatch, rows: torch.Tensor, start: int, end: int, beta: float | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss the update routine composes for one chunk (:func:`~mmpo.trainers.update.compose_loss`
        of :meth:`_chunk_terms`) and its metrics; ``beta`` defaults to the current step's."""
        beta = self.beta(self.step) if beta is None else beta
        return compose_loss(self._chunk_terms(batch, rows, start, end), self.algo, beta, max_len=1)

    # -- saving and `mmpo eval` ----------------------------------------------------------------------
    @classmethod
    def saved_image_sampler(
        cls, cfg: RunConfig, task: DenoisingTask, model_dir: Path | None, device: torch.device, precision: str
    ) -> tuple[DenoiserImages, str]:
        """A full pipeline in ``model_dir`` (or its ``merged/``) is the model; a LoRA-only folder is
        fused into model.path's denoiser; none: model.path as it is. The denoiser in float32, as trained."""
        path, lora = cfg.model.path, None
        if model_dir is not None:
            full = [f for f in (model_dir, model_dir / "merged") if (f / "model_index.json").is_file()]
            if full:
                path = str(full[0])
            elif (model_dir / "pytorch_lora_weights.safetensors").is_file():
                lora = model_dir
            else:
                raise ConfigError(
                    f"'{model_dir}' holds neither a diffusers pipeline (model_index.json) nor "
                    "pytorch_lora_weights.safetensors"
                )
        model, height, width = load_pipeline(cfg, task, device, precision, path)
        model.denoiser.float()
        if lora is not None:
            with quiet_loading():
                model.pipe.load_lora_weights(str(lora))
                model.pipe.fuse_lora()
                model.pipe.unload_lora_weights()
        s = task.config.sampling
        policy = DenoisingPolicy(model, noise_level=s.noise_level, eta=s.eta, guidance_scale=s.guidance_scale)
        schedule = model.schedule(s.eval_num_steps, height, width)
        autocast = precision_autocast(device, precision)
        sampler = DenoiserImages(model, schedule, height, width, s.negative_prompt, autocast, policy, model.denoiser)
        return sampler, str(lora or path)

    def save_final_model(self, folder: Path) -> None:
        """``model/``: the whole pipeline with the trained denoiser (``DiffusionPipeline.from_pretrained``);
        with LoRA, ``model/pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``) and, with
        ``lora.save_merged``, ``model/merged/`` (adapters fused into a full pipeline)."""
        if self.cfg.model.lora is None:
            self.engine.save_pretrained(folder, save_fn=lambda m, f, state: self.model.save_pipeline(f, state))
            return
        from peft.utils import get_peft_model_state_dict

        def save(module: torch.nn.Module, f: Path, state: dict[str, torch.Tensor]) -> None:
            # with the adapter's config, so diffusers loads it with lora_alpha (not alpha = r)
            lora_state = get_peft_model_state_dict(module, state_dict=state)
            self.model.save_lora(f, lora_state, module.peft_config["default"].to_dict())
            if self.cfg.model.lora.save_merged:
                from mmpo.diffusion.lora import save_merged_pipeline

                save_merged_pipeline(self.model.folder, f, f / "merged")

        self.engine.save_pretrained(folder, save_fn=save)


__all__ = ["ChunkGRPOTrainer", "ChunkSettings", "DenoiseBatch", "DenoiserImages", "DenoisingConfig", "DenoisingTask"]
