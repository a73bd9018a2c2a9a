"""No silence, no noise: a run's bar names its phase from the start, every evaluation prints one
result line, and nothing else (DeepSpeed's accelerator guess, transformers' save bars, expected
notices) breaks into the bar; the install's pip output is compact and keeps every problem."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mmpo.evaluate import run_evaluation
from mmpo.hf_logging import EXPECTED_NOTICES, quiet_libraries
from mmpo.progress import eval_count, eval_index, format_results

ROOT = Path(__file__).resolve().parents[1]
BAR = re.compile(r"^(?P<desc>[^|]+?): +\d+%\|")  # a tqdm line: "<desc>:  50%|█████     | 1/2 [...]"
NOISE = ("Setting accelerator", "Writing model shards", "Loading weights", "XDG_RUNTIME_DIR", "[transformers]")


def _segments(stderr: str) -> list[str]:
    """The pieces a terminal shows: split at carriage returns and newlines, cursor-up codes removed."""
    return [s.strip() for s in re.split(r"[\r\n]", stderr.replace("\x1b[A", "")) if s.strip()]


@pytest.mark.slow
def test_a_tiny_run_shows_its_phases_and_results_and_nothing_else(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # DeepSpeed's own default
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "mmpo",
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        f"output_dir={tmp_path / 'run'}",
        "task.num_train=64",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "trainer.max_steps=2",
        "trainer.eval_every=1",
        "trainer.time_limit_s=0",
        "eval.num_samples=8",
        "eval.batch_size=4",  # two chunks: the evaluation bar moves
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    segments = _segments(proc.stderr)
    strays = [s for s in segments if not BAR.match(s) and not s.startswith("synthetic_vqa data: ")]
    assert strays == []
    for bad in NOISE:
        assert bad not in proc.stderr and bad not in proc.stdout
    phases = {m.group("desc") for s in segments if (m := BAR.match(s))}
    # 3 evaluations: at step 0 (eval_at_start), 1 and 2
    assert {"load model", "eval 1/3", "eval 2/3", "eval 3/3", "train · rollout", "train · update"} <= phases
    assert {"save checkpoint", "save model"} <= phases
    item_bars = [s for s in segments if BAR.match(s) and "item" in s]
    assert any(re.search(r"\| 4/8 \[", s) for s in item_bars) and any(re.search(r"\| 8/8 \[", s) for s in item_bars)
    results = [line for line in proc.stdout.splitlines() if line.startswith("eval step ")]
    assert [r.split(":")[0] for r in results] == ["eval step 0", "eval step 1", "eval step 2"]
    assert all(re.search(r" accuracy=[0-9.e-]+ ", r) and "chance=0.25" in r for r in results)


# -- the pieces ---------------------------------------------------------------------------------
def test_evaluations_are_counted_as_the_loop_runs_them() -> None:
    # eval_every 100 over 400 steps with one at the start: steps 0, 100, 200, 300, 400
    assert eval_count(400, 100, True) == 5
    assert [eval_index(s, 400, 100, True) for s in (0, 100, 200, 300, 400)] == [1, 2, 3, 4, 5]
    # 30 steps every 20: 0, 20 and the end at 30
    assert eval_count(30, 20, True) == 3 and eval_index(30, 30, 20, True) == 3
    assert eval_count(5, 0, False) == 1 and eval_index(5, 5, 0, False) == 1  # only at the end
    assert eval_index(13, 30, 10, True) == 3  # stopped by the time limit after the 10-step one


def test_result_line_shows_the_top_level_metrics() -> None:
    metrics = {
        "eval/accuracy": 0.61234,
        "eval/reward": 0.58,
        "eval/accuracy/colour": 0.9,  # per-category: in the report, not on the line
        "sft/loss_last_epoch": 0.3,
        "eval_s": 12.0,
        "eval/rmse": 53.276,
    }
    assert format_results(10, metrics) == "eval step 10: accuracy=0.612 reward=0.58 rmse=53.3"
    assert format_results(0, {}) == "eval step 0: (no metric)"


class _CountingEvaluator:
    """A held-out set of ``n`` numbers; each prediction is the number times 10 (and notes its offset)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls: list[tuple[list[int], int]] = []

    def items(self) -> list[int]:
        return list(range(self.n))

    def predict(self, items: list[int], offset: int) -> list[dict[str, Any]]:
        self.calls.append((list(items), offset))
        return [{"id": str(x), "prediction": 10 * x, "offset": offset + i} for i, x in enumerate(items)]

    def summarize(self, items: list[int], rows: list[dict[str, Any]]) -> dict[str, float]:
        return {"mean": sum(r["prediction"] for r in rows) / len(rows)}

    def write_artifacts(self, out_dir: Path, items: list[int], rows: list[dict[str, Any]]) -> dict[str, str]:
        return {}


