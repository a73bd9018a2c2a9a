"""The video QA loader (JSONL and Parquet; bad rows skipped with file, line and key) and the
MVBench / Video-MME converters, on tiny real videos."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path
from typing import Any

import pytest

from mmpo.errors import DataError
from mmpo_tasks.video_frames.data import answer_letter, load_video_qa
from mmpo_tasks.video_frames.video import synthetic_dataset, synthetic_event_video

pytest.importorskip("av")

SCRIPT = Path(__file__).resolve().parents[2] / "data_prep" / "video_qa_to_jsonl.py"


@pytest.fixture(scope="module")
def script() -> dict[str, Any]:
    return runpy.run_path(str(SCRIPT))


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two short clips, ``a.mp4`` and ``b.mp4``."""
    folder = tmp_path_factory.mktemp("clips")
    for k, name in enumerate(("a", "b")):
        synthetic_event_video(folder / f"{name}.mp4", seed=k, duration_s=3, num_events=1)
    return folder


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _row(i: Any, video: str = "a.mp4", **kw: Any) -> dict[str, Any]:
    return {
        "id": i,
        "video": video,
        "question": "What colour?",
        "options": ["red", "green", "blue", "yellow"],
        "answer": "B",
        **kw,
    }


def test_synthetic_dataset_loads(tmp_path: Path) -> None:
    written = synthetic_dataset(tmp_path, n=3, seed=0, duration_s=4, num_events=2)
    rows, skipped = load_video_qa(tmp_path / "qa.jsonl")
    assert skipped == [] and [r["id"] for r in rows] == [w["id"] for w in written]
    for r, w in zip(rows, written):
        assert r["answer"] == w["answer"] and r["answer_text"] == w["options"]["ABCD".index(w["answer"])]
        assert Path(r["video"]).is_absolute() and Path(r["video"]) == (tmp_path / w["video"]).resolve()
        assert (r["duration_s"], r["fps"], r["num_frames"]) == (4.0, 4.0, 16)
        assert r["meta"]["events"] == w["events"] and r["meta"]["kind"] == w["kind"]


def test_bad_rows_are_skipped_with_file_line_and_key(tmp_path: Path, clips: Path) -> None:
    shutil.copy(clips / "a.mp4", tmp_path / "a.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x01garbage" * 200)
    data = _jsonl(
        tmp_path / "qa.jsonl",
        [
            _row("ok1"),  # line 1
            _row("corrupt", video="corrupt.mp4"),  # line 2
            _row("missing", video="nowhere/missing.mp4"),  # line 3
            "",  # line 4: blank, ignored
            _row("bad_answer", answer="E"),  # line 5
            {k: v for k, v in _row("no_question").items() if k != "question"},  # line 6
            "{not json",  # line 7
            _row("one_option", options=["red"]),  # line 8
            _row("ok1"),  # line 9: repeated id
            _row("url", video="http://example.com/a.mp4"),  # line 10
            _row(7, answer="blue"),  # line 11: int id, answer as text
            _row("ok_paren", answer="(D)"),  # line 12
        ],
    )
    rows, skipped = load_video_qa(data)
    assert [(r["id"], r["answer"]) for r in rows] == [("ok1", "B"), ("7", "C"), ("ok_paren", "D")]
    got = {s["line"]: s for s in skipped}
    assert sorted(got) == [2, 3, 5, 6, 7, 8, 9, 10]
    for line, key in [
        (2, "video"),
        (3, "video"),
        (5, "answer"),
        (6, "question"),
        (7, "<json>"),
        (8, "options"),
        (9, "id"),
        (10, "video"),
    ]:
        assert got[line]["error"].startswith(f"{data}: line {line}: key '{key}'"), got[line]
    assert got[2]["id"] == "corrupt" and "corrupt.mp4: cannot read video" in got[2]["error"]
    assert got[3]["id"] == "missing" and "file not found" in got[3]["error"]
    assert got[7]["id"] is None and "not valid JSON" in got[7]["error"]
    assert "repeats the id of line 1" in got[9]["error"] and "URL" in got[10]["error"]


