"""``chunk_grpo`` (and ``flow_grpo``): GRPO on the denoiser's SDE steps, grouped into chunks.

Flow-GRPO (``yifan123/flow_grpo``, ``scripts/train_sd3.py``): G images per prompt from the SDE
sampler, one advantage per image shared by all its steps, a clipped ratio per step (eps 1e-4),
closed-form Gaussian KL to the reference, the stored sampling log-prob as pi_old.
Chunk-GRPO (arXiv 2510.21583): contiguous chunks of steps are the action units; a chunk's ratio
is the geometric mean of its steps' ratios, ``exp(mean_t log r_t)``. Chunk size 1 is Flow-GRPO,
through the same code.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from mmpo.config import FieldError
from mmpo.core import aggregate, chunk_log_ratio
from mmpo.core.kl import gaussian_kl
from mmpo.diffusion.pipeline import PromptEmbeds, Schedule, adapters_disabled
from mmpo.diffusion.trainer import DiffusionTrainerBase
from mmpo.errors import ConfigError
from mmpo.loop import seeded_generator
from mmpo.policies.denoising import DenoisingPolicy, Trajectory
from mmpo.tasks import Sample
from mmpo_tasks.diffusion.chunks import (
    check_partition, chunk_bounds, profile_partition, relative_l1_profile, sample_chunks, uniform_partition,
)
from mmpo_tasks.diffusion.task import TextToImageConfig, TextToImageTask


@dataclass
class ChunkConfig:
    mode: Literal["uniform", "fixed", "profile"] = field(
        default="uniform", metadata={"help": "'uniform' (chunks of `size` steps; size 1 = Flow-GRPO), 'fixed' (`sizes`, e.g. [2,3,4,7] over 16 steps), 'profile' (`num_chunks` chunks from the relative-L1 profile of consecutive latents, measured once at the start)."}
    )
    size: int = field(default=1, metadata={"help": "Steps per chunk in 'uniform' mode.", "min": 1})
    sizes: list[int] = field(default_factory=list, metadata={"help": "Chunk sizes in 'fixed' mode; must sum to sampling.num_steps."})
    num_chunks: int = field(default=4, metadata={"help": "Chunks in 'profile' mode.", "min": 1})
    profile_prompts: int = field(default=4, metadata={"help": "Training prompts sampled (deterministically) to measure the profile.", "min": 1})
    weighted_sampling: bool = field(default=False, metadata={"help": "Optimise only `per_step` chunks each step, drawn with probability proportional to (mean noise level)^power: favours high-noise chunks (Chunk-GRPO's optional weighted sampling)."})
    per_step: int = field(default=1, metadata={"help": "Chunks optimised per step under weighted_sampling.", "min": 1})
    power: float = field(default=1.0, metadata={"help": "Exponent of the noise-level weights under weighted_sampling.", "min": 0.0})


@dataclass
class ChunkGRPOConfig(TextToImageConfig):
    chunks: ChunkConfig = field(default_factory=ChunkConfig, metadata={"help": "How the denoising steps form action units."})
    timestep_fraction: float = field(default=1.0, metadata={"help": "Train on the first int(num_steps * fraction) steps (Flow-GRPO: 0.99); later steps are sampled but not trained.", "gt": 0.0, "max": 1.0})
    kl_std: Literal["sigma_t", "step"] = field(default="sigma_t", metadata={"help": "Std in the closed-form KL |mu - mu_ref|^2 / (2 std^2): 'sigma_t' (Flow-GRPO's code) or 'step' (the step's own std sigma_t*sqrt(-dt), the exact Gaussian KL)."})
    skip_zero_advantage: bool = field(default=True, metadata={"help": "Leave images whose advantage is exactly 0 out of the update (Flow-GRPO); they carry no gradient."})

    def validate_config(self, where: str) -> None:
        """Check the chunks against the sampling steps when the config is read (not only after the
        first rollout, where :meth:`ChunkGRPOTrainer.partition` would find them)."""
        c, steps = self.chunks, self.sampling.num_steps
        key = f"{where}.chunks" if where else "chunks"
        if c.mode == "fixed":
            try:
                check_partition(c.sizes, steps, key=f"{key}.sizes")
            except ConfigError as e:
                raise FieldError(f"{key}.sizes", f"key {e} ({where or 'task'}.sampling.num_steps)") from None
        elif c.mode == "profile" and c.num_chunks > steps:
            raise FieldError(
                f"{key}.num_chunks", f"key '{key}.num_chunks' = {c.num_chunks} must be at most the {steps} sampling steps",
            )


class ChunkGRPOTask(TextToImageTask):
    name = "chunk_grpo"
    description = "text-to-image GRPO on chunks of denoising steps (Chunk-GRPO; chunk size 1 = Flow-GRPO) with image rewards"
    Config = ChunkGRPOConfig

    @classmethod
    def trainer_class(cls) -> type:
        return ChunkGRPOTrainer


class FlowGRPOTask(ChunkGRPOTask):
    """Flow-GRPO: ``chunk_grpo`` with every step its own unit (``chunks.size`` 1)."""

    name = "flow_grpo"
    description = "text-to-image Flow-GRPO (one action unit per SDE step) with image rewards"

    def __init__(self, config: ChunkGRPOConfig, *, seed: int = 0) -> None:
        if config.chunks.mode != "uniform" or config.chunks.size != 1:
            raise ConfigError("task flow_grpo trains every step on its own; use task chunk_grpo for task.chunks")
        super().__init__(config, seed=seed)


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


class ChunkGRPOTrainer(DiffusionTrainerBase):
    """Flow-GRPO / Chunk-GRPO on a diffusers denoiser (full fine-tuning or LoRA)."""

    def build_trainable(self) -> torch.nn.Module:
        c: ChunkGRPOConfig = self.task.config
        s = c.sampling
        self.policy = DenoisingPolicy(self.model, noise_level=s.noise_level, eta=s.eta, guidance_scale=s.guidance_scale)
        self.schedule = self.model.schedule(s.num_steps, self.height, self.width)
        self.eval_schedule = self.model.schedule(s.eval_num_steps, self.height, self.width)
        self.beta = self._constant_beta()
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
                    f"model.lora.target_modules {lora.target_modules} match no module of the {self.model.denoiser_name}; "
                    "diffusers attention uses to_q, to_k, to_v, to_out.0 (and add_q_proj, ... in joint blocks)"
                )
            denoiser.add_adapter(
                PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=list(lora.target_modules), init_lora_weights="gaussian")
            )
            for p in denoiser.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # adapters train in float32 over bf16 base weights
        else:
            denoiser.float().requires_grad_(True)
            if self.beta > 0:
                self.ref = copy.deepcopy(denoiser).requires_grad_(False).to(self.model.dtype)
        denoiser.train(False)
        self.chunk_sizes: list[int] | None = None
        self.partition()  # fixes the number of chunks trained a step (the backward calls per update)
        return denoiser

    def backwards_per_update(self) -> int:
        return self.micro_batches() * len(self._trained_chunks(0))

    def _constant_beta(self) -> float:
        a = self.cfg.algorithm
        if a.kl_schedule != "constant":
            raise ConfigError("the diffusion trainers support algorithm.kl_schedule 'constant' (set kl_options.beta)")
        return float(a.kl_options.get("beta", 0.0))

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
        rows = [self.task.train_sample(i) for i in range(min(n, self.task.num_train()))]
        gen = seeded_generator(self.cfg.seed + 77, self.model.device)
        x = self.model.init_latents(len(rows), self.height, self.width, gen)
        cond = self.model.encode([r.meta["prompt"] for r in rows], negative_prompt=self.task.config.sampling.negative_prompt)
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
    def _sample(self, cond: PromptEmbeds, x_T: torch.Tensor, schedule: Schedule, *, stochastic: bool,
                generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Trajectory:
        with self.engine.autocast():
            return self.policy.sample(
                self.engine.module, cond, x_T, schedule, stochastic=stochastic, generator=generator, noise=noise
            )

    def generate(self, samples, cond, *, eval_mode, generator):
        x = self.model.init_latents(len(samples), self.height, self.width, generator)
        sched = self.eval_schedule if eval_mode else self.schedule
        return self.model.decode(self._sample(cond, x, sched, stochastic=not eval_mode, generator=generator).final)

    def rollout(self) -> tuple[DenoiseBatch, dict[str, float]]:
        """G SDE trajectories per prompt (sampled in micro batches), decoded and scored."""
        t0 = time.perf_counter()
        rows, group_ids = self.draw_prompts()
        cond = self.condition(rows)
        mb = self.micro_batch_size()
        # all noise drawn up front, so the samples do not depend on the micro-batch size
        x_T = self.model.init_latents(len(rows), self.height, self.width)
        noise = torch.randn(len(rows), self.schedule.num_steps, *x_T.shape[1:]).to(x_T.device)
        parts, images = [], []
        with torch.no_grad():
            for s in range(0, len(rows), mb):
                idx = list(range(s, min(s + mb, len(rows))))
                part = self._sample(cond.rows(idx), x_T[idx], self.schedule, stochastic=True, noise=noise[idx])
                parts.append(part)
                images.append(self.model.decode(part.final))
        traj = Trajectory(torch.cat([p.latents for p in parts]), torch.cat([p.log_probs for p in parts]))
        images = torch.cat(images)
        t1 = time.perf_counter()
        out = self.score(images, rows)
        adv = self.advantages(out.rewards, group_ids, rows)
        t2 = time.perf_counter()
        batch = DenoiseBatch(rows, cond, traj, out.rewards.float(), adv, out.components)
        metrics = {
            "rollout_s": t1 - t0, "reward_s": t2 - t1, "reward_mean": float(out.rewards.mean()),
            "reward_std": float(out.rewards.std()) if len(rows) > 1 else 0.0,
            "advantage_abs_mean": float(adv.abs().mean()), "zero_advantage_frac": float((adv == 0).float().mean()),
            "rollout_logp_mean": float(traj.log_probs.mean()),
        }
        metrics.update({f"reward/{k}": float(v.float().mean()) for k, v in out.components.items()})
        return batch, metrics

    # -- update ----------------------------------------------------------------------------------
    def _trained_chunks(self, step: int) -> list[tuple[int, int]]:
        """Step ranges of the chunks trained this step: those with steps before
        int(num_steps * timestep_fraction) (clipped there); weighted sampling picks ``per_step`` of
        them. The count is the same every step."""
        c: ChunkGRPOConfig = self.task.config
        sizes = self.partition()
        last = max(1, int(self.schedule.num_steps * c.timestep_fraction))
        eligible = [(a, min(b, last)) for a, b in chunk_bounds(sizes) if a < last]
        if not c.chunks.weighted_sampling:
            return eligible
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        chosen = sample_chunks(self.noise_levels(self.schedule), [b - a for a, b in eligible], c.chunks.per_step, c.chunks.power, gen)
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
        c: ChunkGRPOConfig = self.task.config
        t = self.cfg.trainer
        chunks = self._trained_chunks(step)
        keep = torch.nonzero(batch.advantages != 0).flatten() if c.skip_zero_advantage else torch.arange(len(batch.rows))
        pad = len(keep) == 0  # nothing to learn: one zero-weighted row keeps the collective calls aligned
        if pad:
            keep = torch.arange(1)
        sums: dict[str, float] = {}
        count = 0
        n_mb = self.minibatches()
        for epoch in range(t.update_epochs):
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 101 + epoch)
            order = keep[torch.randperm(len(keep), generator=g)]
            for mb_rows in torch.tensor_split(order, n_mb):
                for micro in torch.tensor_split(mb_rows, self.micro_batches()):
                    # an empty slot still runs (weight 0): same backward calls on every rank
                    pad_micro = pad or len(micro) == 0
                    rows = order[:1] if len(micro) == 0 else micro
                    weight = 0.0 if pad_micro else len(micro) / len(mb_rows) / len(chunks)
                    for start, end in chunks:
                        loss, m = self._chunk_loss(batch, rows, start, end)
                        self.engine.backward(loss * weight)
                        if not pad_micro:
                            for k, v in m.items():
                                sums[k] = sums.get(k, 0.0) + v
                            count += 1
                grad_norm, skipped = self.optimizer_step(step)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
                sums["skipped_updates"] = sums.get("skipped_updates", 0.0) + float(skipped)
        out = {k: v / max(1, count) for k, v in sums.items() if k not in ("grad_norm", "skipped_updates")}
        out["grad_norm"] = sums.get("grad_norm", 0.0) / (t.update_epochs * n_mb)
        out["skipped_updates"] = sums.get("skipped_updates", 0.0)
        out["beta"] = self.beta
        out["chunks_trained"] = float(len(chunks))
        out["rows_trained_frac"] = 0.0 if pad else len(keep) / len(batch.rows)
        return out

    def _chunk_loss(self, batch: DenoiseBatch, rows: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Clipped loss of one chunk (steps ``start..end-1``) for ``rows``: the chunk's log-ratio is
        the mean of its steps' log-ratios; plus beta times the steps' mean closed-form KL."""
        a = self.cfg.algorithm
        idx = rows.tolist()
        cond = batch.cond.rows(idx)
        lat = batch.traj.latents[rows].to(self.device)
        logps, kls = [], []
        for i in range(start, end):
            with self.engine.autocast():
                out = self.policy.step(self.engine.module, lat[:, i], self.schedule, i, cond, prev_sample=lat[:, i + 1])
            logps.append(out.log_prob)
            if self.beta > 0:
                with self._reference() as ref, self.engine.autocast():
                    ref_mean = self.policy.step(ref, lat[:, i], self.schedule, i, cond, prev_sample=lat[:, i + 1]).mean
                std = out.kl_sigma if self.task.config.kl_std == "sigma_t" else out.std
                kls.append(gaussian_kl(out.mean[:, None], ref_mean[:, None], std)[:, 0])
        logp = torch.stack(logps, 1)  # [n, steps]
        old = batch.traj.log_probs[rows][:, start:end].to(self.device)
        chunk_logp = chunk_log_ratio(logp, [end - start])  # the mean: log of the geometric mean
        chunk_old = chunk_log_ratio(old, [end - start])
        mask = torch.ones_like(chunk_logp, dtype=torch.bool)
        loss_mat, lm = self.loss_fn(chunk_logp, chunk_old, batch.advantages[rows].to(self.device), mask, **a.loss_options)
        pg = aggregate(loss_mat, mask, a.loss_agg, max_len=1)
        loss = pg
        metrics = {"pg_loss": float(pg.detach()), **{k: float(v) for k, v in lm.items()}}
        if kls:
            kl = torch.stack(kls, 1).mean()
            loss = loss + self.beta * kl
            metrics["kl"] = float(kl.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    # -- saving and `mmpo eval` ----------------------------------------------------------------------
    @classmethod
    def eval_config(cls, cfg, model_dir: Path):
        """A full pipeline in ``model_dir`` (or its ``merged/``) replaces model.path; a LoRA-only
        folder keeps the base model and is loaded by :meth:`load_final_model`."""
        import dataclasses

        for folder in (model_dir, model_dir / "merged"):
            if (folder / "model_index.json").is_file():
                return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(folder), lora=None, tiny={}))
        if not (model_dir / "pytorch_lora_weights.safetensors").is_file():
            raise ConfigError(f"'{model_dir}' holds neither a diffusers pipeline (model_index.json) nor pytorch_lora_weights.safetensors")
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=None))

    def load_final_model(self, model_dir: Path) -> None:
        if (model_dir / "model_index.json").is_file() or (model_dir / "merged" / "model_index.json").is_file():
            return
        from mmpo.diffusion.pipeline import quiet_loading

        with quiet_loading():
            self.model.pipe.load_lora_weights(str(model_dir))
            self.model.pipe.fuse_lora()
            self.model.pipe.unload_lora_weights()

    def save_final_model(self) -> None:
        """``model/``: the whole pipeline with the trained denoiser (``DiffusionPipeline.from_pretrained``);
        with LoRA, ``model/pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``) and, with
        ``lora.save_merged``, ``model/merged/`` (adapters fused into a full pipeline)."""
        folder = self.run_dir / "model"
        if self.cfg.model.lora is None:
            self.engine.save_pretrained(folder, save_fn=lambda m, f, state: self.model.save_pipeline(f, state))
            return
        from peft.utils import get_peft_model_state_dict

        def save(module: torch.nn.Module, f: Path, state: dict[str, torch.Tensor]) -> None:
            # with the adapter's config, so diffusers loads it with lora_alpha (not alpha = r)
            self.model.save_lora(f, get_peft_model_state_dict(module, state_dict=state), module.peft_config["default"].to_dict())
            if self.cfg.model.lora.save_merged:
                from mmpo.diffusion.lora import save_merged_pipeline

                save_merged_pipeline(self.model.folder, f, f / "merged")

        self.engine.save_pretrained(folder, save_fn=save)


__all__ = ["ChunkGRPOTask", "FlowGRPOTask", "ChunkGRPOTrainer", "ChunkConfig", "ChunkGRPOConfig"]
