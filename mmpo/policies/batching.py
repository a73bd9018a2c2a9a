"""Collating encoded prompts (and their completions) into model inputs.

A prompt is encoded once into a dict with a batch dimension of 1: token-aligned tensors
(``input_ids``, ``attention_mask``, ``mm_token_type_ids``: [1, L]) and media tensors
(``pixel_values`` [patches, D], ``image_grid_thw`` [n_images, 3], the video equivalents),
which are concatenated in row order.
"""

from __future__ import annotations

from typing import Any

import torch

TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def collate_prompts(encoded: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad token tensors of several prompts to one length and concatenate their media.

    Returns ``input_ids [n, P]``, ``attention_mask [n, P]`` and the media/extra keys.
    """
    length = max(int(e["input_ids"].shape[-1]) for e in encoded)
    out: dict[str, list[torch.Tensor]] = {}
    for enc in encoded:
        pad = length - int(enc["input_ids"].shape[-1])
        for key, value in enc.items():
            if not torch.is_tensor(value):
                continue
            if key in TOKEN_KEYS:
                fill = pad_token_id if key == "input_ids" else 0
                value = torch.nn.functional.pad(value, (pad, 0), value=fill)
            out.setdefault(key, []).append(value)
    return {k: torch.cat(v, dim=0) for k, v in out.items()}


def append_completions(
    inputs: dict[str, torch.Tensor], completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Model inputs for prompt + completion: ``completion_ids [n, T]``, ``completion_mask [n, T]``."""
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], dim=1)
    full["attention_mask"] = torch.cat(
        [inputs["attention_mask"], completion_mask.to(inputs["attention_mask"].dtype)], dim=1
    )
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            zeros = torch.zeros_like(completion_ids, dtype=inputs[key].dtype)
            full[key] = torch.cat([inputs[key], zeros], dim=1)
    return full


def to_device(inputs: dict[str, Any], device: torch.device, float_dtype: torch.dtype | None = None) -> dict[str, Any]:
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v):
            v = v.to(device)
            if float_dtype is not None and v.is_floating_point():
                v = v.to(float_dtype)
        out[k] = v
    return out


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of valid completion tokens: up to and including the first EOS.

    ``completion_ids [n, T]`` -> ``(mask [n, T] bool, truncated [n] bool)`` where ``truncated``
    marks completions that never produced an EOS.
    """
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids == e
    n, t = completion_ids.shape
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.float().argmax(dim=1), torch.full((n,), t, device=completion_ids.device))
    pos = torch.arange(t, device=completion_ids.device).unsqueeze(0)
    mask = pos <= first.unsqueeze(1)
    mask &= pos < t
    return mask, ~has_eos
