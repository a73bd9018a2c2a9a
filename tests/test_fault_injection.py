"""Fault injection (issue 18): a run SIGKILLed at least 5 times -- during a step, a checkpoint write,
an evaluation (``MMPO_FAULT_AT``, :mod:`mmpo.faults`) and at seeded random times -- and restarted
each time ends bit-identical to a straight run: every tensor of ``model/`` and of the last
checkpoint, every metric line exactly once with the same values (timings aside), the same logged
rollouts (``samples/``) and in-training evaluations (``eval/step_*``).

Each run is a child forked from the test process (``mmpo.cli.main`` in the child, its output in a
log file): the modules are imported once, so a restart costs the run, not the imports.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmpo.errors import ConfigError
from mmpo.faults import ENV_VAR, fault_point, parse_fault
from mmpo.trainers.loop import TIMING_KEYS

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300.0
#: what :func:`_resumed_from` says of a fresh start, or of a run killed before it printed where it resumed
NO_RESUME_LINE = "no 'resuming from' line"


@dataclass
class Attempt:
    """One process of the faulted run: how it was stopped and how it ended."""

    case: str
    exit_code: int
    message: str
    lost: str


def _run(
    argv: list[str],
    log: Path,
    fault: str | None = None,
    kill_after_s: float | None = None,
    saved_at: dict[int, float] | None = None,
) -> int:
    """Fork a child running ``mmpo <argv>`` (``MMPO_FAULT_AT=fault`` in its environment), SIGKILL
    it after ``kill_after_s`` seconds when given; return its exit code (-9 when killed). With
    ``saved_at`` (a dict to fill), record when each checkpoint of ``output_dir`` appeared."""
    run_dir = Path(next(a for a in argv if a.startswith("output_dir=")).split("=", 1)[1])
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            out = open(log, "w", buffering=1, encoding="utf-8")
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            sys.stdout = sys.stderr = out
            os.environ.pop(ENV_VAR, None)
            if fault:
                os.environ[ENV_VAR] = fault
            torch.set_num_threads(1)
            from mmpo.cli import main

            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    start = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - start
        if saved_at is not None:
            for step in _saved_steps(run_dir):
                saved_at.setdefault(step, elapsed)
        if (kill_after_s is not None and elapsed >= kill_after_s) or elapsed > RUN_TIMEOUT_S:
            os.kill(pid, signal.SIGKILL)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.02)


def _saved_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in ``run_dir``."""
    from mmpo.checkpoint import checkpoint_step, list_checkpoints

    return [checkpoint_step(p) for p in list_checkpoints(run_dir)]


def _resumed_from(log: Path) -> str:
    """What a run printed about its start: ``resuming from checkpoints/step_...`` or a fresh start."""
    text = log.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        if line.startswith("resuming from "):
            return f"resuming from {Path(line.removeprefix('resuming from ').strip()).name}"
    return NO_RESUME_LINE


def _state(run_dir: Path) -> tuple[int, int]:
    """``(newest complete checkpoint step, newest logged metric step)`` of ``run_dir`` (-1: none)."""
    path = run_dir / "metrics.jsonl"
    logged = (
        [json.loads(ln)["step"] for ln in path.read_text(encoding="utf-8").splitlines() if ln] if path.exists() else []
    )
    return max(_saved_steps(run_dir), default=-1), max(logged, default=-1)


def _faulted_run(argv: list[str], run_dir: Path, saved_at: dict[int, float], seed: int) -> list[Attempt]:
    """Kill the run in ``run_dir`` 5 times, restarting it each time, then let it finish: twice at a
    seeded random time before its first checkpoint (10-60% of the time the straight run took to
    save it, ``saved_at``: the run always has its whole work left, however fast the machine is that
    day), then during the evaluation of step 2, during the checkpoint write of step 2 (its metric
    line already logged), and after step 3 (before its line and checkpoint).
    Returns the attempts (case, exit code, what the restart printed, what was redone)."""
    rng = random.Random(seed)
    plan: list[tuple[str, str | None]] = [
        ("SIGKILL at a random time", None),
        ("SIGKILL at a random time", None),
        ("SIGKILL during the evaluation of step 2", "evaluation:2"),
        ("SIGKILL during the checkpoint write of step 2 (its metric line logged)", "checkpoint_write:1"),
        ("SIGKILL after step 3's update (before its metrics and checkpoint)", "step:2"),
    ]
    killed: list[tuple[str, int, tuple[int, int]]] = []
    messages: list[str] = []
    for i, (case, fault) in enumerate(plan):
        kill_after = None
        if fault is None:  # the run has not saved its first checkpoint yet: a fresh start each time
            assert not _saved_steps(run_dir), "a random kill must come before the first checkpoint"
            kill_after = round(rng.uniform(0.1, 0.6) * saved_at[1], 3)
            case = f"{case} ({kill_after} s after start)"
        log = run_dir.parent / f"{run_dir.name}.attempt{i}.log"
        code = _run(argv, log, fault=fault, kill_after_s=kill_after)
        assert code == -signal.SIGKILL, f"{case}: the run was not killed (exit {code}); log: {log}"
        messages.append(_resumed_from(log))
        killed.append((case, code, _state(run_dir)))
    log = run_dir.parent / f"{run_dir.name}.final.log"
    code = _run(argv, log)
    assert code == 0, log.read_text(encoding="utf-8")
    messages.append(_resumed_from(log))
    assert messages[-1] == f"resuming from step_{killed[-1][2][0]:08d}", messages[-1]  # the finishing run resumed
    attempts = []
    for (case, code, (saved, logged)), restart in zip(killed, messages[1:]):
        # the restart loads the newest complete checkpoint (a restart killed early prints nothing)
        expected = f"resuming from step_{saved:08d}" if saved >= 0 else NO_RESUME_LINE
        assert restart in (expected, NO_RESUME_LINE), (case, restart, expected)
        lost = f"only unsaved work after step {saved}, redone" if saved >= 0 else "only unsaved work, redone"
        if logged > max(saved, 0):
            lost += f"; metric lines {max(saved, 0) + 1}..{logged} dropped and logged again"
        attempts.append(
            Attempt(case, code, f"none (SIGKILL); the restart: {expected if saved >= 0 else 'fresh start'}", lost)
        )
    return attempts


