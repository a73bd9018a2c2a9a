"""Group / sample filters, registered in ``GROUP_FILTERS`` (DAPO arXiv 2503.14476, CPPO 2503.22342,
LSPO 2510.01459, D3S 2509.22115, RIPT-VLA 2505.17016).

Signatures differ per entry (each docstring gives shapes); all are pure functions of tensors,
lists and (for ``ript_skip``) a persisted state. Masks are BoolTensors, True = keep.

=========================== ===============================================================
``dynamic``                 ``(metric [N], group_ids [N], *, lo=None, hi=None) -> keep [N]``
``overlong_filter``         ``(mask [N, T], *, truncated [N] | lengths [N] + max_len) -> mask [N, T]``
``soft_overlong_punishment`` ``(lengths [N], *, max_len, cache_len, penalty=1.0) -> delta [N]``
``cppo_prune``              ``(advantages [N], group_ids [N], *, prune_ratio) -> keep [N]``
``ript_skip``               ``(context_keys list[str] (M), *, state, rollouts_per_context) -> run [M]``
``lspo``                    ``(lengths [N], group_ids [N], *, low_pct=30, high_pct=70, max_len=None) -> keep [N]``
``d3s``                     ``(advantages [N] | [N, T], entropy [N, T], mask [N, T], *, progress, ...)
                            -> (sample_keep [N], token_mask [N, T])``
=========================== ===============================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from mmpo.core._tensor import as_float, check_shapes, group_index, group_mean_std, group_sum
from mmpo.core.registry import Registry
from mmpo.errors import ConfigError

GROUP_FILTERS: Registry[Callable[..., Any]] = Registry("group filter")


def _stateless(fn):
    fn.state_cls = None
    return fn


@GROUP_FILTERS.register("dynamic")
@_stateless
def dynamic(metric: Tensor, group_ids: Tensor, *, lo: float | None = None, hi: float | None = None) -> Tensor:
    """DAPO dynamic sampling: keep the samples of groups that carry a learning signal.

    Default (verl DAPO ``filter_groups``): keep a group when its ``metric`` values (e.g. acc) are
    not all equal; one-sample groups are kept, as verl. ARES variant: pass ``lo`` and/or ``hi``
    to keep groups whose mean metric lies strictly in ``(lo, hi)`` (ARES uses 0.01, 0.99).

    metric [N], group_ids [N] -> keep [N] bool
    """
    metric = as_float(metric).detach()
    check_shapes("group_ids", group_ids, tuple(metric.shape))
    inv, g = group_index(group_ids.to(metric.device))
    if lo is not None or hi is not None:
        mean, _, _ = group_mean_std(metric, inv, g)
        keep = torch.ones(g, dtype=torch.bool, device=metric.device)
        if lo is not None:
            keep &= mean > lo
        if hi is not None:
            keep &= mean < hi
        return keep[inv]
    gmax = torch.full((g,), -math.inf, device=metric.device).scatter_reduce(0, inv, metric, "amax")
    gmin = torch.full((g,), math.inf, device=metric.device).scatter_reduce(0, inv, metric, "amin")
    count = group_sum(torch.ones_like(metric), inv, g)
    return ((gmax > gmin) | (count < 2))[inv]


@GROUP_FILTERS.register("overlong_filter")
@_stateless
def overlong_filter(
    mask: Tensor,
    *,
    truncated: Tensor | None = None,
    lengths: Tensor | None = None,
    max_len: int | None = None,
) -> Tensor:
    """DAPO overlong filtering: zero the loss mask of truncated completions.

    Give ``truncated [N]`` (bool, hit the length limit without EOS) or ``lengths [N]`` and
    ``max_len`` (truncated = lengths >= max_len). mask [N, T] -> mask [N, T] bool.
    """
    if truncated is None:
        if lengths is None or max_len is None:
            raise ConfigError("overlong_filter needs truncated=[N] or lengths=[N] with max_len")
        truncated = lengths >= max_len
    check_shapes("truncated", truncated, (mask.shape[0],))
    return mask.bool() & ~truncated.bool().to(mask.device)[:, None]


@GROUP_FILTERS.register("soft_overlong_punishment")
@_stateless
def soft_overlong_punishment(lengths: Tensor, *, max_len: int, cache_len: int, penalty: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment (verl ``reward_manager/dapo.py``): reward delta to add.

    ``delta = min(-(len - (max_len - cache_len)) / cache_len * penalty, 0)``: 0 up to
    ``max_len - cache_len``, then linear down to ``-penalty`` at ``max_len`` (DAPO: 20480 / 4096).

    lengths [N] (response lengths in tokens) -> delta [N] float
    """
    if cache_len <= 0 or cache_len > max_len:
        raise ConfigError(f"soft_overlong_punishment: need 0 < cache_len <= max_len, got {cache_len}, {max_len}")
    exceed = as_float(lengths) - (max_len - cache_len)
    return torch.clamp(-exceed / cache_len * penalty, max=0.0)


