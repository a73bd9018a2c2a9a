"""Padding-free (packed) log-prob passes: several rows share one sequence, none is padded.

A micro batch of rows of unequal length is padded to its longest row, and every padded token
still runs through the decoder. Here the rows' tokens are packed, first-fit decreasing, into
bins as long as the longest row (so attention never costs more than in the padded batch), and
attention is kept inside each row. See docs/performance.md ("Packed rows (padding-free)").

* Plain forward (:func:`log_probs_packed`): each row is its valid prompt tokens and its
  completion tokens but the last (which predicts nothing). Position ids restart at 0 for each
  row, ``attention_mask`` is None: transformers' packed-sequence detection
  (``masking_utils.find_packed_sequence_indices``) makes the block-diagonal causal mask. Qwen-VL
  rows get their M-RoPE positions from ``get_rope_index`` on the padded batch, exactly as the
  plain forward computes them, behind a leading row of per-row text positions (the ``[4, m, L]``
  form Qwen2-VL reads for packed inputs).
* Shared prefix (:func:`log_probs_shared_prefix_packed`): the completions of one prompt are
  packed after that prompt's KV cache (Prefix Grouper, ``CausalLMPolicy.log_probs_shared_prefix``)
  with a 4-D mask: each completion sees its prompt's valid keys and, causally, itself.

Log-probs and gradients equal the padded forward's on valid tokens; masked positions are 0.
"""

from __future__ import annotations

from typing import Any

import torch

from mmpo.errors import ConfigError
from mmpo.policies.batching import TOKEN_KEYS, append_completions, to_device

# ``policy`` below is a ``mmpo.policies.causal_lm.CausalLMPolicy`` and the passes return its
# ``TokenLogProbs``; typed ``Any`` because that module imports this one.

#: ``model.config.model_type`` values whose packed passes are tested against the padded ones
PACKED_MODEL_TYPES = ("qwen2", "qwen3", "qwen2_vl", "qwen2_5_vl")
#: attention backends whose packed masks are tested (flash_attention_2 reads position ids itself)
PACKED_ATTENTION = ("sdpa", "eager")


def check_packable(model: torch.nn.Module) -> None:
    """ConfigError unless ``model``'s architecture and attention backend are verified for packing."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    kind, attn = cfg.model_type, getattr(cfg, "_attn_implementation", None)
    if kind not in PACKED_MODEL_TYPES or attn not in PACKED_ATTENTION:
        raise ConfigError(
            f"rollout.padding_free=true is verified for model types {PACKED_MODEL_TYPES} with attention "
            f"{PACKED_ATTENTION}; this model is {kind!r} with {attn!r} (set rollout.padding_free: false)"
        )


def check_padding_free(cfg: Any, multi_turn: bool) -> None:
    """At config load: refuse ``rollout.padding_free`` with an attention backend whose packed masks
    are not verified, or with multi-turn tool rollouts (their whole-conversation rows are scored
    by ``score_conversations``, which does not pack)."""
    if not cfg.rollout.padding_free:
        return
    attn = cfg.model.attn_implementation
    if attn not in PACKED_ATTENTION:
        raise ConfigError(
            f"rollout.padding_free=true with model.attn_implementation={attn!r}: packing is verified with "
            f"{PACKED_ATTENTION} (set model.attn_implementation: sdpa, or rollout.padding_free: false)"
        )
    if multi_turn:
        raise ConfigError(
            "rollout.padding_free=true: this task runs multi-turn tool rollouts, whose conversation rows "
            "are scored padded (set rollout.padding_free: false)"
        )


def pack_bins(
    lengths: list[int], capacity: int, keys: list[int] | None = None, keep_order: bool = False
) -> list[list[int]]:
    """Rows (by index) in bins of at most ``capacity`` tokens; rows of length 0 are left out.

    First-fit decreasing; only rows with equal ``keys`` share a bin. ``keep_order`` (rows that
    carry images, whose features are consumed in row order) fills bins in row order instead.
    """
    keys = keys if keys is not None else [0] * len(lengths)
    order = [i for i in range(len(lengths)) if lengths[i] > 0]
    if not keep_order:
        order.sort(key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        candidates = [len(bins) - 1] if keep_order and bins else range(len(bins))
        b = next((b for b in candidates if keys[bins[b][0]] == keys[i] and room[b] >= lengths[i]), None)
        if b is None:
            bins.append([]), room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def _layout(bins: list[list[int]], lengths: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bin [n], offset [n])`` of each row in the packed batch (-1 for rows left out)."""
    where, offset = torch.full((n,), -1, dtype=torch.long), torch.full((n,), -1, dtype=torch.long)
    for b, rows in enumerate(bins):
        o = 0
        for i in rows:
            where[i], offset[i] = b, o
            o += lengths[i]
    return where, offset


