"""Rerun every CPU demo of the docs (docs/plugins/*.md) and print one table: each demo's held-out
metric at the start and at the end, the result the docs claim, pass / fail and wall time.

    .venv/bin/python scripts/demos.py [--only NAME,...] [--list] [--smoke] [--out runs/demos]
    make demos DEMOS_ARGS="--only quickstart,pathology_demo"

Not part of CI: the whole set takes about an hour on the project's 2-core CPU machine. Each demo runs
from scratch in ``<out>/<name>_s<seed>/`` (removed first: ``mmpo train`` would resume an old run),
with the commands of its Makefile target or docs page (data and warm starts included), its
output in ``<out>/<name>_s<seed>.log``. The table goes to stdout, ``<out>/demos.md`` and
``<out>/demos.json``. ``--smoke`` cuts every run to one step and a few held-out samples (default
folder ``runs/demos-smoke``): it checks the commands and the parsing, not the claims. Exit status 1
when a demo errors or, without ``--smoke``, misses its claim.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMOKE_TRAIN = "trainer.max_steps=1 eval.num_samples=2"
SMOKE_EVAL = "eval.num_samples=2"


@dataclass(frozen=True)
class Cmd:
    """A shell command run from the repository root; ``{py}``, ``{mmpo}``, ``{run}`` (the demo's
    folder) and ``{seed}`` are filled in, and ``smoke`` is appended under ``--smoke``."""

    line: str
    smoke: str = ""


@dataclass(frozen=True)
class Read:
    """A number in the demo's folder: in ``metrics.jsonl``, ``key`` on the ``first`` or ``last`` line
    that carries it; in a JSON file, ``key`` is a dotted path."""

    path: str
    key: str
    line: str = "last"


@dataclass(frozen=True)
class Demo:
    """One demo: what it runs, where its start and end values are, and the docs' claim about them.
    ``check`` sees ``start``, ``end`` and the ``extras`` by name."""

    name: str
    seed: int
    cmds: tuple[Cmd, ...]
    metric: str
    start: Read
    end: Read
    claim: str
    check: Callable[[dict[str, float]], bool]
    why: str
    extras: dict[str, Read] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The demo's folder and log name under ``--out``."""
        return f"{self.name}_s{self.seed}"


def train_only(config: str) -> tuple[Cmd]:
    """The commands of a one-run demo: ``mmpo train configs/<config>.yaml`` into the demo's folder."""
    return (Cmd(f"{{mmpo}} train configs/{config}.yaml seed={{seed}} output_dir={{run}}", SMOKE_TRAIN),)


def min_end(documented: float, share: float = 0.9) -> dict[str, Any]:
    """The claim "the end value reaches ``share`` of the documented one" (``claim`` and ``check``)."""
    bound = share * documented
    return {"claim": f"end >= {bound:.3f} ({share} x {documented:.3f})", "check": lambda v: v["end"] >= bound}


def quickstart(seed: int, documented: float) -> Demo:
    """``mmpo train configs/quickstart.yaml`` with one seed of the docs' seeds table."""
    return Demo(
        "quickstart",
        seed,
        train_only("quickstart"),
        "eval/accuracy",
        Read("metrics.jsonl", "eval/accuracy", "first"),
        Read("metrics.jsonl", "eval/accuracy"),
        **min_end(documented),
        why=f"docs/plugins/synthetic_vqa.md: seed {seed} 0.000 -> {documented:.3f} at step 400 (chance 0.250)",
        extras={"chance": Read("metrics.jsonl", "eval/chance")},
    )


