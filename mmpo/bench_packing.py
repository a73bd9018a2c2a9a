"""``mmpo bench --packing``: padded vs packed (padding-free) log-prob passes.

Rows of realistic, unequal lengths (prompt lengths about 15 to 140 tokens, completion lengths
log-normal with median ``max_new_tokens / 6``, clipped to [1, ``max_new_tokens``]; G rows per
prompt) scored by a small Qwen2 text model in float32, with and without prefix sharing. Per
setting: tokens run through the decoder and the share of them that is padding (or a last
completion token, which predicts nothing), the reference pass (no grad) and the policy pass
(forward + backward), the activations kept for backward (CPU) or peak memory (CUDA), and the
largest |log-prob difference| between the two. See docs/performance.md.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from mmpo.models import load_model
from mmpo.policies.causal_lm import CausalLMPolicy

#: a Qwen2-shaped text model big enough that token counts, not call overheads, set the time
BENCH_SIZES = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def _rows(pol: CausalLMPolicy, n: int, group: int, max_new: int, seed: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """``n`` rows (``group`` per prompt): encodings, completion ids ``[n, T]`` and mask ``[n, T]``,
    ``T`` the longest completion (micro batches are trimmed to it)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(-(-n // group)):
        words = int(torch.randint(4, 40, (1,), generator=gen))
        prompts.append(pol.encode([{"role": "user", "content": "word " * words + "answer?"}]))
    encodings = [prompts[i // group] for i in range(n)]
    log_len = torch.randn(n, generator=gen) * 0.9 + torch.log(torch.tensor(max_new / 6))
    lengths = log_len.exp().round().clamp(1, max_new).long()
    T = int(lengths.max())
    ids = torch.randint(5, 300, (n, T), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return encodings, ids, mask


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _useful_tokens(encodings: list, mask: torch.Tensor, share: bool) -> int:
    """Tokens a pass cannot do without: valid prompt tokens (each distinct prompt once when
    shared) and every valid completion token but the last of each row."""
    prompts = {id(e): e for e in encodings}.values() if share else encodings
    prompt = sum(int(e["attention_mask"].sum()) for e in prompts)
    return prompt + int((mask.sum(-1) - 1).clamp(min=0).sum())


def run_packing_bench(
    *,
    row_counts: tuple[int, ...] = (16, 64),
    group_size: int = 8,
    max_new_tokens: int = 256,
    repeats: int = 3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One dict per (rows, prefix sharing): padded vs packed log-prob passes."""
    model, proc, info = load_model("tiny:qwen2", seed=seed, tiny_overrides=BENCH_SIZES)
    policies = {pf: CausalLMPolicy.from_info(model, proc, info, padding_free=pf) for pf in (False, True)}
    device = next(model.parameters()).device
    seen: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    results = []
    for n in row_counts:
        encodings, ids, mask = _rows(policies[False], n, group_size, max_new_tokens, seed + n)
        for share in (False, True):
            row: dict[str, Any] = {
                "rows": n,
                "group_size": group_size,
                "prefix_sharing": share,
                "completion_tokens": int(mask.sum()),
                "longest_completion": int(mask.shape[1]),
                "threads": torch.get_num_threads(),
            }
            useful = _useful_tokens(encodings, mask, share)
            logp: dict[str, torch.Tensor] = {}
            saved = [0]

            def pack_hook(t: torch.Tensor) -> torch.Tensor:
                saved[0] += t.numel() * t.element_size()
                return t

            def no_grad(pol: CausalLMPolicy, name: str) -> None:
                with torch.no_grad():
                    logp[name] = pol.score(encodings, ids, mask, share_prefix=share, with_entropy=False).logp

            def with_grad(pol: CausalLMPolicy) -> None:
                model.zero_grad(set_to_none=True)
                saved[0] = 0
                with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
                    out = pol.score(encodings, ids, mask, share_prefix=share)
                ((out.logp * mask).sum() + (out.entropy * mask).sum()).backward()

            names = {"padded": policies[False], "packed": policies[True]}
            times: dict[str, list[float]] = {f"{name}_{p}": [] for name in names for p in ("ref", "policy")}
            for name, pol in names.items():  # warm-up; decoder tokens; activations kept for backward
                seen.clear()
                no_grad(pol, name)
                row[f"{name}_decoder_tokens"] = sum(seen)
                row[f"{name}_padding_pct"] = round(100.0 * (sum(seen) - useful) / sum(seen), 1)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with_grad(pol)
                if device.type == "cuda":
                    row[f"{name}_peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                else:
                    row[f"{name}_saved_activations_mb"] = round(saved[0] / 2**20, 1)
            for _ in range(repeats):  # alternating, so that both see the same machine load
                for name, pol in names.items():
                    times[f"{name}_ref"].append(_timed(lambda: no_grad(pol, name)))
                    times[f"{name}_policy"].append(_timed(lambda: with_grad(pol)))
            for key, values in times.items():
                row[f"{key}_pass_s"] = round(statistics.median(values), 4)
            row["ref_pass_speedup"] = round(row["padded_ref_pass_s"] / row["packed_ref_pass_s"], 2)
            row["policy_pass_speedup"] = round(row["padded_policy_pass_s"] / row["packed_policy_pass_s"], 2)
            row["max_abs_dlogp"] = float((logp["padded"] - logp["packed"])[mask].abs().max())
            results.append(row)
    return results