def _is_prefix_mask(mask: torch.Tensor) -> bool:
    """Whether each row of ``mask [n, T]`` is valid tokens followed by padding only."""
    n_valid = mask.sum(-1, keepdim=True)
    return bool((mask == (torch.arange(mask.shape[1], device=mask.device) < n_valid)).all())


def _project_valid(
    policy: Any,
    hidden: torch.Tensor,
    head: torch.nn.Module,
    completion_ids: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    topk: int,
    curvature: bool,
) -> Any:
    """Project ``hidden [V, H]`` (the predictors of the ``V`` valid tokens of ``mask [n, T]``,
    row-major) in blocks of ``T`` and scatter the results to ``[n, T, ...]`` (0 where masked)."""
    n, T = mask.shape
    V = hidden.shape[0]
    blocks = max(1, -(-V // T))
    pad = blocks * T - V
    h = torch.nn.functional.pad(hidden, (0, 0, 0, pad)).view(blocks, T, -1)
    tgt = torch.nn.functional.pad(completion_ids[mask], (0, pad), value=policy.eos_token_ids[0]).view(blocks, T)
    valid = (torch.arange(blocks * T, device=mask.device) < V).view(blocks, T)
    out = policy._project(h, head, tgt, valid, temperature, with_entropy, topk, curvature)

    def scatter(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        flat = x.reshape(blocks * T, *x.shape[2:])[:V]
        full = flat.new_zeros((n, T, *x.shape[2:]))
        full[mask] = flat
        return full

    for name in ("logp", "entropy", "topk_logp", "is_top1", "curvature"):
        setattr(out, name, scatter(getattr(out, name)))
    return out


def log_probs_packed(
    policy: Any,
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
) -> Any:
    """``CausalLMPolicy.log_probs`` with the rows packed: prompts ``[n, P]`` (left-padded),
    ``completion_ids [n, T]``; returns ``logp [n, T]``, ``entropy [n, T]`` (0 where masked).

    Completion masks with holes (not valid-then-padding) take the padded forward.
    """
    model = model if model is not None else policy.model
    device = device or next(model.parameters()).device
    cmask = completion_mask.to(device).bool()
    kw = dict(model=model, temperature=temperature, with_entropy=with_entropy, topk=topk, curvature=curvature)
    if not _is_prefix_mask(cmask):
        return policy.log_probs(prompt_inputs, completion_ids, completion_mask, device=device, dtype=dtype, **kw)
    full = to_device(append_completions(prompt_inputs, completion_ids, completion_mask), device, dtype)
    n, P = prompt_inputs["input_ids"].shape
    comp_len = cmask.sum(-1)
    keep = full["attention_mask"].bool().clone()
    last = (P + comp_len - 1).clamp(min=P)  # the last completion token predicts nothing
    keep[torch.arange(n, device=device), last] &= comp_len == 0
    lengths = keep.sum(-1).tolist()
    decoder, head = policy._decoder_and_head(model)
    media = any(k.startswith("pixel_values") for k in full)
    bins = pack_bins(lengths, max(lengths), keep_order=media)
    where, offset = (t.to(device) for t in _layout(bins, lengths, n))
    m, C = len(bins), max(lengths)

    # packed column of each kept token: row i's r-th kept token sits at (where[i], offset[i] + r)
    rows, cols = keep.nonzero(as_tuple=True)
    rank = keep.long().cumsum(-1)[rows, cols] - 1
    dst_b, dst_c = where[rows], offset[rows] + rank
    text_pos = torch.arange(C, device=device).expand(m, C).clone()  # the tail after a bin's rows: one dummy row
    filled = torch.zeros(m, C, dtype=torch.bool, device=device)
    filled[dst_b, dst_c] = True
    tail_start = filled.long().sum(-1, keepdim=True)
    text_pos = torch.where(filled, text_pos, text_pos - tail_start)
    text_pos[dst_b, dst_c] = rank
    packed: dict[str, Any] = {k: v for k, v in full.items() if k not in (*TOKEN_KEYS, "position_ids")}
    for key in TOKEN_KEYS:
        if key in full and key != "attention_mask":
            fill = policy.pad_token_id if key == "input_ids" else 0
            buf = full[key].new_full((m, C), fill)
            buf[dst_b, dst_c] = full[key][rows, cols]
            packed[key] = buf
    if policy.is_vlm:
        pos3, _ = policy._rope_index(decoder, full)  # [3, n, P + T], as the padded forward computes them
        mrope = text_pos.unsqueeze(0).repeat(3, 1, 1)
        mrope[:, dst_b, dst_c] = pos3[:, rows, cols].to(mrope.dtype)
        position_ids = torch.cat([text_pos.unsqueeze(0), mrope], dim=0)  # [4, m, C]
    else:
        position_ids = text_pos
    input_ids = packed.pop("input_ids")
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False, **packed).last_hidden_state

    # completion token t of row i is predicted by its kept token of rank (valid prompt tokens - 1 + t)
    prompt_valid = prompt_inputs["attention_mask"].to(device).long().sum(-1)
    vi, vt = cmask.nonzero(as_tuple=True)
    src = hidden[where[vi], offset[vi] + prompt_valid[vi] - 1 + vt]
    return _project_valid(
        policy, src, head, completion_ids.to(device), cmask, temperature, with_entropy, topk, curvature
    )


def log_probs_shared_prefix_packed(
    policy: Any,
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
) -> Any:
    """``CausalLMPolicy.log_probs_shared_prefix`` with the completions of each prompt packed after
    its KV cache: ``k`` prompts ``[k, P]``, ``row_prefix [n]``, ``completion_ids [n, T]``.

    Bins of at most ``T - 1`` tokens hold completions of one prompt; the cache is gathered to the
    ``m`` bins (not to the ``n`` rows) and a 4-D mask ``[m, 1, C, P + C]`` lets each completion
    see its prompt's valid keys and, causally, its own tokens.
    """
    model = model if model is not None else policy.model
    device = device or next(model.parameters()).device
    cmask = completion_mask.to(device).bool()
    kw = dict(model=model, temperature=temperature, with_entropy=with_entropy, topk=topk, curvature=curvature)
    if not _is_prefix_mask(cmask):
        return policy.log_probs_shared_prefix(
            prefix_inputs, row_prefix, completion_ids, completion_mask, device=device, dtype=dtype, **kw
        )
    row_prefix = row_prefix.to(device)
    comp_ids = completion_ids.to(device)
    n = comp_ids.shape[0]
    decoder, head = policy._decoder_and_head(model)
    pre = policy.prefill(decoder, to_device(prefix_inputs, device, dtype))
    sources = [pre.last_hidden]  # [k, H]: the prompt's last hidden state predicts completion token 0
    lengths = (cmask.sum(-1) - 1).clamp(min=0).tolist()  # tokens 0..len-2 predict tokens 1..len-1
    vi, vt = cmask.nonzero(as_tuple=True)
    index = row_prefix[vi]  # into sources, for t == 0
    C = max(lengths)
    if C > 0:
        bins = pack_bins(lengths, C, keys=row_prefix.tolist())
        where, offset = (t.to(device) for t in _layout(bins, lengths, n))
        m, P = len(bins), pre.mask.shape[1]
        bin_prefix = row_prefix[torch.tensor([b[0] for b in bins], device=device)]
        ri, rt = (cmask & (torch.arange(cmask.shape[1], device=device) < cmask.sum(-1, keepdim=True) - 1)).nonzero(
            as_tuple=True
        )
        db, dc = where[ri], offset[ri] + rt
        ids = comp_ids.new_full((m, C), policy.pad_token_id)
        ids[db, dc] = comp_ids[ri, rt]
        seg = torch.full((m, C), -1, dtype=torch.long, device=device)
        seg[db, dc] = ri
        pos_1d = torch.arange(C, device=device).expand(m, C).clone()
        pos_1d[db, dc] = rt
        pos_1d = pos_1d + pre.start[bin_prefix][:, None]
        causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
        own = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0) & causal
        prompt_keys = pre.mask[bin_prefix].bool()[:, None, :].expand(m, C, P)
        mask = torch.cat([prompt_keys, own], dim=-1).unsqueeze(1)  # [m, 1, C, P + C]
        if decoder.config._attn_implementation == "eager":  # additive float mask
            h_dtype = pre.last_hidden.dtype
            mask = torch.zeros(mask.shape, dtype=h_dtype, device=device).masked_fill(~mask, torch.finfo(h_dtype).min)
        pre.cache.reorder_cache(bin_prefix)
        position_ids = pos_1d.unsqueeze(0).expand(3, -1, -1) if policy.is_vlm else pos_1d
        rest = decoder(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=pre.cache, use_cache=True
        ).last_hidden_state
        sources.append(rest.reshape(m * C, -1))
        later = vt > 0
        index = torch.where(later, pre.last_hidden.shape[0] + where[vi] * C + offset[vi] + vt - 1, index)
    src = torch.cat(sources, dim=0)[index]
    return _project_valid(policy, src, head, comp_ids, cmask, temperature, with_entropy, topk, curvature)
