"""The token trainer's draw loop: draw prompts, roll out G completions each, reward them, and draw
again while filters leave the step's batch short.

One draw is ``prompts_per_step`` prompts x G rows (see ``docs/algorithms.md``, group filters):

- DAPO dynamic sampling (arXiv 2503.14476, ``algorithm.dynamic_sampling``) drops groups whose
  rewards are all equal;
- LSPO (arXiv 2510.01459) with ``refill: true`` drops, of the groups that dynamic sampling kept, those
  whose mean length lies between its percentiles (a group must pass both);
- CPPO (arXiv 2503.22342) with ``refill: true`` ("dynamic completion allocation"): the advantages of
  the draw's kept rows are estimated (a collective), then each group keeps its
  ``floor(G (1 - prune_ratio))`` completions of largest |A|. The kept rows carry these advantages
  (``batch.draw_advantages``); the trainer estimates advantages again on the kept batch, and
  ``filters.after_advantage`` puts the draw's back, because a per-group estimator (GRPO's mean and
  std) gives other values on a pruned group than on the whole group CPPO normalises over.

Kept rows accumulate until they reach the step's rows (``prompts_per_step x G``) or
``algorithm.max_draws`` draws; the batch is then cut to the step's rows. Every rank draws equally
often (an all_gather of ``done``): generation under ZeRO-3, some rewards and the advantage are
collectives. Without any of the three, one draw is the batch.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from mmpo.core import GROUP_FILTERS
from mmpo.media_check import draw_prompts, task_skips_bad_rows
from mmpo.rollout import filters
from mmpo.rollout.batch import RolloutBatch
from mmpo.rollout.engines.base import GenerationSettings
from mmpo.tasks import RolloutView
from mmpo.trainers.token_tree import (
    MULTI_TURN,
    SINGLE_TURN,
    add_stats,
    branching_agent_batch,
    tree_method,
    tree_rollout,
)


def generation_settings(trainer: Any) -> GenerationSettings:
    """The sampling settings of ``rollout.*`` (with HAPO's per-row temperature once the trainer's
    methods have its statistics, ``TokenMethods.settings``)."""
    r = trainer.cfg.rollout
    settings = GenerationSettings(r.max_new_tokens, r.temperature, r.top_p, r.top_k, min_new_tokens=r.min_new_tokens)
    methods = getattr(trainer, "methods", None)
    return methods.settings(settings) if methods is not None else settings


def draw_once(trainer: Any, settings: GenerationSettings, first_group: int, clock: Any) -> tuple[RolloutBatch, int]:
    """One draw: ``prompts_per_step`` prompts, G rollouts each, rewarded; ``(batch, bad prompts
    dropped)``. Group ids start at ``first_group``. The rewards are reported to the prompt sampler,
    ``sampler.observe(indices, rewards [prompts, G])`` (e.g. VADE's difficulty estimates)."""
    r = trainer.cfg.rollout
    t0 = time.perf_counter()
    with trainer.phase_hook("rollout"):
        prompts, n_bad = draw_prompts(trainer.task, trainer.sampler, r.prompts_per_step)  # bad ones dropped
        drawn = list(trainer.sampler.last_indices)
        indices = drawn[len(drawn) - len(prompts) :]  # it ends with the returned prompts' indices
        rows = [s for s in prompts for _ in range(r.group_size)]
        group_ids = torch.arange(first_group, first_group + len(prompts)).repeat_interleave(r.group_size)
        if trainer.agent is not None and tree_method(trainer.cfg) in MULTI_TURN:
            batch, trajs = branching_agent_batch(trainer, prompts, rows, group_ids)
        elif trainer.agent is not None:
            batch, trajs = trainer._agent_rollout(prompts, rows, group_ids)
        else:
            if tree_method(trainer.cfg) in SINGLE_TURN:  # the G rows of a group are a tree's leaves
                encodings, (ids, mask, truncated), info, stats = tree_rollout(trainer, prompts, settings)
                logp_rollout = None
                add_stats(trainer.tree_stats, stats)
            else:
                encodings, gen = trainer._generate(prompts, settings)
                ids, mask, truncated, logp_rollout, info = gen.completion_ids, gen.mask, gen.truncated, gen.logprobs, {}
                add_stats(trainer.tree_stats, {"decoded_tokens": float(mask.sum())})
            texts = trainer.policy.decode(ids, mask)
            batch = RolloutBatch(
                rows,
                encodings,
                ids,
                mask,
                truncated,
                torch.zeros(len(rows)),
                group_ids,
                texts=texts,
                logp_rollout=logp_rollout,
                row_info=info,
            )
            view = RolloutView(ids, mask, group_ids, tokenizer=trainer.policy.tokenizer)
            if trainer.task.needs_token_entropy:
                # sampled under the current weights, so these log-probs are also pi_old's
                batch.logp_old, view.token_entropy = trainer._score(batch, trainer.engine.module, with_entropy=True)
                view.token_texts = [trainer.policy.tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
    t1 = time.perf_counter()
    with trainer.phase_hook("reward"):
        if trainer.agent is not None:
            out = trainer.task.reward_trajectories(rows, trajs)
        else:
            out = trainer.task.reward_with_rollout(rows, texts, view)
    clock.rollout += t1 - t0
    clock.reward += time.perf_counter() - t1
    batch.rewards, batch.components = out.rewards.float(), out.components
    batch.row_info = {**batch.row_info, **out.row_info}  # the tree's token_node / row_leaf, then the task's
    trainer.sampler.observe(indices, batch.rewards.view(len(indices), -1))  # the task's rewards (VADE)
    # ConciseR's length reward replaces the rewards of all-correct groups before any group filter sees them
    batch.rewards = filters.length_reward(batch, trainer.cfg.algorithm.filters, trainer.step, trainer.cfg.rollout)
    return batch, n_bad


def prune_draw(trainer: Any, part: RolloutBatch, options: dict[str, Any]) -> RolloutBatch:
    """CPPO on one draw's kept rows: their advantages (collective: every rank calls it on every
    draw, with its rows or none), then per group the ``floor(G (1 - prune_ratio))`` rows of largest
    |A|, which keep these advantages in ``draw_advantages``."""
    a = trainer.cfg.algorithm
    rewards = filters.shaped_rewards(part, a.filters, trainer.cfg.rollout.max_new_tokens)
    adv = trainer.advantages(rewards, part.group_ids, [s.id for s in part.samples])
    if len(part) == 0:
        return part
    part.draw_advantages = adv
    keep = GROUP_FILTERS.get("cppo_prune")(adv, part.group_ids, **options).cpu()
    return part.select(torch.nonzero(keep).flatten())


def draw_batch(trainer: Any, clock: Any) -> tuple[RolloutBatch, dict[str, float]]:
    """The step's rollout batch and its metrics (``draws``, ``groups_kept_frac``: rows kept over
    rows drawn, ``reward_mean`` and ``reward/<component>`` over everything drawn)."""
    r, a = trainer.cfg.rollout, trainer.cfg.algorithm
    settings = generation_settings(trainer)
    cppo = filters.refill_options(a.filters, "cppo_prune")
    redraw = a.dynamic_sampling or cppo is not None or filters.refill_options(a.filters, "lspo") is not None
    target = trainer.rows_per_step()
    kept: list[RolloutBatch] = []
    drawn_rewards: list[torch.Tensor] = []
    drawn_components: dict[str, list[torch.Tensor]] = {}
    kept_rows, draws, seen_groups, dropped = 0, 0, 0, 0
    trainer.tree_stats = {}  # branching rollouts' token counts, summed over the draws
    while True:
        draws += 1
        batch, n_bad = draw_once(trainer, settings, seen_groups, clock)
        dropped += n_bad
        seen_groups += len(batch) // r.group_size
        drawn_rewards.append(batch.rewards)
        for k, v in batch.components.items():
            drawn_components.setdefault(k, []).append(v.float())
        if not redraw:
            kept.append(batch)
            break
        part = batch.select(torch.nonzero(filters.draw_keep(batch, a.filters, a.dynamic_sampling)).flatten())
        if cppo is not None:
            part = prune_draw(trainer, part, cppo)
        if len(part):
            kept.append(part)
            kept_rows += len(part)
        done = kept_rows >= target or draws >= a.max_draws
        # every rank draws equally often: generation under ZeRO-3 and some rewards are collectives
        if all(trainer.engine.all_gather_object(done)):
            break
    if redraw and not kept:  # every group was dropped: train on the last draw (DAPO: zero advantage)
        kept.append(batch)
    full = RolloutBatch.concat(kept, trainer.policy.pad_token_id)
    if redraw and len(full) > target:
        full = full.select(list(range(target)))
    stats = {"draws": float(draws), "groups_kept_frac": len(full) / (draws * target)}
    if task_skips_bad_rows(trainer.task):
        stats["dropped_samples"] = float(dropped)
    stats.update(trainer.tree_stats)
    stats["reward_mean"] = float(torch.cat(drawn_rewards).mean())
    stats.update({f"reward/{k}": float(torch.cat(v).mean()) for k, v in drawn_components.items()})
    return full, stats


__all__ = ["draw_batch", "draw_once", "generation_settings", "prune_draw"]
