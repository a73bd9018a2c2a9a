"""Advantage estimators that look at the answers of a group, registered in ``ADVANTAGES``:
``seed_grpo`` (SEED-GRPO, arXiv 2505.12346) and ``copo`` (COPO, arXiv 2508.04138).

Answer equivalence is decided outside the tensor core (on decoded text): the trainer passes
``cluster_ids [N]`` (long, the answer cluster of each row within its group; a negative id, -1 by
convention, means "no extractable answer" and makes the row its own singleton cluster). Cluster
ids only need to be consistent within a group. See ``docs/algorithms.md``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mmpo.core._tensor import check_shapes, group_index, group_mean_std, group_sum
from mmpo.core.advantages import ADVANTAGES, _prepare, grpo
from mmpo.errors import ConfigError

_PROBABILITIES = ("likelihood", "count")
_ESTIMATORS = ("cluster_mean", "rao")
_F_FAMILIES = ("linear", "exp", "focal", "inverse")
_BASES = ("drgrpo", "grpo")


def _choice(fn_name: str, option: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{fn_name}: {option} must be one of {', '.join(choices)}, got {value!r}")


def _clusters(cluster_ids: Tensor, inverse: Tensor) -> tuple[Tensor, int, Tensor]:
    """Number the (group, answer) pairs: ``(cluster [N] in 0..C-1, C, cluster_group [C])``.

    Rows with a negative cluster id each get a cluster of their own.
    """
    n = cluster_ids.numel()
    rows = torch.arange(n, device=cluster_ids.device)
    key = torch.where(cluster_ids >= 0, cluster_ids, -(rows + 1))
    pairs = torch.stack([inverse, key], dim=1)
    _, cluster = torch.unique(pairs, dim=0, return_inverse=True)
    num = int(cluster.max()) + 1 if n else 0
    cluster_group = torch.zeros(num, dtype=inverse.dtype, device=inverse.device).scatter_(0, cluster, inverse)
    return cluster, num, cluster_group


def _segment_logsumexp(x: Tensor, index: Tensor, num: int) -> Tensor:
    """``out[k] = log sum_{i: index[i]=k} exp(x[i])`` for finite ``x`` -> [num]."""
    peak = torch.full((num,), -math.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, index, x, "amax")
    total = torch.zeros(num, dtype=x.dtype, device=x.device).index_add(0, index, torch.exp(x - peak[index]))
    return peak + torch.log(total)


def semantic_entropy(
    cluster_ids: Tensor,
    group_ids: Tensor,
    *,
    seq_logp: Tensor | None = None,
    lengths: Tensor | None = None,
    probability: str = "count",
    length_normalize: bool = True,
    se_estimator: str = "cluster_mean",
) -> Tensor:
    """Semantic entropy of each group's answer clusters (SEED-GRPO, arXiv 2505.12346; Kuhn et al.).

    Cluster probabilities p(C_k), per group:

    - ``count``: ``|C_k| / G``.
    - ``likelihood``: ``p(C_k) ∝ sum_{i in C_k} pi_old(o_i | q)``, in log space from
      ``l_i = seq_logp_i`` (``/ max(lengths_i, 1)`` when ``length_normalize``):
      ``log p(C_k) = logsumexp_{i in C_k} l_i - logsumexp_{i in group} l_i``. A group with any
      non-finite ``l_i`` (NaN, -inf, ...) uses ``count`` instead.

    Estimators over the K clusters of a group: ``cluster_mean`` (the paper's Monte-Carlo form)
    ``SE = -(1/K) sum_k log p(C_k)``; ``rao`` ``SE = -sum_k p(C_k) log p(C_k)``.

    cluster_ids [N] (negative = no answer, singleton cluster), group_ids [N], seq_logp [N],
    lengths [N] -> SE [N] (every row holds its group's value; float32 unless seq_logp is float64)
    """
    _choice("semantic_entropy", "probability", probability, _PROBABILITIES)
    _choice("semantic_entropy", "se_estimator", se_estimator, _ESTIMATORS)
    check_shapes("cluster_ids", cluster_ids, tuple(group_ids.shape))
    device = cluster_ids.device
    inv, g = group_index(group_ids.to(device))
    cluster, c, cluster_group = _clusters(cluster_ids.long(), inv)
    work = torch.float64
    size_c = group_sum(torch.ones(inv.numel(), dtype=work, device=device), cluster, c)
    size_g = group_sum(torch.ones(inv.numel(), dtype=work, device=device), inv, g)
    log_p = torch.log(size_c) - torch.log(size_g[cluster_group])
    out_dtype = torch.float32
    if probability == "likelihood":
        if seq_logp is None:
            raise ConfigError("semantic_entropy: probability='likelihood' needs seq_logp [N]; or use 'count'")
        check_shapes("seq_logp", seq_logp, tuple(group_ids.shape))
        out_dtype = seq_logp.dtype if seq_logp.dtype == torch.float64 else torch.float32
        ll = seq_logp.detach().to(device=device, dtype=work)
        if length_normalize:
            if lengths is None:
                raise ConfigError("semantic_entropy: length_normalize=True needs lengths [N]; or set it False")
            check_shapes("lengths", lengths, tuple(group_ids.shape))
            ll = ll / lengths.detach().to(device=device, dtype=work).clamp_min(1.0)
        finite = torch.isfinite(ll)
        bad_group = group_sum((~finite).to(work), inv, g) > 0
        ll = torch.where(finite, ll, torch.zeros_like(ll))
        log_p_lik = _segment_logsumexp(ll, cluster, c) - _segment_logsumexp(ll, inv, g)[cluster_group]
        log_p = torch.where(bad_group[cluster_group], log_p, log_p_lik)
    if se_estimator == "rao":
        se = -group_sum(torch.exp(log_p) * log_p, cluster_group, g)
    else:
        k = group_sum(torch.ones_like(log_p), cluster_group, g)
        se = -group_sum(log_p, cluster_group, g) / k
    return se[inv].to(out_dtype)


def _seed_grpo_inputs(options: dict[str, Any]) -> tuple[str, ...]:
    if options.get("probability", "likelihood") != "likelihood":
        return ("cluster_ids",)
    if options.get("length_normalize", True):
        return ("cluster_ids", "seq_logp", "lengths")
    return ("cluster_ids", "seq_logp")


@ADVANTAGES.register("seed_grpo")
def seed_grpo(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    cluster_ids: Tensor,
    seq_logp: Tensor | None = None,
    lengths: Tensor | None = None,
    alpha: float = 0.5,
    base: str = "drgrpo",
    probability: str = "likelihood",
    length_normalize: bool = True,
    se_estimator: str = "cluster_mean",
    f: str = "linear",
    gamma: float = 2.0,
    eps: float = 1e-6,
) -> Tensor:
    """SEED-GRPO: scale each group's advantages by its semantic entropy (arXiv 2505.12346).

    ``A_i`` = base advantage (``drgrpo``: ``r_i - mean_g r``, the paper's; ``grpo``: the z-score
    with unbiased std and ``eps``); ``SE`` = :func:`semantic_entropy` of the group's answer
    clusters; ``x = clamp(alpha * SE / log G, 0, 1)`` with G the group size (``x = 0`` when
    G = 1); ``A'_i = A_i * f(x)``.

    ``f``: ``linear`` ``1 - x`` (default); ``exp`` ``exp(-x)``; ``focal`` ``(1 - x) ** gamma``;
    ``inverse`` ``1 / (1 + x)`` (a third-party form ``1 / (1 + alpha SE / log G)``, here on the
    clamped x). The ``exp`` / ``focal`` forms and the default ``alpha`` = 0.5 are [UNVERIFIED]
    design choices; the paper names the linear / exponential / focal families. ``probability``
    ``likelihood`` (the paper's; needs ``seq_logp`` and, when ``length_normalize``, ``lengths``)
    or ``count``; groups whose log-likelihoods are not all finite use ``count``.

    rewards [N], group_ids [N], cluster_ids [N] long (-1 = no answer), seq_logp [N], lengths [N]
    -> advantages [N]
    """
    _choice("seed_grpo", "base", base, _BASES)
    _choice("seed_grpo", "f", f, _F_FAMILIES)
    _choice("seed_grpo", "probability", probability, _PROBABILITIES)
    _choice("seed_grpo", "se_estimator", se_estimator, _ESTIMATORS)
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ConfigError(f"seed_grpo: alpha must be a finite number >= 0, got {alpha!r}")
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ConfigError(f"seed_grpo: gamma must be a finite number >= 0, got {gamma!r}")
    rewards, inv, g = _prepare(rewards, group_ids)
    group_ids = group_ids.to(rewards.device)
    adv = grpo(rewards, group_ids, eps=eps, norm_by_std=(base == "grpo"))
    se = semantic_entropy(
        cluster_ids.to(rewards.device),
        group_ids,
        seq_logp=seq_logp if probability == "likelihood" else None,
        lengths=lengths,
        probability=probability,
        length_normalize=length_normalize,
        se_estimator=se_estimator,
    ).to(rewards.dtype)
    size = group_sum(torch.ones_like(rewards), inv, g)[inv]
    se_max = torch.log(size.clamp_min(2.0))
    x = torch.where(size > 1, (alpha * se / se_max).clamp(0.0, 1.0), torch.zeros_like(se))
    if f == "linear":
        scale = 1.0 - x
    elif f == "exp":
        scale = torch.exp(-x)
    elif f == "focal":
        scale = (1.0 - x) ** gamma
    else:
        scale = 1.0 / (1.0 + x)
    return adv * scale


seed_grpo.state_cls = None
seed_grpo.inputs = _seed_grpo_inputs
seed_grpo.input_names = ("cluster_ids", "seq_logp", "lengths")  # every input it may read


# --------------------------------------------------------------------------- copo
def _copo_inputs(options: dict[str, Any]) -> tuple[str, ...]:
    return ("cluster_ids",) if options.get("global_reward", "mean_correct") == "majority" else ()


def _majority_reward(rewards: Tensor, inv: Tensor, g: int, cluster_ids: Tensor, r_thr: float) -> Tensor:
    """Per group: share of the largest answer cluster, signed by its correctness -> [G].

    Ties go to a real answer over a no-answer row, then to the smallest cluster id; the cluster is
    correct when the mean reward of its rows is > r_thr.
    """
    cluster, c, cluster_group = _clusters(cluster_ids, inv)
    size_c = group_sum(torch.ones_like(rewards), cluster, c)
    mean_c = group_sum(rewards, cluster, c) / size_c
    size_g = group_sum(torch.ones_like(rewards), inv, g)
    first_row = torch.full((c,), inv.numel(), dtype=torch.long, device=inv.device).scatter_reduce(
        0, cluster, torch.arange(inv.numel(), device=inv.device), "amin"
    )
    out = torch.zeros(g, dtype=rewards.dtype, device=rewards.device)
    for j in range(g):
        ks = (cluster_group == j).nonzero().flatten().tolist()
        best = max(
            ks,
            key=lambda k: (
                float(size_c[k]),
                int(cluster_ids[first_row[k]]) >= 0,
                -int(cluster_ids[first_row[k]]),
            ),
        )
        share = size_c[best] / size_g[j]
        out[j] = share if float(mean_c[best]) > r_thr else -share
    return out


@ADVANTAGES.register("copo")
def copo(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    cluster_ids: Tensor | None = None,
    global_reward: str = "mean_correct",
    gate: str = "linear",
    kappa: float = 10.0,
    h0: float = 0.5,
    r_thr: float = 0.0,
    eps: float = 1e-6,
) -> Tensor:
    """COPO-style local/global advantage blend (after arXiv 2508.04138).

    **[UNVERIFIED] design.** Only the paper's abstract was available: a global reward based on
    outcome consistency gives signal to unanimous groups, and an entropy-based soft blend moves
    between the local (GRPO) and the global objective. Every formula below is this library's
    design choice consistent with that, not the paper's method; see ``docs/algorithms.md``.

    - Local: ``A_loc`` = GRPO z-score within the group, unbiased std, ``(r - mean) / (std + eps)``;
      0 for a singleton group or a group with std < eps.
    - Global reward per prompt ``R_q``: ``mean_correct`` = ``mean_i r_i`` (the fraction correct for
      {0, 1} rewards); ``majority`` = share of the largest answer cluster, + when that answer is
      correct (mean reward of its rows > ``r_thr``) and - otherwise (needs ``cluster_ids``).
    - Global: ``A_glob = (R_q - mean_B R) / (std_B R + eps)`` over the B prompts of the batch,
      population std; 0 for every prompt when std < eps (one prompt, or all R_q equal). Compute it
      on the whole rollout batch of a step, not per micro-batch.
    - Gate entropy ``H_q`` in [0, 1]: with ``cluster_ids`` the count-based cluster entropy
      ``-sum_k p_k log p_k / log G``; otherwise the Bernoulli entropy of the fraction with
      ``r > r_thr``, ``/ log 2``. ``H_q = 0`` when G = 1. Weight ``w = H_q`` (``linear``) or
      ``sigmoid(kappa (H_q - h0))``.
    - ``A_i = w A_loc_i + (1 - w) A_glob_q`` (the "advantage blend"). A blend of two PPO losses
      (one per advantage) is not offered; the two agree whenever neither branch is clipped.

    rewards [N], group_ids [N], cluster_ids [N] long (optional; -1 = no answer) -> advantages [N]
    """
    _choice("copo", "global_reward", global_reward, ("mean_correct", "majority"))
    _choice("copo", "gate", gate, ("linear", "sigmoid"))
    if not math.isfinite(kappa):
        raise ConfigError(f"copo: kappa must be finite, got {kappa!r}")
    if not math.isfinite(h0):
        raise ConfigError(f"copo: h0 must be finite, got {h0!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"copo: eps must be > 0, got {eps!r}")
    rewards, inv, g = _prepare(rewards, group_ids)
    if cluster_ids is not None:
        check_shapes("cluster_ids", cluster_ids, tuple(rewards.shape))
        cluster_ids = cluster_ids.to(rewards.device).long()
    elif global_reward == "majority":
        raise ConfigError("copo: global_reward='majority' needs cluster_ids [N]; or use 'mean_correct'")

    mean, std, count = group_mean_std(rewards, inv, g, unbiased=True)
    flat = (count < 2) | ~(std >= eps)
    a_loc = torch.where(flat[inv], torch.zeros_like(rewards), (rewards - mean[inv]) / (std[inv] + eps))

    if global_reward == "majority":
        big_r = _majority_reward(rewards, inv, g, cluster_ids, r_thr)
    else:
        big_r = mean
    b_std = big_r.std(unbiased=False)
    if g < 2 or not float(b_std) >= eps:
        a_glob = torch.zeros_like(big_r)
    else:
        a_glob = (big_r - big_r.mean()) / (b_std + eps)

    log_g = torch.log(count.clamp_min(2.0))
    if cluster_ids is not None:
        h = semantic_entropy(cluster_ids, inv, probability="count", se_estimator="rao").to(rewards.dtype)
        h = (h / log_g[inv]).clamp(0.0, 1.0)
        h = torch.where(count[inv] > 1, h, torch.zeros_like(h))
    else:
        p = group_sum((rewards > r_thr).to(rewards.dtype), inv, g) / count
        h = (-(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / math.log(2.0)).clamp(0.0, 1.0)[inv]
    w = h if gate == "linear" else torch.sigmoid(kappa * (h - h0))
    return w * a_loc + (1.0 - w) * a_glob[inv]


copo.state_cls = None
copo.inputs = _copo_inputs
copo.optional_inputs = ("cluster_ids",)
copo.input_names = ("cluster_ids",)  # every input it may read

__all__ = ["copo", "seed_grpo", "semantic_entropy"]
