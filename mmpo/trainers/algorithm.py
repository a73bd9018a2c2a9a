"""One algorithm builder: the objective of ``algorithm.*`` built and checked once, at config load.

:func:`build_algorithm` turns the config's names into the core's functions (advantage and its
state, policy loss and its default aggregation, aggregation, KL estimator, KL schedule and its
state, KL placement, entropy coefficient, filters) and checks each against what the trainer's
kind (:mod:`mmpo.trainers.kinds`) and the task can compute. A combination that cannot work is a
:class:`mmpo.errors.ConfigError` naming the key, the value and the trainer kind; nothing is
silently ignored. Stateful pieces keep their state in :attr:`Algorithm.states`, which every
trainer saves in its checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mmpo.config import AlgorithmConfig, RunConfig, check_options
from mmpo.core import ADVANTAGES, AGGREGATIONS, GROUP_FILTERS, KL_ESTIMATORS, KL_SCHEDULES, POLICY_LOSSES
from mmpo.core.registry import state_class
from mmpo.errors import ConfigError
from mmpo.trainers.kinds import TrainerKind

#: ``algorithm.loss_agg`` / ``algorithm.kl_estimator`` value meaning "the loss's / the kind's default"
AUTO = "auto"
#: keywords the trainers pass themselves (they may not be set in ``*_options``)
ADVANTAGE_RESERVED = ("state", "prompt_keys")
SCHEDULE_RESERVED = ("state", "kl")
FILTER_RESERVED = {
    "soft_overlong_punishment": ("lengths",),
    "lspo": ("lengths", "group_ids"),
    "overlong_filter": ("mask", "truncated", "lengths"),
    "cppo_prune": ("advantages", "group_ids"),
    "dynamic": ("metric", "group_ids"),
}


def _refuse(key: str, value: Any, kind: TrainerKind, why: str) -> ConfigError:
    hint = f" ({kind.hint})" if kind.hint else ""
    return ConfigError(f"{key}={value!r} is not supported by the {kind.name} trainer: {why}{hint}")


@dataclass
class Algorithm:
    """The built objective. Functions are the core's registry entries; ``states`` holds the
    state of every stateful piece (``advantage``, ``kl_schedule``), keyed as in checkpoints."""

    config: AlgorithmConfig
    kind: TrainerKind
    advantage_fn: Callable[..., torch.Tensor]
    loss_fn: Callable[..., tuple[torch.Tensor, dict[str, Any]]]
    loss_agg: str
    kl_estimator: str
    kl_fn: Callable[..., torch.Tensor]
    kl_schedule_fn: Callable[..., float]
    uses_kl: bool
    states: dict[str, Any] = field(default_factory=dict)

    @property
    def loss_options(self) -> dict[str, Any]:
        return self.config.loss_options

    @property
    def entropy_coef(self) -> float:
        return float(self.config.entropy_coef)

    @property
    def kl_placement(self) -> str:
        return self.config.kl_placement

    def advantages(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, prompt_keys: list[str] | None = None
    ) -> torch.Tensor:
        """``advantage_fn(rewards [N], group_ids [N])`` -> ``[N]`` float32, with its state carried
        across steps; ``prompt_keys`` (one str per row) name the prompts for ``dcpo_sas``."""
        opts = dict(self.config.advantage_options)
        if "advantage" in self.states:
            opts["state"] = self.states["advantage"]
            if self.config.advantage == "dcpo_sas" and prompt_keys is not None:
                opts.setdefault("prompt_keys", list(prompt_keys))
        return self.advantage_fn(rewards.float(), group_ids, **opts).float()

    def beta(self, step: int, total_steps: int, last_kl: float | None) -> float:
        """The KL coefficient at ``step`` (0 when no KL term is on); stateful schedules read the
        last measured KL."""
        if not self.uses_kl:
            return 0.0
        opts = dict(self.config.kl_options)
        if "kl_schedule" in self.states:
            opts["state"] = self.states["kl_schedule"]
            opts["kl"] = last_kl
        return float(self.kl_schedule_fn(step, total_steps, **opts))

    def kl(self, *args: torch.Tensor) -> torch.Tensor:
        """Per-unit KL ``[N, T]``: ``(logp, logp_ref)`` for sample estimators, ``(mean, mean_ref,
        sigma)`` for ``gaussian``."""
        return self.kl_fn(*args)


def kl_is_on(cfg: AlgorithmConfig) -> bool:
    """Whether beta can be non-zero: any schedule but ``constant`` with ``beta`` 0."""
    if cfg.kl_schedule == "constant":
        return float(cfg.kl_options.get("beta", 0.0)) > 0.0
    return True


def build_algorithm(cfg: RunConfig | AlgorithmConfig, kind: TrainerKind, task: Any = None) -> Algorithm:
    """Build and check the objective for a trainer of ``kind`` running ``task``.

    Raises ConfigError (naming key, value and kind) for a combination the trainer cannot run.
    The task may narrow the kind: ``task.unit_densities`` (bool) says whether its action units'
    log-probs are densities; ``task.row_info_keys`` names the per-row tensors its rewards attach
    (e.g. ARES's ``bucket``, which ``kl_schedule: ares_bucket`` needs).
    """
    a = cfg.algorithm if isinstance(cfg, RunConfig) else cfg
    advantage_fn = ADVANTAGES.get(a.advantage)
    loss_fn = POLICY_LOSSES.get(a.loss)
    check_options(advantage_fn, a.advantage_options, "algorithm.advantage_options", ADVANTAGE_RESERVED)
    check_options(loss_fn, a.loss_options, "algorithm.loss_options")
    densities = getattr(task, "unit_densities", None)
    densities = kind.densities if densities is None else bool(densities)
    if densities and getattr(loss_fn, "needs_probabilities", False):
        raise _refuse(
            "algorithm.loss",
            a.loss,
            kind,
            "its bounds come from the old action's probability, and these log-probs are densities "
            "(no probability in [0, 1])",
        )
    loss_agg = a.loss_agg if a.loss_agg != AUTO else getattr(loss_fn, "default_agg_mode", "token-mean")
    AGGREGATIONS.get(loss_agg)
    # -- KL ------------------------------------------------------------------------------
    schedule_fn = KL_SCHEDULES.get(a.kl_schedule)
    check_options(schedule_fn, a.kl_options, "algorithm.kl_options", SCHEDULE_RESERVED)
    uses_kl = kl_is_on(a)
    estimator = a.kl_estimator if a.kl_estimator != AUTO else kind.default_kl_estimator
    if uses_kl:
        if not kind.kl_estimators:
            what = "algorithm.kl_options.beta" if a.kl_schedule == "constant" else "algorithm.kl_schedule"
            value = a.kl_options.get("beta") if a.kl_schedule == "constant" else a.kl_schedule
            raise _refuse(
                what, value, kind, "it holds no reference policy, so no KL term (set kl_schedule constant with beta 0)"
            )
        if estimator not in kind.kl_estimators:
            raise _refuse("algorithm.kl_estimator", estimator, kind, f"it computes {', '.join(kind.kl_estimators)}")
        if a.kl_placement not in kind.kl_placements:
            raise _refuse(
                "algorithm.kl_placement", a.kl_placement, kind, f"beta * KL goes in {', '.join(kind.kl_placements)}"
            )
        needs = getattr(schedule_fn, "needs_row_info", ())
        have = tuple(getattr(task, "row_info_keys", ()) or ())
        missing = [k for k in needs if k not in have]
        if missing:
            raise _refuse(
                "algorithm.kl_schedule",
                a.kl_schedule,
                kind,
                f"task {getattr(task, 'name', '?')!r} gives no per-row {', '.join(missing)} "
                "(vlm_reasoning with task.ares.enabled assigns difficulty buckets)",
            )
    kl_fn = KL_ESTIMATORS.get(estimator)
    # -- entropy, filters, dynamic sampling ----------------------------------------------------------
    if a.entropy_coef and not kind.entropy:
        raise _refuse(
            "algorithm.entropy_coef",
            a.entropy_coef,
            kind,
            "its policy pass gives no per-unit entropy that the weights change",
        )
    if a.dynamic_sampling and not kind.dynamic_sampling:
        raise _refuse("algorithm.dynamic_sampling", True, kind, "it does not redraw prompts")
    for i, item in enumerate(a.filters):
        name = item["name"]
        if name not in kind.filters:
            runs = ", ".join(kind.filters) or "none"
            raise _refuse(f"algorithm.filters[{i}].name", name, kind, f"it runs these filters: {runs}")
        options = {k: v for k, v in item.items() if k != "name"}
        check_options(GROUP_FILTERS.get(name), options, f"algorithm.filters[{i}]", FILTER_RESERVED.get(name, ()))
    states: dict[str, Any] = {}
    for key, fn in (("advantage", advantage_fn), ("kl_schedule", schedule_fn)):
        cls = state_class(fn)
        if cls is not None and (key == "advantage" or uses_kl):
            states[key] = cls()
    return Algorithm(a, kind, advantage_fn, loss_fn, loss_agg, estimator, kl_fn, schedule_fn, uses_kl, states)


__all__ = ["Algorithm", "AUTO", "build_algorithm", "kl_is_on"]
