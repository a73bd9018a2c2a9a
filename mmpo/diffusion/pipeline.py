"""A diffusers pipeline as mmpo sees it: a trainable denoiser and the frozen rest.

We own the sampling loop (as Flow-GRPO does): the pipeline supplies the text encoders, the
scheduler's noise levels, the denoiser's forward and the VAE decoder; each family adapter below
turns them into four calls: ``encode`` (prompt embeddings, cached), ``init_latents``,
``predict`` (one guided denoiser evaluation) and ``decode``.

Families: ``sd3`` (StableDiffusion3Pipeline, SD3Transformer2DModel, flow matching), ``flux``
(FluxPipeline, FluxTransformer2DModel, flow matching, guidance-distilled) and ``sd``
(StableDiffusionPipeline, UNet2DConditionModel, DDIM). Latents are kept unpacked ``[B, C, h, w]``
for every family (Flux's 2x2 packing happens inside ``predict``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from mmpo.errors import ConfigError

TINY_PREFIX = "tiny:"
FAMILIES = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "StableDiffusionPipeline": "sd",
}


@dataclass
class PromptEmbeds:
    """Text conditioning of B rows: ``embeds [B, L, D]``, optional ``pooled [B, P]``, and for
    classifier-free guidance the negative prompt's ``neg_embeds`` / ``neg_pooled`` (same shapes)."""

    embeds: Tensor
    pooled: Tensor | None = None
    neg_embeds: Tensor | None = None
    neg_pooled: Tensor | None = None

    def rows(self, index: Tensor | list[int]) -> "PromptEmbeds":
        idx = torch.as_tensor(index, dtype=torch.long, device=self.embeds.device)
        pick = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
        return PromptEmbeds(pick(self.embeds), pick(self.pooled), pick(self.neg_embeds), pick(self.neg_pooled))

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        join = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
        fields = ("embeds", "pooled", "neg_embeds", "neg_pooled")
        return PromptEmbeds(*(join([getattr(p, f) for p in parts]) for f in fields))


@dataclass
class Schedule:
    """Noise levels of one sampling run with ``num_steps`` steps.

    Flow families: ``sigmas [S+1]`` (last 0) and ``timesteps [S]`` (the denoiser's input).
    DDIM: ``timesteps [S]`` and ``alphas [S+1]``: ``alphas[i]`` = alpha_bar at step i's
    timestep, ``alphas[i+1]`` = alpha_bar of the step it moves to.
    """

    kind: str  # "flow" | "ddim"
    timesteps: Tensor
    sigmas: Tensor | None = None
    alphas: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def resolve_pipeline_folder(path: str, *, seed: int = 0, overrides: dict[str, Any] | None = None) -> Path:
    """A local diffusers folder (``model_index.json``), a Hub id in the local Hugging Face cache
    (:func:`mmpo.hub.local_model_folder`), or ``tiny:<sd3|flux|sd>`` (built once into the tiny
    cache). Raises ConfigError naming the path when it is not a pipeline folder."""
    if path.startswith(TINY_PREFIX):
        from mmpo.tiny_diffusion import ensure_tiny_pipeline

        return ensure_tiny_pipeline(path[len(TINY_PREFIX) :], seed=seed, overrides=overrides)
    if overrides:
        raise ConfigError(f"model.tiny overrides only apply to tiny:<kind> models, not to '{path}'")
    from mmpo.hub import local_model_folder

    folder = local_model_folder(path)
    if not (folder / "model_index.json").is_file():
        raise ConfigError(
            f"model.path '{path}' is not a diffusers pipeline folder (no model_index.json); point it at a "
            "local save_pretrained pipeline (transformer/ or unet/, scheduler/, vae/, text encoders) or use "
            "tiny:sd3, tiny:flux or tiny:sd"
        )
    return folder


