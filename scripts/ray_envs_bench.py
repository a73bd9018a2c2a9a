"""Episodes per second of local environment stepping (``EnvRunner``) against 2 Ray workers
(``RayEnvRunner``, a local Ray instance) with a random policy, and whether both give the same episodes.

    .venv/bin/python scripts/ray_envs_bench.py grid      # BabyAI, 8 seeds x 8 rollouts, 16 steps
    .venv/bin/python scripts/ray_envs_bench.py miniwob   # MiniWoB (Chromium), 4 seeds x 4 rollouts, 3 steps

Not part of CI. Each mode runs once to warm up (the browsers start), then ``reps`` timed rounds;
prints one JSON line. The numbers in docs/distributed.md come from it.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import torch

from mmpo.rollout.env_runner import ActionBatch, EnvRunner, EnvSpec, Episode
from mmpo.rollout.ray_envs import RayEnvRunner


class RandomPolicy:
    """A random BabyAI action (of 3) or a random click ``[x, y]`` in [0, 1]^2 per observation."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def act(self, observations: list[Any], *, generator: torch.Generator, greedy: bool = False) -> ActionBatch:
        n = len(observations)
        if self.kind == "grid":
            units = torch.randint(0, 3, (n, 1), generator=generator)
            actions: list[Any] = [int(x) for x in units[:, 0]]
        else:
            units = torch.rand(n, 2, generator=generator)
            actions = [np.array(row.tolist()) for row in units]
        mask = torch.ones(units.shape, dtype=torch.bool)
        return ActionBatch(actions, units, torch.zeros(units.shape), mask, [None] * n)


def trace(episodes: list[Episode]) -> list[tuple[int, int, float, bool]]:
    return [(e.seed, e.length, e.env_return, e.success) for e in episodes]


def main(kind: str) -> dict[str, Any]:
    if kind == "grid":
        spec = EnvSpec(id="BabyAI-GoToRedBallNoDists-v0", tile_size=8, max_steps=16)
        seeds, k, reps = list(range(8)), 8, 3
    else:
        from mmpo_tasks.gui_agent.miniwob_task import miniwob_env_spec

        spec = miniwob_env_spec(["click-test", "click-test-2", "focus-text"], image_size=224, max_envs=16)
        seeds, k, reps = list(range(4)), 4, 2
    out: dict[str, Any] = {}
    traces = {}
    for mode in ("local", "ray"):
        t0 = time.perf_counter()
        runner = EnvRunner(spec) if mode == "local" else RayEnvRunner(spec, num_workers=2)
        start_s = time.perf_counter() - t0
        runner.run(RandomPolicy(kind), seeds, k, generator=torch.Generator().manual_seed(0))  # warm-up
        t, got = time.perf_counter(), []
        for r in range(reps):
            got += trace(runner.run(RandomPolicy(kind), seeds, k, generator=torch.Generator().manual_seed(r)))
        dt = time.perf_counter() - t
        runner.close()
        traces[mode] = got
        out[mode] = {"start_s": round(start_s, 1), "episodes": len(got), "seconds": round(dt, 2)}
        out[mode]["episodes_per_s"] = round(len(got) / dt, 2)
    out["identical"] = traces["local"] == traces["ray"]
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "grid")))
