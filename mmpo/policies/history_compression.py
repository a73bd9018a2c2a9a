"""Anchor-guided History Compression (AHC, HiconAgent) for Qwen2-VL / Qwen2.5-VL decoders.

A GUI-agent prompt holds a task, a history of (screenshot, action text) pairs and the current
screenshot. The compressed branch runs decoder layers ``0..k-1`` on the whole sequence, then
drops the hidden states of the *history screenshots* (every image of a row but its last, with
their ``<|vision_start|>`` / ``<|vision_end|>`` tokens) and runs layers ``k..N-1`` on the rest.
Kept tokens keep the M-RoPE positions of the full prompt; the rows are re-packed left-padded,
so each row's tail (its current screenshot, prompt end and completion) keeps its last columns.

The pieces are the model's own: its embedding and vision-feature merge, ``compute_3d_position_ids``
(``get_rope_index``), ``create_causal_mask``, ``rotary_emb``, decoder layers and ``norm``, so an
all-False drop mask gives the normal ``last_hidden_state``.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from mmpo.errors import ConfigError


class Compressed(NamedTuple):
    """Output of ``compressed_hidden_states``.

    hidden ``[n, L2, H]``: final (normed) hidden states of the kept tokens, left-padded.
    index ``[n, L2]``: the column of each output token in the full sequence (-1: filler padding).
    attention_mask ``[n, L2]``: the re-packed padding mask (0 on filler and on padding kept from the input).
    position_ids ``[3, n, L2]``: the M-RoPE positions the kept tokens ran with (the full prompt's).
    """

    hidden: torch.Tensor
    index: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def history_image_mask(
    input_ids: torch.Tensor, image_token_id: int, vision_start_id: int, vision_end_id: int
) -> torch.Tensor:
    """``[n, L]`` bool: the tokens of every image of a row except its last one (image pads and
    their vision start/end tokens). Video spans (vision start, video pads, vision end) are never
    marked and do not count as images."""
    starts = input_ids == vision_start_id
    ends = input_ids == vision_end_id
    opened = starts.long().cumsum(1)  # 1-based index of the latest span started at or before a token
    closed_before = ends.long().cumsum(1) - ends.long()
    in_span = opened > closed_before  # from a vision start up to and including its vision end
    span = torch.where(in_span, opened, torch.zeros_like(opened))  # 0: outside every span
    n, width = input_ids.shape[0], int(opened.max()) + 1 if input_ids.numel() else 1
    pads = torch.zeros(n, width, dtype=torch.long, device=input_ids.device)
    pads.scatter_add_(1, span, (input_ids == image_token_id).long())
    is_image = pads > 0
    is_image[:, 0] = False
    spans = torch.arange(width, device=input_ids.device).expand(n, -1)
    last_image = torch.where(is_image, spans, torch.zeros_like(spans)).max(1, keepdim=True).values  # [n, 1]
    return in_span & is_image.gather(1, span) & (span < last_image)


def validate_drop_layer(layer: Any, num_layers: int) -> int:
    """``layer`` as an int in ``[0, num_layers)``; ConfigError (a ValueError) naming ``drop_layer`` otherwise."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ConfigError(
            f"drop_layer={layer!r} is not a decoder layer index: the decoder has {num_layers} layers, so "
            f"drop_layer must be an integer with 0 <= drop_layer < {num_layers} (HiconAgent uses 6 of 36)."
        )
    return layer


