"""Our sampling loop (mmpo.policies.denoising over mmpo.diffusion.pipeline) against diffusers.

Deterministic sampling must reproduce each pipeline's own ``__call__`` (same text encoding, same
negative prompt, same noise levels, same guidance), and stochastic sampling must store log-probs
that re-scoring the stored transitions gives back.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mmpo.diffusion.pipeline import DiffusionModel  # noqa: E402
from mmpo.policies.denoising import DenoisingPolicy  # noqa: E402

KINDS = ("sd3", "flux", "sd")
H = W = 32
GUIDANCE = {"sd3": 4.5, "flux": 3.5, "sd": 7.5}


@pytest.fixture(scope="module")
def models() -> dict[str, DiffusionModel]:
    return {kind: DiffusionModel.load(f"tiny:{kind}") for kind in KINDS}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pipeline_latents(model: DiffusionModel, x_T: torch.Tensor) -> torch.Tensor:
    """``x_T [B, C, h, w]`` in the layout the pipeline's ``latents=`` argument expects."""
    if model.family == "flux":
        b, c, h, w = x_T.shape
        return model.pipe._pack_latents(x_T.clone(), b, c, h, w)  # [B, h/2 * w/2, 4C]
    if model.family == "sd":
        # StableDiffusionPipeline multiplies given latents by init_noise_sigma; DDIM's is 1, so the
        # noise our init_latents draws (already scaled by it) goes in unchanged
        assert float(model.pipe.scheduler.init_noise_sigma) == 1.0
    return x_T.clone()


@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_sampling_reproduces_the_diffusers_pipeline(models, kind, steps):
    model = models[kind]
    prompts = ["a red square", "a blue circle on the left"]
    g = GUIDANCE[kind]
    x_T = model.init_latents(len(prompts), H, W, torch.Generator().manual_seed(steps))
    schedule = model.schedule(steps, H, W)
    traj = DenoisingPolicy(model, guidance_scale=g).sample(
        model.denoiser, model.encode(prompts), x_T, schedule, stochastic=False
    )
    ours = model.decode(traj.final)
    assert traj.latents.shape == (2, steps + 1, *model.latent_shape(H, W))
    assert torch.equal(traj.latents[:, 0], x_T)
    assert torch.all(traj.log_probs == 0)  # deterministic steps carry no density
    # the pipeline: default negative prompt (None, encoded as ""), its own scheduler and loop
    with torch.no_grad():
        ref = model.pipe(
            prompts,
            latents=_pipeline_latents(model, x_T),
            num_inference_steps=steps,
            guidance_scale=g,
            height=H,
            width=W,
            output_type="pt",
        ).images
    assert ref.shape == ours.shape == (2, 3, H, W)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-5)
    # and the comparison is not vacuous: the images depend on the prompt and on the noise
    other = DenoisingPolicy(model, guidance_scale=g).sample(
        model.denoiser, model.encode(prompts[::-1]), x_T, schedule, stochastic=False
    )
    assert (model.decode(other.final) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("kind, tiny", [("sd3", {"color_vae": 1, "latent_channels": 4}), ("sd", {"color_vae": 1})])
def test_deterministic_sampling_with_the_colour_vae_reproduces_the_pipeline(kind, tiny):
    """The demo's normalisation-free VAE (AutoencoderTiny, scaling 1, no shift) decodes like the pipeline."""
    model = DiffusionModel.load(f"tiny:{kind}", tiny_overrides=tiny)
    assert type(model.pipe.vae).__name__ == "AutoencoderTiny" and model.vae_scale_factor == model.pipe.vae_scale_factor
    prompts = ["a red image", "a blue image"]
    x_T = model.init_latents(2, H, W, torch.Generator().manual_seed(5))
    traj = DenoisingPolicy(model, guidance_scale=GUIDANCE[kind]).sample(
        model.denoiser, model.encode(prompts), x_T, model.schedule(3, H, W), stochastic=False
    )
    ours = model.decode(traj.final)
    with torch.no_grad():
        ref = model.pipe(
            prompts,
            latents=x_T.clone(),
            num_inference_steps=3,
            guidance_scale=GUIDANCE[kind],
            height=H,
            width=W,
            output_type="pt",
        ).images
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-5)
    # with this VAE the mean colour follows the latent: the two images' mean colours differ
    assert (ours.mean((2, 3))[0] - ours.mean((2, 3))[1]).abs().max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_latents_equal_the_pipelines_latent_output(models, kind):
    """Before the VAE: the final latents themselves match (a VAE could hide latent differences)."""
    model = models[kind]
    g = GUIDANCE[kind]
    x_T = model.init_latents(1, H, W, torch.Generator().manual_seed(7))
    traj = DenoisingPolicy(model, guidance_scale=g).sample(
        model.denoiser, model.encode(["a green star"]), x_T, model.schedule(3, H, W), stochastic=False
    )
    with torch.no_grad():
        ref = model.pipe(
            "a green star",
            latents=_pipeline_latents(model, x_T),
            num_inference_steps=3,
            guidance_scale=g,
            height=H,
            width=W,
            output_type="latent",
        ).images
    if kind == "flux":
        ref = model.pipe._unpack_latents(ref, H, W, model.pipe.vae_scale_factor)
    torch.testing.assert_close(traj.final, ref.float(), rtol=1e-5, atol=1e-5)
    assert (traj.final - x_T).abs().max() > 1e-2  # the sampler moved the latents


