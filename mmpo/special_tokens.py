"""Which special tokens a policy may sample and score (shared by model loading and the tiny models)."""

from __future__ import annotations

from typing import Any

#: special tokens of real Qwen2-VL tokenizers that a policy may write (grounding boxes and refs)
SAMPLEABLE_SPECIAL_TOKENS: frozenset[str] = frozenset(
    {"<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>"}
)


def special_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that must never be sampled nor scored, sorted.

    Every token the tokenizer flags as special except its eos token and the grounding tokens
    (`SAMPLEABLE_SPECIAL_TOKENS`) of real Qwen2-VL tokenizers: for the tiny tokenizer
    ``<|endoftext|>`` (pad; distinct from eos ``<|im_end|>``), ``<|im_start|>``,
    ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``. A sampled
    image pad breaks the next forward ("tokens N vs features M"); a sampled im_start opens a
    turn the policy must not write. Non-special added tokens (``<think>``, ``<tool_call>``, ...)
    stay sampleable. Accepts a tokenizer or a processor (uses its ``.tokenizer``).
    `mmpo.models.load_model` also drops ids that end generation and adds unused embedding rows.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ids = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    ids.update(i for i in tok.all_special_ids if i is not None)
    vocab = tok.get_vocab()
    keep = {tok.eos_token_id} | {vocab[t] for t in SAMPLEABLE_SPECIAL_TOKENS if t in vocab}
    return sorted(ids - keep)


__all__ = ["SAMPLEABLE_SPECIAL_TOKENS", "special_token_ids"]
