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
from mmpo.trainers.method_inputs import available_inputs, check_inputs

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
    "capo": ("kl_hat", "mask"),
    "conciser_length": ("rewards", "lengths", "group_ids", "step"),
    "d3s": ("advantages", "entropy", "mask", "progress"),
}
#: advantage options the trainer reads itself (the judge / encoder it builds), never passed to the core
TRAINER_ADVANTAGE_OPTIONS: dict[str, tuple[str, ...]] = {"spectral_po": ("judge",), "grpo_scaling": ("encoder",)}
#: filter options the trainer reads itself (the proxy's learning rate defaults to the optimizer's)
TRAINER_FILTER_OPTIONS: dict[str, tuple[str, ...]] = {
    "capo": ("lr",),
    # draw more prompts for the rows the filter drops (the token trainer's draw loop)
    "lspo": ("refill",),
    "cppo_prune": ("refill",),
}


def _check_refill(
    key: str, item: dict[str, Any], a: AlgorithmConfig, advantage_fn: Any, uses_kl: bool, inputs: tuple[str, ...]
) -> None:
    """``refill`` (token trainer): a bool, only on ``lspo`` / ``cppo_prune``. CPPO's refill
    estimates each draw's advantages from its rewards, kept for training, so it refuses a stateful
    estimator (its state would move twice a step), one that reads more than rewards (``inputs``:
    the tensors the advantage or the loss is given, e.g. entropies, SRFT's demonstrations, which
    exist only after the draw loop) and KL in the reward (not known at draw time)."""
    name, value = item["name"], item["refill"]
    if name not in ("lspo", "cppo_prune"):
        raise ConfigError(f"{key}={value!r}: refill is an option of lspo and cppo_prune only, not of {name!r}")
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if name == "cppo_prune" and value:
        if state_class(advantage_fn) is not None:
            raise ConfigError(
                f"{key}=True with algorithm.advantage={a.advantage!r}: a stateful estimator's state would "
                "move once per draw and again on the kept batch"
            )
        if inputs:
            raise ConfigError(
                f"{key}=True with algorithm.advantage={a.advantage!r} / algorithm.loss={a.loss!r}: the draw's "
                f"advantages are estimated from rewards alone, and these read {', '.join(inputs)}"
            )
        if uses_kl and a.kl_placement == "reward":
            raise ConfigError(
                f"{key}=True with algorithm.kl_placement='reward': the draw's advantages are estimated "
                "before the reference log-probs exist (use kl_placement: loss)"
            )


