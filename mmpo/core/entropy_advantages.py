"""Entropy-weighted advantages: GTPO (token level) and GRPO-S (sequence level), Tan et al., arXiv 2508.04349.

Both shape the outcome reward with the entropy of the *old* policy (the old-logprob pass, detached) and
then z-score the shaped rewards. Registered in ``ADVANTAGES`` as ``gtpo`` and ``grpo_s`` (alias
``grpo_s_entropy``; unrelated to DR-IRL's difficulty-scaled "GRPO-S").

Status of the formulas: no official code exists. The shaping (Eq. 3, 5, 8, 9) and the separate
normalisation (Eq. 6) follow three independent re-implementations that cite the paper's equation numbers
and agree with each other (third-party code, not the authors'). Where they disagree, or where a choice
was ours, the option is marked [UNVERIFIED] in the function docstring. See ``docs/algorithms.md``.

Conventions shared by both functions:

- ``safe_div(a, b) = a / max(b, eps)`` (never ``a / (b + eps)``: the latter leaves ~1e-9 noise that a later
  z-score with a tiny std amplifies into visible advantages).
- z-score guard: ``z(x over S) = (x - mean_S) / std_S``, and 0 for every member of S when S is empty or
  ``std_S < 1e-6`` (with ``std="unb"`` a one-element set has no std and also gives 0).
- Arithmetic runs in float64; the result has the float dtype of ``rewards`` (float32 for int/bool rewards).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmpo.core._tensor import as_float, check_shapes, group_mean_std, group_sum
from mmpo.core.advantages import ADVANTAGES, _prepare, _stateless
from mmpo.errors import ConfigError

_STD_MODES = ("pop", "unb")
_NORM_MODES = ("separate", "joint")
_NORM_SCOPES = ("group", "batch")
_STD_FLOOR = 1e-6


def _check_choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{option} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _check_eps(eps: float) -> None:
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ConfigError(f"eps must be a positive number, got {eps!r}")


def _guarded_zscore(values: Tensor, set_ids: Tensor, num_sets: int, std: str) -> Tensor:
    """z-score of ``values [K]`` within the sets ``set_ids [K]`` (0..num_sets-1), with the 0-guard."""
    if values.numel() == 0:
        return values
    mean, sd, _ = group_mean_std(values, set_ids, num_sets, unbiased=std == "unb")
    sd = sd[set_ids]
    ok = sd >= _STD_FLOOR  # False for NaN (one-element set with unb)
    return torch.where(ok, (values - mean[set_ids]) / torch.where(ok, sd, torch.ones_like(sd)), torch.zeros_like(sd))


def _token_inputs(rewards: Tensor, entropy: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    if entropy.dim() != 2:
        raise ValueError(f"entropy must be 2-D [N, T], got shape {tuple(entropy.shape)}")
    check_shapes("entropy", entropy, (rewards.shape[0], entropy.shape[1]))
    check_shapes("mask", mask, tuple(entropy.shape))
    ent = as_float(entropy).detach().to(device=rewards.device, dtype=torch.float64)
    return ent, mask.to(rewards.device).bool()


@ADVANTAGES.register("gtpo")
@_stateless
def gtpo(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    entropy: Tensor,
    mask: Tensor,
    alpha1: float = 1.0,
    alpha2: float = 0.1,
    r_thr: float = 0.0,
    eps: float = 1e-8,
    norm_mode: str = "separate",
    norm_scope: str = "group",
    std: str = "pop",
) -> Tensor:
    """GTPO token-level entropy-shaped advantage (Tan et al., arXiv 2508.04349, Eq. 3, 5, 6).

    Per group g, O+ = {i : r_i > r_thr}, O- = the rest; at each position t the surviving counts are
    ``d_t = sum_{k in O+} m[k,t]`` and ``h_t = sum_{k in O-} m[k,t]``. Shaped token rewards (valid cells):

    - i in O+: ``r~[i,t] = alpha1 * r_i + alpha2 * safe_div(d_t * H[i,t], sum_{k in O+} m[k,t] H[k,t])``
    - j in O-: ``r~[j,t] = -alpha1 - alpha2 * safe_div(h_t * u[j,t], sum_{k in O-} m[k,t] u[k,t])``,
      ``u = 1 / max(H, eps)`` (confident wrong tokens are pushed down harder).

    Advantage: ``norm_mode="separate"`` (default, as all three re-implementations) z-scores the O+ tokens
    and the O- tokens separately, ``A = z(r~ | O+) + z(r~ | O-)``. With binary rewards this removes alpha1
    and the scale of alpha2: tokens are ranked by relative entropy only, so a low-entropy token of a correct
    answer can get a negative advantage. ``norm_mode="joint"`` z-scores all tokens of the set together
    (correct stays positive, wrong negative) — an [UNVERIFIED] design alternative, not the paper's method.
    ``norm_scope="group"`` (default, the paper's per-prompt notation) normalises within each prompt group;
    ``"batch"`` pools the sets over the whole batch as two re-implementations do ([3P-CODE] evidence only,
    the paper text for Eq. 6 was not readable). The shaping itself (``d_t``, ``h_t`` and the sums) is always
    per group. The z-score guard gives 0 to a set that is empty or has ``std < 1e-6``.

    ``std="pop"`` (default) divides by n: the spec's reference values (and the plain z-score definition)
    use it; ``"unb"`` (n-1) is offered because the re-implementations differ. ``entropy`` is the
    full-vocabulary entropy of pi_old at the sampled positions (detached). No state.

    rewards [N], group_ids [N], entropy [N, T], mask [N, T] bool -> advantages [N, T] (0 on masked cells)
    """
    _check_choice("norm_mode", norm_mode, _NORM_MODES)
    _check_choice("norm_scope", norm_scope, _NORM_SCOPES)
    _check_choice("std", std, _STD_MODES)
    _check_eps(eps)
    rewards, inv, g = _prepare(rewards, group_ids)
    ent, m = _token_inputs(rewards, entropy, mask)
    r = rewards.to(torch.float64)
    pos_row = r > r_thr
    pos = m & pos_row[:, None]
    neg = m & ~pos_row[:, None]
    posf, negf = pos.to(torch.float64), neg.to(torch.float64)

    def per_group(x: Tensor) -> Tensor:  # [N, T] -> group sums broadcast back to rows [N, T]
        out = torch.zeros(g, x.shape[1], dtype=x.dtype, device=x.device)
        return out.index_add(0, inv, x)[inv]

    inv_h = 1.0 / ent.clamp_min(eps)
    d, h = per_group(posf), per_group(negf)
    sum_pos = per_group(posf * torch.where(pos, ent, torch.zeros_like(ent)))
    sum_neg = per_group(negf * torch.where(neg, inv_h, torch.zeros_like(inv_h)))
    shaped_pos = alpha1 * r[:, None] + alpha2 * d * ent / sum_pos.clamp_min(eps)
    shaped_neg = -alpha1 - alpha2 * h * inv_h / sum_neg.clamp_min(eps)
    shaped = torch.where(pos, shaped_pos, shaped_neg)

    row_set = inv if norm_scope == "group" else torch.zeros_like(inv)
    n_scopes = g if norm_scope == "group" else 1
    set_rows = row_set * 2 + pos_row.long() if norm_mode == "separate" else row_set
    n_sets = n_scopes * 2 if norm_mode == "separate" else n_scopes
    set_tok = set_rows[:, None].expand_as(m)
    adv = torch.zeros_like(shaped)
    adv[m] = _guarded_zscore(shaped[m], set_tok[m], n_sets, std)
    return adv.to(rewards.dtype)


gtpo.inputs = ("entropy", "mask")


@ADVANTAGES.register("grpo_s", "grpo_s_entropy")
@_stateless
def grpo_s(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    entropy: Tensor,
    mask: Tensor,
    beta1: float = 1.0,
    beta2: float = 0.1,
    r_thr: float = 0.0,
    eps: float = 1e-8,
    std: str = "unb",
) -> Tensor:
    """GRPO-S sequence-level entropy-shaped advantage (Tan et al., arXiv 2508.04349, Eq. 8, 9).

    Mean entropy per response ``Hbar_i = sum_t m H / L_i`` (Eq. 8). In group g with n = |O+|, k = |O-|
    (O+ = {r_i > r_thr}):

    - i in O+: ``r^_i = beta1 * r_i + beta2 * safe_div(n * Hbar_i, sum_{j in O+} Hbar_j)``
    - i in O-: ``r^_i = -beta1 - beta2 * safe_div(k * u_i, sum_{j in O-} u_j)``, ``u = 1 / max(Hbar, eps)``

    ``A_i`` = z-score of r^ over the whole group (guarded: 0 for a one-sample group or std < 1e-6).
    ``std="unb"`` (default) as the verl-fork re-implementation ([3P-CODE]); that code also adds 1e-6 to
    the std, which changes values by < 1e-6 relative and is not reproduced. ``"pop"`` divides by n.
    A row with no valid token (L_i = 0) takes no part in the entropy weighting (it is left out of n, k
    and the sums, and gets only its beta1 term) — a design choice so that an empty response cannot take
    all the inverse-entropy weight of O-.

    rewards [N], group_ids [N], entropy [N, T], mask [N, T] bool -> advantages [N] (per sequence)
    """
    _check_choice("std", std, _STD_MODES)
    _check_eps(eps)
    rewards, inv, g = _prepare(rewards, group_ids)
    ent, m = _token_inputs(rewards, entropy, mask)
    r = rewards.to(torch.float64)
    length = m.sum(dim=1).to(torch.float64)
    has_tok = length > 0
    mean_h = torch.where(m, ent, torch.zeros_like(ent)).sum(dim=1) / length.clamp_min(1.0)
    pos_row = r > r_thr
    in_pos = (pos_row & has_tok).to(torch.float64)
    in_neg = (~pos_row & has_tok).to(torch.float64)
    u = 1.0 / mean_h.clamp_min(eps)
    n = group_sum(in_pos, inv, g)[inv]
    k = group_sum(in_neg, inv, g)[inv]
    sum_pos = group_sum(in_pos * mean_h, inv, g)[inv]
    sum_neg = group_sum(in_neg * u, inv, g)[inv]
    term_pos = torch.where(has_tok, beta2 * n * mean_h / sum_pos.clamp_min(eps), torch.zeros_like(r))
    term_neg = torch.where(has_tok, beta2 * k * u / sum_neg.clamp_min(eps), torch.zeros_like(r))
    shaped = torch.where(pos_row, beta1 * r + term_pos, -beta1 - term_neg)
    return _guarded_zscore(shaped, inv, g, std).to(rewards.dtype)


grpo_s.inputs = ("entropy", "mask")
