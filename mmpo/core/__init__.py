"""The group-relative optimizer core: pure tensor functions, no models, no I/O.

Registries (an unknown name raises :class:`mmpo.errors.UnknownNameError` listing valid ones):

- ``ADVANTAGES``: ``fn(rewards [N], group_ids [N], **options) -> advantages [N]``
- ``POLICY_LOSSES``: ``fn(logp, logp_old, advantages, mask, **options) -> (loss [N, T], metrics)``
- ``AGGREGATIONS`` / :func:`aggregate`: loss_matrix [N, T] -> scalar
- ``KL_ESTIMATORS``: ``fn(logp [N, T], logp_ref [N, T]) -> [N, T]`` (``gaussian`` differs)
- ``KL_SCHEDULES``: ``fn(step, total_steps, **options) -> beta``
- ``GROUP_FILTERS``: sampling / pruning filters (signatures per entry)

Stateful entries expose ``fn.state_cls`` (see :func:`mmpo.core.registry.state_class`).
"""

from mmpo.core import capo as _capo  # noqa: F401  (registers the capo / capo_curvature filter)
from mmpo.core import credit_once as _credit_once  # noqa: F401  (tree rows: the loss once per unique token)
from mmpo.core import entropy
from mmpo.core import entropy_advantages as _entropy_advantages  # noqa: F401  (registers gtpo, grpo_s)
from mmpo.core import hapo as _hapo  # noqa: F401  (registers hapo_tlga, the hapo loss)
from mmpo.core import mode_advantages as _mode_advantages  # noqa: F401  (registers hipo)
from mmpo.core import reward_shaping as _reward_shaping  # noqa: F401  (registers conciser_length)
from mmpo.core import semantic_advantages as _semantic_advantages  # noqa: F401  (registers seed_grpo, copo)
from mmpo.core import shaped_advantages as _shaped_advantages  # noqa: F401  (spectral_po, grpo_scaling)
from mmpo.core import simko as _simko  # noqa: F401  (registers the simko loss)
from mmpo.core import srft as _srft  # noqa: F401  (registers the srft loss)
from mmpo.core import stateful_advantages as _stateful_advantages  # noqa: F401  (registers dcpo_sas, rank_ema)
from mmpo.core import tree_advantages as _tree_advantages  # noqa: F401  (tree_subgroup, arpo_hard, aepo_agent)
from mmpo.core.advantages import ADVANTAGES
from mmpo.core.aggregation import AGGREGATIONS, aggregate
from mmpo.core.batch_filler import GroupBatchFiller
from mmpo.core.kl import KL_ESTIMATORS, kl_to_reward
from mmpo.core.losses import POLICY_LOSSES, chunk_log_ratio, dcpo_bounds
from mmpo.core.registry import Registry, state_class
from mmpo.core.sampling import GROUP_FILTERS
from mmpo.core.schedules import KL_SCHEDULES

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "GROUP_FILTERS",
    "GroupBatchFiller",
    "KL_ESTIMATORS",
    "KL_SCHEDULES",
    "POLICY_LOSSES",
    "Registry",
    "aggregate",
    "chunk_log_ratio",
    "dcpo_bounds",
    "entropy",
    "kl_to_reward",
    "state_class",
]