def _check_credit_once(a: AlgorithmConfig, kind: TrainerKind, tree: bool) -> None:
    """``credit_once`` needs tree rows (their token nodes) and a loss it can merge exactly."""
    if not tree or "token_node" not in kind.advantage_inputs:
        raise _refuse("algorithm.credit_once", True, kind, "only branching rollouts (rollout.tree) share tokens")
    opts = a.loss_options
    gppo = a.loss == "ce_gppo" and float(opts.get("beta1", 0.75)) == 0.0 and float(opts.get("beta2", 1.0)) == 1.0
    if a.loss != "ppo_clip" and not gppo:
        raise ConfigError(
            f"algorithm.credit_once=True with algorithm.loss={a.loss!r}: the merged loss is exact for ppo_clip and "
            "for ce_gppo with beta1 0, beta2 1 only"
        )


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
    #: names of the tensors the advantage estimator / the policy loss are given (see method_inputs)
    advantage_inputs: tuple[str, ...] = ()
    loss_inputs: tuple[str, ...] = ()

    @property
    def core_advantage_options(self) -> dict[str, Any]:
        """``advantage_options`` without the ones the trainer reads itself (a judge, an encoder)."""
        own = TRAINER_ADVANTAGE_OPTIONS.get(self.config.advantage, ())
        return {k: v for k, v in self.config.advantage_options.items() if k not in own}

    @property
    def topk(self) -> int:
        """K of the top-K log-probs the policy loss reads (0: none), from its ``topk_option``."""
        name = getattr(self.loss_fn, "topk_option", None)
        if not name:
            return 0
        import inspect

        default = inspect.signature(self.loss_fn).parameters[name].default
        return int(self.config.loss_options.get(name, default))

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
        self,
        rewards: torch.Tensor,
        group_ids: torch.Tensor,
        prompt_keys: list[str] | None = None,
        inputs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``advantage_fn(rewards [N], group_ids [N], **inputs)`` -> ``[N]`` or ``[N, T]`` float32,
        with its state carried across steps; ``prompt_keys`` (one str per row) name the prompts for
        ``dcpo_sas``; ``inputs`` holds at least :attr:`advantage_inputs` (others are not passed)."""
        opts = self.core_advantage_options
        given = inputs or {}
        missing = [n for n in self.advantage_inputs if n not in given]
        if missing:
            raise ValueError(f"advantage {self.config.advantage!r} was not given {', '.join(missing)}")
        opts.update({n: given[n] for n in self.advantage_inputs})
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


def check_option_names(a: AlgorithmConfig) -> None:
    """ConfigError for an option the chosen advantage, loss, KL schedule or filter does not take
    (the options the trainer reads itself, such as a judge or ``refill``, left out)."""
    own = TRAINER_ADVANTAGE_OPTIONS.get(a.advantage, ())
    options = {k: v for k, v in a.advantage_options.items() if k not in own}
    check_options(ADVANTAGES.get(a.advantage), options, "algorithm.advantage_options", ADVANTAGE_RESERVED)
    check_options(POLICY_LOSSES.get(a.loss), a.loss_options, "algorithm.loss_options")
    check_options(KL_SCHEDULES.get(a.kl_schedule), a.kl_options, "algorithm.kl_options", SCHEDULE_RESERVED)
    for i, item in enumerate(a.filters):
        if "refill" in item:
            _check_refill(f"algorithm.filters[{i}].refill", item, a, None, False, ())
        own = TRAINER_FILTER_OPTIONS.get(item["name"], ())
        options = {k: v for k, v in item.items() if k != "name" and k not in own}
        check_options(
            GROUP_FILTERS.get(item["name"]), options, f"algorithm.filters[{i}]", FILTER_RESERVED.get(item["name"], ())
        )


def build_algorithm(cfg: RunConfig | AlgorithmConfig, kind: TrainerKind, task: Any = None) -> Algorithm:
    """Build and check the objective for a trainer of ``kind`` running ``task``.

    Raises ConfigError (naming key, value and kind) for a combination the trainer cannot run.
    The task may narrow the kind: ``task.unit_densities`` (bool) says whether its action units'
    log-probs are densities; ``task.row_info_keys`` names the per-row tensors its rewards attach
    (e.g. ARES's ``bucket``, which ``kl_schedule: ares_bucket`` needs).
    """
    a = cfg.algorithm if isinstance(cfg, RunConfig) else cfg
    advantage_fn = ADVANTAGES.get(a.advantage)
    need = getattr(task, "required_advantage", None)
    if need and a.advantage != need:
        raise ConfigError(
            f"algorithm.advantage={a.advantage!r}: task {getattr(task, 'name', '?')!r} as configured needs "
            f"algorithm.advantage: {need} (its rows carry what that estimator reads, e.g. task.hipo.enabled)"
        )
    loss_fn = POLICY_LOSSES.get(a.loss)
    tree = isinstance(cfg, RunConfig) and getattr(cfg.rollout, "tree", None) is not None
    have = available_inputs(tuple(kind.advantage_inputs), task, tree)
    check_option_names(a)
    own = TRAINER_ADVANTAGE_OPTIONS.get(a.advantage, ())
    core_adv_options = {k: v for k, v in a.advantage_options.items() if k not in own}
    advantage_inputs = check_inputs("algorithm.advantage", a.advantage, advantage_fn, core_adv_options, have, kind.name)
    loss_inputs = check_inputs(
        "algorithm.loss",
        a.loss,
        loss_fn,
        a.loss_options,
        available_inputs(tuple(kind.loss_inputs), task),
        kind.name,
    )
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
    if isinstance(cfg, RunConfig) and cfg.rollout.adaptive_temperature is not None and not kind.samples_tokens:
        raise _refuse("rollout.adaptive_temperature", cfg.rollout.adaptive_temperature, kind, "it samples no tokens")
    if isinstance(cfg, RunConfig) and cfg.rollout.env_workers != "local" and not kind.environments:
        raise _refuse("rollout.env_workers", cfg.rollout.env_workers, kind, "it steps no environments")
    if isinstance(cfg, RunConfig) and cfg.model.frozen_dtype != "fp32" and kind.name != "token":
        raise _refuse("model.frozen_dtype", cfg.model.frozen_dtype, kind, "only the token trainer casts frozen weights")
    if isinstance(cfg, RunConfig) and cfg.rollout.padding_free and kind.name != "token":
        raise _refuse("rollout.padding_free", True, kind, "only the token trainer packs its log-prob passes")
    if a.credit_once:
        _check_credit_once(a, kind, tree)
    if a.dynamic_sampling and not kind.dynamic_sampling:
        raise _refuse("algorithm.dynamic_sampling", True, kind, "it does not redraw prompts")
    for i, item in enumerate(a.filters):
        name = item["name"]
        if name not in kind.filters:
            runs = ", ".join(kind.filters) or "none"
            raise _refuse(f"algorithm.filters[{i}].name", name, kind, f"it runs these filters: {runs}")
        if "refill" in item:
            demo = tuple(n for n in loss_inputs if n == "demo")  # SRFT's demonstrations join groups before it
            _check_refill(f"algorithm.filters[{i}].refill", item, a, advantage_fn, uses_kl, (*advantage_inputs, *demo))
    states: dict[str, Any] = {}
    for key, fn in (("advantage", advantage_fn), ("kl_schedule", schedule_fn)):
        cls = state_class(fn)
        if cls is not None and (key == "advantage" or uses_kl):
            states[key] = cls()
    return Algorithm(
        a,
        kind,
        advantage_fn,
        loss_fn,
        loss_agg,
        estimator,
        kl_fn,
        schedule_fn,
        uses_kl,
        states,
        advantage_inputs=advantage_inputs,
        loss_inputs=loss_inputs,
    )


__all__ = ["Algorithm", "AUTO", "build_algorithm", "kl_is_on"]