def _metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if ln]


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS and not k.endswith("_s")}


def _same_number(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _assert_same_tensors(a: Path, b: Path) -> int:
    """Every tensor of every safetensors file under ``a`` equals ``b``'s, bit for bit; returns the count."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files, f"no safetensors under {a}"
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    count = 0
    for rel in files:
        ta, tb = load_file(str(a / rel)), load_file(str(b / rel))
        assert ta.keys() == tb.keys(), rel
        for name in ta:
            assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), f"{rel}:{name} differs"
            count += 1
    return count


def _files(folder: Path, run_dir: Path | None = None) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path; ``run_dir``'s path in them replaced by ``<run>``
    (an evaluation names its run folder)."""
    out = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return out if run_dir is None else {k: v.replace(str(run_dir).encode(), b"<run>") for k, v in out.items()}


def _compare_runs(straight: Path, faulted: Path, max_steps: int) -> list[str]:
    """Assert the faulted run equals the straight one; returns what was checked (for the report)."""
    import pyarrow.parquet as pq

    n_model = _assert_same_tensors(straight / "model", faulted / "model")
    last = f"checkpoints/step_{max_steps:08d}"
    n_ckpt = _assert_same_tensors(straight / last, faulted / last)

    lines_s, lines_f = _metric_lines(straight), _metric_lines(faulted)
    steps = [r["step"] for r in lines_f]
    assert steps == list(range(max_steps + 1)), f"metric steps {steps}: each of 0..{max_steps} once, in order"
    assert [r["step"] for r in lines_s] == steps
    for rs, rf in zip(lines_s, lines_f):
        us, uf = _untimed(rs), _untimed(rf)
        assert us.keys() == uf.keys(), rs["step"]
        bad = [k for k in us if not _same_number(us[k], uf[k])]
        assert not bad, f"step {rs['step']}: {bad} differ"

    samples = sorted(p.name for p in (faulted / "samples").glob("*.parquet"))
    assert samples == [f"step_{s:08d}.parquet" for s in range(1, max_steps + 1)]
    assert samples == sorted(p.name for p in (straight / "samples").glob("*.parquet"))
    for name in samples:
        assert pq.read_table(straight / "samples" / name).equals(pq.read_table(faulted / "samples" / name)), name
    assert _files(straight / "samples" / "media") == _files(faulted / "samples" / "media")

    evals = sorted(p.name for p in (faulted / "eval").iterdir())
    assert evals == sorted(p.name for p in (straight / "eval").iterdir())
    for name in evals:
        same = _files(straight / "eval" / name, straight) == _files(faulted / "eval" / name, faulted)
        assert same, f"eval/{name} differs"
    leftovers = [p.name for p in (faulted / "checkpoints").iterdir() if p.name.startswith(".")]
    return [
        f"{n_model} model tensors, {n_ckpt} tensors of {last} equal",
        f"metrics.jsonl steps 0..{max_steps} once each, values equal",
        f"samples steps 1..{max_steps} equal; eval folders {evals} equal",
        f"leftover temporary checkpoint folders: {leftovers or 'none'}",
    ]


def _preload(config: str) -> None:
    """Import in this process what a run imports on first use (its trainer and plugin, the model
    classes, DeepSpeed via transformers' save_pretrained, matplotlib for the curves), so that each
    forked run starts without paying for the imports again."""
    import importlib

    from mmpo.config import load_config
    from mmpo.trainers import trainer_class_for

    trainer_class_for(load_config(str(ROOT / config), []).task.name)
    for name in ("deepspeed", "matplotlib.backends.backend_agg", "pyarrow.parquet", "mmpo.cli", "mmpo.report"):
        importlib.import_module(name)


def _check_recipe(tmp_path: Path, config: str, overrides: list[str], max_steps: int, seed: int) -> None:
    _preload(config)
    common = [
        f"trainer.max_steps={max_steps}",
        "trainer.save_every=1",
        "trainer.eval_every=2",
        "trainer.keep_last=0",
        "trainer.time_limit_s=0",
        "trainer.log_samples=4",
        *overrides,
    ]
    straight, faulted = tmp_path / "straight", tmp_path / "faulted"
    started = time.monotonic()
    saved_at: dict[int, float] = {}
    code = _run(
        ["train", str(ROOT / config), f"output_dir={straight}", *common], tmp_path / "straight.log", saved_at=saved_at
    )
    straight_s = time.monotonic() - started
    assert code == 0, (tmp_path / "straight.log").read_text(encoding="utf-8")
    assert sorted(saved_at) == list(range(1, max_steps + 1))
    argv = ["train", str(ROOT / config), f"output_dir={faulted}", *common]
    attempts = _faulted_run(argv, faulted, saved_at, seed)
    checked = _compare_runs(straight, faulted, max_steps)
    # the note's table: case | exit code | message | anything lost
    print(f"\n{config} (straight run {straight_s:.1f} s)")
    print("| case | exit code | message | anything lost |\n|---|---|---|---|")
    for a in attempts:
        print(f"| {a.case} | {a.exit_code} (137 in a shell) | {a.message} | {a.lost} |")
    print("checked: " + "; ".join(checked))


@pytest.mark.slow
@needs_fork
def test_token_recipe_survives_kills(tmp_path: Path) -> None:
    _check_recipe(
        tmp_path,
        "configs/quickstart.yaml",
        [
            "rollout.prompts_per_step=2",
            "rollout.group_size=4",
            "task.num_train=64",
            "algorithm.dynamic_sampling=false",
            "trainer.update_epochs=1",
            "trainer.minibatch_size=8",
            "eval.num_samples=4",
            "eval.batch_size=4",
        ],
        max_steps=3,
        seed=18,
    )


@pytest.mark.slow
@needs_fork
def test_diffusion_recipe_survives_kills(tmp_path: Path) -> None:
    _check_recipe(
        tmp_path,
        "configs/diffusion_demo.yaml",
        [
            "task.sampling.num_steps=4",
            "task.sampling.eval_num_steps=4",
            "task.chunks.sizes=[2,2]",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "eval.num_samples=2",
            "eval.batch_size=2",
        ],
        max_steps=3,
        seed=19,
    )


@pytest.mark.slow
@needs_fork
def test_environment_recipe_survives_kills(tmp_path: Path) -> None:
    _check_recipe(
        tmp_path,
        "configs/ript_vla_continuous.yaml",
        [
            "task.env.max_steps=4",
            "task.eval_videos=1",
            "task.ript.dynamic_sampling=false",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "trainer.minibatch_size=4",
            "eval.num_samples=2",
            "eval.batch_size=2",
        ],
        max_steps=3,
        seed=20,
    )


@pytest.mark.parametrize("bad", ["step", "step:0", "step:x", "nowhere:1", ":2"])
def test_malformed_fault_spec_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match=ENV_VAR):
        parse_fault(bad)


