"""Offline tiny diffusers pipelines (mmpo.tiny_diffusion): build, save/load, determinism, caching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers  # noqa: E402 (the diffusion extra is part of dev)
import pytest
import torch

from mmpo.errors import ConfigError
from mmpo.tiny_diffusion import (
    TINY_DIFFUSION_KINDS,
    build_tiny_pipeline,
    ensure_tiny_pipeline,
    save_tiny_pipeline,
)

PIPELINE_CLASS = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "sd": "StableDiffusionPipeline"}
LATENT = {"sd3": (16, 8, 8), "flux": (16, 8, 8), "sd": (4, 8, 8)}  # for a 32 px image


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    return {kind: build_tiny_pipeline(kind) for kind in TINY_DIFFUSION_KINDS}


def generate(pipe: Any, prompt: str | list[str] = "a red square", steps: int = 2) -> torch.Tensor:
    kwargs: dict[str, Any] = dict(num_inference_steps=steps, output_type="pt", height=32, width=32)
    if not isinstance(pipe, diffusers.FluxPipeline):
        kwargs["guidance_scale"] = 5.0
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images


def denoiser_output(pipe: Any, prompts: list[str], latents: torch.Tensor, t: float) -> torch.Tensor:
    """One denoiser call as the pipeline makes it; latents (B, C, 8, 8), t in [0, 1000)."""
    b = len(prompts)
    timestep = torch.full((b,), t)
    with torch.no_grad():
        if isinstance(pipe, diffusers.StableDiffusion3Pipeline):
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
            return pipe.transformer(
                hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled
            ).sample
        if isinstance(pipe, diffusers.FluxPipeline):
            embeds, pooled, text_ids = pipe.encode_prompt(prompts, None)
            c, h, w = latents.shape[1:]
            return pipe.transformer(
                hidden_states=pipe._pack_latents(latents, b, c, h, w),
                timestep=timestep / 1000,
                guidance=torch.full((b,), 3.5),
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", latents.dtype),
            ).sample
        embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        return pipe.unet(latents, timestep, encoder_hidden_states=embeds).sample


def default_side(pipe: Any) -> int:
    """The pipeline's default height/width in px (what a call without height/width samples)."""
    latent = pipe.unet.config.sample_size if hasattr(pipe, "unet") else pipe.default_sample_size
    return latent * pipe.vae_scale_factor


def weights(pipe: Any) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for k, v in module.state_dict().items()
    }


