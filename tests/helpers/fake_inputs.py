"""Valid random tensors for the inputs a core entry declares (``fn.inputs``; see
mmpo.trainers.method_inputs), for tests that call every registry entry."""

from __future__ import annotations

import torch


def fake_inputs(names, rewards: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, seed: int = 1) -> dict:
    """``{name: tensor}`` for ``names``, shaped for ``N = len(rewards)`` rows of ``T`` units."""
    g = torch.Generator().manual_seed(seed)
    n, t = mask.shape
    topk = torch.log_softmax(torch.randn(n, t, 3, generator=g), -1).sort(-1, descending=True).values
    make = {
        "mask": lambda: mask.bool(),
        "lengths": lambda: mask.sum(1).float(),
        "entropy": lambda: torch.rand(n, t, generator=g) * 2 + 0.05,
        "seq_logp": lambda: (logp.detach() * mask).sum(1),
        "cluster_ids": lambda: torch.randint(-1, 3, (n,), generator=g),
        "judge_scores": lambda: torch.rand(n, generator=g),
        "components": lambda: torch.randint(0, 2, (n, 2), generator=g).float(),
        "demo_reward": lambda: torch.rand(n, generator=g),
        "data_hardness": lambda: torch.rand(n, generator=g),
        "mode": lambda: torch.randint(0, 2, (n,), generator=g),
        "segment_mask": lambda: mask.bool() & (torch.arange(t) < 2),
        "topk_logp": lambda: topk,
        "old_topk_logp": lambda: topk + 0.05 * torch.randn(n, t, 3, generator=g),
        "is_top1": lambda: torch.rand(n, t, generator=g) > 0.5,
        "rewards": lambda: rewards,
        "demo": lambda: torch.arange(n) % 4 == 0,
        "token_node": lambda: torch.where(mask.bool(), torch.arange(n)[:, None].expand(n, t), -1),
        "row_leaf": lambda: torch.arange(n),
    }
    return {k: make[k]() for k in sorted(set(names))}


def declared(fn, options: dict | None = None) -> tuple[str, ...]:
    """Every input ``fn`` reads with ``options`` (required and optional)."""
    need = getattr(fn, "inputs", ())
    need = need(dict(options or {})) if callable(need) else need
    return (*need, *getattr(fn, "optional_inputs", ()))
