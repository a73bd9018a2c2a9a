"""The kinds of action unit a trainer optimises, and what each can compute.

Every trainer declares one :class:`TrainerKind`. The algorithm builder
(:func:`mmpo.trainers.algorithm.build_algorithm`) checks the configured objective against it at
config load, so an option a trainer cannot honour is refused there instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainerKind:
    """What a kind of trainer can do with the objective.

    - ``densities``: its log-probs are log-*densities* of continuous actions (no probability in
      [0, 1] exists, so losses built on the old token probability, such as DCPO's bounds, are
      refused); a task may override this per config (``Task.unit_densities``).
    - ``kl_estimators``: the KL estimators it computes (``gaussian`` is the closed form on the
      policy's means, the others are sample estimators on ``logp - logp_ref``); empty when it
      holds no reference policy.
    - ``default_kl_estimator``: what ``algorithm.kl_estimator: auto`` means here.
    - ``kl_placements``: where beta * KL may go (``loss`` or ``reward``).
    - ``entropy``: the policy pass gives a per-unit entropy that depends on the weights.
    - ``filters``: the ``GROUP_FILTERS`` names it runs from ``algorithm.filters``.
    - ``dynamic_sampling``: it runs DAPO dynamic sampling (``algorithm.dynamic_sampling``).
    - ``advantage_inputs``: the tensors it can hand an advantage estimator beyond rewards and
      groups (see :mod:`mmpo.trainers.method_inputs` for their names and meanings);
    - ``loss_inputs``: the tensors it can hand a policy loss beyond log-probs, advantages and mask;
    - ``samples_tokens``: it samples tokens from a vocabulary (``rollout.adaptive_temperature``);
    - ``environments``: it steps environments (``rollout.env_workers: ray`` runs them in Ray actors);
    - ``hint``: where the equivalent setting lives for this kind, shown in refusals.
    """

    name: str
    densities: bool
    kl_estimators: tuple[str, ...]
    default_kl_estimator: str
    kl_placements: tuple[str, ...] = ("loss",)
    entropy: bool = False
    filters: tuple[str, ...] = ()
    dynamic_sampling: bool = False
    advantage_inputs: tuple[str, ...] = ()
    loss_inputs: tuple[str, ...] = ()
    samples_tokens: bool = False
    environments: bool = False
    hint: str = ""


SAMPLE_KL = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "kl+", "k3+", "low_var_kl+")

TOKEN = TrainerKind(
    "token",
    densities=False,
    kl_estimators=SAMPLE_KL,
    default_kl_estimator="k3",
    kl_placements=("loss", "reward"),
    entropy=True,
    filters=(
        "soft_overlong_punishment",
        "lspo",
        "overlong_filter",
        "cppo_prune",
        "dynamic",
        "capo",
        "conciser_length",
        "d3s",
    ),
    dynamic_sampling=True,
    advantage_inputs=(
        "mask",
        "lengths",
        "entropy",
        "seq_logp",
        "cluster_ids",
        "judge_scores",
        "components",
        "demo_reward",
        "data_hardness",
        "token_node",
        "row_leaf",
    ),
    loss_inputs=("entropy", "topk_logp", "old_topk_logp", "is_top1", "rewards", "demo"),
    samples_tokens=True,
)
DENOISING = TrainerKind(
    "denoising",
    densities=True,
    kl_estimators=("gaussian",),
    default_kl_estimator="gaussian",
    advantage_inputs=("components",),
    hint="the reference KL is Flow-GRPO's closed-form Gaussian KL of the step means (task.kl_std picks its std)",
)
NOISE = TrainerKind(
    "noise",
    densities=True,
    kl_estimators=(),
    default_kl_estimator="gaussian",
    advantage_inputs=("components",),
    hint="FIND's pull toward N(0, I) is task.reg_weight",
)
ENVIRONMENT = TrainerKind(
    "environment",
    densities=False,
    kl_estimators=SAMPLE_KL,
    default_kl_estimator="k3",
    advantage_inputs=("lengths",),
    environments=True,
    hint="the KL is to a frozen copy of the start policy, in the loss only (sample estimators, also on the "
    "log-densities of a continuous head); RIPT's context filtering is task.ript.dynamic_sampling / "
    "task.ript.skip_solved",
)
SERIES = TrainerKind(
    "series",
    densities=True,
    kl_estimators=("gaussian", *SAMPLE_KL),
    default_kl_estimator="gaussian",
)

KINDS: dict[str, TrainerKind] = {k.name: k for k in (TOKEN, DENOISING, NOISE, ENVIRONMENT, SERIES)}

__all__ = ["TrainerKind", "KINDS", "TOKEN", "DENOISING", "NOISE", "ENVIRONMENT", "SERIES", "SAMPLE_KL"]
