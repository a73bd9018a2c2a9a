"""Token entropy helpers (ARES HWE, entropy-shaped rewards, D3S token selection).

All math runs in float32; results are float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def entropy_from_logprobs(logprobs: Tensor) -> Tensor:
    """``H = -sum_v p log p`` over the last dim of a full log-distribution ``[..., V]`` -> ``[...]``.

    Entries with p = 0 (log-prob -inf) contribute 0.
    """
    lp = logprobs.to(torch.float32)
    p = lp.exp()
    return -torch.where(p > 0, p * lp, torch.zeros_like(lp)).sum(-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last dim: ``logits [..., V] -> [...]``.

    Stable for large logits and for -inf (masked) entries: uses ``log_softmax`` in float32.
    """
    return entropy_from_logprobs(torch.log_softmax(logits.to(torch.float32), dim=-1))


def topk_entropy(topk_logprobs: Tensor) -> Tensor:
    """Entropy from the top-K log-probs with a tail bucket (ARES ``compute_entropy_from_logprobs``).

    ``topk_logprobs [..., K]`` (log-probs of the K most likely tokens under the full
    distribution) -> ``[...]``: ``H = -sum_k p_k log p_k - tail log(max(tail, 1e-12))`` with
    ``tail = max(0, 1 - sum_k p_k)`` (the tail term is 0 when tail = 0).
    """
    lp = topk_logprobs.to(torch.float32)
    p = lp.exp()
    head = -torch.where(p > 0, p * lp, torch.zeros_like(lp)).sum(-1)
    tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    tail_term = torch.where(tail > 0, tail * torch.log(tail.clamp_min(1e-12)), torch.zeros_like(tail))
    return head - tail_term


def window_entropy(H: Tensor, mask: Tensor, w: int = 4, include_current: bool = False) -> Tensor:
    """Mean entropy of the window following each token: ``H [N, T], mask [N, T] -> [N, T]``.

    ARES's code (``compute_reasoning_token_window_entropy``) averages the ``w`` tokens **after**
    position t: ``t+1 .. t+w`` (default). ``include_current=True`` gives the paper's window
    ``t .. t+w-1``. Only valid tokens (mask true) in the window are averaged; a window with
    fewer than ``w`` valid tokens averages the ones it has (0 when it has none). ARES only uses
    complete windows; select them with :func:`window_complete`. Positions where ``mask`` is
    false are 0.
    """
    if w < 1:
        raise ValueError(f"window size w must be >= 1, got {w}")
    h = torch.where(mask.bool(), H.to(torch.float32), torch.zeros_like(H, dtype=torch.float32))
    m = mask.to(torch.float32)
    sums, counts = _window_sums(h, w, include_current), _window_sums(m, w, include_current)
    out = sums / counts.clamp_min(1)
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def window_complete(mask: Tensor, w: int = 4, include_current: bool = False) -> Tensor:
    """Bool ``[N, T]``: token t is valid and all ``w`` tokens of its window are valid."""
    counts = _window_sums(mask.to(torch.float32), w, include_current)
    return mask.bool() & (counts >= w)


def _window_sums(x: Tensor, w: int, include_current: bool) -> Tensor:
    """``out[:, t] = sum x[:, s]`` over ``s in t+1..t+w`` (or ``t..t+w-1``), zero-padded at the end."""
    n, t = x.shape
    start = 0 if include_current else 1
    padded = torch.cat([x, x.new_zeros(n, w + 1)], dim=-1)
    return padded.unfold(-1, w, 1)[:, start : start + t, :].sum(-1)