def test_fault_spec_parses() -> None:
    assert parse_fault("checkpoint_write:3") == ("checkpoint_write", 3)


def _passes(tmp_path: Path, fault: str | None) -> tuple[int, str]:
    """Fork a child that passes ``step`` 3 times (``MMPO_FAULT_AT=fault``; unset for None), recording
    each completed pass; returns its exit code and the last recorded pass."""
    record = tmp_path / "passes"
    record.write_text("0")
    pid = os.fork()
    if pid == 0:
        try:
            os.environ.pop(ENV_VAR, None)
            if fault is not None:
                os.environ[ENV_VAR] = fault
            for i in range(3):
                fault_point("step")
                record.write_text(str(i + 1))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), record.read_text()


@needs_fork
def test_fault_point_kills_at_the_nth_pass(tmp_path: Path) -> None:
    assert _passes(tmp_path, "step:2") == (-signal.SIGKILL, "1")
    assert _passes(tmp_path, "step:1") == (-signal.SIGKILL, "0")


@needs_fork
def test_fault_point_is_inert_unless_its_phase_is_named(tmp_path: Path) -> None:
    assert _passes(tmp_path, None) == (0, "3")
    assert _passes(tmp_path, "evaluation:1") == (0, "3")
    assert _passes(tmp_path, "step:4") == (0, "3")