class DiffusionModel:
    """A loaded pipeline. ``denoiser`` is the module RL trains; everything else is frozen."""

    family: str = ""

    def __init__(self, pipe: Any, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe = pipe
        self.folder = folder
        self.device = device
        self.dtype = dtype
        self._cache: dict[tuple[str, str], tuple[Tensor, Tensor | None]] = {}
        for name, comp in pipe.components.items():
            if isinstance(comp, torch.nn.Module):
                comp.requires_grad_(False).eval()
                want = torch.float32 if name == "vae" else dtype  # decode in float32
                comp.to(device) if next(comp.parameters()).dtype == want else comp.to(device, want)

    # -- loading ------------------------------------------------------------------------------
    @staticmethod
    def load(
        path: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        tiny_overrides: dict[str, Any] | None = None,
    ) -> "DiffusionModel":
        """Load the pipeline of ``path`` (a local folder or ``tiny:<kind>``) and pick its family."""
        from diffusers import DiffusionPipeline

        folder = resolve_pipeline_folder(path, seed=seed, overrides=tiny_overrides)
        cls_name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
        if cls_name not in FAMILIES:
            raise ConfigError(
                f"model.path '{path}': pipeline class {cls_name!r} is not supported; supported: {', '.join(FAMILIES)}"
            )
        try:
            with quiet_loading():
                pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"cannot load the diffusers pipeline in '{folder}': {e}") from e
        pipe.set_progress_bar_config(disable=True)
        family = FAMILY_CLASSES[FAMILIES[cls_name]]
        return family(pipe, folder, torch.device(device), dtype)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet if self.family == "sd" else self.pipe.transformer

    @property
    def denoiser_name(self) -> str:
        return "unet" if self.family == "sd" else "transformer"

    @property
    def kind(self) -> str:
        """``flow`` (SDE/ODE on sigmas) or ``ddim``."""
        return "ddim" if self.family == "sd" else "flow"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def uses_cfg(self) -> bool:
        """Whether guidance runs a negative branch (Flux embeds the guidance scale instead)."""
        return self.family != "flux"

    def default_size(self) -> int:
        """The pipeline's default image side in pixels."""
        size = getattr(self.pipe, "default_sample_size", None) or self.denoiser.config.sample_size
        return int(size) * self.vae_scale_factor

    # -- prompts --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], *, negative_prompt: str = "", cfg: bool = True) -> PromptEmbeds:
        """Embeddings of ``prompts`` (each encoded once, then cached), plus the negative prompt's
        when ``cfg`` and the family uses classifier-free guidance."""
        pos = [self._encode_one(p) for p in prompts]
        out = PromptEmbeds(
            torch.cat([e for e, _ in pos]), None if pos[0][1] is None else torch.cat([p for _, p in pos])
        )
        if cfg and self.uses_cfg:
            ne, npool = self._encode_one(negative_prompt)
            out.neg_embeds = ne.expand(len(prompts), *ne.shape[1:])
            out.neg_pooled = None if npool is None else npool.expand(len(prompts), *npool.shape[1:])
        return out

    def _encode_one(self, prompt: str) -> tuple[Tensor, Tensor | None]:
        key = (self.family, prompt)
        if key not in self._cache:
            emb, pooled = self._encode_text(prompt)
            pooled = None if pooled is None else pooled.to(self.device, self.dtype)
            self._cache[key] = (emb.to(self.device, self.dtype), pooled)
        return self._cache[key]

    def _encode_text(self, prompt: str) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    # -- latents and noise levels -------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ConfigError(f"image size {height}x{width} must be a multiple of the VAE factor {f}")
        return self._latent_channels(), height // f, width // f

    def _latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    def init_latents(self, n: int, height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
        """Initial noise ``x_T [n, C, h, w]`` (float32, on the model's device)."""
        shape = (n, *self.latent_shape(height, width))
        gen_device = generator.device if generator is not None else self.device
        return self.scale_noise(torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32))

    def scale_noise(self, noise: Tensor) -> Tensor:
        """Initial latents ``x_T [n, C, h, w]`` (float32, on the model's device) from standard-normal
        ``noise`` of the same shape (the scheduler's ``init_noise_sigma`` times it for DDIM)."""
        return noise.float().to(self.device)

    def schedule(self, num_steps: int, height: int, width: int) -> Schedule:
        raise NotImplementedError

    # -- the denoiser ---------------------------------------------------------------------------
    def predict(
        self,
        denoiser: torch.nn.Module,
        x: Tensor,
        schedule: Schedule,
        i: int,
        cond: PromptEmbeds,
        guidance_scale: float,
    ) -> Tensor:
        """The (guided) model output at step ``i`` for latents ``x [B, C, h, w]`` -> ``[B, C, h, w]``
        (velocity for flow families, epsilon / v for DDIM), float32."""
        t = schedule.timesteps[i]
        if self.uses_cfg and guidance_scale > 1.0 and cond.neg_embeds is not None:
            both = PromptEmbeds(
                torch.cat([cond.neg_embeds, cond.embeds]),
                None if cond.pooled is None else torch.cat([cond.neg_pooled, cond.pooled]),
            )
            out = self._forward(denoiser, torch.cat([x, x]), t, both, guidance_scale).float()
            uncond, text = out.chunk(2)
            return uncond + guidance_scale * (text - uncond)
        return self._forward(denoiser, x, t, cond, guidance_scale).float()

    def _forward(
        self, denoiser: torch.nn.Module, x: Tensor, t: Tensor, cond: PromptEmbeds, guidance_scale: float
    ) -> Tensor:
        raise NotImplementedError

    # -- images ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """RGB images ``[B, 3, H, W]`` in [0, 1] (float32) from latents ``[B, C, h, w]``."""
        vae = self.pipe.vae
        z = latents.float() / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        images = vae.decode(z.to(self.device), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- saving ---------------------------------------------------------------------------------
    def save_pipeline(self, folder: Path, denoiser_state: dict[str, Tensor]) -> None:
        """The whole pipeline with the trained denoiser weights (``DiffusionPipeline.from_pretrained`` opens it)."""
        from safetensors.torch import save_file

        with quiet_loading():
            self.pipe.save_pretrained(str(folder), safe_serialization=True)
        # diffusers' save_pretrained writes the module's own state_dict, which is empty for
        # parameters partitioned by ZeRO-3: write the gathered one in its place
        sub = folder / self.denoiser_name
        for old in sub.glob("diffusion_pytorch_model*"):
            old.unlink()
        self.denoiser.save_config(str(sub))
        tensors = {k: v.detach().cpu().contiguous() for k, v in denoiser_state.items()}
        save_file(tensors, str(sub / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

    def save_lora(
        self, folder: Path, lora_state: dict[str, Tensor], adapter_config: dict[str, Any] | None = None
    ) -> None:
        """``pytorch_lora_weights.safetensors`` in diffusers' layout (``pipe.load_lora_weights(folder)``).

        ``adapter_config`` (the peft ``LoraConfig.to_dict()``) is stored in the file's metadata:
        without it diffusers rebuilds the adapter with ``lora_alpha = r``, so any ``alpha != r``
        would load with the wrong scale (``alpha / r``)."""
        prefix = "unet" if self.family == "sd" else "transformer"
        kwargs: dict[str, Any] = {f"{prefix}_lora_layers": lora_state}
        if adapter_config is not None:
            kwargs[f"{prefix}_lora_adapter_metadata"] = adapter_config
        type(self.pipe).save_lora_weights(str(folder), **kwargs, safe_serialization=True)


class _FlowModel(DiffusionModel):
    def schedule(self, num_steps: int, height: int, width: int) -> Schedule:
        sched = self.pipe.scheduler
        if getattr(sched.config, "use_dynamic_shifting", False):
            self._set_shifted_timesteps(num_steps, *self.latent_shape(height, width)[1:])
        else:
            sched.set_timesteps(num_steps, device="cpu")
        return Schedule("flow", sched.timesteps.clone().float(), sigmas=sched.sigmas.clone().float())

    def _set_shifted_timesteps(self, num_steps: int, h: int, w: int) -> None:
        """Resolution-dependent shift ``mu`` (SD3.5, Flux), as the family's pipeline sets it."""
        raise NotImplementedError

    def _mu(self, seq_len: int, default_max_shift: float) -> float:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.pipe.scheduler.config
        return calculate_shift(
            seq_len,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", default_max_shift),
        )


class SD3Model(_FlowModel):
    family = "sd3"

    def _set_shifted_timesteps(self, num_steps: int, h: int, w: int) -> None:
        p = int(self.denoiser.config.patch_size)
        self.pipe.scheduler.set_timesteps(num_steps, device="cpu", mu=self._mu((h // p) * (w // p), 1.16))

    def _encode_text(self, prompt: str) -> tuple[Tensor, Tensor | None]:
        emb, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False
        )
        return emb, pooled

    def _forward(self, denoiser, x, t, cond, guidance_scale):
        ts = t.to(self.device).expand(x.shape[0])
        return denoiser(
            hidden_states=x.to(self.dtype),
            timestep=ts,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]


class FluxModel(_FlowModel):
    family = "flux"

    def _set_shifted_timesteps(self, num_steps: int, h: int, w: int) -> None:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        self.pipe.scheduler.set_timesteps(device="cpu", sigmas=sigmas, mu=self._mu((h // 2) * (w // 2), 1.15))

    def _latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels) // 4

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        c, h, w = super().latent_shape(height, width)
        if h % 2 or w % 2:
            raise ConfigError(f"Flux needs latents with even sides; image {height}x{width} gives {h}x{w}")
        return c, h, w

    def _encode_text(self, prompt: str) -> tuple[Tensor, Tensor | None]:
        emb, pooled, _ = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.device)
        return emb, pooled

    def _forward(self, denoiser, x, t, cond, guidance_scale):
        b, c, h, w = x.shape
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        rows = torch.arange(h // 2, device=self.device)[:, None].expand(h // 2, w // 2)
        cols = torch.arange(w // 2, device=self.device)[None, :].expand(h // 2, w // 2)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(self.dtype)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if getattr(denoiser.config, "guidance_embeds", False):
            guidance = torch.full((b,), float(guidance_scale), device=self.device, dtype=torch.float32)
        out = denoiser(
            hidden_states=packed.to(self.dtype),
            timestep=(t / 1000).to(self.device).expand(b),
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class SDModel(DiffusionModel):
    family = "sd"

    def _encode_text(self, prompt: str) -> tuple[Tensor, Tensor | None]:
        emb, _ = self.pipe.encode_prompt(prompt, self.device, 1, False)
        return emb, None

    def schedule(self, num_steps: int, height: int, width: int) -> Schedule:
        sched = self.pipe.scheduler
        sched.set_timesteps(num_steps, device="cpu")
        ts = sched.timesteps.clone()
        ac = sched.alphas_cumprod
        step = sched.config.num_train_timesteps // num_steps
        prev = [float(ac[t - step]) if t - step >= 0 else float(sched.final_alpha_cumprod) for t in ts.tolist()]
        alphas = torch.tensor([float(ac[int(ts[0])])] + prev, dtype=torch.float64)
        return Schedule("ddim", ts, alphas=alphas)

    def scale_noise(self, noise: Tensor) -> Tensor:
        return super().scale_noise(noise) * float(self.pipe.scheduler.init_noise_sigma)

    def _forward(self, denoiser, x, t, cond, guidance_scale):
        return denoiser(x.to(self.dtype), t.to(self.device), encoder_hidden_states=cond.embeds, return_dict=False)[0]

    @property
    def prediction_type(self) -> str:
        return str(self.pipe.scheduler.config.prediction_type)


FAMILY_CLASSES: dict[str, type[DiffusionModel]] = {"sd3": SD3Model, "flux": FluxModel, "sd": SDModel}


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide diffusers' / transformers' per-component loading bars (they would interleave with
    the training progress bar) and their "keep in float32" notices."""
    from diffusers.utils import logging as dlog

    from mmpo.models import quiet_hf_progress

    was_on, level = dlog.is_progress_bar_enabled(), dlog.get_verbosity()
    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    try:
        with quiet_hf_progress():
            yield
    finally:
        dlog.set_verbosity(level)
        if was_on:
            dlog.enable_progress_bar()


@contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """The LoRA-free base denoiser (the reference policy when training adapters)."""
    module.disable_adapters()
    try:
        yield
    finally:
        module.enable_adapters()


def ddim_alphas_at(schedule: Schedule, i: int) -> tuple[float, float]:
    """``(alpha_bar_t, alpha_bar_prev)`` of DDIM step ``i``."""
    assert schedule.alphas is not None
    return float(schedule.alphas[i]), float(schedule.alphas[i + 1])


__all__ = [
    "DiffusionModel",
    "SD3Model",
    "FluxModel",
    "SDModel",
    "PromptEmbeds",
    "Schedule",
    "FAMILIES",
    "resolve_pipeline_folder",
    "adapters_disabled",
    "ddim_alphas_at",
]
