"""Media checked at the door (mmpo.media_check): a non-image named .png, a truncated JPEG and a corrupt
video are found when the rows load (naming the file and the line; skipped and counted with
skip_bad_rows), and a sample that still fails when drawn is dropped from its step (skip_bad_rows) or
stops the run with exit 2."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmpo.cli import main
from mmpo.errors import DataError
from mmpo.media_check import MediaCache, MediaError, check_image, check_video, draw_samples

ROOT = Path(__file__).resolve().parents[1]


def jpeg(path: Path, size=(64, 48)) -> bytes:
    Image.new("RGB", size, (200, 30, 30)).save(path, quality=90)
    return path.read_bytes()


def good_png(path: Path, colour=(0, 120, 200)) -> Path:
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def text_as_png(path: Path) -> Path:
    path.write_text("this is a text file, not an image\n")
    return path


def truncated_jpeg(path: Path) -> Path:
    data = jpeg(path)
    path.write_bytes(data[: len(data) // 2])
    return path


def corrupt_mp4(path: Path) -> Path:
    from mmpo_tasks.video_frames.video import write_video

    write_video(list(np.zeros((8, 32, 32, 3), np.uint8)), path, fps=4)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the moov atom (at the end) is gone
    return path


def png_with_bad_pixels(path: Path) -> Path:
    """A PNG whose chunks and CRCs are intact (its header and verify() pass) but whose IDAT holds no
    zlib stream: it fails only when decoded, as a file damaged after loading would."""
    good_png(path)
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[at : at + 4])
    junk = bytes(range(7, 7 + length))
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + junk) & 0xFFFFFFFF)
    path.write_bytes(bytes(data[: at + 8]) + junk + crc + bytes(data[at + 12 + length :]))
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------ the checkers


def test_check_image_and_video(tmp_path):
    assert check_image(jpeg(tmp_path / "a.jpg")) == (64, 48)
    assert check_image(good_png(tmp_path / "a.png")) == (32, 32)
    # bytes after the EOI marker (some cameras append data) are not truncation
    (tmp_path / "tail.jpg").write_bytes(jpeg(tmp_path / "t.jpg") + b"APPENDED")
    assert check_image(tmp_path / "tail.jpg") == (64, 48)
    with pytest.raises(MediaError, match="not a readable image: cannot identify image file"):
        check_image(text_as_png(tmp_path / "x.png"))
    with pytest.raises(MediaError, match="not a readable image: .*[Tt]runcated"):
        check_image(truncated_jpeg(tmp_path / "t2.jpg"))
    with pytest.raises(MediaError, match=r"image bytes \(6\) are not a readable image"):
        check_image(b"abcdef")
    # cheap on purpose: chunk CRCs are checked, the pixels are not decoded
    assert check_image(png_with_bad_pixels(tmp_path / "p.png")) == (32, 32)
    with pytest.raises(MediaError, match="not a readable video"):
        check_video(corrupt_mp4(tmp_path / "c.mp4"))
    cache = MediaCache()
    for _ in range(2):  # the second time from the cache, the same error
        with pytest.raises(MediaError, match="not a readable image") as err:
            cache.check(tmp_path / "x.png")
    assert err.value.naming("x.png").startswith("not a readable image (x.png): ")


def test_draw_samples_drops_and_replaces_only_with_skip():
    def make(i: int) -> str:
        if i == 1:
            raise DataError(f"image bad{i}.png cannot be read")
        return f"s{i}"

    warned: list[str] = []
    extra = iter([1, 4])
    samples, dropped = draw_samples(make, [0, 1, 2], lambda: next(extra), skip_bad_rows=True, warn=warned.append)
    assert samples == ["s0", "s2", "s4"] and dropped == 2
    assert len(warned) == 2 and "training sample 1 dropped from this step: image bad1.png" in warned[0]
    with pytest.raises(DataError, match=r"training sample 1: image bad1\.png cannot be read \(set the task's skip"):
        draw_samples(make, [0, 1], lambda: 0, skip_bad_rows=False, warn=warned.append)
    with pytest.raises(DataError, match="3 training samples could not be read"):
        draw_samples(make, [1], lambda: 1, skip_bad_rows=True, warn=warned.append, max_extra=2)


# ------------------------------------------------------------------------------------ the loaders


@pytest.mark.parametrize(
    ("name", "make", "key", "field", "why"),
    [
        ("x.png", text_as_png, "images", r"images\[0\]", "not a readable image"),
        ("t.jpg", truncated_jpeg, "images", r"images\[0\]", "not a readable image"),
        ("c.mp4", corrupt_mp4, "video", "video", "not a readable video"),
    ],
)
def test_vlm_reasoning_bad_media_names_file_and_line(tmp_path, name, make, key, field, why):
    from mmpo_tasks.vlm_reasoning.data import load_rows

    good_png(tmp_path / "ok.png")
    make(tmp_path / name)
    bad = {"question": "q2", "answer": "b", key: [name] if key == "images" else name}
    f = write_rows(tmp_path / "d.jsonl", [{"question": "q1", "answer": "a", "images": ["ok.png"]}, bad])
    with pytest.raises(DataError, match=rf"d\.jsonl: line 2: field '{field}': {why} \(.*{name}\)"):
        load_rows(f)
    res = load_rows(f, skip_bad_rows=True)
    assert [r.question for r in res.rows] == ["q1"] and res.skipped == 1


def test_vlm_reasoning_task_counts_skipped_media_in_its_summary(tmp_path):
    from mmpo.config import from_dict
    from mmpo_tasks.vlm_reasoning.task import VLMReasoningTask

    good_png(tmp_path / "ok.png")
    text_as_png(tmp_path / "x.png")
    truncated_jpeg(tmp_path / "t.jpg")
    corrupt_mp4(tmp_path / "c.mp4")
    rows = [
        {"question": "q1", "answer": "a", "images": ["ok.png"]},
        {"question": "q2", "answer": "b", "images": ["x.png"]},
        {"question": "q3", "answer": "c", "image": "t.jpg"},
        {"question": "q4", "answer": "d", "video": "c.mp4"},
        {"question": "q5", "answer": "e", "images": ["ok.png", "x.png"]},
    ]
    f = write_rows(tmp_path / "d.jsonl", rows)
    options = {"train_file": str(f), "eval_file": str(f), "skip_bad_rows": True}
    task = VLMReasoningTask(from_dict(VLMReasoningTask.Config, options, where="task"))
    assert task.num_train() == 1 and len(task.eval_rows) == 1
    # both files counted: 3 image rows + 1 video row, twice
    assert task.data_summary.skipped == {
        "images: not a readable image": 4,
        "image: not a readable image": 2,
        "video: not a readable video": 2,
    }
    assert "8 skipped (" in task.data_summary.line()


def test_video_frames_skips_a_corrupt_video_with_its_line(tmp_path):
    from mmpo_tasks.video_frames.data import load_video_qa
    from mmpo_tasks.video_frames.video import write_video

    write_video(list(np.zeros((8, 32, 32, 3), np.uint8)), tmp_path / "ok.mp4", fps=4)
    corrupt_mp4(tmp_path / "c.mp4")
    text_as_png(tmp_path / "n.mp4")
    row = {"question": "q", "options": ["a", "b"], "answer": "A"}
    f = write_rows(
        tmp_path / "qa.jsonl",
        [{**row, "id": 1, "video": "ok.mp4"}, {**row, "id": 2, "video": "c.mp4"}, {**row, "id": 3, "video": "n.mp4"}],
    )
    rows, skipped = load_video_qa(f)
    assert [r["id"] for r in rows] == ["1"]
    assert [s["line"] for s in skipped] == [2, 3]
    assert all(s["error"].startswith(f"{f}: line {s['line']}: key 'video': ") for s in skipped)
    assert "c.mp4" in skipped[0]["error"] and "n.mp4" in skipped[1]["error"]
    assert {s["reason"] for s in skipped} == {"video: not a readable video"}  # counted by kind, not by file


def test_gui_episode_with_a_non_image_screenshot_is_skipped_with_its_line(tmp_path):
    from mmpo_tasks.gui_agent.episodes import load_episodes

    good_png(tmp_path / "ok.png")
    text_as_png(tmp_path / "x.png")
    truncated_jpeg(tmp_path / "t.jpg")
    step = {"action": "click(0.5, 0.5)"}
    f = write_rows(
        tmp_path / "e.jsonl",
        [
            {"id": 1, "instruction": "go", "steps": [{**step, "screenshot": "ok.png"}]},
            {
                "id": 2,
                "instruction": "go",
                "steps": [{**step, "screenshot": "ok.png"}, {**step, "screenshot": "x.png"}],
            },
            {"id": 3, "instruction": "go", "steps": [{**step, "screenshot": "t.jpg"}]},
        ],
    )
    episodes, skipped = load_episodes(f)
    assert [e.id for e in episodes] == ["1"]
    assert [s["line"] for s in skipped] == [2, 3]
    assert skipped[0]["error"].startswith(f"{f}: line 2: key 'steps[1].screenshot': not a readable image (")
    assert "x.png" in skipped[0]["error"] and "t.jpg" in skipped[1]["error"]
    assert {s["reason"] for s in skipped} == {"steps.screenshot: not a readable image"}


# ------------------------------------------------------------------------------------ at draw time


def _train(tmp_path: Path, run: str, *extra: str) -> int:
    for k in range(3):
        good_png(tmp_path / f"ok{k}.png", (k * 90, 40, 40))
    png_with_bad_pixels(tmp_path / "bad.png")  # passes the load check, fails when decoded
    rows = [{"question": f"q{k}", "options": ["x", "y"], "answer": "A", "images": [f"ok{k}.png"]} for k in range(3)]
    rows.append({"question": "q3", "options": ["x", "y"], "answer": "B", "images": ["bad.png"]})
    f = write_rows(tmp_path / "d.jsonl", rows)
    good = write_rows(tmp_path / "e.jsonl", rows[:3])
    return main(
        [
            "train",
            str(ROOT / "configs" / "pathology_demo.yaml"),
            f"output_dir={tmp_path / run}",
            f"task.train_file={f}",
            f"task.eval_file={good}",
            "rollout.prompts_per_step=4",
            "rollout.group_size=2",
            "rollout.max_new_tokens=2",
            "algorithm.dynamic_sampling=false",
            "trainer.max_steps=2",
            "trainer.eval_every=0",
            "trainer.eval_at_start=false",
            "trainer.update_epochs=1",
            "trainer.minibatch_size=8",
            "eval.num_samples=2",
            "eval.batch_size=2",
            *extra,
        ]
    )


@pytest.mark.slow
def test_a_sample_failing_when_drawn_is_dropped_with_skip_bad_rows(tmp_path, capsys):
    assert _train(tmp_path, "skip", "task.skip_bad_rows=true") == 0
    lines = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    dropped = [x["dropped_samples"] for x in lines if "dropped_samples" in x]
    assert len(dropped) == 2 and sum(dropped) >= 1  # every prompt is drawn each step: bad.png at least once
    err = capsys.readouterr().err
    assert err.count("dropped from this step") == sum(dropped) and "bad.png cannot be read" in err
    # the same run again (a resume of the finished run) does not replay into a stop
    assert _train(tmp_path, "skip", "task.skip_bad_rows=true") == 0
    again = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in again if "dropped_samples" in x] == [1, 2]


@pytest.mark.slow
def test_a_sample_failing_when_drawn_stops_the_run_with_exit_2_without_skip(tmp_path, capsys):
    assert _train(tmp_path, "stop") == 2
    err = " ".join(capsys.readouterr().err.split())  # the message is wrapped to the terminal
    assert "bad.png cannot be read" in err and "skip_bad_rows: true" in err and "Traceback" not in err
