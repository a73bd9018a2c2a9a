"""Ablation of the GRPO-family methods on the quickstart: GRPO against each method, several seeds,
the same steps, the same everything else. Prints and writes one markdown table: held-out accuracy at
the end (mean and per seed) and the first evaluated step where accuracy reaches chance + 0.25.

    .venv/bin/python scripts/ablation.py [--steps 200] [--eval-every 25] [--seeds 0,1,2]
                                         [--only grpo,gtpo] [--jobs 2] [--out runs/ablation]

Not part of CI (about half an hour with two jobs on the project's 2-core CPU machine). Each run
goes to ``<out>/<method>_s<seed>/`` (removed first); the table goes to stdout and
``<out>/ablation.md``; ``docs/measured/ablation.md`` is the copy ``docs/algorithms.md`` shows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MMPO = str(Path(sys.executable).parent / "mmpo")

#: method -> its overrides of configs/quickstart.yaml (everything else is the quickstart's)
METHODS: dict[str, list[str]] = {
    "grpo": [],
    "gtpo": ["algorithm.advantage=gtpo"],
    "grpo_s": ["algorithm.advantage=grpo_s"],
    "grpo_scaling": ["algorithm.advantage=grpo_scaling"],
    "seed_grpo": ["algorithm.advantage=seed_grpo"],
    "hapo_tlga": ["algorithm.advantage=hapo_tlga"],
    "hapo": [
        "algorithm.advantage=hapo_tlga",
        "algorithm.loss=hapo",
        "algorithm.loss_options={}",
        "rollout.adaptive_temperature={tau: 0.05}",
    ],
    "simko": ["algorithm.loss=simko", "algorithm.loss_options={}"],
    # COPO and Spectral PO exist to use unanimous groups: dynamic sampling would drop them first
    "copo": ["algorithm.advantage=copo", "algorithm.dynamic_sampling=false"],
    "spectral_po": [
        "algorithm.advantage=spectral_po",
        "algorithm.advantage_options={judge: {name: numeric}}",
        "algorithm.dynamic_sampling=false",
    ],
    "capo": ["algorithm.filters=[{name: capo}]"],
    "srft": ["algorithm.loss=srft", "algorithm.loss_options={}"],
    "vade": ["rollout.prompt_sampler=vade"],
    "bnpo_decompose": ["algorithm.advantage=bnpo", "algorithm.advantage_options={decompose: true}"],
    "d3s": ["algorithm.filters=[{name: d3s}]"],
    "cppo_refill": ["algorithm.filters=[{name: cppo_prune, prune_ratio: 0.5, refill: true}]"],
}


def run(method: str, seed: int, args: argparse.Namespace) -> dict:
    """One training run; returns its eval curve ``[(step, accuracy)]``, chance and wall seconds."""
    folder = Path(args.out) / f"{method}_s{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [
        MMPO,
        "train",
        "configs/quickstart.yaml",
        f"output_dir={folder}",
        f"seed={seed}",
        f"trainer.max_steps={args.steps}",
        f"trainer.eval_every={args.eval_every}",
        f"trainer.save_every={args.steps}",
        "trainer.time_limit_s=0",
        f"eval.num_samples={args.eval_samples}",
        *METHODS[method],
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.time()
    with open(f"{folder}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    curve, chance = [], None
    metrics = folder / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "eval/accuracy" in row:
                curve.append((int(row.get("step", 0)), float(row["eval/accuracy"])))
                chance = row.get("eval/chance", chance)
    return {
        "method": method,
        "seed": seed,
        "rc": proc.returncode,
        "curve": curve,
        "chance": chance,
        "seconds": time.time() - t0,
    }


def first_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, acc in curve if acc >= target), None)


def table(results: list[dict], args: argparse.Namespace, commit: str) -> str:
    """The markdown table: one row per method."""
    lines = [
        f"Quickstart (`configs/quickstart.yaml`), {args.steps} steps, evaluation every {args.eval_every} steps "
        f"on {args.eval_samples} held-out questions, seeds {args.seeds}; commit {commit}.",
        "",
        "| method | final accuracy (mean) | per seed | steps to chance + 0.25 (per seed) | s per run |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS:
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        finals, reach = [], []
        for r in sorted(rows, key=lambda r: r["seed"]):
            if r["rc"] != 0 or not r["curve"]:
                finals.append(None)
                reach.append("error")
                continue
            finals.append(r["curve"][-1][1])
            step = first_reaching(r["curve"], float(r["chance"] or 0.25) + 0.25)
            reach.append(str(step) if step is not None else "not reached")
        ok = [f for f in finals if f is not None]
        mean = f"{sum(ok) / len(ok):.3f}" if ok else "error"
        per = " / ".join(f"{f:.3f}" if f is not None else "error" for f in finals)
        secs = sum(r["seconds"] for r in rows) / len(rows)
        lines.append(f"| `{method}` | {mean} | {per} | {' / '.join(reach)} | {secs:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-samples", type=int, default=96)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--only", default="")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/ablation")
    args = p.parse_args()
    methods = [m for m in args.only.split(",") if m] or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    jobs = [(m, s) for s in seeds for m in methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda ms: run(ms[0], ms[1], args), jobs))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    text = table(results, args, commit.stdout.strip() or "?")
    (Path(args.out) / "ablation.md").write_text(text)
    (Path(args.out) / "ablation.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