@GROUP_FILTERS.register("cppo_prune")
@_stateless
def cppo_prune(advantages: Tensor, group_ids: Tensor, *, prune_ratio: float) -> Tensor:
    """CPPO completion pruning: per group keep the ``k = floor(G (1 - P))`` samples with largest |A|.

    Ties go to the earlier sample. advantages [N], group_ids [N] -> keep [N] bool
    """
    if not 0.0 <= prune_ratio < 1.0:
        raise ConfigError(f"cppo_prune: prune_ratio must be in [0, 1), got {prune_ratio}")
    adv = as_float(advantages).detach()
    check_shapes("group_ids", group_ids, tuple(adv.shape))
    inv, g = group_index(group_ids.to(adv.device))
    keep = torch.zeros_like(adv, dtype=torch.bool)
    for j in range(g):
        idx = (inv == j).nonzero().flatten()
        k = int(math.floor(idx.numel() * (1.0 - prune_ratio) + 1e-9))
        order = torch.sort(adv[idx].abs(), descending=True, stable=True).indices
        keep[idx[order[:k]]] = True
    return keep


@dataclass
class RiptSkipState:
    """RIPT-VLA rollout stats: per context key, its success history and consecutive skip count."""

    stats: dict[str, list[int]] = field(default_factory=dict)
    skip_cnt: dict[str, int] = field(default_factory=dict)

    def record(self, key: str, successes: list[int] | Tensor) -> None:
        """Append the K binary outcomes of the rollouts just run for ``key``."""
        vals = successes.tolist() if isinstance(successes, Tensor) else list(successes)
        self.stats.setdefault(str(key), []).extend(int(bool(v)) for v in vals)
        self.skip_cnt.setdefault(str(key), 0)

    def state_dict(self) -> dict[str, Any]:
        return {"stats": {k: list(v) for k, v in self.stats.items()}, "skip_cnt": dict(self.skip_cnt)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.stats = {str(k): [int(x) for x in v] for k, v in d.get("stats", {}).items()}
        self.skip_cnt = {str(k): int(v) for k, v in d.get("skip_cnt", {}).items()}


@GROUP_FILTERS.register("ript_skip")
def ript_skip(
    context_keys: list[str],
    *,
    state: RiptSkipState | None = None,
    rollouts_per_context: int,
    threshold: int = 3,
) -> Tensor:
    """RIPT-VLA context skipping (``rollout_generator.py``), before rollouts are drawn.

    For each candidate key in order: if its latest ``rollouts_per_context`` recorded outcomes are
    all successes, skip it (False) and count the skip; after more than ``threshold`` skips its
    history is dropped so it is tried again later. Unseen keys start an empty history. Run the
    kept contexts, then call ``state.record(key, successes)``; drop contexts whose K outcomes
    are all equal with ``dynamic``. Unlike the code, an empty history never skips.

    context_keys (M) -> run [M] bool
    """
    state = RiptSkipState() if state is None else state
    run = []
    for raw in context_keys:
        key = str(raw)
        if key in state.stats:
            recent = state.stats[key][-rollouts_per_context:]
            if recent and all(s == 1 for s in recent):
                state.skip_cnt[key] = state.skip_cnt.get(key, 0) + 1
                if state.skip_cnt[key] > threshold:
                    del state.stats[key]
                run.append(False)
                continue
        else:
            state.stats[key] = []
            state.skip_cnt[key] = 0
        run.append(True)
    return torch.tensor(run, dtype=torch.bool)


ript_skip.state_cls = RiptSkipState


@GROUP_FILTERS.register("lspo")
@_stateless
def lspo(
    lengths: Tensor,
    group_ids: Tensor,
    *,
    low_pct: float = 30.0,
    high_pct: float = 70.0,
    max_len: float | None = None,
) -> Tensor:
    """LSPO length-aware selection: keep prompts with short or long mean responses.

    ``L(q)`` = mean response length of each group; thresholds are the ``low_pct`` / ``high_pct``
    percentiles of the G values of L(q) in this batch (linear interpolation, as ``np.percentile``).
    Keep a group when ``L(q) < P_low`` or ``P_high < L(q)`` (and ``L(q) < max_len`` when given,
    dropping prompts whose responses run to the cap). Defaults 30/70 are [UNVERIFIED].

    lengths [N], group_ids [N] -> keep [N] bool
    """
    lengths = as_float(lengths).detach()
    check_shapes("group_ids", group_ids, tuple(lengths.shape))
    inv, g = group_index(group_ids.to(lengths.device))
    mean, _, _ = group_mean_std(lengths, inv, g)
    q = torch.tensor([low_pct / 100.0, high_pct / 100.0], dtype=mean.dtype, device=mean.device)
    p_low, p_high = torch.quantile(mean, q, interpolation="linear")
    keep = (mean < p_low) | (mean > p_high)
    if max_len is not None:
        keep &= mean < max_len
    return keep[inv]


def _linear(p: float, start: float, end: float) -> float:
    p = min(max(float(p), 0.0), 1.0)
    return (1.0 - p) * start + p * end


def _max_variance_subset(a: Tensor, n: int) -> Tensor:
    """Indices of ``n`` values of ``a`` with the largest population variance.

    The optimum is always the k largest plus the n-k smallest for some k; all k are tried and
    the most balanced k wins ties.
    """
    order = torch.sort(a, stable=True).indices
    total = a.numel()
    best, best_var = None, -math.inf
    for k in sorted(range(n + 1), key=lambda k: (abs(2 * k - n), k)):
        idx = torch.cat([order[: n - k], order[total - k :]]) if k else order[:n]
        var = float(a[idx].var(unbiased=False)) if n > 1 else 0.0
        if var > best_var + 1e-12:
            best, best_var = idx, var
    return best


@GROUP_FILTERS.register("d3s")
@_stateless
def d3s(
    advantages: Tensor,
    entropy: Tensor,
    mask: Tensor,
    *,
    progress: float,
    sample_frac_init: float = 0.5,
    sample_frac_final: float = 1.0,
    token_frac_init: float = 0.2,
    token_frac_final: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """D3S dynamic dual-level down-sampling (sample level, then token level).

    Schedule: ``frac(p) = (1-p) init + p final`` with ``progress`` p in [0, 1].
    Sample level: keep ``n = max(1, round(sample_frac N))`` rollouts (across the whole batch,
    advantages used as given) that maximise Var(A): the most positive and most negative ones.
    Token level: among valid tokens of kept rollouts keep the top ``max(1, round(token_frac M))``
    (M = their count) by ``|A_it| H_it``. Fraction defaults are [UNVERIFIED].

    advantages [N] or [N, T] (per-sample score = masked mean over tokens), entropy [N, T],
    mask [N, T] -> (sample_keep [N] bool, token_mask [N, T] bool)
    """
    mask = mask.bool()
    check_shapes("entropy", entropy, tuple(mask.shape))
    adv = as_float(advantages).detach()
    adv_tok = adv[:, None].expand(mask.shape) if adv.dim() == 1 else adv
    check_shapes("advantages", adv_tok, tuple(mask.shape))
    n_total = mask.shape[0]
    per_sample = torch.where(mask, adv_tok, torch.zeros_like(adv_tok)).sum(-1) / mask.sum(-1).clamp_min(1)
    n_keep = min(n_total, max(1, round(_linear(progress, sample_frac_init, sample_frac_final) * n_total)))
    sample_keep = torch.zeros(n_total, dtype=torch.bool, device=mask.device)
    if n_total:
        sample_keep[_max_variance_subset(per_sample, n_keep)] = True
    candidates = mask & sample_keep[:, None]
    m = int(candidates.sum())
    token_mask = torch.zeros_like(mask)
    if m:
        k = min(m, max(1, round(_linear(progress, token_frac_init, token_frac_final) * m)))
        score = (adv_tok.abs() * entropy.detach().to(torch.float32)).flatten()
        flat_idx = candidates.flatten().nonzero().flatten()
        top = torch.sort(score[flat_idx], descending=True, stable=True).indices[:k]
        token_mask.view(-1)[flat_idx[top]] = True
    return sample_keep, token_mask