DEMOS: tuple[Demo, ...] = (
    quickstart(0, 0.609),
    quickstart(1, 0.630),
    quickstart(2, 0.469),
    Demo(
        "pathology_demo",
        0,
        train_only("pathology_demo"),
        "eval/accuracy",
        Read("metrics.jsonl", "eval/accuracy", "first"),
        Read("metrics.jsonl", "eval/accuracy"),
        **min_end(0.979),
        why="docs/plugins/vlm_reasoning.md: pathology_demo 0.000 -> 0.979 held-out accuracy at step 300 (chance 0.500)",
    ),
    Demo(
        "diffusion_demo",
        0,
        train_only("diffusion_demo"),
        "eval/target_color",
        Read("metrics.jsonl", "eval/target_color", "first"),
        Read("metrics.jsonl", "eval/target_color"),
        claim="end - start >= 0.15",
        check=lambda v: v["end"] - v["start"] >= 0.15,
        why="docs/plugins/diffusion.md CPU demo: 0.490 -> 0.714 at step 400 (+0.224)",
    ),
    Demo(
        "ript_vla_babyai",
        0,
        (  # make vla-demo: the recipe as written (bot demonstrations built into the cache on first use)
            Cmd(
                "{mmpo} train configs/ript_vla_babyai.yaml seed={seed} output_dir={run}/train",
                f"{SMOKE_TRAIN} task.sft.epochs=1 task.sft.max_episodes=2",
            ),
            Cmd(
                "{mmpo} eval configs/ript_vla_babyai.yaml checkpoint={run}/train/sft/model output_dir={run}/eval_sft",
                SMOKE_EVAL,
            ),
            Cmd(
                "{mmpo} eval configs/ript_vla_babyai.yaml checkpoint={run}/train output_dir={run}/eval_ript",
                SMOKE_EVAL,
            ),
        ),
        "success_rate (SFT -> RIPT)",
        Read("eval_sft/eval/metrics.json", "success_rate"),
        Read("eval_ript/eval/metrics.json", "success_rate"),
        claim="end >= 0.761 (0.9 x 0.845) and end - start >= 0.20",
        check=lambda v: v["end"] >= 0.761 and v["end"] - v["start"] >= 0.20,
        why="docs/plugins/vla.md CPU demo: SFT 0.520 -> RIPT 0.845, 200 held-out seeds",
    ),
    Demo(
        "framemind",
        0,
        (  # make framemind-demo
            Cmd(
                "{py} -m mmpo_tasks.video_frames.warm_start configs/framemind.yaml --out {run}/warm",
                "--examples 8 --epochs 1",
            ),
            Cmd(
                "{mmpo} train configs/framemind.yaml seed={seed} model.path={run}/warm 'model.tiny={}' "
                "output_dir={run}/train",
                SMOKE_TRAIN,
            ),
            Cmd("{mmpo} eval configs/framemind.yaml checkpoint={run}/train output_dir={run}/eval_grpo", SMOKE_EVAL),
        ),
        "accuracy (cold start -> GRPO)",
        Read("train/metrics.jsonl", "eval/accuracy", "first"),
        Read("eval_grpo/eval/metrics.json", "accuracy"),
        **min_end(1.0),
        why="docs/plugins/video_frames.md CPU demo: held-out accuracy 0.469 -> 1.000, tool use 0.00 -> 1.00 at step 80",
        extras={
            "tool_use_start": Read("train/metrics.jsonl", "eval/tool_use", "first"),
            "tool_use_end": Read("eval_grpo/eval/metrics.json", "tool_use"),
        },
    ),
    Demo(
        "miniwob_grpo",
        0,
        (  # make miniwob-demo
            Cmd("{mmpo} train configs/miniwob_grpo.yaml seed={seed} output_dir={run}", SMOKE_TRAIN),
            Cmd("{mmpo} eval configs/miniwob_grpo.yaml checkpoint={run} output_dir={run}/eval_grpo", SMOKE_EVAL),
        ),
        "success_rate",
        Read("metrics.jsonl", "eval/success_rate", "first"),
        Read("eval_grpo/eval/metrics.json", "success_rate"),
        claim="end - start >= 0.25",
        check=lambda v: v["end"] - v["start"] >= 0.25,
        why="docs/plugins/gui_agent.md MiniWoB GRPO: 0.273 [0.208, 0.350] -> 0.593 [0.513, 0.669] (150 seeds, step 30)",
    ),
    Demo(
        "hiconagent",
        0,
        (  # make hicon-demo: the recipe as written (episodes recorded into the cache, stage 1 in the run)
            Cmd(
                "{mmpo} train configs/hiconagent.yaml seed={seed} output_dir={run}/train",
                f"{SMOKE_TRAIN} task.record.seeds.count=2 task.eval_fraction=0.5 task.warm_start.epochs=1",
            ),
        ),
        "eval/action_type",
        Read("train/metrics.jsonl", "eval/action_type", "first"),
        Read("train/metrics.jsonl", "eval/action_type"),
        **min_end(1.0),
        why="docs/plugins/gui_agent.md HiconAgent: action type 0.83 -> 1.00 at step 80 (step success: noise)",
        extras={
            "reward_end": Read("train/metrics.jsonl", "eval/reward"),
            "step_success_end": Read("train/metrics.jsonl", "eval/step_success"),
        },
    ),
    Demo(
        "airquality_grpo",
        0,
        (
            Cmd(
                "{mmpo} train configs/airquality_grpo.yaml seed={seed} output_dir={run}",
                "trainer.max_steps=1 task.sft.epochs=1 task.sft.max_windows=256",
            ),
            Cmd("{mmpo} eval configs/airquality_grpo.yaml checkpoint={run} output_dir={run}"),
        ),
        "FAR 2014, all leads (SFT -> GRPO)",
        Read("eval/metrics.json", "SFT/far"),
        Read("eval/metrics.json", "GRPO/far"),
        claim="end <= 0.9 x start and F1 GRPO >= F1 SFT - 0.02",
        check=lambda v: v["end"] <= 0.9 * v["start"] and v["f1_grpo"] >= v["f1_sft"] - 0.02,
        why="docs/plugins/forecasting.md CPU demo: FAR 0.253 -> 0.195 (-23%), same F1 (0.830 -> 0.836), 2014",
        extras={
            "f1_sft": Read("eval/metrics.json", "SFT/f1"),
            "f1_grpo": Read("eval/metrics.json", "GRPO/f1"),
        },
    ),
)