@pytest.mark.parametrize("kind", ["sd3", "sd"])
def test_explicit_negative_prompt_matches_the_pipelines(models, kind):
    """The CFG branch encodes ``sampling.negative_prompt`` as the pipeline's ``negative_prompt``."""
    model = models[kind]
    g = GUIDANCE[kind]
    x_T = model.init_latents(1, H, W, torch.Generator().manual_seed(11))
    schedule = model.schedule(2, H, W)
    policy = DenoisingPolicy(model, guidance_scale=g)
    ours = policy.sample(
        model.denoiser, model.encode(["a red square"], negative_prompt="blue dog"), x_T, schedule, stochastic=False
    ).final
    default = policy.sample(model.denoiser, model.encode(["a red square"]), x_T, schedule, stochastic=False).final
    with torch.no_grad():
        ref = model.pipe(
            "a red square",
            negative_prompt="blue dog",
            latents=x_T.clone(),
            num_inference_steps=2,
            guidance_scale=g,
            height=H,
            width=W,
            output_type="latent",
        ).images
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)
    assert (ours - default).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_stochastic_log_probs_equal_rescoring_the_stored_steps(models, kind):
    """``log_probs[:, i]`` is the density of ``latents[:, i+1]`` under step i from ``latents[:, i]``
    (Flow-GRPO SDE for sd3/flux, DDIM eta=1 for sd): what the trainer uses as pi_old."""
    model = models[kind]
    policy = DenoisingPolicy(model, noise_level=0.7, eta=1.0, guidance_scale=GUIDANCE[kind])
    cond = model.encode(["a red square", "a yellow cat"])
    steps = 4
    schedule = model.schedule(steps, H, W)
    x_T = model.init_latents(2, H, W, torch.Generator().manual_seed(0))
    traj = policy.sample(model.denoiser, cond, x_T, schedule, stochastic=True, generator=_gen(1))
    assert traj.log_probs.shape == (2, steps)
    with torch.no_grad():
        for i in range(steps):
            out = policy.step(model.denoiser, traj.latents[:, i], schedule, i, cond, prev_sample=traj.latents[:, i + 1])
            torch.testing.assert_close(out.log_prob, traj.log_probs[:, i], rtol=0, atol=1e-5)
            if out.std > 0:
                # the density is the Gaussian N(mean, std^2) averaged over the latent's elements
                dens = torch.distributions.Normal(out.mean, out.std).log_prob(traj.latents[:, i + 1].float())
                torch.testing.assert_close(out.log_prob, dens.flatten(1).mean(1), rtol=0, atol=1e-5)
            else:  # DDIM's last step (alpha_t -> final alpha) can be noiseless: then it is the mean
                torch.testing.assert_close(traj.latents[:, i + 1], out.mean, rtol=0, atol=1e-6)
    stochastic_steps = [i for i in range(steps) if float(traj.log_probs[:, i].abs().sum()) > 0]
    assert len(stochastic_steps) >= steps - 1
    # the same generator seed gives the same trajectory; another seed another one
    again = policy.sample(model.denoiser, cond, x_T, schedule, stochastic=True, generator=_gen(1))
    torch.testing.assert_close(again.latents, traj.latents, rtol=0, atol=0)
    other = policy.sample(model.denoiser, cond, x_T, schedule, stochastic=True, generator=_gen(2))
    assert (other.final - traj.final).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["sd3", "sd"])
def test_rescoring_under_other_weights_changes_the_log_prob(models, kind):
    """The re-scored log-prob is a function of the weights (so a ratio to pi_old can move)."""
    model = models[kind]
    policy = DenoisingPolicy(model, guidance_scale=GUIDANCE[kind])
    cond = model.encode(["a red square"])
    schedule = model.schedule(3, H, W)
    traj = policy.sample(
        model.denoiser,
        cond,
        model.init_latents(1, H, W, torch.Generator().manual_seed(0)),
        schedule,
        generator=torch.Generator().manual_seed(3),
    )
    moved = copy.deepcopy(model.denoiser)
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        same = policy.step(
            model.denoiser, traj.latents[:, 0], schedule, 0, cond, prev_sample=traj.latents[:, 1]
        ).log_prob
        new = policy.step(moved, traj.latents[:, 0], schedule, 0, cond, prev_sample=traj.latents[:, 1]).log_prob
    torch.testing.assert_close(same, traj.log_probs[:, 0], rtol=0, atol=1e-5)
    assert (new - same).abs().max() > 1e-4


def test_sd3_with_dynamic_shifting_uses_the_pipelines_schedule():
    """SD3.5-style schedulers shift by the image's patch count (no explicit sigmas, unlike Flux):
    our schedule and images must follow the pipeline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = DiffusionModel.load("tiny:sd3")
    model.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        model.pipe.scheduler.config, use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64
    )
    prompts = ["a red square"]
    x_T = model.init_latents(1, H, W, torch.Generator().manual_seed(0))
    ours = model.decode(
        DenoisingPolicy(model, guidance_scale=4.5)
        .sample(model.denoiser, model.encode(prompts), x_T, model.schedule(3, H, W), stochastic=False)
        .final
    )
    with torch.no_grad():
        ref = model.pipe(
            prompts, latents=x_T.clone(), num_inference_steps=3, guidance_scale=4.5, height=H, width=W, output_type="pt"
        ).images
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-5)
