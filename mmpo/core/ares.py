"""ARES / AEPO dynamic KL: a per-difficulty-bucket KL multiplier (ARES, code shawn0728/ARES).

ARES (shawn0728/ARES, ``verl/workers/actor/dp_actor.py``) scales the per-token KL of each sample
by ``beta_d`` of the sample's difficulty bucket ``d`` (easy / medium / hard) and by the global
``kl_coef`` (0.01):

    loss_KL = kl_coef * agg( KL_k3[i, t] * beta_{d(i)} * second_chance[i] )

Each ``beta_d`` is a multiplicative controller toward a target sequence-mean KL. The pieces:

- :class:`AresKLState` -- the controller's state and hyper-parameters (JSON ``state_dict``).
- :func:`ares_bucket` -- the ``KL_SCHEDULES`` entry (registered in :mod:`mmpo.core.schedules`):
  configures the state from ``algorithm.kl_options`` and returns the global ``kl_coef``.
- :func:`ares_bucket_observe` -- feed one actor micro-step's per-bucket mean KL (moves ``beta_d``).
- :func:`ares_bucket_betas` -- per-sample ``beta_d`` [N].
- :func:`second_chance_factor` -- per-sample KL relaxation [N] (easy, wrong, high soft cost).
- :func:`sequence_mean` / :func:`bucket_means` -- the statistics ``ares_bucket_observe`` takes.

Pure python / torch; no models, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

BUCKETS: tuple[str, str, str] = ("easy", "medium", "hard")
"""Difficulty buckets, in the order used for integer bucket codes (0 easy, 1 medium, 2 hard)."""


def bucket_names(buckets: Sequence[str] | Tensor) -> list[str]:
    """Bucket names from names or integer codes ``[N]`` (0 easy, 1 medium, 2 hard).

    Raises ``ValueError`` naming the position of an unknown name or code.
    """
    if isinstance(buckets, Tensor):
        if buckets.dim() != 1 or torch.is_floating_point(buckets):
            raise ValueError(
                f"bucket codes must be a 1-D integer tensor [N], got {buckets.dtype} {tuple(buckets.shape)}"
            )
        codes = buckets.tolist()
        for i, c in enumerate(codes):
            if not 0 <= c < len(BUCKETS):
                raise ValueError(f"bucket code {c} at position {i} is not one of 0 (easy), 1 (medium), 2 (hard)")
        return [BUCKETS[c] for c in codes]
    names = [str(b) for b in buckets]
    for i, b in enumerate(names):
        if b not in BUCKETS:
            raise ValueError(f"bucket '{b}' at position {i} is not one of {', '.join(BUCKETS)}")
    return names


def bucket_codes(buckets: Sequence[str] | Tensor) -> Tensor:
    """Integer codes ``[N]`` (long; 0 easy, 1 medium, 2 hard) of bucket names or codes."""
    return torch.tensor([BUCKETS.index(b) for b in bucket_names(buckets)], dtype=torch.long)


def sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over the tokens of each sequence: ``values [N, T], mask [N, T] -> [N]`` (float32).

    ``sum_t mask * values / max(1, sum_t mask)`` (0 for an empty row), as ARES's ``seq_mean_kl``.
    """
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be [N, T]")
    m = mask.bool()
    v = torch.where(m, values.detach().to(torch.float32), torch.zeros((), dtype=torch.float32, device=values.device))
    return v.sum(-1) / m.sum(-1).clamp_min(1).to(torch.float32)


def bucket_means(values: Tensor, buckets: Sequence[str] | Tensor) -> dict[str, float]:
    """Mean of ``values [N]`` over the samples of each bucket; buckets with no sample are absent."""
    names = bucket_names(buckets)
    if values.dim() != 1 or values.shape[0] != len(names):
        raise ValueError(f"values {tuple(values.shape)} must be [N] with N = {len(names)} buckets")
    vals = values.detach().to(torch.float64).cpu().tolist()
    out: dict[str, float] = {}
    for b in BUCKETS:
        sel = [v for v, n in zip(vals, names) if n == b]
        if sel:
            out[b] = float(sum(sel) / len(sel))
    return out


