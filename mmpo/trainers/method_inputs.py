"""The tensors a method needs beyond rewards and groups, and whether a trainer can give them.

An ``ADVANTAGES`` entry may declare ``fn.inputs`` (required) and ``fn.optional_inputs`` (passed
when available); a ``POLICY_LOSSES`` entry declares ``fn.inputs`` the same way. ``fn.inputs`` is a
tuple of names or a callable ``options -> tuple`` when the set depends on an option (BNPO's
``decompose``). A trainer kind lists what it can give (:class:`mmpo.trainers.kinds.TrainerKind`
``advantage_inputs`` / ``loss_inputs``); a task adds its per-row ``row_info_keys`` and, when it
writes demonstrations, the inputs built from them. :func:`check_inputs` refuses at config load a
method whose inputs the trainer cannot give, naming the key, the value, the missing input and why.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from mmpo.errors import ConfigError

#: every input name, with what it holds (shapes: N rows, T units, M components, K top-K)
INPUTS: dict[str, str] = {
    "mask": "[N, T] bool response mask",
    "lengths": "[N] valid units per row (tokens of a completion, steps of an episode)",
    "entropy": "[N, T] full-vocabulary entropy (advantages: pi_old's; losses: the current forward's), detached",
    "seq_logp": "[N] sum of pi_old's log-probs of the sampled tokens",
    "cluster_ids": "[N] answer cluster within the group (the task's parsed answer; -1 = none)",
    "judge_scores": "[N] partial credit in [0, 1] from the configured judge (NaN = not judged)",
    "components": "[N, M] the task's reward components",
    "demo_reward": "[N] reward of the prompt's demonstration (NaN = none)",
    "data_hardness": "[N] (1 - cos(E(prompt), E(demonstration))) / 2 from the configured encoder",
    "topk_logp": "[N, T, K] log-probs of the K most likely tokens (with grad)",
    "old_topk_logp": "[N, T, K] the same under pi_old",
    "is_top1": "[N, T] bool: the sampled token is the current argmax",
    "rewards": "[N] sequence rewards",
    "demo": "[N] bool: the row is a demonstration, not a rollout",
    "token_node": "[N, T] long: the tree node of each token (-1 on padding), from a branching rollout",
    "row_leaf": "[N] long: the leaf node of each row, from a branching rollout",
    "mode": "[N] long: the rollout's mode (HiPO: 1 think-on, 0 think-off), from the task",
    "segment_mask": "[N, T] bool: the mode and justification tokens (HiPO), from the task",
}
#: inputs made from the task's demonstrations (``TokenTask.gives_demonstrations``)
FROM_DEMONSTRATIONS = ("demo_reward", "data_hardness", "demo")
#: inputs of branching rollouts (``rollout.tree``)
FROM_TREE = ("token_node", "row_leaf")


def required_inputs(fn: Callable[..., Any], options: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The names ``fn`` must be given (``fn.inputs``, evaluated on ``options`` when callable)."""
    need = getattr(fn, "inputs", ())
    if callable(need):
        need = need(dict(options or {}))
    return tuple(need)


def optional_inputs(fn: Callable[..., Any]) -> tuple[str, ...]:
    return tuple(getattr(fn, "optional_inputs", ()))


def available_inputs(kind_inputs: tuple[str, ...], task: Any, tree: bool = False) -> dict[str, str]:
    """``{name: why it is missing}`` over :data:`INPUTS` plus the task's ``row_info_keys``; an
    empty reason means the trainer gives it (``tree``: rollouts branch, ``rollout.tree`` is set)."""
    row_info = tuple(getattr(task, "row_info_keys", ()) or ())
    demos = bool(getattr(task, "gives_demonstrations", False))
    out: dict[str, str] = {}
    for name in (*INPUTS, *row_info):
        if name in row_info:
            out[name] = ""
        elif name not in kind_inputs:
            out[name] = "this trainer kind does not compute it"
        elif name in FROM_DEMONSTRATIONS and not demos:
            out[name] = f"task {getattr(task, 'name', '?')!r} writes no demonstrations"
        elif name in FROM_TREE and not tree:
            out[name] = "only branching rollouts have tree nodes (set rollout.tree)"
        else:
            out[name] = ""
    return out


def check_inputs(
    key: str, value: str, fn: Callable[..., Any], options: dict[str, Any], have: dict[str, str], kind_name: str
) -> tuple[str, ...]:
    """The inputs to pass ``fn`` (required + available optional ones); a ConfigError naming the
    first required input the trainer cannot give."""
    need = required_inputs(fn, options)
    for name in need:
        why = have.get(name, "no trainer computes it")
        if why:
            raise ConfigError(
                f"{key}={value!r} is not supported by the {kind_name} trainer: it needs {name} "
                f"({INPUTS.get(name, 'a per-row tensor from the task')}), and {why}"
            )
    return need + tuple(n for n in optional_inputs(fn) if n not in need and not have.get(n, "no"))


def reward_inputs(names: tuple[str, ...], components: dict[str, torch.Tensor], rewards: torch.Tensor) -> dict:
    """The inputs every kind builds from its rewards alone: ``components [N, M]`` (in name order;
    the rewards as one column when the task reports none), when ``names`` asks for them."""
    if "components" not in names:
        return {}
    if not components:
        return {"components": rewards.float()[:, None]}
    return {"components": torch.stack([components[k].float() for k in sorted(components)], dim=1)}


def gather_rows(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate the per-row tensors of several ranks along rows; ``[n, T, ...]`` tensors of
    different widths are right-padded with zeros (False) to the widest."""
    out: dict[str, torch.Tensor] = {}
    for name in parts[0] if parts else ():
        ts = [p[name] for p in parts]
        if ts[0].dim() >= 2:
            width = max(t.shape[1] for t in ts)
            ts = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1])) for t in ts]
        out[name] = torch.cat(ts)
    return out


__all__ = [
    "INPUTS",
    "FROM_DEMONSTRATIONS",
    "available_inputs",
    "check_inputs",
    "gather_rows",
    "optional_inputs",
    "required_inputs",
    "reward_inputs",
]
