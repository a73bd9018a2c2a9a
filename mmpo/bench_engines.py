"""``mmpo bench --engines hf,vllm CONFIG``: sampled tokens per second of each rollout engine.

Each engine trains the recipe for ``warmup + steps`` steps from the same start (a fresh trainer
per engine, the same seed and prompts); the measured steps' completion tokens are divided by their
rollout seconds (sampling only: rewards, the update and vLLM's weight sync are timed apart, and the
sync is reported as ``weight_sync_s``). Dynamic sampling is switched off so that every step samples
exactly one batch of ``prompts_per_step * group_size`` rows.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ENGINES = ("hf", "vllm")


def run_engine_bench(
    cfg: Any, engines: tuple[str, ...] = ENGINES, *, steps: int = 3, warmup: int = 1
) -> Iterator[dict[str, Any]]:
    """One JSON-able row per engine: tokens/s of the rollouts, s/step and the phases' medians."""
    from mmpo.errors import ConfigError
    from mmpo.trainers import trainer_class_for

    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        raise ConfigError(f"mmpo bench --engines: choose from {', '.join(ENGINES)}, got {list(engines)}")
    for engine in engines:
        c = dataclasses.replace(
            cfg,
            rollout=dataclasses.replace(cfg.rollout, engine=engine),
            algorithm=dataclasses.replace(cfg.algorithm, dynamic_sampling=False),
            trainer=dataclasses.replace(cfg.trainer, max_steps=warmup + steps, save_every=0, eval_every=0),
        )
        with tempfile.TemporaryDirectory(prefix="mmpo-bench-engines-") as tmp:
            t0 = time.perf_counter()
            trainer = trainer_class_for(c.task.name)(c, Path(tmp))
            rows = []
            try:
                for step in range(warmup + steps):
                    m = trainer.train_step(step)
                    if step >= warmup:
                        rows.append(m)
            finally:
                trainer.close()  # stops a vLLM server
            total_s = time.perf_counter() - t0
        n = trainer.rows_per_step()
        tokens = sum(m["response_length"] * n for m in rows)
        rollout_s = sum(m["rollout_s"] for m in rows)
        yield {
            "engine": engine,
            "config": c.task.name,
            "model": c.model.path,
            "precision": trainer.engine.precision,
            "rows_per_step": n,
            "steps": steps,
            "tokens_per_s": round(tokens / max(rollout_s, 1e-9), 1),
            "completion_tokens_per_row": round(statistics.fmean(m["response_length"] for m in rows), 2),
            "rollout_s": round(statistics.median(m["rollout_s"] for m in rows), 4),
            "s_per_step": round(statistics.median(m["step_time_s"] for m in rows), 4),
            "weight_sync_s": round(statistics.median(m.get("weight_sync_s", 0.0) for m in rows), 4),
            "wall_s_with_start": round(total_s, 1),
        }
