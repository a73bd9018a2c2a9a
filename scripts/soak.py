"""Soak test: does a long training run keep its memory flat?

Runs ``mmpo train CONFIG`` for ``--steps`` steps in a subprocess and samples the resident set size
(RSS) of the child and all of its children every ``--interval`` seconds with psutil. The training
step each sample belongs to is read off the run's ``metrics.jsonl``. At the end it prints a small
table and writes ``soak.json`` (all samples plus the summary) next to the run folder:

- ``rss_warm_mb``: RSS at the warm-up step (``--warmup-step``, default 5% of the steps, at least 1);
- ``rss_end_mb``: RSS at the last step; ``rss_max_mb``: the largest sample after warm-up;
- ``growth_pct``: ``100 * (rss_end - rss_warm) / rss_warm``, each taken as the median of the
  samples in a window of ``--window`` steps so one allocator spike does not decide the result;
- ``steps_per_s``: training steps per second after warm-up.

It exits 1 when ``growth_pct >= --max-growth`` (default 10) and 2 when the run itself fails.
Not a CI test: a 2,000-step quickstart run takes about an hour on two CPU cores.

    .venv/bin/python scripts/soak.py configs/quickstart.yaml --steps 2000 --out /tmp/soak
    .venv/bin/python scripts/soak.py configs/quickstart.yaml --steps 200 --out /tmp/soak -- rollout.group_size=8

The run uses ``trainer.time_limit_s=0``, evaluates every ``--eval-every`` steps on
``--eval-samples`` samples, checkpoints every ``--save-every`` steps and keeps the config's
``trainer.log_samples`` (8 by default), so the logged-rollout, checkpoint, evaluation and
end-of-run report paths all run. Overrides after ``--`` are passed to ``mmpo train`` last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent


def tree_rss_mb(proc: psutil.Process) -> float:
    """RSS of ``proc`` and all of its descendants, in MB (processes that vanish meanwhile count 0)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


class StepReader:
    """Follows ``metrics.jsonl`` as it grows and keeps the last training step seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.step = 0
        self.step_times: dict[int, float] = {}

    def poll(self) -> int:
        if not self.path.exists():
            return self.step
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return self.step
        self.offset += end + 1
        for line in chunk[: end + 1].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and step > self.step:
                self.step = step
                self.step_times.setdefault(step, time.time())
        return self.step


def window_median(samples: list[dict[str, Any]], lo: int, hi: int) -> float | None:
    """Median RSS (MB) of the samples taken while the run was at steps ``lo..hi``."""
    values = [s["rss_mb"] for s in samples if lo <= s["step"] <= hi]
    return statistics.median(values) if values else None


def summarize(samples: list[dict[str, Any]], steps: int, warm: int, window: int) -> dict[str, Any]:
    """The soak numbers (see the module docstring) from ``samples`` ({t, step, rss_mb} dicts)."""
    last = max((s["step"] for s in samples), default=0)
    warm_mb = window_median(samples, warm, warm + window)
    end_mb = window_median(samples, max(warm, last - window), last)
    after = [s for s in samples if s["step"] >= warm]
    t_warm = min((s["t"] for s in after), default=None)
    t_end = max((s["t"] for s in after), default=None)
    rate = (last - warm) / (t_end - t_warm) if t_warm is not None and t_end and t_end > t_warm else None
    growth = 100.0 * (end_mb - warm_mb) / warm_mb if warm_mb and end_mb is not None else None
    return {
        "steps_planned": steps,
        "last_step": last,
        "complete": last >= steps,
        "warmup_step": warm,
        "rss_start_mb": samples[0]["rss_mb"] if samples else None,
        "rss_warm_mb": warm_mb,
        "rss_end_mb": end_mb,
        "rss_max_mb": max((s["rss_mb"] for s in after), default=None),
        "growth_pct": growth,
        "steps_per_s": rate,
        "projected_s_for_all_steps": (steps - warm) / rate if rate else None,
    }


def curve(samples: list[dict[str, Any]], every: int) -> list[tuple[int, float]]:
    """(step, median RSS MB) every ``every`` steps: the table printed at the end."""
    last = max((s["step"] for s in samples), default=0)
    rows = []
    for step in range(0, last + 1, every):
        mb = window_median(samples, step, step + max(1, every // 10))
        if mb is not None:
            rows.append((step, mb))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default=str(REPO / "configs" / "quickstart.yaml"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", type=Path, required=True, help="folder for the run (out/run) and soak.json")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between RSS samples")
    ap.add_argument("--warmup-step", type=int, default=None, help="default: 5%% of --steps")
    ap.add_argument("--window", type=int, default=None, help="steps averaged at each end (default 2%% of --steps)")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--max-growth", type=float, default=10.0, help="percent; at or above it the script exits 1")
    ap.add_argument("overrides", nargs="*", help="extra `mmpo train` overrides (after --)")
    args = ap.parse_args(argv)

    warm = args.warmup_step if args.warmup_step is not None else max(1, args.steps // 20)
    window = args.window if args.window is not None else max(1, args.steps // 50)
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = args.out / "run"
    cmd = [
        sys.executable,
        "-m",
        "mmpo",
        "train",
        args.config,
        f"output_dir={run_dir}",
        f"trainer.max_steps={args.steps}",
        "trainer.time_limit_s=0",
        f"trainer.eval_every={args.eval_every}",
        f"trainer.save_every={args.save_every}",
        f"eval.num_samples={args.eval_samples}",
        *args.overrides,
    ]
    print("soak:", " ".join(cmd), flush=True)
    log = (args.out / "train.log").open("w")
    child = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    proc = psutil.Process(child.pid)
    reader = StepReader(run_dir / "metrics.jsonl")
    samples: list[dict[str, Any]] = []
    t0 = time.time()
    json_path = args.out / "soak.json"
    last_write = 0.0
    try:
        while child.poll() is None:
            rss = tree_rss_mb(proc)
            samples.append({"t": round(time.time() - t0, 2), "step": reader.poll(), "rss_mb": round(rss, 1)})
            if time.time() - last_write > 60:  # a partial curve survives if the soak is stopped
                last_write = time.time()
                json_path.write_text(
                    json.dumps({"summary": summarize(samples, args.steps, warm, window), "samples": samples})
                )
            time.sleep(args.interval)
    except KeyboardInterrupt:
        child.terminate()
        child.wait()
    reader.poll()
    rc = child.wait()
    summary = summarize(samples, args.steps, warm, window)
    summary.update(returncode=rc, command=cmd, wall_s=round(time.time() - t0, 1))
    json_path.write_text(json.dumps({"summary": summary, "samples": samples}, indent=1))

    print(f"\n{'step':>6} {'RSS MB':>9}")
    for step, mb in curve(samples, max(1, args.steps // 20)):
        print(f"{step:>6} {mb:>9.1f}")
    print()
    for key in ("last_step", "warmup_step", "rss_warm_mb", "rss_end_mb", "rss_max_mb", "growth_pct", "steps_per_s"):
        value = summary[key]
        print(f"{key:>14}: {value:.3f}" if isinstance(value, float) else f"{key:>14}: {value}")
    print(f"soak.json: {json_path}")
    if rc != 0:
        print(f"soak: training exited {rc}; see {args.out / 'train.log'}", file=sys.stderr)
        return 2
    if summary["growth_pct"] is None or summary["growth_pct"] >= args.max_growth:
        print(f"soak: RSS grew {summary['growth_pct']}% after warm-up (limit {args.max_growth}%)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
