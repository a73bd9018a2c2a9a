"""The default rollout engine: a KV-cache sampling loop on the trained transformers module.

Each distinct prompt is prefilled once (its image tokens included) and its cache gathered to its
G samples, so the vision tower and the prompt run once per group, not G times. Rows leave the
batch (and their cache rows are dropped) as soon as they emit EOS: a finished row costs nothing.
The loop reports the log-prob of every sampled token under ``log_softmax(logits / temperature)``
with never-sampled ids masked, which is exactly what the trainer recomputes.
``engine_options: {use_generate: true}`` samples with ``model.generate`` instead (no prefix
sharing, no per-row early exit) for models the loop does not cover.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from mmpo.policies.batching import completion_mask_from_ids, to_device
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.policies.kv_cache import preallocated_cache
from mmpo.rollout.engines.base import ROLLOUT_ENGINES, Generation, GenerationSettings, RolloutEngine

__all__ = ["GenerationSettings", "HFGenerateEngine"]


class _NeverSample(LogitsProcessor):
    """Sets the logits of special tokens (image pad, vision start/end, ...) to -inf."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = torch.tensor(ids, dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(-1, self.ids.to(scores.device), float("-inf"))


def _sample(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs [m, V]`` by inverse-CDF sampling: exact, and about 10x
    cheaper than ``torch.multinomial`` on CPU. ``right=True`` never lands on a zero-probability
    token (its cumulative sum equals its predecessor's)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[1] - 1)


@ROLLOUT_ENGINES.register("hf")
class HFGenerateEngine(RolloutEngine):
    """Samples completions on the trained module itself (CPU and GPU; no second copy of the weights)."""

    OPTIONS = {
        "use_generate": False,  # sample with model.generate (no prefix sharing, no per-row early exit)
    }

    def __init__(self, policy: CausalLMPolicy, options: dict | None = None) -> None:
        super().__init__(policy, options)
        self.use_generate = bool(self.options.get("use_generate", False))

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        prompt_inputs: dict[str, torch.Tensor],
        settings: GenerationSettings,
        *,
        device: torch.device,
        dtype: torch.dtype | None = None,
        num_samples: int = 1,
    ) -> Generation:
        """``num_samples`` completions of each of the ``k`` collated prompts ``[k, P]``; rows are
        prompt-major (``n = k * num_samples``). See ``Generation``."""
        was_training = model.training
        model.eval()
        try:
            inputs = to_device(prompt_inputs, device, dtype)
            if self.use_generate:
                completion, logprobs = self._hf_generate(model, inputs, settings, num_samples), None
            else:
                completion, logprobs = self._sample_loop(model, inputs, settings, num_samples)
        finally:
            model.train(was_training)
        pol = self.policy
        mask, truncated = completion_mask_from_ids(completion, pol.eos_token_ids)
        completion = completion.masked_fill(~mask, pol.pad_token_id)
        if logprobs is not None:
            logprobs = logprobs.masked_fill(~mask, 0.0)
        return Generation(completion, mask, truncated, logprobs)

    def _sample_loop(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], settings: GenerationSettings, num_samples: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Completion ids ``[n, T]`` (pad after EOS) and their sampling log-probs ``[n, T]``."""
        pol = self.policy
        decoder, head = pol._decoder_and_head(model)
        T = settings.max_new_tokens
        pre = pol.prefill(decoder, inputs, cache=preallocated_cache(T))
        device = pre.mask.device
        k = pre.mask.shape[0]
        rows = torch.arange(k, device=device).repeat_interleave(num_samples)
        cache, mask, start, hidden = pre.cache, pre.mask[rows], pre.start[rows], pre.last_hidden[rows]
        if num_samples > 1:
            cache.reorder_cache(rows)
        n = len(rows)
        unpadded = bool(pre.mask.all())
        out = torch.full((n, T), pol.pad_token_id, dtype=torch.long, device=device)
        logps = torch.zeros(n, T, dtype=torch.float32, device=device)
        active = torch.arange(n, device=device)  # rows still generating
        never = torch.tensor(pol.never_sample_ids, dtype=torch.long, device=device)
        eos = torch.tensor(pol.eos_token_ids, dtype=torch.long, device=device)
        warpers = []
        if settings.top_k > 0:
            warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            warpers.append(TopPLogitsWarper(settings.top_p))
        for t in range(T):
            logits = head(hidden).float()
            if never.numel():
                logits.index_fill_(-1, never, float("-inf"))
            scaled = settings.scale(logits)
            # the reported log-probs are the policy's (what the trainer recomputes): before top-k/p
            # and before the minimum-length EOS mask, which shape sampling only
            logp_all = torch.log_softmax(scaled, dim=-1)
            if t < settings.min_new_tokens:
                scaled = scaled.index_fill(-1, eos, float("-inf"))
            if settings.greedy:
                token = scaled.argmax(-1)
            else:
                for warp in warpers:
                    scaled = warp(None, scaled)
                token = _sample(torch.softmax(scaled, dim=-1))
            out[active, t] = token
            logps[active, t] = logp_all.gather(-1, token[:, None]).squeeze(1)
            if t == T - 1:
                break
            going = ~torch.isin(token, eos)
            if not going.all():  # finished rows leave the batch and the cache
                keep = torch.nonzero(going).flatten()
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                active, token, mask, start = active[keep], token[keep], mask[keep], start[keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            hidden = decoder(
                # without prompt padding every key is visible: no mask to build each step
                input_ids=token[:, None],
                attention_mask=None if unpadded else mask,
                position_ids=pol.continuation_positions(start, t, 1),
                cache=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]
        return out.cpu(), logps.cpu()

    def _hf_generate(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], settings: GenerationSettings, num_samples: int
    ) -> torch.Tensor:
        pol = self.policy
        kwargs = dict(
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens or None,
            eos_token_id=pol.eos_token_ids,
            pad_token_id=pol.pad_token_id,
            use_cache=True,
            num_return_sequences=1 if settings.greedy else num_samples,
            logits_processor=LogitsProcessorList([_NeverSample(pol.never_sample_ids)])
            if pol.never_sample_ids
            else None,
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
        out = model.generate(**inputs, **kwargs)
        completion = out[:, inputs["input_ids"].shape[1] :].cpu()
        if settings.greedy and num_samples > 1:  # greedy samples of a prompt are all the same
            completion = completion.repeat_interleave(num_samples, dim=0)
        if completion.shape[1] == 0:
            completion = torch.full((completion.shape[0], 1), pol.pad_token_id, dtype=torch.long)
        return completion
