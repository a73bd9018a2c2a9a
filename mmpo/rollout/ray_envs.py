"""Environments in Ray actors (``rollout.env_workers: ray``, docs/distributed.md).

:class:`RayEnvRunner` is an :class:`~mmpo.rollout.env_runner.EnvRunner` whose environments live in
``rollout.ray.num_workers`` Ray actors (:class:`EnvWorker`). The waves are the runner's own: the
policy acts in the trainer process on all running environments at once; the actions go out, each
worker steps its share of the environments, and the observations (numpy images) come back. Only
:meth:`~mmpo.rollout.env_runner.EnvRunner.start_envs` and
:meth:`~mmpo.rollout.env_runner.EnvRunner.step_envs` are remote, so for the same seeds and the same
policy draws the episodes equal local stepping.

Environment ``i`` of a wave lives in worker ``i % W``, slot ``i // W`` (W workers); each worker
builds its environments with :func:`~mmpo.rollout.env_runner.make_env` in its own process (a
MiniWoB browser starts there). The runner's local ``_pool`` still gives environments for
introspection (action space, a task's own lookups); they are never stepped.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Sequence

import numpy as np

from mmpo.errors import ConfigError, MMPOError
from mmpo.ray_session import acquire_ray, release_ray
from mmpo.rollout.env_runner import EnvRunner, EnvSpec, EnvStart, EnvStep, Observation

#: seconds to wait for the workers to start (a cluster without free CPUs never starts them)
START_TIMEOUT_S = 300


class EnvWorkerError(MMPOError, RuntimeError):
    """A Ray environment worker died (e.g. a browser crash took its process down) or an environment in it failed."""


def registering_modules(spec: EnvSpec) -> list[str]:
    """The modules to import in a worker so that ``gymnasium.make(spec.id)`` finds the id: the
    module of an entry point registered as an object (e.g. ``mmpo/MiniWoB-v0``, registered on import)."""
    import gymnasium as gym

    entry = gym.envs.registry.get(spec.id)
    point = getattr(entry, "entry_point", None)
    if point is None or isinstance(point, str):  # a string entry point is imported by gymnasium itself
        return []
    module = getattr(point, "__module__", None)
    return [module] if module else []


class EnvWorker:
    """One actor's environments: slots ``0 .. m-1`` of a local :class:`EnvRunner` on the same spec."""

    def __init__(self, spec: EnvSpec, modules: Sequence[str], index: int) -> None:
        for name in modules:
            importlib.import_module(name)
        self.index = index
        self.runner = EnvRunner(spec)
        self.seeds: list[int] = []  # seed of each slot in the current wave

    def pid(self) -> int:
        return os.getpid()

    def _failed(self, exc: Exception, seeds: Sequence[int]) -> Exception:
        if isinstance(exc, MMPOError):
            return exc
        return EnvWorkerError(
            f"an environment of Ray env worker {self.index} (pid {os.getpid()}, env seed(s) {list(seeds)}) "
            f"failed: {type(exc).__name__}: {exc}"
        )

    def start(self, seeds: list[int], frames: bool) -> list[EnvStart]:
        self.seeds = list(seeds)
        try:
            return self.runner.start_envs(seeds, frames)
        except Exception as exc:
            raise self._failed(exc, seeds) from exc

    def step(self, moves: list[tuple[int, Any]], frames: bool) -> list[EnvStep]:
        try:
            return self.runner.step_envs(moves, frames)
        except Exception as exc:
            raise self._failed(exc, [self.seeds[j] for j, _ in moves]) from exc

    def close(self) -> None:
        self.runner.close()


def _writable(obs: Observation) -> Observation:
    """Arrays that come out of Ray's object store are read-only; the policy gets its own copy."""
    if not obs.image.flags.writeable:
        obs.image = np.array(obs.image)
    return obs


