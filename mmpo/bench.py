"""``mmpo bench``: seconds per training step and peak memory, split into rollout / reward / update.

Memory on CPU is the process's resident set size, sampled every 5 ms by a thread and
attributed to the phase running at the time; on CUDA it is ``torch.cuda.max_memory_allocated``
per phase.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil
import torch

PHASES = ("rollout", "reward", "update")


class PhaseMemory:
    """Peak memory (MB) per named phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: dict[str, float] = {}
        self._phase: str | None = None
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread: threading.Thread | None = None
        if device.type != "cuda":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            if self._phase is not None:
                rss = self._proc.memory_info().rss / 2**20
                self.peak[self._phase] = max(self.peak.get(self._phase, 0.0), rss)
            time.sleep(0.005)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._phase = name
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                mb = torch.cuda.max_memory_allocated() / 2**20
                self.peak[name] = max(self.peak.get(name, 0.0), mb)
            else:
                rss = self._proc.memory_info().rss / 2**20
                self.peak[name] = max(self.peak.get(name, 0.0), rss)
            self._phase = None

    def close(self) -> None:
        self._stop.set()


def run_bench(cfg: Any, run_dir: Path, *, steps: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Train ``warmup + steps`` steps in a scratch folder and report medians of the measured ones."""
    from mmpo.trainers import trainer_class_for

    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, max_steps=warmup + steps, save_every=0))
    with tempfile.TemporaryDirectory(prefix="mmpo-bench-") as tmp:
        trainer = trainer_class_for(cfg.task.name)(cfg, Path(tmp))
        mem = PhaseMemory(trainer.device)
        trainer.phase_hook = mem.phase
        rows: list[dict[str, float]] = []
        try:
            for step in range(warmup + steps):
                m = trainer.train_step(step)
                if step >= warmup:
                    rows.append(m)
        finally:
            mem.close()
    med = {k: statistics.median(r[k] for r in rows) for k in ("step_time_s", "rollout_s", "reward_s", "update_s")}
    dev = trainer.device
    device_name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"
    )
    return {
        "config": cfg.task.name,
        "model": cfg.model.path,
        "device": device_name,
        "precision": trainer.engine.precision,
        "rows_per_step": trainer.rows_per_step(),
        "steps": steps,
        "s_per_step": round(med["step_time_s"], 4),
        "rollout_s": round(med["rollout_s"], 4),
        "reward_s": round(med["reward_s"], 4),
        "update_s": round(med["update_s"], 4),
        # the whole step as a multiple of sampling the group alone (diffusion: the SDE rollout)
        "step_over_rollout": round(med["step_time_s"] / max(med["rollout_s"], 1e-9), 2),
        "peak_mb": {p: round(mem.peak.get(p, 0.0), 1) for p in PHASES},
        "memory_kind": "cuda_max_allocated" if dev.type == "cuda" else "process_rss",
    }
