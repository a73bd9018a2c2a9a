"""``mmpo bench --tree CONFIG``: decoded tokens and seconds of tree rollouts vs independent rows.

The config's first ``rollout.prompts_per_step`` training prompts are decoded twice with the
same sampling settings: once by the tree engine with the ``rollout.tree`` branching policy
(TreePO arXiv 2508.17445 / LATR arXiv 2510.24302) and once by the hf engine with as many
independent rows per prompt as the tree has leaves. Tokens are decoded tokens: the tree's
node tokens (each shared token once) and every independent row's tokens.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from mmpo.errors import ConfigError


def run_tree_bench(cfg: Any) -> dict[str, Any]:
    """One row of ``tree_tokens``, ``independent_tokens``, ``token_ratio`` (tree / independent),
    ``tree_s``, ``independent_s``, with the leaf count and the policy's name."""
    from mmpo.models import load_model
    from mmpo.policies.causal_lm import CausalLMPolicy
    from mmpo.rollout.engines.base import GenerationSettings
    from mmpo.rollout.engines.hf import HFGenerateEngine
    from mmpo.rollout.engines.tree import tree_generate
    from mmpo.tasks import build_task_from

    ro = cfg.rollout
    if not ro.tree:
        raise ConfigError(f"rollout.tree: mmpo bench --tree needs a rollout.tree block, got {ro.tree!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor, info = load_model(cfg.model.path, seed=cfg.seed, tiny_overrides=cfg.model.tiny, device=device)
    policy = CausalLMPolicy.from_info(model, processor, info)
    task = build_task_from(cfg)
    prompts = [task.train_sample(i) for i in range(ro.prompts_per_step)]
    inputs = policy.collate([policy.encode(s.messages) for s in prompts])
    settings = GenerationSettings(
        ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k, min_new_tokens=ro.min_new_tokens
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(cfg.seed)
    sync()
    t0 = time.perf_counter()
    _, rows, stats = tree_generate(policy, model, inputs, ro.tree, settings, device, group_size=ro.group_size)
    sync()
    tree_s = time.perf_counter() - t0
    per_group = max(1, round(len(rows) / len(prompts)))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    gen = HFGenerateEngine(policy).generate(model, inputs, settings, device=device, num_samples=per_group)
    sync()
    ind_s = time.perf_counter() - t0
    tree_tokens = int(stats["decoded_tokens"])
    ind_tokens = int(gen.mask.sum())
    return {
        "method": ro.tree["method"],
        "prompts": len(prompts),
        "leaves": len(rows),
        "independent_rows": int(gen.mask.shape[0]),
        "tree_tokens": tree_tokens,
        "independent_tokens": ind_tokens,
        "token_ratio": round(tree_tokens / max(ind_tokens, 1), 4),
        "tree_s": round(tree_s, 4),
        "independent_s": round(ind_s, 4),
        "leaf_tokens": int(stats["leaf_tokens"]),
    }