def _merged_inputs(decoder: torch.nn.Module, full: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``inputs_embeds [n, L, H]`` with image/video features merged, and positions ``[3, n, L]``,
    as ``Qwen2(_5)_VLModel.forward`` computes them."""
    input_ids = full["input_ids"]
    embeds = decoder.get_input_embeddings()(input_ids)
    for which, pixels, grid in ((0, "pixel_values", "image_grid_thw"), (1, "pixel_values_videos", "video_grid_thw")):
        if full.get(pixels) is None:
            continue
        get = decoder.get_image_features if which == 0 else decoder.get_video_features
        feats = torch.cat(get(full[pixels], full.get(grid), return_dict=True).pooler_output, dim=0)
        feats = feats.to(embeds.device, embeds.dtype)
        kind = "image_features" if which == 0 else "video_features"
        mask = decoder.get_placeholder_mask(input_ids, inputs_embeds=embeds, **{kind: feats})[which]
        embeds = embeds.masked_scatter(mask, feats)
    pos = full.get("position_ids")
    if pos is None:
        fn = decoder.compute_3d_position_ids
        accepted = inspect.signature(fn).parameters
        extra = {k: full.get(k) for k in accepted if k not in ("self", "input_ids", "inputs_embeds", "cache", "kwargs")}
        pos = fn(input_ids=input_ids, inputs_embeds=embeds, cache=None, **extra)
    if pos is None:  # no media: the language model's default positions
        pos = torch.arange(input_ids.shape[1], device=embeds.device).view(1, 1, -1).expand(3, input_ids.shape[0], -1)
    elif pos.ndim == 2:
        pos = pos[None].expand(3, -1, -1)
    return embeds, pos


def _run_layers(
    lm: torch.nn.Module, hidden: torch.Tensor, pos: torch.Tensor, attention_mask: torch.Tensor, layers: range
) -> torch.Tensor:
    """Decoder ``layers`` of the language model ``lm`` over ``hidden [n, L, H]`` at positions
    ``[3, n, L]``, causal with ``attention_mask [n, L]`` padding, as its ``forward`` runs them."""
    kwargs = dict(config=lm.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=None)
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if lm.has_sliding_layers:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    rope = lm.rotary_emb(hidden, pos)
    for i in layers:
        hidden = lm.layers[i](
            hidden,
            attention_mask=masks[lm.config.layer_types[i]],
            position_embeddings=rope,
            position_ids=None,
            cache=None,
            use_cache=False,
        )
    return hidden


def compressed_hidden_states(
    decoder: torch.nn.Module, full: dict[str, torch.Tensor], drop: torch.Tensor, layer: int
) -> Compressed:
    """Final hidden states with the ``drop [n, L]`` tokens removed from decoder layer ``layer`` on.

    decoder: ``model.model`` of a Qwen2-VL / Qwen2.5-VL ``ForConditionalGeneration`` (holds
      ``.visual``, ``.language_model``, ``get_rope_index``).
    full: collated (left-padded) inputs ``input_ids [n, L]``, ``attention_mask [n, L]`` and the
      processor's media / ``mm_token_type_ids``.
    drop: tokens to remove; the last tokens of every row must be kept (callers read the tail).
    Returns ``Compressed`` with ``hidden [n, L2, H]``, ``L2 = L - min_i(drop_i.sum())``; each row's
    kept tokens, in order, end at column ``L2 - 1``. With ``drop`` all False this equals
    ``decoder(**full).last_hidden_state``.
    """
    lm = decoder.language_model
    layer = validate_drop_layer(layer, len(lm.layers))
    if lm.has_sliding_layers and bool(drop.any()):
        raise ConfigError("history compression does not support sliding-window attention layers (use_sliding_window).")
    attn = full.get("attention_mask")
    if attn is None:
        attn = torch.ones_like(full["input_ids"])
    hidden, pos = _merged_inputs(decoder, full)
    hidden = _run_layers(lm, hidden, pos, attn, range(layer))

    keep = ~drop.to(hidden.device).bool()
    counts = keep.sum(1)
    n, L2 = keep.shape[0], int(counts.max())
    rows, cols = keep.nonzero(as_tuple=True)
    new_cols = (L2 - counts)[:, None] + keep.long().cumsum(1) - 1  # right-aligned column of each kept token
    index = torch.full((n, L2), -1, dtype=torch.long, device=hidden.device)
    index[rows, new_cols[rows, cols]] = cols
    filler = index < 0
    src = index.clamp(min=0)
    hidden = hidden.gather(1, src[:, :, None].expand(-1, -1, hidden.shape[-1]))
    attn2 = attn.gather(1, src).masked_fill(filler, 0)
    pos2 = pos.gather(2, src[None].expand(pos.shape[0], -1, -1)).masked_fill(filler[None], 0)
    hidden = _run_layers(lm, hidden, pos2, attn2, range(layer, len(lm.layers)))
    return Compressed(hidden=lm.norm(hidden), index=index, attention_mask=attn2, position_ids=pos2)


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def ahc_flops(config: Any, full_tokens: int, kept_tokens: int, drop_layer: int) -> dict[str, float]:
    """Analytic forward FLOPs of the language decoder on one row (vision tower and LM head excluded).

    Per layer and ``L`` tokens: ``2 * params_per_layer * L`` (attention projections + MLP) plus
    ``4 * L^2 * (heads * head_dim)`` (scores and weighted values, no causal halving). The full
    branch runs every layer on ``full_tokens``; the compressed one runs ``drop_layer`` layers on
    ``full_tokens`` and the rest on ``kept_tokens``. Returns ``{"full", "compressed", "ratio"}``.
    """
    c = _text_config(config)
    H, inter, N = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or H // heads
    kv = (getattr(c, "num_key_value_heads", None) or heads) * head_dim
    q = heads * head_dim
    params = H * q + 2 * H * kv + q * H + 3 * H * inter  # q, k, v, o projections and the gated MLP

    def per_layer(L: int) -> float:
        return 2.0 * params * L + 4.0 * L * L * q

    validate_drop_layer(drop_layer, N)
    full = N * per_layer(full_tokens)
    compressed = drop_layer * per_layer(full_tokens) + (N - drop_layer) * per_layer(kept_tokens)
    return {"full": full, "compressed": compressed, "ratio": compressed / full}
