"""Offline tiny diffusers pipelines with random weights (SD3, FLUX.1-dev style, SD 1.x).

The real diffusers/transformers classes, built in code from small configs, so tests and CPU
demos never touch a hub. Defaults (every number below is per kind, see `DEFAULT_SIZES`):

- images 32x32 px; VAE (`AutoencoderKL`, 3 blocks of 8/16/16 channels, ~69k params) with
  vae_scale_factor 4, so a 32 px image has latents (C, 8, 8): C = 16 for sd3/flux, 4 for sd.
  The VAEs keep the real scaling_factor / shift_factor of SD3, FLUX.1 and SD 1.x.
- "sd3": `SD3Transformer2DModel` (2 joint blocks, width 32, patch 2), two
  `CLIPTextModelWithProjection` (hidden 32, 2 layers) and a `T5EncoderModel` (d_model 64 =
  joint_attention_dim, 2 layers); `FlowMatchEulerDiscreteScheduler(shift=3.0)`.
- "flux": `FluxTransformer2DModel` (1 double + 1 single block, width 32, guidance_embeds),
  `CLIPTextModel` (hidden 32 = pooled_projection_dim) and `T5EncoderModel` (d_model 32);
  the scheduler has Flux's dynamic-shifting fields. FluxPipeline hard-codes
  default_sample_size=128, so its default image is 512 px: pass height/width.
- "sd": `UNet2DConditionModel` (channels 16/32, one cross-attention level), `CLIPTextModel`
  (hidden 32), `DDIMScheduler` with SD's betas; no safety checker.

Tokenizers are built from vocabularies written here: a byte-level CLIP BPE (256 byte symbols,
their ``</w>`` forms, merges spelling a few words, ``<|startoftext|>`` / ``<|endoftext|>``)
and a Unigram T5 tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, words, single characters).
Weights are drawn from `torch.manual_seed(seed)`; any all-zero weight matrix is redrawn so the
denoiser's output depends on the latent, the timestep and the prompt.
"""

from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path
from typing import Any

import torch

from mmpo.errors import ConfigError

TINY_DIFFUSION_KINDS: tuple[str, ...] = ("sd3", "flux", "sd")