def read_value(run: Path, src: Read) -> tuple[float, int | None]:
    """The number ``src`` points at, with its training step when it comes from a ``.jsonl`` log."""
    path = run / src.path
    if path.suffix == ".jsonl":
        hits = [d for d in map(json.loads, path.read_text().splitlines()) if src.key in d]
        if not hits:
            raise KeyError(f"{path}: no line carries {src.key!r}")
        line = hits[0] if src.line == "first" else hits[-1]
        return float(line[src.key]), line.get("step")
    value: Any = json.loads(path.read_text())
    for part in src.key.split("."):
        value = value[part]
    return float(value), None


def command_line(demo: Demo, cmd: Cmd, run: Path, smoke: bool, no_time_limit: bool = False) -> str:
    """The shell line of ``cmd`` for ``demo`` running in ``run`` (``no_time_limit``: training runs
    to ``max_steps`` even on a busy machine, where ``trainer.time_limit_s`` would cut it short)."""
    line = f"{cmd.line} {cmd.smoke}" if smoke and cmd.smoke else cmd.line
    if no_time_limit and line.startswith("{mmpo} train "):
        line += " trainer.time_limit_s=0"
    fills = {"{py}": BIN / "python", "{mmpo}": BIN / "mmpo", "{run}": run, "{seed}": demo.seed}
    for token, value in fills.items():
        line = line.replace(token, shlex.quote(str(value)))
    return line


