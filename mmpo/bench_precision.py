"""``mmpo bench --bf16-tolerance``: how far bf16 log-probs are from fp32 at a setting's shape.

The same rows (one prompt of the setting, G completions of random tokens from the tokenizer's
vocabulary, ``max_new_tokens`` long) are scored by mmpo's log-prob pass three ways: fp32, bf16
autocast over fp32 weights (``precision: bf16``, what mmpo and TRL's ``bf16=True`` do), and bf16
autocast over bf16 frozen weights (``model.frozen_dtype: bf16``). Reported per token: the largest
and the mean ``|log p_bf16 - log p_fp32|``, and the largest importance-ratio error
``|exp(Δ) - 1|`` that a clipped objective would see (PPO's clip range is 0.2). Random weights give
flatter distributions than trained ones; the gap on a trained model is measured where one is at hand.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: the stated tolerance under which ``precision: bf16`` is offered for a setting: the mean token
#: log-prob error must stay well inside PPO's clip range (|ratio - 1| <= 0.2)
MEAN_TOLERANCE = 0.02


def logprob_gap(setting: str, *, group_size: int = 8, max_new_tokens: int = 64, seed: int = 0) -> dict[str, Any]:
    """One JSON-able row: the bf16-vs-fp32 log-prob gaps of ``setting`` (a key of
    :data:`mmpo.bench_shapes.SHAPES`) on ``group_size`` rows of ``max_new_tokens`` tokens."""
    import torch

    from mmpo.bench_shapes import SHAPES
    from mmpo.bench_trl import BenchSpec, make_prompt
    from mmpo.lora import cast_frozen
    from mmpo.models import ensure_tiny, load_model
    from mmpo.policies.causal_lm import CausalLMPolicy

    shape = SHAPES[setting]
    spec = BenchSpec(setting=setting, group_size=group_size, max_new_tokens=max_new_tokens).resolved()
    overrides = dict(shape.sizes)
    if shape.image:
        overrides["max_pixels"] = max(spec.image_size**2, 28 * 28 * 4)
    model, processor, info = load_model(str(ensure_tiny(shape.kind, seed=seed, overrides=overrides or None)))
    policy = CausalLMPolicy.from_info(model, processor, info)
    text, image = make_prompt(setting, 0, spec.image_size)
    content: Any = text if image is None else [{"type": "image", "image": image}, {"type": "text", "text": text}]
    enc = policy.encode([{"role": "user", "content": content}])
    tok = getattr(processor, "tokenizer", processor)
    never = set(info.special_token_ids)
    allowed = torch.tensor([i for i in range(len(tok)) if i not in never])
    g = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(len(allowed), (group_size, max_new_tokens), generator=g)]
    mask = torch.ones_like(ids, dtype=torch.bool)

    def score(autocast: bool) -> torch.Tensor:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), ctx:
            return policy.score([enc] * group_size, ids, mask, device=torch.device("cpu")).logp.float()

    ref = score(False)
    gaps = {"bf16_autocast": score(True)}
    cast_frozen(model.requires_grad_(False), "bf16")
    gaps["bf16_weights"] = score(True)
    out: dict[str, Any] = {"setting": setting, "rows": group_size, "tokens_per_row": max_new_tokens}
    for name, logp in gaps.items():
        d = (logp - ref).abs()
        out[name] = {
            "max_abs_logp_diff": round(float(d.max()), 5),
            "mean_abs_logp_diff": round(float(d.mean()), 5),
            "max_ratio_error": round(float(torch.expm1(d).max()), 5),
            "max_abs_seq_logp_diff": round(float((logp - ref).sum(1).abs().max()), 4),
        }
    out["fp32_mean_logp"] = round(float(ref.mean()), 4)
    out["uniform_logp"] = round(-math.log(len(allowed)), 4)
    out["tolerance_mean_abs"] = MEAN_TOLERANCE
    out["within_tolerance"] = all(v["mean_abs_logp_diff"] <= MEAN_TOLERANCE for k, v in out.items() if k in gaps)
    return out


def main(settings: list[str]) -> None:
    for s in settings:
        print(json.dumps(logprob_gap(s)), flush=True)
