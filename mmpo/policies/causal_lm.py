"""Token policy for transformers causal LMs and Qwen2-VL / Qwen2.5-VL VLMs.

The action unit is a generated token. ``encode`` turns chat messages (with images or video
frames, through qwen-vl-utils) into model inputs; ``log_probs`` computes per-token log-probs
and entropies of given completions. The vocabulary projection runs only over completion
positions and in chunks (with activation checkpointing when gradients are needed), so float32
logits for the whole batch never exist at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from mmpo.policies.batching import append_completions, collate_prompts, to_device


@dataclass
class TokenLogProbs:
    """``logp [n, T]`` of the given completion tokens and ``entropy [n, T]`` of the full distribution."""

    logp: torch.Tensor
    entropy: torch.Tensor | None


def _chunk_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    temperature: float,
    never_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets [n, c]`` and entropy under ``softmax(head(hidden) / temperature)``.

    The head is called as a module (not through its weight) so that ZeRO-3 gathers it.
    """
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    if never_ids is not None and never_ids.numel():
        logits = logits.index_fill(-1, never_ids, float("-inf"))
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    return logp, entropy


class CausalLMPolicy:
    """Adapts a transformers (VL) causal LM to action units = tokens.

    Args:
        model: the trainable model (possibly a PEFT model).
        processor: an ``AutoProcessor`` for VLMs or a tokenizer for text LMs.
        is_vlm: whether prompts carry images / video.
        never_sample_ids: token ids that are masked at sampling and in the log-softmax.
        eos_token_ids: ids that end a completion.
        pad_token_id: id used for padding.
        logprob_chunk_size: completion positions per vocabulary-projection chunk (0 = auto).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        is_vlm: bool,
        never_sample_ids: list[int],
        eos_token_ids: list[int],
        pad_token_id: int,
        logprob_chunk_size: int = 0,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.is_vlm = is_vlm
        self.never_sample_ids = list(never_sample_ids)
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.logprob_chunk_size = logprob_chunk_size

    # -- prompts --------------------------------------------------------------------------
    def encode(self, messages: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Encode one chat prompt (with the generation prompt appended); batch dimension 1."""
        if self.is_vlm:
            from qwen_vl_utils import process_vision_info

            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            images, videos = process_vision_info(messages)
            enc = self.processor(text=[text], images=images, videos=videos, return_tensors="pt")
        else:
            flat = [{"role": m["role"], "content": _text_of(m["content"])} for m in messages]
            text = self.tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
            enc = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        return {k: v for k, v in enc.items() if torch.is_tensor(v)}

    def collate(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate_prompts(encoded, self.pad_token_id)

    def decode(self, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """Text of each completion row (valid tokens only, EOS and special tokens dropped)."""
        out = []
        for ids, m in zip(completion_ids.tolist(), mask.tolist()):
            toks = [t for t, keep in zip(ids, m) if keep and t not in self.eos_token_ids]
            out.append(self.tokenizer.decode(toks, skip_special_tokens=True))
        return out

    # -- log-probs ------------------------------------------------------------------------
    def _decoder_and_head(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
        return base.model, head

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Text LMs get explicit positions so left padding matches generation; VLMs compute M-RoPE themselves."""
        if self.is_vlm:
            return None
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def log_probs(
        self,
        prompt_inputs: dict[str, torch.Tensor],
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        model: torch.nn.Module | None = None,
        temperature: float = 1.0,
        with_entropy: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> TokenLogProbs:
        """Per-token log-probs of ``completion_ids [n, T]`` given collated prompts ``[n, P]``.

        ``model`` defaults to the policy model (pass the reference model or a DeepSpeed engine's
        module to score under it). Returns ``logp [n, T]`` and ``entropy [n, T]`` (float32).
        """
        model = model if model is not None else self.model
        device = device or next(model.parameters()).device
        full = append_completions(prompt_inputs, completion_ids, completion_mask)
        full = to_device(full, device, dtype)
        P = prompt_inputs["input_ids"].shape[1]
        T = completion_ids.shape[1]
        decoder, head = self._decoder_and_head(model)
        pos = self.position_ids(full["attention_mask"])
        kwargs = {k: v for k, v in full.items() if k != "input_ids"}
        if pos is not None:
            kwargs["position_ids"] = pos
        hidden = decoder(input_ids=full["input_ids"], use_cache=False, **kwargs).last_hidden_state
        # hidden at position P-1+t predicts completion token t
        hidden = hidden[:, P - 1 : P - 1 + T]
        # padding after EOS may be a never-sampled id (-inf log-prob): score EOS there instead, so
        # every entry is finite; callers mask these positions anyway
        targets = full["input_ids"][:, P : P + T].masked_fill(~completion_mask.to(device).bool(), self.eos_token_ids[0])
        never = torch.tensor(self.never_sample_ids, device=device, dtype=torch.long) if self.never_sample_ids else None
        chunk = self.logprob_chunk_size or max(1, min(T, 2**16 // max(1, head.weight.shape[0] // 64)))
        logps, ents = [], []
        use_ckpt = torch.is_grad_enabled() and T > chunk
        for s in range(0, T, chunk):
            args = (hidden[:, s : s + chunk], head, targets[:, s : s + chunk], temperature, never)
            if use_ckpt:
                lp, en = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
            else:
                lp, en = _chunk_logprobs(*args)
            logps.append(lp)
            ents.append(en)
        logp = torch.cat(logps, dim=1)
        entropy = torch.cat(ents, dim=1) if with_entropy else None
        return TokenLogProbs(logp=logp, entropy=entropy)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")
