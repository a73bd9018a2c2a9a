"""Image reward components scored in a pool of Ray actors (docs/distributed.md).

Any component of ``task.rewards`` runs in Ray actors with ``workers: ray``::

    rewards: [{name: clip_score, model: ViT-B-32, weights: /models/clip.safetensors, workers: ray, ray_workers: 4}]

The component is built (and its options checked) in the trainer process as usual, then copied to
``ray_workers`` actors on the first call (its model, if it loads one lazily, loads there). A batch
``images [N, 3, H, W]`` is cut into ``ray_workers`` contiguous chunks, scored in parallel and put
back in order, so the rewards equal the local ones for any component whose score of a row depends
on that row alone (every built-in one). The actors see CPU tensors; the rewards come back on the
images' device. The actors reserve no CPU (the pools of several components share one instance)
and are spread over the cluster's machines. Ray is the instance the run already uses
(``rollout.env_workers: ray``), else the cluster of ``$RAY_ADDRESS``, else a local instance of
``ray_workers`` CPUs (:func:`mmpo.ray_session.acquire_ray`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch

from mmpo.errors import ConfigError
from mmpo.ray_session import acquire_ray, ray_module, release_ray
from mmpo.rewards.image_component import ImageReward, Metas, OptionError, int_option

#: seconds to wait for the actors to start
START_TIMEOUT_S = 300
#: the keys of a reward spec read here (beside name, weight, key)
WORKER_KEYS = ("workers", "ray_workers")


class ScorerWorker:
    """A Ray actor holding one copy of a component."""

    def __init__(self, component: ImageReward) -> None:
        self.component = component

    def pid(self) -> int:
        return os.getpid()

    def score(self, images: torch.Tensor, prompts: list[str], metas: list[Mapping[str, Any]]) -> torch.Tensor:
        """images [n, 3, H, W] -> rewards [n] float32 (CPU)."""
        return torch.as_tensor(self.component(images, prompts, metas)).float().cpu()


class RayScorer(ImageReward):
    """``component`` scored by ``num_workers`` Ray actors (see the module docstring)."""

    def __init__(self, component: ImageReward, num_workers: int = 2) -> None:
        self.component, self.num_workers = component, num_workers
        self.workers: list[Any] = []
        self._ray: Any = None

    def meta_keys(self) -> frozenset[str] | None:
        return self.component.meta_keys()

    def _start(self) -> Any:
        if self._ray is None:
            ray = acquire_ray(os.environ.get("RAY_ADDRESS"), self.num_workers, what="an image reward with workers: ray")
            self._ray = ray
            # no CPU reserved (several components' pools share the instance), spread over the cluster's machines
            actor = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(ScorerWorker)
            ref = ray.put(self.component)
            self.workers = [actor.remote(ref) for _ in range(self.num_workers)]
            ray.get([w.pid.remote() for w in self.workers], timeout=START_TIMEOUT_S)  # up (or a clear timeout)
        return self._ray

    def worker_pids(self) -> list[int]:
        """The process id of each actor (starting them if needed)."""
        ray = self._start()
        return ray.get([w.pid.remote() for w in self.workers])

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metas: Metas) -> torch.Tensor:
        """images [N, 3, H, W] in [0, 1] -> rewards [N] float32 on the images' device."""
        ray = self._start()
        n = images.shape[0]
        bounds = torch.linspace(0, n, len(self.workers) + 1).round().long().tolist()
        cpu, metas = images.detach().cpu(), list(metas)
        refs = [
            w.score.remote(cpu[a:b], list(prompts[a:b]), metas[a:b])
            for w, a, b in zip(self.workers, bounds, bounds[1:])
            if b > a
        ]
        parts = ray.get(refs)
        return torch.cat(parts).to(images.device) if parts else torch.zeros(0, device=images.device)

    def close(self) -> None:
        """End the actors and release Ray (a local instance it started stops)."""
        if self._ray is not None:
            for w in self.workers:
                self._ray.kill(w)
            self.workers, self._ray = [], None
            release_ray()

    def __repr__(self) -> str:
        return f"RayScorer({self.component!r}, num_workers={self.num_workers})"


def with_workers(component: ImageReward, spec: Mapping[str, Any], where: str) -> ImageReward:
    """``component`` as the spec's ``workers`` asks: ``local`` (default) as it is, ``ray`` in a
    :class:`RayScorer` of ``ray_workers`` (default 2) actors. A bad value is a ConfigError naming ``<where>.<key>``."""
    workers = spec.get("workers", "local")
    if workers not in ("local", "ray"):
        raise ConfigError(f"{where}.workers: must be 'local' or 'ray', got {workers!r}")
    if workers == "local":
        if "ray_workers" in spec:
            raise ConfigError(f"{where}.ray_workers: only with workers: ray")
        return component
    try:
        n = int_option(spec.get("ray_workers", 2), "ray_workers")
    except OptionError as exc:
        raise ConfigError(f"{where}.{exc}") from None
    ray_module(f"{where}.workers=ray")
    return RayScorer(component, n)


__all__ = ["RayScorer", "ScorerWorker", "WORKER_KEYS", "with_workers"]
