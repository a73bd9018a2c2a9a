"""SRFT, single-stage SFT + RL with entropy-aware weights (Fu et al., arXiv 2506.19767). See
``docs/algorithms.md``.

No official code exists; the formulas follow a third-party transcription of the paper's equations.
``L = L_SFT^demo + L_RL^demo + L_RL^self``:

- demonstration rows (``demo``): ``w_SFT (-log pi)`` with ``w_SFT = c_sft exp(-H)``, plus the clipped
  surrogate ``max(-A r, -A clip(r, 1 - eps, 1 + eps))`` with the demo's group advantage (the trainer
  puts the demonstration into its prompt's group, reward 1);
- self-generated rows, split by reward and with no baseline or advantage: positive
  (``reward > r_thr``) ``w_RL (-log pi)`` with ``w_RL = c_rl exp(w_rl_sign H)``; negative ``+log pi``.

``H`` is the current policy's entropy, detached (the weights never carry gradient).
Design choices, not the paper's method: ``w_rl_sign`` (the transcription's prose implies
``exp(+H)``, the default, its formula line shows ``exp(-H)``), ``entropy_scope`` (``"batch_mean"``:
one ``H`` = mean over the tokens the weight multiplies, demo tokens for ``w_SFT`` and positive-rollout
tokens for ``w_RL``; ``"token"``: per-token weights), the demo's behaviour probability (``logp_old`` of
the demo tokens as given by the trainer), ``eps = 0.2`` and the aggregation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmpo.core._tensor import as_float, check_shapes, masked_mean
from mmpo.core.losses import POLICY_LOSSES, _clamped_log_ratio, _finish, _metrics, _prepare
from mmpo.errors import ConfigError

ENTROPY_SCOPES = ("batch_mean", "token")


def srft_weights(
    entropy_mean: Tensor | float, c_sft: float = 0.5, c_rl: float = 0.1, w_rl_sign: int = 1
) -> tuple[Tensor | float, Tensor | float]:
    """SRFT weights ``(w_SFT, w_RL) = (c_sft exp(-H), c_rl exp(w_rl_sign H))`` for a detached entropy.

    ``entropy_mean``: a float (-> floats) or a tensor of any shape (-> tensors of that shape).
    ``H = ln 2`` gives ``(0.25, 0.2)`` (``w_rl_sign=-1``: ``(0.25, 0.05)``).
    """
    if w_rl_sign not in (1, -1):
        raise ConfigError(f"srft w_rl_sign must be +1 or -1, got {w_rl_sign!r}")
    if isinstance(entropy_mean, Tensor):
        h = entropy_mean.detach().to(torch.float32)
        return c_sft * torch.exp(-h), c_rl * torch.exp(w_rl_sign * h)
    h = float(entropy_mean)
    return c_sft * math.exp(-h), c_rl * math.exp(w_rl_sign * h)


def _parts(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    demo: Tensor,
    rewards: Tensor,
    entropy: Tensor,
    c_sft: float,
    c_rl: float,
    w_rl_sign: int,
    eps: float,
    r_thr: float,
    entropy_scope: str,
) -> dict[str, Tensor]:
    """Per-token pieces ``[N, T]`` (masked cells 0) and the token masks of each term."""
    if entropy_scope not in ENTROPY_SCOPES:
        raise ConfigError(f"srft entropy_scope must be one of {', '.join(ENTROPY_SCOPES)}, got {entropy_scope!r}")
    if eps <= 0:
        raise ConfigError(f"srft eps must be > 0, got {eps}")
    logp, old, adv, mask = _prepare(logp, logp_old, advantages, mask)
    n, t = logp.shape
    check_shapes("demo", demo, (n,))
    check_shapes("rewards", rewards, (n,))
    check_shapes("entropy", entropy, (n, t))
    is_demo = demo.to(logp.device).bool()
    positive = (as_float(rewards).detach().to(logp.device) > r_thr) & ~is_demo
    demo_tok = is_demo[:, None] & mask
    self_tok = ~is_demo[:, None] & mask
    pos_tok = positive[:, None] & mask
    neg_tok = self_tok & ~pos_tok
    h = torch.where(mask, as_float(entropy).detach().to(logp.device, torch.float32), torch.zeros_like(logp))
    if entropy_scope == "batch_mean":
        w_sft, _ = srft_weights(masked_mean(h, demo_tok), c_sft, c_rl, w_rl_sign)
        _, w_rl = srft_weights(masked_mean(h, pos_tok), c_sft, c_rl, w_rl_sign)
    else:
        w_sft, w_rl = srft_weights(h, c_sft, c_rl, w_rl_sign)
    log_ratio = _clamped_log_ratio(logp, old)
    ratio = torch.exp(log_ratio)
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
    zeros = torch.zeros_like(logp)
    w_sft_tok = torch.broadcast_to(w_sft, logp.shape)
    w_rl_tok = torch.broadcast_to(w_rl, logp.shape)
    return {
        "sft": torch.where(demo_tok, -w_sft_tok * logp, zeros),
        "surrogate": torch.where(demo_tok, surrogate, zeros),
        "self": torch.where(pos_tok, -w_rl_tok * logp, torch.where(neg_tok, logp, zeros)),
        "ratio": ratio,
        "log_ratio": log_ratio,
        "adv": adv,
        "mask": mask,
        "demo_tok": demo_tok,
        "self_tok": self_tok,
        "pos_tok": pos_tok,
        "w_sft": w_sft_tok,
        "w_rl": w_rl_tok,
    }


def srft_terms(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    demo: Tensor,
    rewards: Tensor,
    entropy: Tensor,
    c_sft: float = 0.5,
    c_rl: float = 0.1,
    w_rl_sign: int = 1,
    eps: float = 0.2,
    r_thr: float = 0.0,
    entropy_scope: str = "batch_mean",
) -> dict[str, Tensor]:
    """The three SRFT terms as separate scalars (with grad), each a mean over its own tokens (0 if none).

    ``sft_demo`` = mean over demo tokens of ``w_SFT (-log pi)``; ``rl_demo`` = mean over demo tokens of
    the clipped surrogate; ``rl_self`` = token mean over all self-rollout tokens of ``w_RL (-log pi)``
    (positive rows) and ``+log pi`` (negative rows). Shapes and options as :func:`srft`.
    """
    p = _parts(
        logp, logp_old, advantages, mask, demo, rewards, entropy, c_sft, c_rl, w_rl_sign, eps, r_thr, entropy_scope
    )
    return {
        "sft_demo": masked_mean(p["sft"], p["demo_tok"]),
        "rl_demo": masked_mean(p["surrogate"], p["demo_tok"]),
        "rl_self": masked_mean(p["self"], p["self_tok"]),
    }


@POLICY_LOSSES.register("srft")
def srft(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    demo: Tensor,
    rewards: Tensor,
    entropy: Tensor,
    c_sft: float = 0.5,
    c_rl: float = 0.1,
    w_rl_sign: int = 1,
    eps: float = 0.2,
    r_thr: float = 0.0,
    entropy_scope: str = "batch_mean",
) -> tuple[Tensor, dict[str, float]]:
    """SRFT per-token loss (arXiv 2506.19767, see module doc) -> ``(loss [N, T], metrics)``.

    ``logp, logp_old, mask [N, T]``; ``advantages [N]`` or ``[N, T]`` (used on demo rows only);
    ``demo [N]`` bool (row is a demonstration); ``rewards [N]`` (self rows: positive when
    ``> r_thr``); ``entropy [N, T]`` (current forward, detached). Demo cells:
    ``w_SFT (-logp) + max(-A r, -A clip(r, 1 - eps, 1 + eps))``; positive self cells ``w_RL (-logp)``;
    negative self cells ``+logp``. Aggregated with token-mean this is one mean over all tokens of the
    micro-batch (each term weighted by its token share); :func:`srft_terms` gives the three per-term
    means. Metrics: ``w_sft`` / ``w_rl`` (mean weight over demo / positive tokens), ``demo_token_frac``,
    ``pos_token_frac`` and clip statistics over the demo tokens.
    """
    p = _parts(
        logp, logp_old, advantages, mask, demo, rewards, entropy, c_sft, c_rl, w_rl_sign, eps, r_thr, entropy_scope
    )
    mask, demo_tok, ratio, adv = p["mask"], p["demo_tok"], p["ratio"], p["adv"]
    loss = p["sft"] + p["surrogate"] + p["self"]
    low = (adv < 0) & (ratio < 1 - eps)
    high = (adv > 0) & (ratio > 1 + eps)
    metrics = _metrics(ratio, p["log_ratio"], demo_tok, clip_frac_low=low, clip_frac_high=high)
    metrics.update(
        w_sft=float(masked_mean(p["w_sft"], demo_tok)) if bool(demo_tok.any()) else c_sft,
        w_rl=float(masked_mean(p["w_rl"], p["pos_tok"])) if bool(p["pos_tok"].any()) else c_rl,
        demo_token_frac=float(masked_mean(demo_tok.float(), mask)),
        pos_token_frac=float(masked_mean(p["pos_tok"].float(), mask)),
    )
    return _finish(loss, mask), metrics


srft.inputs = ("demo", "rewards", "entropy")
srft.state_cls = None

__all__ = ["srft", "srft_terms", "srft_weights"]
