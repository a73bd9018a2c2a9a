"""The one update routine: epochs, shuffling, minibatches, micro batches, loss composition,
accumulation weights, zero-weight slots, optimizer steps and metrics, for every trainer.

A trainer supplies, for a micro batch of rows (trajectories), the tensors of its action units
(:class:`UnitTerms`: log-probs with grad, pi_old, advantages, mask, and optionally entropy, the
reference's log-probs or a closed-form KL, and extra loss terms). :func:`compose_loss` turns them
into the scalar loss (policy loss -> aggregation -> + beta * KL -> - entropy_coef * entropy ->
+ extra), and :func:`run_update` drives the passes.

The numbers of optimizer steps and of backward calls per step come from the config, never from
the batch: every rank makes the same collective calls even when filters left ranks with
different row counts (an empty slot runs a stand-in row with weight 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from mmpo.core import aggregate
from mmpo.trainers.algorithm import Algorithm


@dataclass
class UnitTerms:
    """One micro batch's action units. Tensors are ``[n, T]`` over the n loss rows and T units,
    except ``advantages`` (``[n]`` or ``[n, T]``) and ``kl_row_weights`` (``[n]``).

    - ``logp_ref``: the reference's log-probs; the routine applies the configured estimator;
    - ``kl``: a per-unit KL the trainer computed itself (the closed-form Gaussian KL);
    - ``loss_weights``: multipliers of the per-unit policy loss (rollout importance weights);
    - ``kl_row_weights``: per-row KL multipliers (ARES's per-bucket beta);
    - ``loss_matrix``: a per-unit loss the trainer composed itself (HCPO's two branches); it
      replaces the policy loss and the KL term;
    - ``extra_loss``: a scalar added to the loss (FIND's pull toward N(0, I));
    - ``inputs``: the tensors the policy loss declares (``Algorithm.loss_inputs``: entropy, top-K
      log-probs, rewards, demonstration flags, ...; see :mod:`mmpo.trainers.method_inputs`);
    - ``metrics``: more per-micro-batch metrics to average.
    """

    logp: torch.Tensor
    logp_old: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None
    logp_ref: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    loss_weights: torch.Tensor | None = None
    kl_row_weights: torch.Tensor | None = None
    loss_matrix: torch.Tensor | None = None
    extra_loss: torch.Tensor | None = None
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def compose_loss(
    terms: UnitTerms, algo: Algorithm, beta: float, max_len: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The scalar loss of one micro batch and its metrics.

    ``loss = agg(L_pg * w) + beta * agg(KL * w_row) [placement 'loss'] - entropy_coef * agg(H) + extra``
    with ``L_pg = POLICY_LOSSES[loss](logp, logp_old, A, mask, **loss_options)`` and ``agg`` the
    configured aggregation (``max_len`` for ``seq-mean-token-sum-norm``).
    """
    mask = terms.mask
    agg = algo.loss_agg
    metrics: dict[str, float] = {}
    kl = None
    if terms.loss_matrix is not None:
        loss_mat = terms.loss_matrix
    else:
        given = {n: terms.inputs[n] for n in algo.loss_inputs}
        loss_mat, lm = algo.loss_fn(terms.logp, terms.logp_old, terms.advantages, mask, **algo.loss_options, **given)
        metrics.update({k: float(v) for k, v in lm.items()})
        if terms.loss_weights is not None:
            loss_mat = loss_mat * terms.loss_weights
        if terms.kl is not None:
            kl = terms.kl
        elif terms.logp_ref is not None:
            kl = algo.kl(terms.logp, terms.logp_ref)
    pg = aggregate(loss_mat, mask, agg, max_len=max_len)
    if algo.config.credit_once and terms.loss_matrix is None:  # the same value and gradient, shared tokens once
        pg = credit_once_pg(terms, algo, max_len)
    loss = pg
    metrics["pg_loss"] = float(pg.detach())
    if kl is not None:
        if terms.kl_row_weights is not None:
            kl = kl * terms.kl_row_weights.to(kl)[:, None]
        kl_value = aggregate(kl, mask, agg, max_len=max_len)
        if algo.kl_placement == "loss":
            loss = loss + beta * kl_value
        metrics["kl"] = float(kl_value.detach())
    if terms.entropy is not None:
        entropy = aggregate(terms.entropy, mask, agg, max_len=max_len)
        if algo.entropy_coef:
            loss = loss - algo.entropy_coef * entropy
        metrics["entropy"] = float(entropy.detach())
    if terms.extra_loss is not None:
        loss = loss + terms.extra_loss
    metrics.update(terms.metrics)
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def credit_once_pg(terms: UnitTerms, algo: Algorithm, max_len: int | None) -> torch.Tensor:
    """The aggregated policy loss of a micro batch of tree rows with each shared token (same node, same
    offset: ``terms.inputs['token_node']``) counted once, with merged weights (``docs/algorithms.md``,
    credit once): equal in value and gradient to the replicated rows' loss."""
    from mmpo.core.credit_once import credit_once_loss, unique_tokens

    mask = terms.mask.bool()
    uid, first = unique_tokens(terms.inputs["token_node"].to(mask.device), mask)
    opts = algo.loss_options
    return credit_once_loss(
        terms.logp.flatten()[first],
        terms.logp_old.flatten()[first],
        uid,
        terms.advantages,
        mask,
        mode=algo.loss_agg,
        max_len=max_len,
        eps_low=float(opts.get("eps_low", 0.2)),
        eps_high=float(opts.get("eps_high", 0.2)),
        dual_clip=opts.get("dual_clip", 3.0 if algo.config.loss == "ce_gppo" else None),
        preserve_high_grad=algo.config.loss == "ce_gppo",
    )


@dataclass(frozen=True)
class UpdateShape:
    """The fixed structure of one step's update: ``epochs`` passes, each of ``minibatches``
    optimizer steps (of ``minibatch_size`` rows), each of ``micro_batches`` slots (of
    ``micro_batch_size`` rows) of ``parts`` backward calls."""

    epochs: int
    minibatches: int
    micro_batches: int
    parts: int = 1
    minibatch_size: int = 0
    micro_batch_size: int = 0

    @property
    def shuffle(self) -> bool:
        """Rows are shuffled only when the order matters (several epochs or minibatches)."""
        return self.epochs > 1 or self.minibatches > 1

    @property
    def backwards_per_step(self) -> int:
        """``engine.backward`` calls per optimizer step (DeepSpeed's gradient accumulation)."""
        return self.micro_batches * self.parts

    @property
    def optimizer_steps(self) -> int:
        return self.epochs * self.minibatches


def update_shape(cfg: Any, rows_per_step: int, parts: int = 1) -> UpdateShape:
    """The shape from ``trainer.update_epochs / minibatch_size / micro_batch_size`` (0 = all) for
    ``rows_per_step`` rows (trajectories) a step."""
    t = cfg.trainer
    mb = t.minibatch_size or rows_per_step
    micro = t.micro_batch_size or mb
    return UpdateShape(t.update_epochs, math.ceil(rows_per_step / mb), math.ceil(mb / micro), parts, mb, micro)


def shuffle_generator(seed: int, step: int, epoch: int) -> torch.Generator:
    """The generator of the row order of ``epoch`` at ``step`` (the same in every trainer)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + epoch)


@dataclass
class RowSizes:
    """Per row (trajectory) ``[N]``: loss-matrix rows it yields, those with a valid unit, and its
    valid units. A token completion is one row; an episode yields one row per env step."""

    rows: torch.Tensor
    nonempty: torch.Tensor
    units: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> RowSizes:
        """One loss row per trajectory, ``mask [N, T]``."""
        units = mask.sum(1).float()
        return cls(torch.ones(len(mask)), (units > 0).float(), units)


def micro_weight(mode: str, sizes: RowSizes, micro: torch.Tensor, minibatch: torch.Tensor) -> float:
    """Weight of a micro batch's aggregated loss so that the accumulated losses equal the
    aggregated loss of the whole minibatch, for every aggregation mode."""
    if mode == "token-mean":
        return float(sizes.units[micro].sum()) / max(1.0, float(sizes.units[minibatch].sum()))
    if mode == "otm":  # a sum over rows
        return 1.0
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):  # mean over rows with a valid unit
        return float(sizes.nonempty[micro].sum()) / max(1.0, float(sizes.nonempty[minibatch].sum()))
    return float(sizes.rows[micro].sum()) / max(1.0, float(sizes.rows[minibatch].sum()))


def _split(rows: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """``rows`` cut into ``parts`` contiguous, nearly equal chunks (some empty when rows < parts)."""
    return list(torch.tensor_split(rows, parts))


TermsFn = Callable[[torch.Tensor, bool], Iterable[UnitTerms]]


def run_update(
    *,
    shape: UpdateShape,
    rows: torch.Tensor,
    sizes: RowSizes,
    terms: TermsFn,
    algo: Algorithm,
    beta: float,
    step: int,
    seed: int,
    backward: Callable[[torch.Tensor], None],
    optimizer_step: Callable[[int], tuple[float, bool]],
    max_len: int | None = None,
    stand_in: int = 0,
) -> dict[str, float]:
    """``shape.epochs`` passes of minibatch updates over ``rows`` (indices of the trained rows;
    may be empty). ``terms(micro_rows, padding)`` yields ``shape.parts`` :class:`UnitTerms` for
    a micro batch; a slot with no row runs row ``stand_in`` with ``padding=True`` and weight 0
    (it keeps collective calls aligned and feeds no metric). Returns the metrics averaged over
    real micro batches, ``grad_norm`` over optimizer steps, ``skipped_updates`` and
    ``optimizer_steps``."""
    sums: dict[str, float] = {}
    count = 0
    grad_norm_sum, skipped = 0.0, 0
    n = len(rows)
    for epoch in range(shape.epochs):
        order = rows[torch.randperm(n, generator=shuffle_generator(seed, step, epoch))] if shape.shuffle else rows
        for minibatch in _split(order, shape.minibatches):
            for micro in _split(minibatch, shape.micro_batches):
                padding = len(micro) == 0
                run_rows = torch.tensor([stand_in]) if padding else micro
                weight = 0.0 if padding else micro_weight(algo.loss_agg, sizes, micro, minibatch) / shape.parts
                parts = 0
                for part in terms(run_rows, padding):
                    loss, metrics = compose_loss(part, algo, beta, max_len)
                    # a non-finite loss never reaches the weights: the engine skips the update
                    backward(loss * weight)
                    parts += 1
                    if not padding:
                        for k, v in metrics.items():
                            sums[k] = sums.get(k, 0.0) + v
                        count += 1
                if parts != shape.parts:
                    raise RuntimeError(f"a micro batch yielded {parts} loss parts, the update shape says {shape.parts}")
            grad_norm, was_skipped = optimizer_step(step)
            grad_norm_sum += grad_norm
            skipped += int(was_skipped)
    out = {k: v / max(1, count) for k, v in sums.items()}
    out["grad_norm"] = grad_norm_sum / max(1, shape.optimizer_steps)
    out["skipped_updates"] = float(skipped)
    out["optimizer_steps"] = float(shape.optimizer_steps)
    return out


__all__ = [
    "RowSizes",
    "UnitTerms",
    "UpdateShape",
    "compose_loss",
    "micro_weight",
    "run_update",
    "shuffle_generator",
    "update_shape",
]
