"""Rollout: engines that sample completions, and the data they return."""

from mmpo.rollout.engines import hf as _hf  # noqa: F401  (registers "hf")

# registers "vllm"; the module imports vllm only when a colocate engine is built, so mmpo
# never needs vllm installed (server mode runs it in its own environment, `make vllm-env`)
from mmpo.rollout.engines import vllm as _vllm  # noqa: F401
from mmpo.rollout.engines.base import ROLLOUT_ENGINES

__all__ = ["ROLLOUT_ENGINES"]
