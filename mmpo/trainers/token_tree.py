"""Branching rollouts in the token trainer (``rollout.tree``; see ``docs/algorithms.md``).

A group's G rows are the leaves of a tree instead of G independent samples:

- single-turn (``treepo``, arXiv 2508.17445; ``latr``): :func:`mmpo.rollout.engines.tree.tree_generate`
  samples each prompt's forest in one KV-cache loop, every shared token decoded once;
- multi-turn (``arpo``, arXiv 2507.19849; ``aepo_agent``, arXiv 2510.14545): the agent loop forks
  rows right after tool results (:func:`mmpo.rollout.agent_branching.branching_agent_rollout`).

Every leaf is one row of the batch, as an independent sample would be ("replicated rows"), so the
core runs unchanged; rows carry ``row_info['token_node'] [N, T]`` and ``row_info['row_leaf'] [N]``
for the tree advantages (``tree_subgroup``, ``arpo_hard``). The sampler's log-probs are not kept:
LATR forces tokens, so the trainer recomputes pi_old (``rollout.is_correction`` is refused).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from mmpo.errors import ConfigError
from mmpo.rollout.batch import RolloutBatch
from mmpo.rollout.engines.base import GenerationSettings

SINGLE_TURN = ("treepo", "latr")
MULTI_TURN = ("arpo", "aepo_agent")


def tree_method(cfg: Any) -> str | None:
    """The ``rollout.tree`` method, or None when rollouts do not branch."""
    tree = getattr(cfg.rollout, "tree", None)
    return None if tree is None else str(tree.get("method"))


def check_tree(cfg: Any, task: Any) -> None:
    """Refuse at load a ``rollout.tree`` this task's rollouts cannot run, and a bad ARPO / AEPO
    option (their policies are built here once to check them)."""
    method = tree_method(cfg)
    if method is None:
        return
    multi = bool(task.tools())
    if method in SINGLE_TURN and multi:
        raise ConfigError(
            f"rollout.tree.method={method!r} branches single-turn completions; task {task.name!r} runs multi-turn "
            "tool rollouts (use arpo or aepo_agent, which branch after tool results)"
        )
    if method in MULTI_TURN:
        if not multi:
            raise ConfigError(
                f"rollout.tree.method={method!r} branches after tool results; task {task.name!r} calls no tools "
                "(use treepo or latr for single-turn completions)"
            )
        from mmpo.rollout.agent_branching import build_branching_policy

        options = {k: v for k, v in cfg.rollout.tree.items() if k not in ("method", "n")}
        build_branching_policy(method, int(cfg.rollout.tree.get("n") or cfg.rollout.group_size), options)
    if cfg.rollout.is_correction != "none":
        raise ConfigError(
            f"rollout.is_correction={cfg.rollout.is_correction!r} with rollout.tree: tree rows carry no sampling "
            "log-probs to correct against (LATR forces tokens; the trainer recomputes pi_old), set is_correction: none"
        )
    if cfg.rollout.engine != "hf":
        raise ConfigError(
            f"rollout.tree needs rollout.engine: hf (its KV-cache loop branches), got {cfg.rollout.engine!r}"
        )
    n = cfg.rollout.tree.get("n")
    if n is not None and int(n) != cfg.rollout.group_size:
        raise ConfigError(
            f"rollout.tree.n={n!r}: the leaves of a group are its rows, so n must equal rollout.group_size "
            f"({cfg.rollout.group_size}); leave n out"
        )


def tree_rollout(
    trainer: Any, prompts: list[Any], settings: GenerationSettings
) -> tuple[list[dict], Any, dict[str, torch.Tensor], dict[str, float]]:
    """Single-turn branching: ``(per-row encodings, rows, row_info, stats)``; rows are group-major,
    G leaves per prompt, each row's encoding the (shared) encoding of its prompt."""
    from mmpo.rollout.engines.tree import tree_generate

    unique = [trainer.policy.encode(s.messages) for s in prompts]
    ctx = trainer.engine.sampling()
    G = trainer.cfg.rollout.group_size
    with ctx:
        forest, rows, stats = tree_generate(
            trainer.policy,
            trainer.engine.module,
            trainer.policy.collate(unique),
            dict(trainer.cfg.rollout.tree),
            settings,
            trainer.device,
            group_size=G,
            step=trainer.step,
        )
    if len(rows.row_group) != G * len(prompts):
        raise RuntimeError(f"the tree engine gave {len(rows.row_group)} leaves for {len(prompts)} groups of {G}")
    encodings = [unique[int(g)] for g in rows.row_group]
    info = {"token_node": rows.token_node.cpu(), "row_leaf": rows.row_leaf.cpu()}
    rows_truncated = forest.truncated(list(rows.row_leaf.tolist()))
    return encodings, (rows.completion_ids.cpu(), rows.mask.cpu(), rows_truncated), info, _tree_stats(stats)


def branching_agent_batch(trainer: Any, prompts: list[Any], rows: list[Any], group_ids: torch.Tensor):
    """Multi-turn branching (ARPO / AEPO): ``(batch, trajectories)`` with G leaves per prompt."""
    from mmpo.rollout.agent_branching import branching_agent_rollout, build_branching_policy, leaf_ids

    cfg = trainer.cfg
    tree = dict(cfg.rollout.tree)
    options = {k: v for k, v in tree.items() if k not in ("method", "n")}
    policy = build_branching_policy(tree["method"], cfg.rollout.group_size, options)
    encodings = [trainer.policy.encode(trainer.task.rollout_messages(p, 0)) for p in prompts]
    contexts = [trainer.task.tool_context(p) for p in prompts]
    ctx = nullcontext() if trainer.rollout_engine.holds_weights else trainer.engine.sampling()
    with ctx:
        trajs, forest, stats = branching_agent_rollout(
            trainer.agent, trainer.engine.module, encodings, contexts, policy, trainer.device
        )
    pad = trainer.policy.pad_token_id
    tree_rows = forest.materialise(pad, leaf_ids(trajs))
    batch = RolloutBatch.from_trajectories(rows, trajs, group_ids, pad, sampling_logprobs=False)
    width = batch.completion_ids.shape[1]
    node = torch.full((len(trajs), width), -1, dtype=torch.long)
    w = min(width, tree_rows.token_node.shape[1])
    node[:, :w] = tree_rows.token_node[:, :w]
    batch.row_info = {"token_node": node, "row_leaf": tree_rows.row_leaf.cpu()}
    add_stats(trainer.tree_stats, _tree_stats(stats))
    return batch, trajs


def add_stats(into: dict[str, float], stats: dict[str, float]) -> None:
    for k, v in stats.items():
        into[k] = into.get(k, 0.0) + v


def _tree_stats(stats: dict[str, float]) -> dict[str, float]:
    keep = ("decoded_tokens", "leaf_tokens", "replicated_decoded_tokens", "branches", "peak_rows", "rounds")
    out = {f"tree/{k}": float(v) for k, v in stats.items() if k in keep and k != "decoded_tokens"}
    if "decoded_tokens" in stats:  # the same key as plain sampling's, for equal-budget comparisons
        out["decoded_tokens"] = float(stats["decoded_tokens"])
    return out


__all__ = [
    "MULTI_TURN",
    "SINGLE_TURN",
    "add_stats",
    "branching_agent_batch",
    "check_tree",
    "tree_method",
    "tree_rollout",
]
