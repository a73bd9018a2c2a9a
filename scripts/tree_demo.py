"""TreePO against GRPO on the same task at the same decoded-token budget: trains both (unless
``--plot-only``), then prints a table of held-out accuracy against the tokens each has decoded and
draws both curves into ``docs/img/tree_demo.png``.

    .venv/bin/python scripts/tree_demo.py [--out runs/tree_demo] [--plot-only]

Both runs are ``configs/treepo.yaml``; GRPO's is the same recipe with ``rollout.tree=null`` and the
``grpo`` advantage (independent rows). Not part of CI (about 10 minutes on the project's CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MMPO = str(Path(sys.executable).parent / "mmpo")
RUNS = {
    "treepo": [],
    "grpo": ["rollout.tree=null", "algorithm.advantage=grpo"],
}


def curve(folder: Path) -> list[tuple[int, float, float]]:
    """``(step, decoded tokens so far, eval accuracy)`` at every evaluation of a run."""
    total, out = 0.0, []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        total += row.get("decoded_tokens", 0.0)
        if "eval/accuracy" in row:
            out.append((int(row["step"]), total, float(row["eval/accuracy"])))
    return out


def at_budget(points: list[tuple[int, float, float]], budget: float) -> float:
    """Accuracy at ``budget`` decoded tokens, linear between the evaluations around it."""
    for (_, t0, a0), (_, t1, a1) in zip(points, points[1:]):
        if t0 <= budget <= t1:
            return a0 + (a1 - a0) * (budget - t0) / max(t1 - t0, 1.0)
    return points[-1][2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/tree_demo")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    out = ROOT / args.out
    if not args.plot_only:
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [
            subprocess.Popen(
                [MMPO, "train", "configs/treepo.yaml", f"output_dir={out / name}", "trainer.eval_every=25", *extra],
                cwd=ROOT,
                env=env,
                stdout=open(out / f"{name}.log", "w"),
                stderr=subprocess.STDOUT,
            )
            for name, extra in RUNS.items()
        ]
        if any(proc.wait() for proc in procs):
            print("a run failed: see", out, file=sys.stderr)
            return 1
    curves = {name: curve(out / name) for name in RUNS}
    budget = min(c[-1][1] for c in curves.values())
    print(f"equal budget: {budget:,.0f} decoded tokens")
    print("| run | accuracy at the budget | tokens at step 200 | accuracy at step 200 |")
    print("|---|---|---|---|")
    for name, c in curves.items():
        print(f"| {name} | {at_budget(c, budget):.3f} | {c[-1][1]:,.0f} | {c[-1][2]:.3f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name, c in curves.items():
        ax.plot([t / 1e3 for _, t, _ in c], [a for _, _, a in c], marker="o", label=name)
    ax.axvline(budget / 1e3, color="grey", linestyle=":", label="equal budget")
    ax.set_xlabel("decoded tokens (thousands)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("TreePO vs GRPO, configs/treepo.yaml")
    ax.legend()
    fig.tight_layout()
    target = ROOT / "docs" / "img" / "tree_demo.png"
    fig.savefig(target)
    print("plot:", target.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
