"""The default rollout engine: transformers ``generate`` with KV cache (CPU and GPU)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from mmpo.policies.batching import completion_mask_from_ids, to_device
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout import ROLLOUT_ENGINES


@dataclass
class GenerationSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


class _NeverSample(LogitsProcessor):
    """Sets the logits of special tokens (image pad, vision start/end, ...) to -inf."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = torch.tensor(ids, dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(-1, self.ids.to(scores.device), float("-inf"))


@ROLLOUT_ENGINES.register("hf")
class HFGenerateEngine:
    """Samples completions with ``model.generate`` (stops each row at EOS; KV cache on)."""

    def __init__(self, policy: CausalLMPolicy) -> None:
        self.policy = policy

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        prompt_inputs: dict[str, torch.Tensor],
        settings: GenerationSettings,
        *,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample one completion per row of ``prompt_inputs [n, P]``.

        Returns ``completion_ids [n, T]`` (padded after EOS), ``mask [n, T]`` (valid tokens,
        EOS included) and ``truncated [n]`` (no EOS within ``max_new_tokens``).
        """
        pol = self.policy
        inputs = to_device(prompt_inputs, device, dtype)
        kwargs = dict(
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=pol.eos_token_ids,
            pad_token_id=pol.pad_token_id,
            use_cache=True,
            logits_processor=LogitsProcessorList([_NeverSample(pol.never_sample_ids)]) if pol.never_sample_ids else None,
        )
        if settings.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p if settings.top_p < 1.0 else None,
                top_k=settings.top_k if settings.top_k > 0 else None,
            )
        was_training = model.training
        model.eval()
        try:
            out = model.generate(**inputs, **kwargs)
        finally:
            model.train(was_training)
        P = inputs["input_ids"].shape[1]
        completion = out[:, P:].cpu()
        if completion.shape[1] == 0:
            completion = torch.full((completion.shape[0], 1), pol.pad_token_id, dtype=torch.long)
        mask, truncated = completion_mask_from_ids(completion, pol.eos_token_ids)
        completion = completion.masked_fill(~mask, pol.pad_token_id)
        return completion, mask, truncated
