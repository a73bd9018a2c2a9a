"""``mmpo bench --prefix``: what the shared-prefix forward saves on long (image) prompts.

One group of G completions after one prompt with a large image, scored by the tiny Qwen2-VL in
float32: the reference pass (no gradient) and the policy pass (forward + backward), plain vs
shared prefix. Prints one JSON line per G with medians over ``repeats`` runs.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from mmpo.models import load_model
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.tasks import build_task


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_prefix_bench(
    *,
    image_size: int = 560,
    group_sizes: tuple[int, ...] = (8, 16),
    completion_len: int = 32,
    repeats: int = 3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Seconds of one log-prob pass over a group, with and without prefix sharing."""
    pixels = image_size * image_size
    model, proc, info = load_model("tiny:qwen2_vl", seed=seed, tiny_overrides={"max_pixels": pixels})
    pol = CausalLMPolicy.from_info(model, proc, info)
    task = build_task("synthetic_vqa", {"num_train": 4, "image_size": image_size}, seed=seed)
    enc = pol.encode(task.train_sample(0).messages)
    prompt_tokens = int(enc["input_ids"].shape[1])
    image_tokens = int((enc["input_ids"] == model.config.image_token_id).sum())
    results = []
    for G in group_sizes:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, 300, (G, completion_len), generator=gen)
        mask = torch.ones_like(ids, dtype=torch.bool)
        encodings = [enc] * G
        row: dict[str, Any] = {
            "G": G,
            "prompt_tokens": prompt_tokens,
            "image_tokens": image_tokens,
            "completion_tokens": completion_len,
            "threads": torch.get_num_threads(),
        }
        for share in (False, True):
            name = "shared" if share else "plain"

            def no_grad() -> None:
                with torch.no_grad():
                    pol.score(encodings, ids, mask, share_prefix=share, with_entropy=False)

            def with_grad() -> None:
                model.zero_grad(set_to_none=True)
                out = pol.score(encodings, ids, mask, share_prefix=share)
                (out.logp.sum() + out.entropy.sum()).backward()

            no_grad(), with_grad()  # warm-up
            row[f"{name}_ref_pass_s"] = round(statistics.median(_timed(no_grad) for _ in range(repeats)), 4)
            row[f"{name}_policy_pass_s"] = round(statistics.median(_timed(with_grad) for _ in range(repeats)), 4)
        row["ref_pass_speedup"] = round(row["plain_ref_pass_s"] / row["shared_ref_pass_s"], 2)
        row["policy_pass_speedup"] = round(row["plain_policy_pass_s"] / row["shared_policy_pass_s"], 2)
        results.append(row)
    return results
