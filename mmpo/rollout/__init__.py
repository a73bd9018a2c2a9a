"""Rollout: engines that sample completions, and the data they return."""
from mmpo.core.registry import Registry

ROLLOUT_ENGINES: Registry = Registry("rollout engine")

from mmpo.rollout.engines import hf as _hf  # noqa: E402,F401  (registers "hf")

__all__ = ["ROLLOUT_ENGINES"]