class RayEnvRunner(EnvRunner):
    """An :class:`EnvRunner` whose environments are stepped in Ray actors (see the module docstring).

    ``address``: None starts a local Ray instance of ``num_workers * num_cpus_per_worker`` CPUs;
    ``auto`` / ``ray://host:port`` / ``host:port`` joins a cluster. :meth:`close` closes the
    environments, ends the actors and shuts down a Ray instance it started."""

    def __init__(
        self, spec: EnvSpec, *, address: str | None = None, num_workers: int = 2, num_cpus_per_worker: float = 1.0
    ) -> None:
        super().__init__(spec)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and address in (None, "local"):
            raise ConfigError(
                "rollout.ray.address=null starts one Ray instance per process; under torchrun start Ray once "
                "(`ray start --head`) and set rollout.ray.address=auto"
            )
        self.ray = acquire_ray(address, num_workers * num_cpus_per_worker)
        self._released = False
        try:
            actor = self.ray.remote(num_cpus=num_cpus_per_worker, max_restarts=0)(EnvWorker)
            modules = registering_modules(spec)
            self.workers = [actor.remote(spec, modules, w) for w in range(num_workers)]
            try:
                self.pids: list[int] = self.ray.get([w.pid.remote() for w in self.workers], timeout=START_TIMEOUT_S)
            except self.ray.exceptions.GetTimeoutError:
                raise EnvWorkerError(
                    f"Ray did not start {num_workers} env workers of {num_cpus_per_worker} CPU(s) each within "
                    f"{START_TIMEOUT_S} s; free CPUs: {self.ray.available_resources().get('CPU', 0)} (lower "
                    "rollout.ray.num_workers or num_cpus_per_worker, or add machines to the cluster)"
                ) from None
        except BaseException:
            self._release()
            raise
        self._seeds: list[int] = []  # seed of each environment of the current wave

    def worker_pids(self) -> list[int]:
        """The process id of each worker (one process per actor)."""
        return list(self.pids)

    def _gather(self, calls: dict[int, tuple[Any, list[int]]], what: str) -> dict[int, Any]:
        """``ray.get`` of each worker's call ``{worker: (ref, its env seeds)}``; a dead worker -> EnvWorkerError."""
        out = {}
        for w, (ref, seeds) in calls.items():
            try:
                out[w] = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as exc:
                raise EnvWorkerError(
                    f"Ray env worker {w} (pid {self.pids[w]}) died while {what} its environments with env seed(s) "
                    f"{seeds} (a crashed browser or simulator takes its worker down): {type(exc).__name__}"
                ) from exc
            except self.ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, MMPOError):
                    raise type(cause)(*cause.args) from exc
                raise
        return out

    def start_envs(self, seeds: Sequence[int], frames: bool) -> list[EnvStart]:
        W = len(self.workers)
        self._seeds = [int(s) for s in seeds]
        calls = {}
        for w in range(W):
            mine = self._seeds[w::W]
            if mine:
                calls[w] = (self.workers[w].start.remote(mine, frames), mine)
        out: list[Any] = [None] * len(self._seeds)
        for w, part in self._gather(calls, "resetting").items():
            for j, st in enumerate(part):
                _writable(st.observation)
                out[w + j * W] = st
        return out

    def step_envs(self, moves: Sequence[tuple[int, Any]], frames: bool) -> list[EnvStep]:
        W = len(self.workers)
        per: list[list[tuple[int, Any]]] = [[] for _ in range(W)]
        where: list[list[int]] = [[] for _ in range(W)]
        for pos, (i, action) in enumerate(moves):
            per[i % W].append((i // W, action))
            where[i % W].append(pos)
        calls = {}
        for w in range(W):
            if per[w]:
                seeds = [self._seeds[w + j * W] for j, _ in per[w]]
                calls[w] = (self.workers[w].step.remote(per[w], frames), seeds)
        out: list[Any] = [None] * len(moves)
        for w, part in self._gather(calls, "stepping").items():
            for pos, st in zip(where[w], part):
                _writable(st.observation)
                out[pos] = st
        return out

    def _release(self) -> None:
        if not self._released:
            self._released = True
            release_ray()

    def close(self) -> None:
        """Close the workers' environments (browsers quit), end the actors, release Ray."""
        if self._released:
            return super().close()
        pending = [w.close.remote() for w in self.workers]
        for ref in pending:
            try:
                self.ray.get(ref, timeout=120)
            except Exception:  # a dead worker has nothing left to close
                pass
        for w in self.workers:
            self.ray.kill(w)
        super().close()
        self._release()


def build_env_runner(spec: EnvSpec, rollout: Any = None) -> EnvRunner:
    """The environment runner of ``rollout.env_workers``: local (:class:`EnvRunner`) or Ray actors
    (:class:`RayEnvRunner` with ``rollout.ray``'s address and workers)."""
    if rollout is None or getattr(rollout, "env_workers", "local") == "local":
        return EnvRunner(spec)
    r = rollout.ray
    return RayEnvRunner(spec, address=r.address, num_workers=r.num_workers, num_cpus_per_worker=r.num_cpus_per_worker)


__all__ = ["EnvWorker", "EnvWorkerError", "RayEnvRunner", "build_env_runner", "registering_modules"]
