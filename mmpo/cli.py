"""Command line: ``mmpo train | eval | report | bench | config | tasks | tiny``.

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
    from mmpo.trainers import trainer_class_for

    if args.help:
        if args.config is None:
            print(args.parser.format_help())
            return 0
        return _print_config(args.config, args.overrides, "text")
    if args.config is None:
        args.parser.error("the following arguments are required: config")
    cfg = _load(args.config, args.overrides)
    run_dir = _run_dir(cfg, args.config)
    _memory_warning(cfg)
    trainer = trainer_class_for(cfg.task.name)(cfg, run_dir)
    if trainer.resumed_from is not None and trainer.engine.is_main:
        from tqdm.auto import tqdm

        tqdm.write(f"resuming from {trainer.resumed_from}")  # above the run's bar, not through it
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
        if result.get("report"):
            print(f"report:     {result['report']}")
    return 0


def _memory_warning(cfg) -> None:
    """Before the model loads: a ``warning:`` paragraph when the estimated peak exceeds the device."""
    from mmpo.memory_fit import train_warning

    if int(os.environ.get("RANK", "0") or 0) == 0:
        text = train_warning(cfg)
        if text:
            print(text, file=sys.stderr)


def _split_checkpoint(overrides: list[str]) -> tuple[str | None, list[str]]:
    checkpoint, rest = None, []
    for o in overrides:
        if o.startswith("checkpoint="):
            checkpoint = o.split("=", 1)[1]
        else:
            rest.append(o)
    return checkpoint, rest


def cmd_eval(args: argparse.Namespace) -> int:
    """``mmpo eval CONFIG [checkpoint=RUN_OR_MODEL] [key=value ...]``: the one evaluator (see
    :mod:`mmpo.evaluate`), sharded over ranks under torchrun; writes next to the checkpoint unless
    ``output_dir=`` is given (then into ``<output_dir>/eval``)."""
    from mmpo.evaluate import default_eval_dir, eval_ranks, run_evaluation, write_evaluation
    from mmpo.trainers import trainer_class_for

    checkpoint, overrides = _split_checkpoint(args.overrides)
    cfg = _load(args.config, overrides)
    if any(o.startswith("output_dir=") for o in overrides):
        out_dir = Path(cfg.output_dir) / "eval"
    else:
        out_dir = default_eval_dir(checkpoint, _run_dir(cfg, args.config))
    rank, world, gather = eval_ranks()
    evaluator, label = trainer_class_for(cfg.task.name).checkpoint_evaluator(cfg, checkpoint)
    evaluated = run_evaluation(evaluator, rank=rank, world_size=world, gather=gather)
    if rank != 0:
        return 0
    result = write_evaluation(out_dir, evaluated, evaluator, label)
    if "table" in result:  # an evaluator's markdown table (e.g. forecasting's per-lead-time errors)
        print(Path(result["table"]).read_text(encoding="utf-8").rstrip("\n"))
    print(json.dumps(result["metrics"]))
    print(f"predictions: {result['predictions']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.against:
        return _bench_against(args)
    if args.prefix_sharing:
        return _bench_prefix(args)
    if args.packing:
        return _bench_packing(args)
    if args.tree:
        return _bench_tree(args)
    if args.diffusion:
        return _bench_diffusion(args)
    if args.engines:
        return _bench_engines(args)
    if args.bf16_tolerance:
        from mmpo.bench_precision import main as bf16_gaps

        bf16_gaps([s.strip() for s in args.settings.split(",") if s.strip()])
        return 0
    if args.config == "ahc":
        return _bench_ahc(args)
    if args.estimate:
        return _bench_estimate(args)
    if args.config is None:
        raise MMPOError("mmpo bench needs a CONFIG (or --against trl, which builds its own settings)")
    from mmpo.bench import run_bench

    cfg = _load(args.config, args.overrides)
    steps = 5 if args.steps is None else args.steps
    warmup = 1 if args.warmup is None else args.warmup
    result = run_bench(cfg, _run_dir(cfg, args.config), steps=steps, warmup=warmup)
    print(json.dumps(result))
    return 0


def _bench_estimate(args: argparse.Namespace) -> int:
    """``mmpo bench --estimate CONFIG``: predicted peak memory per phase and component, no model loaded."""
    from mmpo.memory_estimate import GiB, estimate_memory
    from mmpo.memory_fit import device_memory, first_fit, format_table

    if args.config is None:
        raise MMPOError("mmpo bench --estimate needs a CONFIG")
    cfg = _load(args.config, args.overrides)
    device = "cuda" if args.device_memory is not None and cfg.device == "auto" else None
    est = estimate_memory(cfg, device=device, prompt_tokens=args.prompt_tokens)
    capacity = int(args.device_memory * GiB) if args.device_memory is not None else device_memory(est.device)
    fit = (
        None if est.peak <= capacity else first_fit(cfg, capacity, device=est.device, prompt_tokens=args.prompt_tokens)
    )
    if args.json:
        out = est.to_dict()
        out.update({"device_memory_bytes": capacity, "fits": est.peak <= capacity})
        out["fitting_overrides"] = fit[0] if fit else None
        print(json.dumps(out))
    else:
        print(format_table(est, capacity, fit))
    return 0


def _bench_against(args: argparse.Namespace) -> int:
    """``mmpo bench --against trl``: one JSON line per setting (mmpo and TRL, alternating steps)."""
    from mmpo.bench_trl import run_against_trl

    if args.config is not None or args.overrides:
        raise MMPOError(
            "mmpo bench --against trl builds matched settings for both frameworks itself; "
            "pass no CONFIG or overrides (use --settings, --steps, --prompts-per-step, ...)"
        )
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    fields = {
        "group_size": args.group_size,
        "prompts_per_step": args.prompts_per_step,
        "max_new_tokens": args.max_new_tokens,
        "image_size": args.image_size,
        "precision": args.precision,
        "memory_mode": args.memory_mode,
        "beta": args.beta,
    }
    rows = run_against_trl(
        settings,
        steps=5 if args.steps is None else args.steps,
        warmup=2 if args.warmup is None else args.warmup,
        threads=args.threads,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        wait_quiet_s=args.wait_quiet,
        **{k: v for k, v in fields.items() if v is not None},
    )
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


def _bench_prefix(args: argparse.Namespace) -> int:
    """``mmpo bench --prefix-sharing``: one JSON line per G (plain vs shared-prefix log-prob passes)."""
    from mmpo.bench_prefix import run_prefix_bench

    if args.config is not None or args.overrides:
        raise MMPOError("mmpo bench --prefix-sharing builds its own inputs; pass no CONFIG or overrides")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    groups = tuple(int(g) for g in args.group_sizes.split(",") if g.strip())
    rows = run_prefix_bench(
        image_size=args.image_size or 560,
        group_sizes=groups,
        completion_len=args.max_new_tokens or 32,
        repeats=args.steps or 3,
    )
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


def _bench_packing(args: argparse.Namespace) -> int:
    """``mmpo bench --packing``: one JSON line per (rows, prefix sharing), padded vs packed log-prob passes."""
    from mmpo.bench_packing import run_packing_bench

    if args.config is not None or args.overrides:
        raise MMPOError("mmpo bench --packing builds its own inputs; pass no CONFIG or overrides")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = run_packing_bench(
        row_counts=tuple(int(n) for n in args.rows.split(",") if n.strip()),
        group_size=args.group_size or 8,
        max_new_tokens=args.max_new_tokens or 256,
        repeats=args.steps or 3,
    )
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


def _bench_tree(args: argparse.Namespace) -> int:
    """``mmpo bench --tree CONFIG``: one JSON line, tree rollouts (``rollout.tree``) vs independent rows."""
    from mmpo.bench_tree import run_tree_bench

    if args.config is None:
        raise MMPOError("mmpo bench --tree needs a CONFIG with a rollout.tree block")
    print(json.dumps(run_tree_bench(_load(args.config, args.overrides))), flush=True)
    return 0


def _bench_engines(args: argparse.Namespace) -> int:
    """``mmpo bench --engines hf,vllm CONFIG``: one JSON line per rollout engine (sampled tokens/s)."""
    from mmpo.bench_engines import run_engine_bench

    if args.config is None:
        raise MMPOError("mmpo bench --engines needs a CONFIG (a token recipe)")
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    cfg = _load(args.config, args.overrides)
    steps, warmup = args.steps or 3, 1 if args.warmup is None else args.warmup
    for row in run_engine_bench(cfg, engines, steps=steps, warmup=warmup):
        print(json.dumps(row), flush=True)
    return 0


def _bench_diffusion(args: argparse.Namespace) -> int:
    """``mmpo bench --diffusion [key=value ...]``: one JSON line per diffusion recipe, its RL step
    over sampling its group (goal: at most 1.5)."""
    from mmpo.bench_diffusion import RECIPES, run_diffusion_bench

    overrides = ([args.config] if args.config else []) + list(args.overrides)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise MMPOError(f"mmpo bench --diffusion runs {', '.join(RECIPES)} itself; {bad[0]!r} is not a key=value")
    recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip()) if args.recipes else RECIPES
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        raise MMPOError(f"mmpo bench --diffusion: unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    steps, warmup = args.steps or 3, 1 if args.warmup is None else args.warmup
    for row in run_diffusion_bench(recipes, overrides, steps=steps, warmup=warmup):
        print(json.dumps(row), flush=True)
    return 0


def _bench_ahc(args: argparse.Namespace) -> int:
    """``mmpo bench ahc``: one JSON line per drop layer (full vs history-compressed policy pass)."""
    from mmpo.bench_ahc import run_ahc_bench

    if args.overrides:
        raise MMPOError("mmpo bench ahc builds its own model and prompt; pass no overrides")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = run_ahc_bench(image_size=args.image_size or 224, repeats=args.steps or 3)
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``mmpo report RUN_DIR``: write ``RUN_DIR/report.html`` (see :mod:`mmpo.report`)."""
    from mmpo.report import build_report
    from mmpo.trainers import run_kind

    print(f"report: {build_report(args.run_dir, kind=run_kind(args.run_dir))}")
    return 0


