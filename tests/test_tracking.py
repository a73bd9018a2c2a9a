"""mmpo.tracking: metrics.jsonl lines, resume truncation, TensorBoard scalars, the PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmpo.errors import DataError
from mmpo.tracking import Tracker, read_metrics


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _run(run_dir: Path, steps: range, start_step: int = 0, scale: float = 1.0) -> None:
    tracker = Tracker(run_dir, total_steps=5, start_step=start_step, progress=False)
    for step in steps:
        tracker.log(step, {"reward_mean": scale * step, "loss": 0.5 * step})
    tracker.close()


def test_one_json_line_per_log(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, total_steps=3)
    tracker.log(1, {"reward_mean": 0.25, "loss": torch.tensor(1.5), "kl": np.float32(0.125), "n": 8})
    tracker.log(2, {"reward_mean": 0.5, "loss": float("nan"), "ok": True, "note": "x"})
    # lines are on disk before close (flushed per line)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "reward_mean": 0.25, "loss": 1.5, "kl": 0.125, "n": 8},
        {"step": 2, "reward_mean": 0.5, "loss": None, "ok": True, "note": "x"},  # NaN -> null
    ]
    tracker.close()
    assert read_metrics(tmp_path / "metrics.jsonl")[1]["loss"] is None


def test_resume_truncates_to_start_step_and_matches_straight_run(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight, range(1, 6))
    _run(resumed, range(1, 6), scale=7.0)  # a first attempt that got to step 5 ...
    _run(resumed, range(4, 6), start_step=3, scale=1.0)  # ... and was resumed from step 3
    # steps 1-3 of the first attempt are kept (scale 7), steps 4-5 come from the resumed run
    assert [r["reward_mean"] for r in read_metrics(resumed / "metrics.jsonl")] == [7.0, 14.0, 21.0, 4.0, 5.0]

    # with identical values, the resumed file equals the straight run's byte for byte
    again = tmp_path / "again"
    _run(again, range(1, 6))
    _run(again, range(4, 6), start_step=3)
    assert (again / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()


def test_fresh_start_replaces_old_file(tmp_path: Path) -> None:
    _run(tmp_path, range(1, 4))
    _run(tmp_path, range(1, 2))
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "reward_mean": 1.0, "loss": 0.5}]


def test_read_metrics_skips_torn_last_line_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a"')
    assert read_metrics(path) == [{"step": 1, "a": 1}]
    path.write_text('{"step": 1, "a": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DataError, match="line 2"):
        read_metrics(path)
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_tensorboard_scalars_written_and_purged_on_resume(tmp_path: Path) -> None:
    _run(tmp_path, range(1, 6), scale=2.0)
    assert _scalars(tmp_path, "reward_mean") == [(1, 2.0), (2, 4.0), (3, 6.0), (4, 8.0), (5, 10.0)]
    assert _scalars(tmp_path, "loss") == [(s, pytest.approx(0.5 * s)) for s in range(1, 6)]
    # resume from step 3: events the first attempt wrote after step 3 are purged
    tracker = Tracker(tmp_path, total_steps=5, start_step=3, progress=False)
    tracker.log(4, {"reward_mean": -1.0})
    tracker.close()
    assert _scalars(tmp_path, "reward_mean") == [(1, 2.0), (2, 4.0), (3, 6.0), (4, -1.0)]
    assert [s for s, _ in _scalars(tmp_path, "loss")] == [1, 2, 3]


def test_curves_png_is_a_valid_image_with_one_panel_per_metric(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, total_steps=4, progress=True)
    for step in range(1, 5):
        tracker.log(step, {"reward_mean": step / 4, "kl": 0.01 * step, "entropy": 1.0 / step, "loss": 0.1})
        if step % 2 == 0:
            tracker.log(step, {"eval/accuracy": step / 10})
    path = tracker.close()
    assert path == tmp_path / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        # 5 panels (reward_mean, loss, kl, entropy, eval/accuracy) in 3 columns x 2 rows of
        # 4.2 x 3.0 inches at 100 dpi
        assert image.size == (1260, 600)
    assert tracker.close() == path  # idempotent


def test_curves_png_without_metrics(tmp_path: Path) -> None:
    path = Tracker(tmp_path, total_steps=1, progress=False, tensorboard=False).close()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (420, 300)


def test_disabled_tracker_writes_nothing(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path / "run", total_steps=3, enabled=False)
    tracker.log(1, {"reward_mean": 1.0})
    assert tracker.close() is None
    assert not (tmp_path / "run").exists()


def test_log_after_close_is_an_error(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, total_steps=1, progress=False, tensorboard=False)
    tracker.close()
    with pytest.raises(RuntimeError, match="after close"):
        tracker.log(1, {"loss": math.pi})