_COMMON = dict(num_layers=2, hidden=32, num_heads=2, text_hidden=32, text_layers=2, color_vae=0)
#: kind -> the keyword overrides it accepts and their defaults. sample_size: the denoiser's
#: latent side (default image side = sample_size * 4 px); hidden: transformer width (heads x
#: head_dim) or the first UNet block's channels; num_layers: transformer blocks (flux: double-
#: stream blocks) or UNet layers per block; text_hidden / text_layers: the text encoders.
DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "sd3": dict(_COMMON, sample_size=8, latent_channels=16),
    "flux": dict(_COMMON, num_layers=1, num_single_layers=1, latent_channels=16),
    "sd": dict(_COMMON, sample_size=8, num_layers=1, hidden=16, latent_channels=4),
}
#: Words the tokenizers spell as one token (others fall back to characters / bytes).
WORDS: tuple[str, ...] = tuple(
    "a an the of and on in with red green blue yellow orange purple pink brown black white gray "
    "square circle triangle star cross diamond photo picture image small big cat dog".split()
)
_VAE = {  # kind -> AutoencoderKL fields of the real model
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
    "flux": dict(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
    "sd": dict(scaling_factor=0.18215),
}


def _sizes(kind: str, overrides: dict[str, Any]) -> dict[str, int]:
    if kind not in DEFAULT_SIZES:
        raise ConfigError(f"Unknown tiny diffusion kind '{kind}'. Valid: {', '.join(TINY_DIFFUSION_KINDS)}.")
    valid = DEFAULT_SIZES[kind]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(f"Unknown tiny '{kind}' pipeline override(s) {unknown}. Valid: {', '.join(sorted(valid))}.")
    s = {**valid, **{k: int(v) for k, v in overrides.items()}}
    if s["hidden"] % (2 * s["num_heads"]) or s["text_hidden"] % 2:
        raise ConfigError(
            f"tiny '{kind}': hidden={s['hidden']} must be num_heads={s['num_heads']} x an even head_dim "
            f"and text_hidden={s['text_hidden']} even."
        )
    return s


# ----------------------------------------------------------------------------- tokenizers


def build_clip_tokenizer(max_length: int = 77) -> Any:
    """Byte-level CLIP BPE tokenizer: 512 byte symbols (+``</w>``), merges for `WORDS`, 2 specials.

    Lower-cases like CLIP; ``<|endoftext|>`` is eos and pad. ~600 tokens.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        cur = symbols[0]
        for sym in symbols[1:]:
            if (cur, sym) not in merges:
                merges.append((cur, sym))
            cur += sym
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_t5_tokenizer(max_length: int = 512) -> Any:
    """Unigram T5 tokenizer (`T5TokenizerFast`): ``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``▁word``
    for `WORDS`, then ``▁`` and single ASCII characters; no ``<extra_id_*>`` sentinels."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    pieces += [("▁", -5.0)] + [(c, -6.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


# ----------------------------------------------------------------------------- models


def _clip(tok: Any, s: dict[str, int], with_projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=s["text_hidden"],
        intermediate_size=2 * s["text_hidden"],
        projection_dim=s["text_hidden"],
        num_hidden_layers=s["text_layers"],
        num_attention_heads=2,
        max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5(tok: Any, d_model: int, s: dict[str, int]) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=s["text_layers"],
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _vae(kind: str, latent_channels: int, color_vae: int = 0) -> Any:
    """A tiny AutoencoderKL with the real model's scaling/shift factors, or with ``color_vae=1``
    a calibrated :func:`_color_vae`."""
    from diffusers import AutoencoderKL

    if color_vae:
        return _color_vae(latent_channels)

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **_VAE[kind],
    )


def _color_vae(latent_channels: int) -> Any:
    """A tiny ``AutoencoderTiny`` (TAESD layout: convs and ReLUs, no normalisation) whose output
    layer is rescaled so that random latents decode to mid-grey images with visible colour.

    An AutoencoderKL decoder ends in GroupNorm, which removes each image's mean colour from the
    latent's influence: with random weights every image decodes to the same average colour, and
    a colour reward has nothing to learn from. Without normalisation the mean colour follows the
    latent, as in a trained VAE. Used by the CPU demo (``model.tiny: {color_vae: 1}``).
    """
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16),
        decoder_block_out_channels=(16, 16, 16),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(1, 1, 1),
        latent_channels=latent_channels,
    ).eval()
    last = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    z = torch.randn(32, latent_channels, 8, 8)
    out: dict[str, torch.Tensor] = {}
    hook = last.register_forward_hook(lambda m, i, o: out.__setitem__("o", o))
    with torch.no_grad():
        vae.decode(z)
        hook.remove()
        mean, std = out["o"].mean((0, 2, 3)), out["o"].std((0, 2, 3))
        # the decoder returns 2 * last - 1, and images are (x + 1) / 2: mean 0.5, pixel std 0.25
        gain = 0.25 / std
        last.weight.mul_(gain[:, None, None, None])
        last.bias.copy_((last.bias - mean) * gain + 0.5)
    return vae


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux's (t, h, w) rotary split of head_dim, all even (128 -> (16, 56, 56) in FLUX.1)."""
    t = 2 * max(1, head_dim // 16)
    h = 2 * ((head_dim - t) // 4)
    return t, h, head_dim - t - h


def _components(kind: str, s: dict[str, int]) -> dict[str, Any]:
    """All pipeline modules of `kind`, built in a fixed order (weights follow the global RNG)."""
    import diffusers as d

    lc, hidden, heads, th = s["latent_channels"], s["hidden"], s["num_heads"], s["text_hidden"]
    clip_tok = build_clip_tokenizer()
    if kind == "sd3":
        t5_tok = build_t5_tokenizer(256)
        return dict(
            transformer=d.SD3Transformer2DModel(
                sample_size=s["sample_size"],
                patch_size=2,
                in_channels=lc,
                out_channels=lc,
                num_layers=s["num_layers"],
                attention_head_dim=hidden // heads,
                num_attention_heads=heads,
                joint_attention_dim=2 * th,
                caption_projection_dim=hidden,
                pooled_projection_dim=2 * th,
                pos_embed_max_size=max(32, s["sample_size"]),
            ),
            scheduler=d.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=_vae(kind, lc, s["color_vae"]),
            text_encoder=_clip(clip_tok, s, True),
            tokenizer=clip_tok,
            text_encoder_2=_clip(clip_tok, s, True),
            tokenizer_2=build_clip_tokenizer(),
            text_encoder_3=_t5(t5_tok, 2 * th, s),
            tokenizer_3=t5_tok,
        )
    if kind == "flux":
        t5_tok = build_t5_tokenizer()
        return dict(
            transformer=d.FluxTransformer2DModel(
                patch_size=1,
                in_channels=4 * lc,
                num_layers=s["num_layers"],
                num_single_layers=s["num_single_layers"],
                attention_head_dim=hidden // heads,
                num_attention_heads=heads,
                joint_attention_dim=th,
                pooled_projection_dim=th,
                guidance_embeds=True,
                axes_dims_rope=_rope_axes(hidden // heads),
            ),
            scheduler=d.FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000,
                shift=3.0,
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            ),
            vae=_vae(kind, lc, s["color_vae"]),
            text_encoder=_clip(clip_tok, s, False),
            tokenizer=clip_tok,
            text_encoder_2=_t5(t5_tok, th, s),
            tokenizer_2=t5_tok,
        )
    return dict(
        unet=d.UNet2DConditionModel(
            sample_size=s["sample_size"],
            in_channels=lc,
            out_channels=lc,
            layers_per_block=s["num_layers"],
            block_out_channels=(hidden, 2 * hidden),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=th,
            attention_head_dim=heads,
            norm_num_groups=8,
        ),
        scheduler=d.DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        vae=_vae(kind, lc, s["color_vae"]),
        text_encoder=_clip(clip_tok, s, False),
        tokenizer=clip_tok,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _redraw_zero_weights(modules: dict[str, Any], std: float = 0.02) -> list[str]:
    """Redraw every all-zero weight matrix (zero-init output layers); returns their names."""
    names = []
    with torch.no_grad():
        for key, module in modules.items():
            for name, p in getattr(module, "named_parameters", lambda: [])():
                if p.ndim >= 2 and not p.any():
                    p.normal_(0.0, std)
                    names.append(f"{key}.{name}")
    return names


def build_tiny_pipeline(kind: str, seed: int = 0, **overrides: Any) -> Any:
    """Build tiny pipeline `kind` ("sd3" | "flux" | "sd") in memory, modules in eval mode.

    Same `seed` -> identical weights. `overrides` are keys of ``DEFAULT_SIZES[kind]``
    (e.g. ``sample_size``, ``num_layers``, ``hidden``); an unknown key raises a ConfigError
    (a ValueError) naming it and the valid ones.
    """
    import diffusers

    from mmpo.tiny import _seeded

    s = _sizes(kind, overrides)
    modules = _seeded(lambda: _components(kind, s), seed)
    _seeded(lambda: _redraw_zero_weights(modules), seed)
    for m in modules.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    cls = {"sd3": diffusers.StableDiffusion3Pipeline, "flux": diffusers.FluxPipeline}.get(
        kind, diffusers.StableDiffusionPipeline
    )
    pipe = cls(**modules)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(kind: str, folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write `build_tiny_pipeline(kind, seed, **overrides)` to `folder` (safetensors); returns it.

    ``diffusers.DiffusionPipeline.from_pretrained(folder)`` loads it back offline.
    """
    from mmpo.models import quiet_hf_progress

    folder = Path(folder)
    pipe = build_tiny_pipeline(kind, seed=seed, **overrides)
    with quiet_hf_progress():
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_pipeline_folder(kind: str, seed: int = 0, overrides: dict[str, Any] | None = None) -> Path:
    """Cache folder ``diffusion-{kind}-seed{seed}-{hash}`` under `mmpo.models.tiny_cache_root`.

    The hash covers the overrides, the diffusers and transformers versions and this file's
    source, so an edited builder never reuses a stale folder.
    """
    import diffusers
    import transformers

    from mmpo.models import tiny_cache_root

    overrides = dict(overrides or {})
    _sizes(kind, overrides)  # reject unknown kinds / keys before naming a folder
    h = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode())
    h.update(f"diffusers {diffusers.__version__} transformers {transformers.__version__}".encode())
    h.update(Path(__file__).read_bytes())
    return tiny_cache_root() / f"diffusion-{kind}-seed{seed}-{h.hexdigest()[:12]}"


def ensure_tiny_pipeline(kind: str, seed: int = 0, overrides: dict[str, Any] | None = None) -> Path:
    """Write tiny pipeline `kind` to its cache folder unless it is there (marker
    ``model_index.json``); returns the folder. Concurrent callers are safe (temp dir + rename)."""
    from mmpo.models import write_cache_folder

    overrides = dict(overrides or {})
    folder = tiny_pipeline_folder(kind, seed, overrides)
    return write_cache_folder(
        folder,
        "model_index.json",
        lambda tmp: save_tiny_pipeline(kind, tmp, seed=seed, **overrides),
        what="Tiny pipeline",
    )