def test_chunked_evaluation_moves_a_bar_and_gives_the_same_rows() -> None:
    whole, chunked = _CountingEvaluator(8), _CountingEvaluator(8)
    done: list[int] = []
    a = run_evaluation(whole)
    b = run_evaluation(chunked, chunk_size=3, progress=done.append)
    assert a.rows == b.rows and a.metrics == b.metrics == {"mean": 35.0}
    assert [r["offset"] for r in b.rows] == list(range(8))  # each item keeps its global index
    assert [off for _, off in chunked.calls] == [0, 3, 6] and done == [3, 3, 2]
    # rank 2 of 3 holds items 6, 7: it still predicts as often as the others (an empty chunk
    # predicts the first item and drops it), so collective calls stay in step
    last = _CountingEvaluator(8)
    done = []
    c = run_evaluation(last, rank=2, world_size=3, chunk_size=2, progress=done.append)
    assert [r["id"] for r in c.rows] == ["6", "7"] and len(last.calls) == 2 and done == [2, 0]
    assert last.calls[1] == ([0], 0)


def test_quiet_libraries_drops_expected_notices_only(monkeypatch) -> None:
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    quiet_libraries("cpu")
    assert os.environ["DS_ACCELERATOR"] == "cpu" and not hf_logging.is_progress_bar_enabled()
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    quiet_libraries("cpu")  # a value the user set is kept
    assert os.environ["DS_ACCELERATOR"] == "cuda"
    logger = logging.getLogger("transformers.modeling_utils")
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)
    logger.addHandler(handler)
    try:
        logger.warning(EXPECTED_NOTICES[0] + " that has old embeddings' mean and covariance.")
        logger.warning("Some weights of the model checkpoint were not used")
    finally:
        logger.removeHandler(handler)
    assert seen.getvalue() == "Some weights of the model checkpoint were not used\n"


PIP_OUTPUT = """\
Looking in indexes: https://pypi.org/simple
Collecting torch==2.14.1
  Downloading torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl (900.1 MB)
Collecting filelock (from torch==2.14.1)
  Using cached filelock-3.20.0-py3-none-any.whl (16 kB)
Requirement already satisfied: typing-extensions>=4.10 in ./.venv/lib/python3.11/site-packages (4.15.0)
WARNING: torch 2.14.1 does not provide the extra 'cuda'
Installing collected packages: filelock, torch
Successfully installed filelock-3.20.0 torch-2.14.1
"""

PIP_FAILURE = """\
Collecting nothing-here==1
ERROR: Could not find a version that satisfies the requirement nothing-here==1 (from versions: none)
  hint: check the name
"""


def _pip_progress() -> Any:
    import runpy

    return runpy.run_path(str(ROOT / "scripts" / "pip_progress.py"))["compact"]


def test_pip_output_becomes_a_status_and_a_summary_and_keeps_warnings() -> None:
    compact = _pip_progress()
    out = io.StringIO()
    counts = compact(io.StringIO(PIP_OUTPUT), out, tty=False)
    assert counts == {"collected": 2, "satisfied": 1, "installed": 2, "passed": 1}
    assert out.getvalue().splitlines() == [
        "WARNING: torch 2.14.1 does not provide the extra 'cuda'",
        "      2 package(s) installed, 1 already there",
    ]
    tty = io.StringIO()
    compact(io.StringIO(PIP_OUTPUT), tty, tty=True)
    assert "\r      collecting 2: filelock" in tty.getvalue()  # redrawn in place on a terminal


def test_pip_errors_pass_through_whole() -> None:
    compact = _pip_progress()
    out = io.StringIO()
    compact(io.StringIO(PIP_FAILURE), out, tty=False)
    assert out.getvalue().splitlines() == [
        "ERROR: Could not find a version that satisfies the requirement nothing-here==1 (from versions: none)",
        "  hint: check the name",
    ]


def test_the_wheel_config_ships_every_data_folder() -> None:
    """setup.py lists each folder without __init__.py (data) as a package shipping all its files, so
    setuptools neither warns about nor drops it (the report's assets, the bundled demo data)."""
    code = (
        "import sys, setuptools; captured = {}; setuptools.setup = lambda **kw: captured.update(kw); "
        "exec(open('setup.py').read()); import json; print(json.dumps(captured['package_data']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    for package in (
        "mmpo.report.assets",
        "mmpo_tasks.forecasting.data_sources",
        "mmpo_tasks.vlm_reasoning.demo_sources",
    ):
        assert data[package] == ["*"], package
    assert data["mmpo_tasks.vlm_reasoning"] == ["*.txt", "*.json"]
    assert not any("__pycache__" in p for p in data)