def run_demo(demo: Demo, out: Path, smoke: bool, no_time_limit: bool = False) -> dict[str, Any]:
    """Run ``demo`` from scratch (output to its log) and read its numbers; one table row."""
    run, log = out / demo.key, out / f"{demo.key}.log"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    row: dict[str, Any] = {
        "demo": demo.name,
        "seed": demo.seed,
        "metric": demo.metric,
        "threshold": demo.claim,
        "why": demo.why,
        "log": str(log),
    }
    t0 = time.monotonic()
    with open(log, "w") as f:
        for cmd in demo.cmds:
            line = command_line(demo, cmd, run, smoke, no_time_limit)
            f.write(f"$ {line}\n")
            f.flush()
            proc = subprocess.run(["bash", "-c", line], check=False, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                row.update(result="error", error=f"exit status {proc.returncode}: {line}")
                break
    row["wall_s"] = round(time.monotonic() - t0, 1)
    if "error" not in row:
        try:
            (row["start"], row["start_step"]), (row["end"], row["end_step"]) = (
                read_value(run, demo.start),
                read_value(run, demo.end),
            )
            row["extras"] = {name: read_value(run, src)[0] for name, src in demo.extras.items()}
            values = {"start": row["start"], "end": row["end"], **row["extras"]}
            row["result"] = "pass" if demo.check(values) else "FAIL"
        except (OSError, KeyError, TypeError, ValueError) as e:
            row.update(result="error", error=f"reading the metrics: {e!r}")
    if "error" in row:
        row["log_tail"] = log.read_text(errors="replace").splitlines()[-15:]
    return row


def clock(seconds: float) -> str:
    """``1h02m03s`` / ``2m37s`` / ``12s``."""
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def number(row: dict[str, Any], which: str) -> str:
    """A start or end cell: the value, with its training step when known."""
    if which not in row:
        return "-"
    step = row.get(f"{which}_step")
    return f"{row[which]:.3f}" + (f" (step {step})" if step is not None else "")


def markdown(rows: list[dict[str, Any]], commit: str, smoke: bool) -> str:
    """The report: the table, the docs passages behind the thresholds, the failed demos' log tails."""
    mode = "--smoke (one step each: checks the script, not the claims)" if smoke else "full runs"
    lines = [
        "# mmpo CPU demos",
        "",
        f"commit `{commit}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {mode}",
        "",
        "| demo | seed | metric | start | end | threshold (docs) | result | wall | other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        other = ", ".join(f"{k} {v:.3f}" for k, v in r.get("extras", {}).items())
        result = r["result"] + (" (smoke)" if smoke else "")
        lines.append(
            f"| {r['demo']} | {r['seed']} | {r['metric']} | {number(r, 'start')} | {number(r, 'end')} | "
            f"{r['threshold']} | {result} | {clock(r['wall_s'])} | {other} |"
        )
    lines += ["", "Thresholds:", *(f"- {r['demo']} seed {r['seed']}: {r['why']}" for r in rows)]
    for r in rows:
        if "error" in r:
            lines += ["", f"## {r['demo']} seed {r['seed']}: {r['error']}", "", "```", *r["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    """``git rev-parse --short HEAD``, with ``+dirty`` when the tree has changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")


def main() -> int:
    """Parse the arguments, run the chosen demos one after another and write the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated demo names (all seeds) or name_sSEED")
    p.add_argument("--list", action="store_true", help="print the demos, their claims and commands; run nothing")
    p.add_argument("--smoke", action="store_true", help="one step per run: checks this script, not the claims")
    p.add_argument(
        "--no-time-limit", action="store_true", help="lift trainer.time_limit_s (a busy machine cuts runs short)"
    )
    p.add_argument("--out", default=None, help="output folder (default runs/demos, or runs/demos-smoke with --smoke)")
    args = p.parse_args()
    out = Path(args.out or ("runs/demos-smoke" if args.smoke else "runs/demos")).resolve()
    wanted = {w for w in args.only.split(",") if w}
    demos = [d for d in DEMOS if not wanted or d.name in wanted or d.key in wanted]
    unknown = wanted - {d.name for d in DEMOS} - {d.key for d in DEMOS}
    if unknown or not demos:
        p.error(f"unknown demo(s) {sorted(unknown)}; known: {', '.join(sorted({d.name for d in DEMOS}))}")
    if args.list:
        for d in demos:
            print(f"{d.key}: {d.metric}; {d.claim}\n    {d.why}")
            for c in d.cmds:
                print(f"    $ {command_line(d, c, out / d.key, args.smoke)}")
        return 0
    commit, rows, t0 = git_commit(), [], time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(demos, 1):
        print(f"[{i}/{len(demos)}] {d.key}: started (elapsed {clock(time.monotonic() - t0)})", flush=True)
        rows.append(run_demo(d, out, args.smoke, args.no_time_limit))
        print(
            f"[{i}/{len(demos)}] {d.key}: {rows[-1]['result']} in {clock(rows[-1]['wall_s'])} "
            f"(elapsed {clock(time.monotonic() - t0)})",
            flush=True,
        )
    report = markdown(rows, commit, args.smoke)
    (out / "demos.md").write_text(report)
    (out / "demos.json").write_text(json.dumps({"commit": commit, "smoke": args.smoke, "demos": rows}, indent=1) + "\n")
    print(report + f"\nwritten: {out / 'demos.md'}, {out / 'demos.json'}")
    bad = {"error"} if args.smoke else {"error", "FAIL"}
    return int(any(r["result"] in bad for r in rows))


if __name__ == "__main__":
    sys.exit(main())
