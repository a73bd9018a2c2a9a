"""Token policy for transformers causal LMs and Qwen2-VL / Qwen2.5-VL VLMs.

The action unit is a generated token. ``encode`` turns chat messages (with images or video
frames, through qwen-vl-utils) into model inputs; ``log_probs`` computes per-token log-probs
and entropies of given completions. The vocabulary projection runs only over completion
positions and in chunks (with activation checkpointing when gradients are needed), so float32
logits for the whole batch never exist at once.

``score`` is the entry point of the trainer: rows whose prompt encoding is the same object (the
G rows of a group) share one prefix pass (Prefix Grouper): the prompt, with its image tokens, is
encoded once, its KV cache is gathered to the group's rows, and the completions attend to it.
Values and gradients equal the plain forward; prompt and vision-tower compute drop by G times.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.cache_utils import Cache

from mmpo.errors import ConfigError
from mmpo.policies.batching import append_completions, collate_prompts, to_device
from mmpo.policies.history_compression import compressed_hidden_states, history_image_mask
from mmpo.policies.packing import check_packable, log_probs_packed, log_probs_shared_prefix_packed


@dataclass
class TokenLogProbs:
    """``logp [n, T]`` of the given completion tokens and ``entropy [n, T]`` of the full distribution.

    On request (``topk``, ``curvature`` of the scoring calls): ``topk_logp [n, T, K]``, the
    log-probs of the K most likely tokens in rank order (with grad), ``is_top1 [n, T]`` (the token
    is the argmax; SimKO, arXiv 2510.14807), and ``curvature [n, T, 4]`` = (pi(y), sum pi^2,
    sum pi^3, |h|^2 of the head's input), the statistics of CAPO's curvature proxy
    (:func:`mmpo.core.capo.curvature_kl`), without gradient.
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None
    topk_logp: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    curvature: torch.Tensor | None = None


def _chunk_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    temperature: float,
    never_ids: torch.Tensor | None,
    topk: int = 0,
    curvature: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Log-prob of ``targets [n, c]`` and entropy under ``softmax(head(hidden) / temperature)``;
    then, when asked, the top-``topk`` log-probs ``[n, c, K]`` and the argmax flag ``[n, c]``, and
    the curvature statistics ``[n, c, 4]`` (see :class:`TokenLogProbs`).

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
    out: tuple[torch.Tensor, ...] = (logp, entropy)
    if topk:
        idx = logits.detach().topk(topk, dim=-1).indices  # chosen on detached logits, ranked
        out += (logp_all.gather(-1, idx), idx[..., 0] == targets)
    if curvature:
        with torch.no_grad():
            pd = p.detach()
            stats = (logp.detach().exp(), (pd * pd).sum(-1), (pd**3).sum(-1), hidden.detach().float().pow(2).sum(-1))
            out += (torch.stack(stats, dim=-1),)
    return out


@dataclass
class Prefill:
    """Prompts run once through the decoder: ``last_hidden [k, H]`` (predicts the first new
    token), the KV ``cache`` (batch k), the prompt ``mask [k, P]`` and ``start [k]``, the
    position of the first token after each prompt."""

    last_hidden: torch.Tensor
    cache: Cache
    mask: torch.Tensor
    start: torch.Tensor


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
        padding_free: ``score`` packs the rows without padding (:mod:`mmpo.policies.packing`);
            ConfigError for a model whose packing is not verified.
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
        padding_free: bool = False,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.is_vlm = is_vlm
        self.never_sample_ids = list(never_sample_ids)
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.logprob_chunk_size = logprob_chunk_size
        self.padding_free = padding_free
        if padding_free:
            check_packable(model)

    @classmethod
    def from_info(cls, model: torch.nn.Module, processor: Any, info: Any, **kwargs: Any) -> "CausalLMPolicy":
        """The policy of a model as ``mmpo.models.load_model`` returns it (``info``: its ModelInfo)."""
        return cls(
            model,
            processor,
            is_vlm=info.is_vlm,
            never_sample_ids=info.special_token_ids,
            eos_token_ids=info.eos_token_ids,
            pad_token_id=info.pad_token_id,
            **kwargs,
        )

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

    def score(
        self,
        encodings: list[dict[str, torch.Tensor]],
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        share_prefix: bool = True,
        compress_layer: int | None = None,
        **kwargs: Any,
    ) -> TokenLogProbs:
        """Log-probs of ``completion_ids [n, T]`` after the per-row prompt ``encodings`` (length n).

        With ``share_prefix``, rows whose encoding is the same object are scored through one
        prefix pass (``log_probs_shared_prefix``); without repeats, or without it, the plain
        forward. ``compress_layer`` (history compression, see ``log_probs``) always takes the
        plain forward. With ``padding_free`` the rows are packed (:mod:`mmpo.policies.packing`).
        ``kwargs`` as in ``log_probs``.
        """
        index: dict[int, int] = {}
        unique: list[dict[str, torch.Tensor]] = []
        rows = []
        for enc in encodings:
            if id(enc) not in index:
                index[id(enc)] = len(unique)
                unique.append(enc)
            rows.append(index[id(enc)])
        if (
            share_prefix
            and compress_layer is None
            and len(unique) < len(encodings)
            and self.prefix_sharing_possible(kwargs.get("model"))
        ):
            shared = log_probs_shared_prefix_packed if self.padding_free else CausalLMPolicy.log_probs_shared_prefix
            row_prefix = torch.tensor(rows, dtype=torch.long)
            return shared(self, self.collate(unique), row_prefix, completion_ids, completion_mask, **kwargs)
        if self.padding_free and compress_layer is None:
            return log_probs_packed(self, self.collate(encodings), completion_ids, completion_mask, **kwargs)
        return self.log_probs(
            self.collate(encodings), completion_ids, completion_mask, compress_layer=compress_layer, **kwargs
        )

    def _hidden_states(
        self, model: torch.nn.Module, full: dict[str, torch.Tensor], compress_layer: int | None = None
    ) -> tuple[torch.Tensor, torch.nn.Module]:
        """One decoder pass over collated inputs (on the model's device): last hidden states
        ``[n, L, H]`` and the LM head.

        With ``compress_layer`` (VLMs only), the history screenshots (all images of a row but its
        last) are dropped from that decoder layer on (``history_compression``): the hidden states
        are ``[n, L2, H]``, re-packed left-padded, each row's tail in the last columns.
        """
        decoder, head = self._decoder_and_head(model)
        if compress_layer is not None:
            if not self.is_vlm:
                raise ConfigError(
                    f"compress_layer={compress_layer!r} drops history screenshots and needs a VLM; "
                    "this policy's model is text-only (set compress_layer=None)."
                )
            cfg = decoder.config
            drop = history_image_mask(
                full["input_ids"], cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
            )
            return compressed_hidden_states(decoder, full, drop, compress_layer).hidden, head
        kwargs = {k: v for k, v in full.items() if k != "input_ids"}
        pos = self.position_ids(full["attention_mask"])
        if pos is not None:
            kwargs["position_ids"] = pos
        return decoder(input_ids=full["input_ids"], use_cache=False, **kwargs).last_hidden_state, head

    def score_conversations(
        self,
        encodings: list[dict[str, torch.Tensor]],
        lengths: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        model: torch.nn.Module | None = None,
        temperature: float = 1.0,
        with_entropy: bool = True,
        topk: int = 0,
        curvature: bool = False,
        device: torch.device | None = None,
        **_: Any,
    ) -> TokenLogProbs:
        """Log-probs ``[n, T]`` of multi-turn rows: ``encodings[i]`` is a whole conversation whose
        last ``lengths[i]`` tokens follow the prompt (model turns and observations, with their
        images); ``completion_ids [n, T]`` holds those tokens left-aligned. One forward over the
        conversations; position ``p`` predicts token ``p + 1``. Rows are left-padded, so row i's
        tokens after its prompt start at column ``L - lengths[i]``."""
        model = model if model is not None else self.model
        device = device or next(model.parameters()).device
        full = to_device(self.collate(list(encodings)), device)
        hidden, head = self._hidden_states(model, full)
        L, T = hidden.shape[1], completion_ids.shape[1]
        start = L - lengths.to(device).long()  # first post-prompt column of each row
        idx = (start[:, None] - 1 + torch.arange(T, device=device)[None, :]).clamp(max=L - 1)
        hidden = hidden.gather(1, idx[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return self._project(
            hidden, head, completion_ids.to(device), completion_mask, temperature, with_entropy, topk, curvature
        )

    def prefix_sharing_possible(self, model: torch.nn.Module | None = None) -> bool:
        """False while gradient checkpointing is active: transformers drops the KV cache inside
        checkpointed layers, so the completions could not attend to the prefix."""
        model = model if model is not None else self.model
        if not torch.is_grad_enabled():
            return True
        return not any(getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules())

    def log_probs(
        self,
        prompt_inputs: dict[str, torch.Tensor],
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        model: torch.nn.Module | None = None,
        temperature: float = 1.0,
        with_entropy: bool = True,
        topk: int = 0,
        curvature: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        compress_layer: int | None = None,
    ) -> TokenLogProbs:
        """Per-token log-probs of ``completion_ids [n, T]`` given collated prompts ``[n, P]``.

        ``model`` defaults to the policy model (pass the reference model or a DeepSpeed engine's
        module to score under it). ``compress_layer``: score under HiconAgent's compressed
        branch, history screenshots dropped from that decoder layer on (VLMs; ConfigError, a
        ValueError, for text LMs). Returns ``logp [n, T]`` and ``entropy [n, T]`` (float32).
        """
        model = model if model is not None else self.model
        device = device or next(model.parameters()).device
        full = append_completions(prompt_inputs, completion_ids, completion_mask)
        full = to_device(full, device, dtype)
        P = prompt_inputs["input_ids"].shape[1]
        T = completion_ids.shape[1]
        hidden, head = self._hidden_states(model, full, compress_layer)
        # hidden at position P-1+t predicts completion token t; compression keeps the rows' tails
        # in the last columns of its re-packed length L2 (= P + T when nothing is dropped)
        if compress_layer is None:
            hidden = hidden[:, P - 1 : P - 1 + T]
        else:
            L2 = hidden.shape[1]
            hidden = hidden[:, L2 - T - 1 : L2 - 1]
        return self._project(
            hidden, head, full["input_ids"][:, P : P + T], completion_mask, temperature, with_entropy, topk, curvature
        )

    def log_probs_shared_prefix(
        self,
        prefix_inputs: dict[str, torch.Tensor],
        row_prefix: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        model: torch.nn.Module | None = None,
        temperature: float = 1.0,
        with_entropy: bool = True,
        topk: int = 0,
        curvature: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> TokenLogProbs:
        """``log_probs`` with each distinct prompt encoded once (Prefix Grouper).

        prefix_inputs: ``k`` distinct collated prompts ``[k, P]`` (left-padded, with their media);
        row_prefix ``[n]``: which prompt each completion row follows. The prefix pass fills a KV
        cache ``[k, heads, P, d]``; it is gathered to ``[n, heads, P, d]`` (the gather's backward sums
        the G rows' gradients into the shared prefix) and the completion pass attends to it, at
        the positions the plain forward would use (text: after the valid prompt tokens; Qwen-VL
        M-RoPE: after the prompt's largest position, the rope delta). Returns as ``log_probs``.
        """
        model = model if model is not None else self.model
        device = device or next(model.parameters()).device
        row_prefix = row_prefix.to(device)
        comp_ids = completion_ids.to(device)
        T = comp_ids.shape[1]
        decoder, head = self._decoder_and_head(model)
        pre = self.prefill(decoder, to_device(prefix_inputs, device, dtype))
        # the prompt's last hidden state predicts completion token 0 (prompts are left-padded)
        hidden = pre.last_hidden[row_prefix].unsqueeze(1)
        if T > 1:  # completion tokens 0..T-2 predict tokens 1..T-1
            pre.cache.reorder_cache(row_prefix)
            comp_mask = completion_mask.to(device).long()[:, : T - 1]
            rest = decoder(
                input_ids=comp_ids[:, : T - 1],
                attention_mask=torch.cat([pre.mask[row_prefix], comp_mask], dim=1),
                position_ids=self.continuation_positions(pre.start[row_prefix], 0, T - 1),
                cache=pre.cache,
                use_cache=True,
            ).last_hidden_state
            hidden = torch.cat([hidden, rest], dim=1)
        return self._project(hidden, head, comp_ids, completion_mask, temperature, with_entropy, topk, curvature)

    def prefill(
        self, decoder: torch.nn.Module, prefix: dict[str, torch.Tensor], cache: Cache | None = None
    ) -> "Prefill":
        """Run ``k`` collated (left-padded) prompts ``[k, P]`` through the decoder into a KV cache
        (``cache``, default a new ``DynamicCache``, which keeps autograd through the prompt)."""
        mask = prefix["attention_mask"].long()
        valid = mask.sum(-1)  # [k] prompt tokens without padding
        if self.is_vlm:
            pos, deltas = self._rope_index(decoder, prefix)
            # text after the prompt continues at (largest prompt position + 1) = valid + delta
            start = valid + deltas.view(-1).to(valid.device)
        else:
            pos, start = self.position_ids(mask), valid
        cache = cache if cache is not None else DynamicCache()
        kwargs = {k: v for k, v in prefix.items() if k != "input_ids"}
        out = decoder(input_ids=prefix["input_ids"], position_ids=pos, cache=cache, use_cache=True, **kwargs)
        return Prefill(last_hidden=out.last_hidden_state[:, -1], cache=cache, mask=mask, start=start)

    def continuation_positions(self, start: torch.Tensor, offset: int, length: int) -> torch.Tensor:
        """Positions of tokens ``offset .. offset+length-1`` after prompts whose first continuation
        position is ``start [m]``: ``[m, length]`` (text) or ``[3, m, length]`` (M-RoPE: text tokens
        advance all three axes together)."""
        pos = start[:, None] + torch.arange(offset, offset + length, device=start.device)[None, :]
        return pos.unsqueeze(0).expand(3, -1, -1) if self.is_vlm else pos

    def _rope_index(
        self, decoder: torch.nn.Module, prefix: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions ``[3, k, P]`` and deltas ``[k, 1]`` of collated VLM prompts."""
        fn = decoder.get_rope_index
        accepted = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in prefix.items() if k in accepted and k != "input_ids"}
        return fn(prefix["input_ids"], **kwargs)

    def _project(
        self,
        hidden: torch.Tensor,
        head: torch.nn.Module,
        targets: torch.Tensor,
        completion_mask: torch.Tensor,
        temperature: float,
        with_entropy: bool,
        topk: int = 0,
        curvature: bool = False,
    ) -> TokenLogProbs:
        """Chunked vocabulary projection: ``hidden [n, T, H]`` -> log-probs of ``targets [n, T]``
        (and the requested extras of :class:`TokenLogProbs`)."""
        device = hidden.device
        T = targets.shape[1]
        # padding after EOS may be a never-sampled id (-inf log-prob): score EOS there instead, so
        # every entry is finite; callers mask these positions anyway
        targets = targets.to(device).masked_fill(~completion_mask.to(device).bool(), self.eos_token_ids[0])
        never = torch.tensor(self.never_sample_ids, device=device, dtype=torch.long) if self.never_sample_ids else None
        chunk = self.logprob_chunk_size or max(1, min(T, 2**16 // max(1, head.weight.shape[0] // 64)))
        parts: list[tuple[torch.Tensor, ...]] = []
        use_ckpt = torch.is_grad_enabled() and T > chunk
        for s in range(0, T, chunk):
            args = (hidden[:, s : s + chunk], head, targets[:, s : s + chunk], temperature, never, topk, curvature)
            parts.append(
                checkpoint(_chunk_logprobs, *args, use_reentrant=False) if use_ckpt else _chunk_logprobs(*args)
            )
        cols = [torch.cat(c, dim=1) for c in zip(*parts)]
        out = TokenLogProbs(logp=cols[0], entropy=cols[1] if with_entropy else None)
        if topk:
            out.topk_logp, out.is_top1 = cols[2], cols[3]
        if curvature:
            out.curvature = cols[-1]
        return out


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")