CONFIG_HINT = (
    "Every key a config accepts (type, default or current value, help; the task's own keys and the "
    "options of the chosen loss, advantage, KL schedule, filters and engine): mmpo config CONFIG_OR_TASK, "
    "or mmpo train CONFIG --help. Task names: mmpo tasks."
)


def _print_config(target: str, overrides: list[str], fmt: str) -> int:
    """Print the keys of a config or task (:mod:`mmpo.config_doc`); a config that does not load
    as written is still listed, with a note on stderr saying why."""
    from mmpo.config_doc import describe, format_json, format_text

    listing = describe(target, overrides)
    print(format_json(listing) if fmt == "json" else format_text(listing), end="" if fmt == "text" else "\n")
    if listing.problem:
        msg = textwrap.fill(listing.problem, width=100, break_long_words=False, break_on_hyphens=False)
        print(f"note: the config does not load as written (training would stop here): {msg}", file=sys.stderr)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    return _print_config(args.target, args.overrides, args.format)


def cmd_tasks(args: argparse.Namespace) -> int:
    from mmpo.tasks import TASKS

    for name in TASKS.names():
        cls = TASKS.get(name)
        print(f"{name:20s} {cls.description or (cls.__doc__ or '').strip().splitlines()[0]}")
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from mmpo.tiny_diffusion import TINY_DIFFUSION_KINDS, save_tiny_pipeline

    if args.kind in TINY_DIFFUSION_KINDS:  # a diffusers pipeline folder
        path = save_tiny_pipeline(args.kind, args.folder, seed=args.seed)
        print(
            f"Wrote tiny '{args.kind}' diffusers pipeline (seed {args.seed}) to {path}: "
            f"{', '.join(sorted(p.name for p in path.iterdir()))}."
        )
        return 0
    return tiny_main(args.kind, args.folder, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmpo", description="Group-relative RL post-training for multimodal models.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", help="train a recipe: mmpo train CONFIG [key=value ...]", add_help=False, epilog=CONFIG_HINT
    )
    t.add_argument("config", nargs="?", help="a run config (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=3 output_dir=runs/x")
    # argparse would print its generic help before CONFIG is read: with a CONFIG, --help lists its keys
    t.add_argument("-h", "--help", action="store_true", help="with CONFIG: every key it accepts; else this help")
    t.set_defaults(fn=cmd_train, parser=t)
    c = sub.add_parser(
        "config",
        help="every key a config accepts, with type, value and help: mmpo config CONFIG_OR_TASK [key=value ...]",
    )
    c.add_argument("target", metavar="CONFIG_OR_TASK", help="a run config (configs/*.yaml) or a task name (defaults)")
    c.add_argument("overrides", nargs="*", help="dotted overrides, as for mmpo train")
    c.add_argument("--format", choices=["text", "json"], default="text", help="json: one object, for tools")
    c.set_defaults(fn=cmd_config)
    e = sub.add_parser("eval", help="greedy evaluation: mmpo eval CONFIG checkpoint=DIR [key=value ...]")
    e.add_argument("config")
    e.add_argument("overrides", nargs="*")
    e.set_defaults(fn=cmd_eval)
    b = sub.add_parser(
        "bench",
        help="seconds per step and peak memory, split into rollout / reward / update; "
        "--against trl: mmpo vs TRL's GRPOTrainer on the same tiny model",
    )
    b.add_argument(
        "config",
        nargs="?",
        help="a run config (not with --against); or 'ahc': full vs history-compressed (HiconAgent AHC) policy pass",
    )
    b.add_argument("overrides", nargs="*")
    b.add_argument("--steps", type=int, default=None, help="measured steps (default 5)")
    b.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default 1; 2 with --against)")
    b.add_argument(
        "--against",
        choices=["trl"],
        default=None,
        help="run TRL's GRPOTrainer and mmpo with matched settings, alternating step by step; "
        "one JSON line per setting (needs pip install -e '.[bench]')",
    )
    b.add_argument(
        "--prefix-sharing",
        action="store_true",
        help="time the log-prob passes (reference: no grad; policy: forward + backward) over one group "
        "after a long image prompt, plain vs shared prefix; one JSON line per G",
    )
    b.add_argument(
        "--packing",
        action="store_true",
        help="time the log-prob passes over rows of unequal lengths, padded vs packed (rollout.padding_free), "
        "with and without prefix sharing; one JSON line per setting (--rows, --group-size, --max-new-tokens)",
    )
    b.add_argument("--rows", default="16,64", help="with --packing: comma-separated rows per micro batch")
    b.add_argument(
        "--diffusion",
        action="store_true",
        help="bench each diffusion recipe (flow_grpo, chunk_grpo, find, diffusion_demo; key=value overrides apply to "
        "all): one JSON line each with step_over_rollout, an RL step over sampling its group (goal <= 1.5)",
    )
    b.add_argument(
        "--engines",
        default=None,
        help="comma-separated rollout engines (hf, vllm): sample CONFIG's prompts with each and print tokens/s",
    )
    b.add_argument(
        "--bf16-tolerance",
        action="store_true",
        help="score the same rows of each --settings shape in fp32, bf16 autocast and bf16 frozen weights; print the "
        "log-prob gaps (one JSON line per setting)",
    )
    b.add_argument("--recipes", default=None, help="with --diffusion: comma-separated subset of the recipes")
    b.add_argument(
        "--tree",
        action="store_true",
        help="decode the config's prompts with its rollout.tree branching policy and with independent rows "
        "(as many per prompt as leaves); one JSON line of decoded tokens and seconds",
    )
    b.add_argument(
        "--estimate",
        action="store_true",
        help="predict peak memory per phase and component from the config and the model's shapes "
        "(no weights loaded); says which micro batch / checkpointing / ZeRO setting fits when it does not",
    )
    b.add_argument(
        "--device-memory",
        type=float,
        default=None,
        metavar="GiB",
        help="with --estimate: the device memory to compare with (default: CUDA device 0, else available RAM)",
    )
    b.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help="with --estimate: text tokens of a prompt before its image tokens (default 150)",
    )
    b.add_argument("--json", action="store_true", help="with --estimate: one JSON object")
    b.add_argument("--group-sizes", default="8,16", help="with --prefix-sharing: comma-separated G values")
    b.add_argument(
        "--settings",
        default="text,vlm",
        help="with --against: comma-separated, of text, vlm (tiny models), text-0.5b (Qwen2.5-0.5B dimensions, fp32 "
        "full fine-tuning), vlm-2b-lora (Qwen2-VL-2B dimensions, LoRA r 16, bf16 weights, one 448 px image)",
    )
    b.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=None,
        help="with --against: both sides' precision (default: the setting's; bf16: autocast on both sides)",
    )
    b.add_argument(
        "--memory-mode",
        choices=["auto", "alternate", "blocks"],
        default=None,
        help="with --against: 'alternate' keeps both workers alive and alternates step by step; 'blocks' runs one "
        "worker at a time (all mmpo's steps, then TRL's) so that real shapes fit; 'auto' (default): blocks at the "
        "real shapes",
    )
    b.add_argument(
        "--beta", type=float, default=None, help="with --against: KL coefficient (default 0.04; 0 at the real shapes)"
    )
    b.add_argument(
        "--threads",
        type=int,
        default=None,
        help="with --against: torch threads of each side (default: all usable CPUs)",
    )
    b.add_argument(
        "--prompts-per-step",
        type=int,
        default=None,
        help="with --against: prompts per step (default 4; 2 at the real shapes)",
    )
    b.add_argument("--group-size", type=int, default=None, help="with --against: G, completions per prompt (default 8)")
    b.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="with --against: completion length, EOS suppressed (default 32; 64 at the real shapes)",
    )
    b.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        help="with --against: before each step wait up to this many seconds for other processes to leave the CPUs idle "
        "(0: never wait)",
    )
    b.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="with --against, vlm: image side in pixels, a multiple of 28 (default 560: 400 image tokens; 448 at "
        "vlm-2b-lora: 256)",
    )
    b.set_defaults(fn=cmd_bench)
    r = sub.add_parser(
        "report",
        help="write RUN_DIR/report.html: curves, evaluations, logged rollouts, config; one page that opens offline",
    )
    r.add_argument("run_dir", help="a run folder (the output_dir of mmpo train)")
    r.set_defaults(fn=cmd_report)
    ls = sub.add_parser("tasks", help="list registered task plugins")
    ls.set_defaults(fn=cmd_tasks)
    ty = sub.add_parser(
        "tiny",
        help="write an offline tiny model or pipeline: mmpo tiny KIND FOLDER "
        "(qwen2, qwen3, qwen2_vl, qwen2_5_vl, sd3, flux, sd)",
    )
    ty.add_argument("kind")
    ty.add_argument("folder")
    ty.add_argument("--seed", type=int, default=0)
    ty.set_defaults(fn=cmd_tiny)
    return p


def tiny_main(kind: str, folder: str, seed: int = 0) -> int:
    """CLI ``mmpo tiny <kind> <folder>``: write the tiny model and print what was written."""
    from mmpo.models import load_model
    from mmpo.tiny import save_tiny

    path = save_tiny(kind, folder, seed=seed)
    model, _, info = load_model(str(path))
    n_params = sum(p.numel() for p in model.parameters())
    files = ", ".join(sorted(p.name for p in path.iterdir()))
    print(
        f"Wrote tiny '{kind}' (seed {seed}) to {path}: {n_params:,} parameters, "
        f"vocab size {info.vocab_size}, {'VLM' if info.is_vlm else 'text LM'} "
        f"(model_type {info.model_type}). Files: {files}."
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except MMPOError as e:
        from mmpo.progress import clear_open_bars

        clear_open_bars()  # a run stopped while loading: no bar left above the message
        from mmpo.redact import scrub

        msg = textwrap.fill(scrub(str(e)), width=100, break_long_words=False, break_on_hyphens=False)
        print(f"mmpo {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
