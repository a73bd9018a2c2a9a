"""Start, join and stop the Ray instance that mmpo's workers run in (docs/distributed.md).

Environment workers (:mod:`mmpo.rollout.ray_envs`) and reward scorers (:mod:`mmpo.rewards.ray_scorer`)
share one Ray connection per process. :func:`acquire_ray` initialises Ray on first use: with no
address it starts a local instance of ``num_cpus`` CPUs (no dashboard, no usage statistics, the
workers' logs kept out of the trainer's output); with an address (``auto``, ``ray://host:10001``,
``host:6379``) it joins that cluster. Each acquire is paired with a :func:`release_ray`; the last
release shuts down a Ray that :func:`acquire_ray` started (one that was already initialised, e.g.
by the user, is left running).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from mmpo.errors import ConfigError

_state = {"users": 0, "started": False}


def ray_module(what: str = "rollout.env_workers=ray") -> Any:
    """The ``ray`` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"{what} needs Ray: pip install 'mmpo[ray]' (or 'ray>=2.40')") from exc
    return ray


def acquire_ray(address: str | None, num_cpus: float, what: str = "rollout.env_workers=ray") -> Any:
    """The ``ray`` module, initialised: ``address`` None or ``"local"`` starts a local instance of
    ``ceil(num_cpus)`` CPUs, any other address joins that cluster; an already initialised Ray is used
    as it is. Pair every call with :func:`release_ray`."""
    ray = ray_module(what)
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        if address in (None, "local"):
            ray.init(address="local", num_cpus=max(1, math.ceil(num_cpus)), **quiet)
        else:
            try:
                ray.init(address=address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"rollout.ray.address={address!r}: cannot join that Ray cluster ({exc})") from exc
        _state["started"] = True
    _state["users"] += 1
    return ray


def release_ray() -> None:
    """One user fewer; the last one shuts down a Ray instance that :func:`acquire_ray` started."""
    _state["users"] = max(0, _state["users"] - 1)
    if _state["users"] == 0 and _state["started"]:
        import ray

        ray.shutdown()
        _state["started"] = False


__all__ = ["acquire_ray", "ray_module", "release_ray"]
