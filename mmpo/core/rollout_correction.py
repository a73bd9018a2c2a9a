"""Rollout importance sampling: correct for an engine whose sampling distribution differs from
the trainer's (vLLM kernels, bf16, a stale weight copy).

The per-token ratio ``rho = pi_old / pi_rollout`` (trainer's log-prob of the sampled token vs
the engine's) reweights the policy-gradient loss. ``token_tis`` truncates it at C (truncated IS,
as verl's ``tis_imp_ratio_cap`` and TRL's ``vllm_importance_sampling_cap``); ``token_mis`` drops
the tokens whose ratio exceeds C (masked IS).
"""

from __future__ import annotations

import torch

MODES = ("none", "token_tis", "token_mis")


def rollout_is_weights(
    logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, mode: str, cap: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token loss weights ``[N, T]`` and diagnostics.

    logp_old, logp_rollout, mask: ``[N, T]``. Metrics (means over valid tokens):
    ``rollout/logprob_abs_diff`` = mean |logp_old - logp_rollout|, ``rollout/is_ratio_mean``,
    and for ``token_mis`` ``rollout/is_masked_frac``. ``mode='none'`` gives weights of 1.
    """
    if mode not in MODES:
        raise ValueError(f"unknown rollout IS mode '{mode}'; valid: {', '.join(MODES)}")
    m = mask.to(logp_old.dtype)
    n_tok = m.sum().clamp(min=1.0)
    diff = (logp_old - logp_rollout).detach()
    ratio = diff.clamp(max=20.0).exp()
    metrics = {
        "rollout/logprob_abs_diff": float((diff.abs() * m).sum() / n_tok),
        "rollout/is_ratio_mean": float((ratio * m).sum() / n_tok),
    }
    if mode == "token_tis":
        return ratio.clamp(max=cap), metrics
    if mode == "token_mis":
        keep = (ratio <= cap).to(logp_old.dtype)
        metrics["rollout/is_masked_frac"] = float(((1.0 - keep) * m).sum() / n_tok)
        return keep, metrics
    return torch.ones_like(ratio), metrics