@pytest.mark.parametrize("kind", TINY_DIFFUSION_KINDS)
def test_builds_small_pipeline_that_samples_32px(pipes: dict[str, Any], kind: str):
    pipe = pipes[kind]
    assert type(pipe).__name__ == PIPELINE_CLASS[kind]
    assert pipe.vae_scale_factor == 4
    denoiser = pipe.unet if kind == "sd" else pipe.transformer
    assert 20_000 < sum(p.numel() for p in denoiser.parameters()) < 400_000
    if kind != "flux":  # FluxPipeline hard-codes default_sample_size = 128
        assert default_side(pipe) == 32
    assert pipe.vae.config.latent_channels == LATENT[kind][0]
    images = generate(pipe, ["a red square", "a blue circle"])
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert not torch.equal(images[0], images[1])
    latents = pipe(
        "a red square",
        num_inference_steps=1,
        height=32,
        width=32,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    shape = (1, 16, 64) if kind == "flux" else (1, *LATENT[kind])  # flux packs 2x2 latent patches
    assert latents.shape == shape


@pytest.mark.parametrize("kind", TINY_DIFFUSION_KINDS)
def test_save_and_from_pretrained_round_trip(pipes: dict[str, Any], kind: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = save_tiny_pipeline(kind, tmp_path / kind)
    assert (folder / "model_index.json").is_file()
    assert list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
    loaded = diffusers.DiffusionPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipes[kind])
    ref, ours = weights(pipes[kind]), weights(loaded)
    assert ours.keys() == ref.keys() and all(torch.equal(v, ref[k]) for k, v in ours.items())
    expected = generate(pipes[kind])
    # safetensors weights are mmap'd at 8-byte (not 64-byte) aligned addresses, which moves CPU
    # matmuls onto other kernels: equal up to float rounding, bitwise equal once re-allocated.
    torch.testing.assert_close(generate(loaded), expected, rtol=0, atol=1e-5)
    for module in loaded.components.values():
        for p in module.parameters() if isinstance(module, torch.nn.Module) else ():
            p.data = p.data.clone()
    assert torch.equal(generate(loaded), expected)


@pytest.mark.parametrize("kind", TINY_DIFFUSION_KINDS)
def test_weights_are_deterministic_per_seed(pipes: dict[str, Any], kind: str):
    a = weights(pipes[kind])
    b, c = weights(build_tiny_pipeline(kind, seed=0)), weights(build_tiny_pipeline(kind, seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    denoiser = "unet." if kind == "sd" else "transformer."
    changed = [k for k in a if k.startswith(denoiser) and a[k].ndim >= 2 and not torch.equal(a[k], c[k])]
    assert len(changed) > 5


@pytest.mark.parametrize("kind", TINY_DIFFUSION_KINDS)
def test_denoiser_depends_on_prompt_latent_and_timestep(pipes: dict[str, Any], kind: str):
    pipe = pipes[kind]
    one = torch.randn((1, *LATENT[kind]), generator=torch.Generator().manual_seed(0))
    latents = one.expand(2, -1, -1, -1).contiguous()  # the same latent for both prompts
    prompts = ["a red square", "a blue circle"]
    out = denoiser_output(pipe, prompts, latents, 500.0)
    assert out.std() > 0.1  # no zero-initialised output layer
    assert (out[0] - out[1]).abs().mean() > 1e-3  # the prompt matters
    assert (denoiser_output(pipe, prompts, latents, 100.0) - out).abs().mean() > 1e-3  # the timestep
    assert (denoiser_output(pipe, prompts, latents * 0.5, 500.0) - out).abs().mean() > 1e-3  # the latent


def test_ensure_tiny_pipeline_caches_one_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MMPO_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for kind in TINY_DIFFUSION_KINDS:
        folder = ensure_tiny_pipeline(kind, seed=3)
        mtime = (folder / "model_index.json").stat().st_mtime_ns
        assert ensure_tiny_pipeline(kind, seed=3) == folder
        assert (folder / "model_index.json").stat().st_mtime_ns == mtime  # not rewritten
        assert folder.name.startswith(f"diffusion-{kind}-seed3-") and folder.parent == tmp_path / "tiny"
        loaded = diffusers.DiffusionPipeline.from_pretrained(folder)
        ref = weights(build_tiny_pipeline(kind, seed=3))
        assert all(torch.equal(v, ref[k]) for k, v in weights(loaded).items())
    other = ensure_tiny_pipeline("sd3", seed=3, overrides={"num_layers": 1})
    assert other != ensure_tiny_pipeline("sd3", seed=3)
    assert diffusers.DiffusionPipeline.from_pretrained(other).transformer.config.num_layers == 1
    assert sorted(p.name.startswith(".") for p in (tmp_path / "tiny").iterdir()) == [False] * 4  # no temp dirs


def test_overrides_change_sizes():
    pipe = build_tiny_pipeline("sd3", sample_size=16, num_layers=1, hidden=64)
    assert pipe.transformer.config.num_layers == 1 and pipe.transformer.inner_dim == 64
    assert default_side(pipe) == 64
    flux = build_tiny_pipeline("flux", num_single_layers=2, hidden=64)
    assert len(flux.transformer.single_transformer_blocks) == 2 and flux.transformer.inner_dim == 64
    assert generate(flux).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("kind", TINY_DIFFUSION_KINDS)
def test_unknown_override_names_key_and_valid_ones(kind: str):
    with pytest.raises(ValueError, match=r"hiden.*Valid: .*hidden"):
        build_tiny_pipeline(kind, hiden=64)
    with pytest.raises(ConfigError, match="hiden"):
        ensure_tiny_pipeline(kind, overrides={"hiden": 64})
    with pytest.raises(ConfigError, match="sd3, flux, sd"):
        build_tiny_pipeline("sdxl")