@dataclass
class AresKLState:
    """Per-bucket KL controller state (``ares_bucket.state_cls``).

    Dynamic values (saved by :meth:`state_dict`): ``betas`` (None until first use, then
    ``beta_init`` per bucket), ``kl_ema`` (None per bucket until its first observation),
    ``err_ema`` (0 per bucket), ``micro_steps`` (number of :func:`ares_bucket_observe` calls).

    Hyper-parameters (set by every :func:`ares_bucket` call from ``algorithm.kl_options``; not
    saved, they come from the config): defaults are the ARES code's.
    """

    betas: dict[str, float] | None = None
    kl_ema: dict[str, float | None] = field(default_factory=lambda: {b: None for b in BUCKETS})
    err_ema: dict[str, float] = field(default_factory=lambda: {b: 0.0 for b in BUCKETS})
    micro_steps: int = 0
    # hyper-parameters
    kl_coef: float = 0.01
    target: float = 0.01
    targets: dict[str, float] | None = None
    ema_decay: float = 0.97
    deadzone: float = 0.02
    err_clip: float = 0.2
    lr: float = 0.05
    beta_init: float = 1.0
    beta_min: float = 1e-4
    beta_max: float = 100.0
    update_every: int = 100

    def ensure_betas(self) -> dict[str, float]:
        """The per-bucket betas, set to ``beta_init`` on first use."""
        if self.betas is None:
            self.betas = {b: float(self.beta_init) for b in BUCKETS}
        return self.betas

    def target_for(self, bucket: str) -> float:
        """The target sequence-mean KL of ``bucket`` (``targets[bucket]`` or ``target``)."""
        t = self.target if self.targets is None else self.targets.get(bucket, self.target)
        return max(1e-8, float(t))

    def state_dict(self) -> dict[str, Any]:
        return {
            "betas": None if self.betas is None else dict(self.betas),
            "kl_ema": dict(self.kl_ema),
            "err_ema": dict(self.err_ema),
            "micro_steps": self.micro_steps,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        betas = d.get("betas")
        self.betas = None if betas is None else {b: float(betas[b]) for b in BUCKETS}
        kl_ema = d.get("kl_ema") or {}
        self.kl_ema = {b: None if kl_ema.get(b) is None else float(kl_ema[b]) for b in BUCKETS}
        err = d.get("err_ema") or {}
        self.err_ema = {b: float(err.get(b, 0.0)) for b in BUCKETS}
        self.micro_steps = int(d.get("micro_steps", 0))


def ares_bucket(
    step: int,
    total_steps: int,
    *,
    state: AresKLState | None = None,
    kl: float | None = None,
    kl_coef: float = 0.01,
    target: float = 0.01,
    targets: dict[str, float] | None = None,
    ema_decay: float = 0.97,
    deadzone: float = 0.02,
    err_clip: float = 0.2,
    lr: float = 0.05,
    beta_init: float = 1.0,
    beta_min: float = 1e-4,
    beta_max: float = 100.0,
    update_every: int = 100,
) -> float:
    """ARES per-bucket dynamic KL (``KL_SCHEDULES['ares_bucket']``): returns the global ``kl_coef``.

    The per-sample part is :func:`ares_bucket_betas` (x :func:`second_chance_factor`); the
    controller moves only through :func:`ares_bucket_observe`. This call stores the options in
    ``state`` (so later observe/betas calls use them) and initialises the betas. ``kl`` (the
    trainer's global mean KL of the previous step) is accepted and ignored: the controller needs
    per-bucket KL. Options (ARES defaults): ``target`` KL 0.01 (``targets`` per bucket overrides),
    ``ema_decay`` 0.97 (KL EMA and error EMA), ``deadzone`` 0.02, ``err_clip`` 0.2, ``lr`` 0.05
    (log-space step), ``beta_init`` 1, ``[beta_min, beta_max]`` = [1e-4, 100],
    ``update_every`` 100 observe calls (ARES: actor micro-steps).
    """
    del step, total_steps, kl
    if update_every < 1:
        raise ValueError(f"ares_bucket: update_every must be >= 1, got {update_every}")
    if not 0 < beta_min <= beta_init <= beta_max:
        raise ValueError(
            f"ares_bucket: need 0 < beta_min <= beta_init <= beta_max, got {beta_min}, {beta_init}, {beta_max}"
        )
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ares_bucket: ema_decay must be in [0, 1), got {ema_decay}")
    if targets is not None:
        unknown = sorted(set(targets) - set(BUCKETS))
        if unknown:
            raise ValueError(f"ares_bucket: unknown bucket(s) {unknown} in targets; valid: {', '.join(BUCKETS)}")
    state = AresKLState() if state is None else state
    state.kl_coef, state.target = float(kl_coef), float(target)
    state.targets = None if targets is None else {k: float(v) for k, v in targets.items()}
    state.ema_decay, state.deadzone, state.err_clip, state.lr = (
        float(ema_decay),
        float(deadzone),
        float(err_clip),
        float(lr),
    )
    state.beta_init, state.beta_min, state.beta_max = float(beta_init), float(beta_min), float(beta_max)
    state.update_every = int(update_every)
    state.ensure_betas()
    return state.kl_coef


ares_bucket.state_cls = AresKLState


def bucket_kl_sums(buckets: Tensor, seq_kl: Tensor) -> Tensor:
    """``[len(BUCKETS), 2]`` float64: per difficulty bucket, the sum of the rows' sequence KL and
    the row count (``buckets [n]`` codes, ``seq_kl [n]``); summed over ranks before observing."""
    sums = torch.zeros(len(BUCKETS), 2, dtype=torch.float64)
    sums[:, 0].index_add_(0, buckets.long(), seq_kl.double())
    sums[:, 1].index_add_(0, buckets.long(), torch.ones_like(seq_kl, dtype=torch.float64))
    return sums


def bucket_kl_weights(
    state: AresKLState, sums: Tensor, buckets: Tensor, correct: Tensor | None = None, soft_cost: Tensor | None = None
) -> Tensor:
    """Per-row KL multipliers ``[n]``: feed the controller the mean KL of each bucket with rows
    (``sums`` from :func:`bucket_kl_sums`, over all ranks), then read the rows' bucket betas, times
    the second-chance factor when ``correct`` and ``soft_cost`` are given."""
    ares_bucket_observe(state, {b: float(sums[i, 0] / sums[i, 1]) for i, b in enumerate(BUCKETS) if sums[i, 1] > 0})
    weights = ares_bucket_betas(state, buckets)
    if correct is not None and soft_cost is not None:
        weights = weights * second_chance_factor(buckets, correct, soft_cost)
    return weights


#: per-row tensors of the rewards it reads (the difficulty bucket of each row)
ares_bucket.needs_row_info = ("bucket",)


def ares_bucket_observe(state: AresKLState, bucket_kl: Mapping[str, float]) -> dict[str, float]:
    """One actor micro-step of the ARES controller; returns the betas after it.

    ``bucket_kl``: mean over this micro-batch's samples of their sequence-mean KL, per bucket
    present (see :func:`sequence_mean`, :func:`bucket_means`). Exactly ARES's
    ``_update_beta_per_bucket``:

    1. ``micro_steps += 1`` (every call, whatever buckets are present);
    2. for each bucket present: ``kl_ema = kl`` on its first observation, else
       ``decay * kl_ema + (1 - decay) * kl``; ``e = kl_ema / target - 1``;
    3. skip when ``|e| < deadzone`` or ``micro_steps % update_every != 0``; otherwise
       ``err_ema = decay * err_ema + (1 - decay) * e``; ``log beta += lr * clip(err_ema, +-err_clip)``,
       with ``beta`` kept in ``[beta_min, beta_max]``.

    Note that the error EMA starts at 0 and moves only on update steps, so its first update is
    ``(1 - decay) * e``.
    """
    unknown = sorted(set(bucket_kl) - set(BUCKETS))
    if unknown:
        raise ValueError(f"ares_bucket_observe: unknown bucket(s) {unknown}; valid: {', '.join(BUCKETS)}")
    betas = state.ensure_betas()
    state.micro_steps += 1
    d = state.ema_decay
    on_update = state.micro_steps % state.update_every == 0
    for b in BUCKETS:
        if b not in bucket_kl:
            continue
        cur = float(bucket_kl[b])
        if not math.isfinite(cur):
            raise ValueError(f"ares_bucket_observe: KL of bucket '{b}' is not finite ({cur})")
        last = state.kl_ema[b]
        ema = cur if last is None else d * last + (1.0 - d) * cur
        state.kl_ema[b] = ema
        e = ema / state.target_for(b) - 1.0
        if abs(e) < state.deadzone or not on_update:
            continue
        state.err_ema[b] = d * state.err_ema[b] + (1.0 - d) * e
        de = min(max(state.err_ema[b], -state.err_clip), state.err_clip)
        beta = min(max(betas[b], state.beta_min), state.beta_max)
        log_beta = min(max(math.log(beta) + state.lr * de, math.log(state.beta_min)), math.log(state.beta_max))
        betas[b] = math.exp(log_beta)
    return dict(betas)


def ares_bucket_betas(state: AresKLState, buckets: Sequence[str] | Tensor) -> Tensor:
    """Per-sample KL multiplier ``beta_{d(i)}``: bucket names or codes ``[N]`` -> float32 ``[N]``.

    Multiply the per-token KL ``[N, T]`` by ``betas[:, None]`` (and the global ``kl_coef``
    returned by :func:`ares_bucket`). Unknown bucket names raise ``ValueError`` (ARES falls
    back to the medium beta).
    """
    betas = state.ensure_betas()
    device = buckets.device if isinstance(buckets, Tensor) else None
    return torch.tensor([betas[b] for b in bucket_names(buckets)], dtype=torch.float32, device=device)


def second_chance_factor(
    buckets: Sequence[str] | Tensor,
    correct: Tensor,
    soft_cost: Tensor,
    *,
    min_soft_cost: float = 0.5,
    relax: float = 0.67,
    easy_only: bool = True,
    incorrect_only: bool = True,
) -> Tensor:
    """ARES "second chance" KL relaxation: per-sample factor ``[N]`` (float32), 1 or ``relax``.

    ``relax`` (0.67) where ``soft_cost >= min_soft_cost`` (0.5) and (with ``easy_only``) the
    sample's bucket is easy and (with ``incorrect_only``) it is wrong (``correct < 0.5``); 1
    elsewhere. ``correct [N]`` (bool or 0/1 accuracy), ``soft_cost [N]`` (the HWE soft cost).
    """
    names = bucket_names(buckets)
    n = len(names)
    if correct.shape != (n,) or soft_cost.shape != (n,):
        raise ValueError(
            f"second_chance_factor: correct {tuple(correct.shape)} and soft_cost {tuple(soft_cost.shape)} must be [{n}]"
        )
    hit = soft_cost.detach().to(torch.float32) >= min_soft_cost
    if easy_only:
        hit &= torch.tensor([b == "easy" for b in names], dtype=torch.bool, device=hit.device)
    if incorrect_only:
        hit &= correct.detach().to(torch.float32) < 0.5
    return torch.where(hit, torch.full_like(hit, relax, dtype=torch.float32), torch.ones_like(hit, dtype=torch.float32))
