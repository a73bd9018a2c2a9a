"""Command line: ``mmpo train | eval | bench | tasks | tiny``.

``python -m mmpo ...`` is the same (so ``torchrun -m mmpo train ...`` works). A user error
(config, data, missing file) prints one paragraph and exits with code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from mmpo.errors import MMPOError

EXIT_USER_ERROR = 2


def _run_dir(cfg, config_path: str) -> Path:
    return Path(cfg.output_dir) if cfg.output_dir else Path("runs") / Path(config_path).stem


def _load(config: str, overrides: list[str]):
    from mmpo.config import load_config

    return load_config(config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from mmpo.trainer import Trainer

    cfg = _load(args.config, args.overrides)
    run_dir = _run_dir(cfg, args.config)
    trainer = Trainer(cfg, run_dir)
    if trainer.resumed_from is not None and trainer.engine.is_main:
        print(f"resuming from {trainer.resumed_from}", flush=True)
    result = trainer.train()
    if trainer.engine.is_main:
        ev = result["eval"]
        if ev:
            shown = ", ".join(f"{k}={v:.3f}" for k, v in ev.items())
            print(f"final evaluation (step {result['step']}): {shown}")
        print(f"run folder: {result['run_dir']}")
        print(f"metrics:    {Path(result['run_dir']) / 'metrics.jsonl'}")
        if result["plot"]:
            print(f"plot:       {result['plot']}")
        print(f"model:      {Path(result['run_dir']) / 'model'}")
    return 0


def _split_checkpoint(overrides: list[str]) -> tuple[str | None, list[str]]:
    checkpoint, rest = None, []
    for o in overrides:
        if o.startswith("checkpoint="):
            checkpoint = o.split("=", 1)[1]
        else:
            rest.append(o)
    return checkpoint, rest


def cmd_eval(args: argparse.Namespace) -> int:
    from mmpo.evaluate import evaluate_checkpoint

    checkpoint, overrides = _split_checkpoint(args.overrides)
    cfg = _load(args.config, overrides)
    result = evaluate_checkpoint(cfg, checkpoint, _run_dir(cfg, args.config))
    print(json.dumps(result["metrics"]))
    print(f"predictions: {result['predictions']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mmpo.bench import run_bench

    cfg = _load(args.config, args.overrides)
    result = run_bench(cfg, _run_dir(cfg, args.config), steps=args.steps, warmup=args.warmup)
    print(json.dumps(result))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from mmpo.tasks import TASKS

    for name in TASKS.names():
        cls = TASKS.get(name)
        print(f"{name:20s} {cls.description or (cls.__doc__ or '').strip().splitlines()[0]}")
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from mmpo.tiny import tiny_main

    return tiny_main(args.kind, args.folder, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmpo", description="Group-relative RL post-training for multimodal models.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a recipe: mmpo train CONFIG [key=value ...]")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=3 output_dir=runs/x")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="greedy evaluation: mmpo eval CONFIG checkpoint=DIR [key=value ...]")
    e.add_argument("config")
    e.add_argument("overrides", nargs="*")
    e.set_defaults(fn=cmd_eval)
    b = sub.add_parser("bench", help="seconds per step and peak memory, split into rollout / reward / update")
    b.add_argument("config")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--steps", type=int, default=5, help="measured steps")
    b.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    b.set_defaults(fn=cmd_bench)
    ls = sub.add_parser("tasks", help="list registered task plugins")
    ls.set_defaults(fn=cmd_tasks)
    ty = sub.add_parser("tiny", help="write an offline tiny model: mmpo tiny KIND FOLDER")
    ty.add_argument("kind")
    ty.add_argument("folder")
    ty.add_argument("--seed", type=int, default=0)
    ty.set_defaults(fn=cmd_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except MMPOError as e:
        msg = textwrap.fill(str(e), width=100, break_long_words=False, break_on_hyphens=False)
        print(f"mmpo {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