def test_parquet_and_video_root(tmp_path: Path, clips: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([_row("p1"), _row("p2", video="b.mp4", answer="yellow"), _row("p3", video="zz.mp4")])
    pq.write_table(table, tmp_path / "qa.parquet")
    rows, skipped = load_video_qa(tmp_path / "qa.parquet", video_root=clips)
    assert [(r["id"], r["answer"]) for r in rows] == [("p1", "B"), ("p2", "D")]
    assert [(s["line"], s["id"]) for s in skipped] == [(3, "p3")]
    rows, skipped = load_video_qa(tmp_path / "qa.parquet", video_root=clips, check_videos=False)
    assert rows[0]["duration_s"] is None and len(skipped) == 1  # existence is still checked


def test_file_level_errors_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_video_qa(tmp_path / "nope.jsonl")
    (tmp_path / "qa.csv").write_text("id\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_video_qa(tmp_path / "qa.csv")
    (tmp_path / "qa.parquet").write_bytes(b"PAR1garbage")
    with pytest.raises(DataError, match="not a readable Parquet"):
        load_video_qa(tmp_path / "qa.parquet")
    bad = _jsonl(tmp_path / "qa.jsonl", [_row("x", video="gone.mp4")])
    with pytest.raises(DataError, match=r"no valid rows .*line 1: key 'video'"):
        load_video_qa(bad)


def test_answer_letter() -> None:
    opts = ["red", "Green", "B", "green"]
    assert answer_letter("B", opts) == "B"  # a letter first
    assert answer_letter("B.", opts) == "B" and answer_letter("(C)", opts) == "C"
    assert answer_letter(" red ", opts) == "A" and answer_letter("Green", opts) == "B"
    with pytest.raises(ValueError, match="matches options B, D"):
        answer_letter("GREEN", opts)
    with pytest.raises(ValueError, match="neither a letter A..B"):
        answer_letter("C", ["x", "y"])
    with pytest.raises(ValueError):
        answer_letter(1, opts)


# ---------------------------------------------------------------------------------------------
# Converters
# ---------------------------------------------------------------------------------------------


def test_convert_mvbench(tmp_path: Path, clips: Path, script: dict[str, Any]) -> None:
    (clips / "frames_dir").mkdir(exist_ok=True)
    src = tmp_path / "action_sequence.json"
    src.write_text(
        json.dumps(
            [
                {
                    "video": "a.mp4",
                    "question": "What did the person do?",
                    "candidates": ["sat", "ran", "ate"],
                    "answer": "ran",
                },
                {
                    "video": "b.mp4",
                    "question": "Which?",
                    "candidates": ["x", "y"],
                    "answer": "y",
                    "start": 0.5,
                    "end": 2,
                },
                {"video": "a.mp4", "question": "Q", "candidates": ["x", "y"], "answer": "z"},
                {"video": "missing.mp4", "question": "Q", "candidates": ["x", "y"], "answer": "x"},
                {"video": "frames_dir", "question": "Q", "candidates": ["x", "y"], "answer": "x"},
                {"video": "a.mp4", "question": "Q", "candidates": ["x"], "answer": "x"},
            ]
        )
    )
    out = tmp_path / "out" / "mvbench.jsonl"
    stats = script["convert_mvbench"](src, clips, out)
    assert stats["written"] == 2 and [s["row"] for s in stats["skipped"]] == [3, 4, 5, 6]
    errors = [s["error"] for s in stats["skipped"]]
    assert "key 'answer'" in errors[0] and "file not found" in errors[1] and "folder of frames" in errors[2]
    assert "key 'candidates'" in errors[3] and all(e.startswith(f"{src}: row ") for e in errors)
    rows, skipped = load_video_qa(out)
    assert skipped == []
    assert [(r["id"], r["answer"], r["options"]) for r in rows] == [
        ("mvbench_action_sequence_00000", "B", ["sat", "ran", "ate"]),
        ("mvbench_action_sequence_00001", "B", ["x", "y"]),
    ]
    assert rows[1]["meta"] == {"source": "mvbench", "task": "action_sequence", "start_s": 0.5, "end_s": 2.0}
    written = [json.loads(line) for line in out.read_text().splitlines()]
    # the clips lie outside the output file's folder: absolute (a relative "../" path would be refused)
    assert Path(written[0]["video"]) == (clips / "a.mp4").resolve()


def test_convert_videomme(tmp_path: Path, clips: Path, script: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = {
        "duration": "short",
        "domain": "Knowledge",
        "sub_category": "Humanity",
        "task_type": "Counting Problem",
        "question": "How many?",
        "options": ["A. one", "B. two", "C. three", "D. four"],
    }
    recs = [
        {**base, "video_id": "001", "videoID": "a", "question_id": "001-1", "answer": "C"},
        {**base, "video_id": "b", "question_id": "002-1", "answer": "A"},  # no videoID: video_id names the file
        {**base, "video_id": "003", "videoID": "zz", "question_id": "003-1", "answer": "A"},  # no such video
        {**base, "video_id": "004", "videoID": "a", "question_id": "004-1", "answer": "F"},  # bad letter
        {**base, "video_id": "005", "videoID": "../a", "question_id": "005-1", "answer": "A"},  # not a name
    ]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "test.parquet")
    out = tmp_path / "videomme.jsonl"
    stats = script["convert_videomme"](tmp_path / "test.parquet", clips, out)
    assert stats["written"] == 2 and [(s["row"], s["id"]) for s in stats["skipped"]] == [
        (3, None),
        (4, None),
        (5, None),
    ]
    rows, skipped = load_video_qa(out)
    assert skipped == []
    assert [(r["id"], r["answer"], r["answer_text"]) for r in rows] == [("001-1", "C", "three"), ("002-1", "A", "one")]
    assert rows[0]["options"] == ["one", "two", "three", "four"] and rows[0]["meta"]["task_type"] == "Counting Problem"
    assert rows[0]["video"] == str((clips / "a.mp4").resolve())

    _jsonl(tmp_path / "test.jsonl", [{**base, "videoID": "b", "answer": "D"}, "{bad"])  # the same rows as JSON lines
    stats = script["convert_videomme"](tmp_path / "test.jsonl", clips, out)
    assert stats["written"] == 1 and "not valid JSON" in stats["skipped"][0]["error"]
    assert json.loads(out.read_text())["id"] == "videomme_b_00000"


def test_cli(tmp_path: Path, clips: Path, script: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "task.json"
    src.write_text(json.dumps([{"video": "a.mp4", "question": "Q", "candidates": ["x", "y"], "answer": "y"}]))
    out = tmp_path / "o.jsonl"
    assert script["main"](["mvbench", str(src), "--video-root", str(clips), "--out", str(out)]) == 0
    assert "1 row(s) written, 0 skipped" in capsys.readouterr().out
    assert script["main"](["mvbench", str(src), "--video-root", str(tmp_path), "--out", str(out)]) == 2
    assert "no row could be converted" in capsys.readouterr().err
    assert (
        script["main"](["mvbench", str(src), "--video-root", str(tmp_path), "--out", str(out), "--no-check-videos"])
        == 0
    )
