"""vlm_reasoning loaders: our JSONL/JSON, TRL rows, verl / EasyR1 parquet, LLaVA json; bad rows."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmpo.errors import DataError
from mmpo_tasks.vlm_reasoning.data import ImageSource, detect_format, load_rows


def png(path: Path | None = None, colour=(200, 30, 30), size=(40, 30)) -> bytes:
    img = Image.new("RGB", size, colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def pixel(img: Image.Image) -> tuple:
    return tuple(np.asarray(img)[0, 0])


# -- our layout ---------------------------------------------------------------------------------


def test_mmpo_jsonl_rows(tmp_path):
    png(tmp_path / "images" / "a.png", (255, 0, 0), (40, 30))
    png(tmp_path / "images" / "b.png", (0, 0, 255), (20, 20))
    f = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {
                "id": "q0",
                "images": ["images/a.png", "images/b.png"],
                "question": "Which stain?",
                "options": ["H&E", "IHC", "PAS"],
                "answer": "B",
                "meta": {"source": "demo", "qtype": "stain"},
            },
            {"id": "q1", "image": "images/a.png", "question": "Is it red?", "options": None, "answer": "Yes"},
            {"question": "Pick the colour", "images": ["images/b.png"], "options": ["red", "blue"], "answer": "Blue"},
            {"question": "Pick the colour", "images": [], "choices": ["red", "green", "blue"], "answer": 2},
            {"question": "How many?", "answer": 3, "solution": "count them: 3"},
        ],
    )
    res = load_rows(f)
    assert (res.total, res.skipped) == (5, 0)
    r0, r1, r2, r3, r4 = res.rows
    assert r0.id == "q0" and r0.letters == ["A", "B", "C"] and r0.answer == "B" and r0.answer_type == "choice"
    assert r0.meta == {"source": "demo", "qtype": "stain"}
    # images stay paths (absolute, under the file's folder) until loaded
    assert r0.images[0].path == (tmp_path / "images" / "a.png").resolve() and r0.images[0].data is None
    img = r0.images[1].load()
    assert img.size == (20, 20) and pixel(img) == (0, 0, 255)
    assert r1.answer == "Yes" and r1.options is None and r1.answer_type == "open" and len(r1.images) == 1
    assert r2.answer == "B"  # the option's text, mapped to its letter (case-insensitive)
    assert r3.options == ["red", "green", "blue"] and r3.answer == "C"  # a 0-based index
    assert r4.answer == "3" and r4.solution == "count them: 3" and r4.images == []
    assert r4.id == "train-4"  # no id: <file stem>-<row>


def test_json_list_image_root_and_options_in_question(tmp_path):
    root = tmp_path / "imgs"
    png(root / "x.png")
    f = tmp_path / "data" / "val.json"
    f.parent.mkdir()
    f.write_text(
        json.dumps(
            [
                {
                    "id": 7,
                    "images": ["x.png"],
                    "question": "What is shown?\nA. muscle\n(B) nerve\nC) fat",
                    "answer": "(b)",
                },
                {"id": 8, "images": ["x.png"], "question": "Grade?\nA: low\nB: high", "answer": "B."},
                {"id": 9, "images": ["x.png"], "question": "A. is not a list", "answer": "B"},  # one line only: open
            ]
        )
    )
    rows = load_rows(f, image_root=root).rows
    assert rows[0].id == "7" and rows[0].options == ["muscle", "nerve", "fat"] and rows[0].answer == "B"
    assert rows[0].options_in_question
    assert rows[1].options == ["low", "high"] and rows[1].answer == "B"
    assert rows[2].options is None and rows[2].answer == "B"
    assert rows[0].images[0].path == (root / "x.png").resolve()


def test_answer_type_choice_and_open(tmp_path):
    png(tmp_path / "x.png")
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"images": ["x.png"], "question": "Colour?", "options": ["red", "blue"], "answer": "B"},
            {"images": ["x.png"], "question": "Is it red?", "answer": "yes"},
        ],
    )
    opened = load_rows(f, answer_type="open").rows
    assert opened[0].options is None and opened[0].answer == "blue"  # the option's text is asked for
    with pytest.raises(DataError, match=r"d\.jsonl: line 2: field 'options': answer_type is 'choice'"):
        load_rows(f, answer_type="choice")
    kept = load_rows(f, answer_type="choice", skip_bad_rows=True)
    assert len(kept.rows) == 1 and kept.skipped == 1


# -- TRL ----------------------------------------------------------------------------------------


def test_trl_conversational_rows(tmp_path):
    png(tmp_path / "p.png", (0, 255, 0))
    png(tmp_path / "q.png", (0, 0, 255))
    f = write_jsonl(
        tmp_path / "trl.jsonl",
        [
            {
                "prompt": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many cells?"}]},
                ],
                "image": "p.png",
                "solution": "<think>I count.</think><answer> 3 </answer>",
            },
            {
                "prompt": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Compare"},
                            {"type": "image"},
                            {"type": "text", "text": "and"},
                            {"type": "image"},
                        ],
                    }
                ],
                "images": ["p.png", "q.png"],
                "answer": "the left one",
            },
        ],
    )
    r0, r1 = load_rows(f).rows
    assert detect_format(json.loads((tmp_path / "trl.jsonl").read_text().splitlines()[0])) == "trl"
    assert r0.answer == "3" and r0.solution == "<think>I count.</think><answer> 3 </answer>"
    assert r0.question == "<image>\nHow many cells?"
    assert pixel(r0.images[0].load()) == (0, 255, 0)
    assert r1.question == "Compare\n<image>\nand\n<image>" and r1.answer == "the left one"
    assert [pixel(s.load()) for s in r1.images] == [(0, 255, 0), (0, 0, 255)]


# -- verl / EasyR1 parquet ------------------------------------------------------------------------


def test_verl_parquet_with_image_bytes(tmp_path):
    png(tmp_path / "p.png", (40, 50, 60))
    f = write_parquet(
        tmp_path / "verl.parquet",
        [
            {
                "data_source": "pathvqa",
                "prompt": [{"role": "user", "content": "<image>Is there necrosis?"}],
                "images": [{"bytes": png(None, (10, 20, 30)), "path": None}],
                "reward_model": {"style": "rule", "ground_truth": "no"},
            },
            {
                "data_source": "pathvqa",
                "prompt": [{"role": "user", "content": "<image>Which organ?\nA. liver\nB. lung"}],
                "images": [{"bytes": None, "path": "p.png"}],  # HF image struct with only a path
                "reward_model": {"style": "rule", "ground_truth": "B"},
            },
        ],
    )
    rows = load_rows(f).rows
    assert rows[0].answer == "no" and rows[0].meta == {"source": "pathvqa"} and rows[0].answer_type == "open"
    assert rows[0].images[0].data is not None and rows[0].images[0].path is None  # kept encoded
    assert pixel(rows[0].images[0].load()) == (10, 20, 30)
    assert rows[1].options == ["liver", "lung"] and rows[1].answer == "B" and rows[1].options_in_question
    assert rows[1].images[0].path == (tmp_path / "p.png").resolve()
    assert pixel(rows[1].images[0].load()) == (40, 50, 60)


def test_easyr1_parquet_problem_answer_and_paths(tmp_path):
    png(tmp_path / "g.png", (1, 2, 3))
    f = write_parquet(
        tmp_path / "geo.parquet",
        [
            {"problem": "<image>Find x.", "answer": "\\frac{3}{4}", "images": ["g.png"]},
            {"problem": "<image>Find y.", "answer": "The length is \\boxed{12}.", "images": ["g.png"]},
        ],
    )
    rows = load_rows(f).rows
    assert rows[0].answer == "\\frac{3}{4}" and rows[0].images[0].path == (tmp_path / "g.png").resolve()
    assert rows[1].answer == "12" and rows[1].solution == "The length is \\boxed{12}."
    assert pixel(rows[1].images[0].load()) == (1, 2, 3)


# -- LLaVA ----------------------------------------------------------------------------------------


def test_llava_json(tmp_path):
    png(tmp_path / "coco" / "1.png")
    png(tmp_path / "coco" / "2.png")
    f = tmp_path / "llava.json"
    f.write_text(
        json.dumps(
            [
                {
                    "id": "000001",
                    "image": "coco/1.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat colour is the square?"},
                        {"from": "gpt", "value": "Red"},
                        {"from": "human", "value": "more?"},
                    ],
                },
                {
                    "id": "000002",
                    "image": ["coco/1.png", "coco/2.png"],
                    "conversations": [
                        {"from": "human", "value": "<image><image>\nSame?"},
                        {"from": "gpt", "value": "yes"},
                    ],
                },
            ]
        )
    )
    r0, r1 = load_rows(f).rows
    assert (r0.id, r0.question, r0.answer) == ("000001", "<image>\nWhat colour is the square?", "Red")
    assert len(r1.images) == 2 and r1.answer == "yes"


def test_forced_format_and_undetectable_layout(tmp_path):
    png(tmp_path / "x.png")
    f = write_jsonl(tmp_path / "ours.jsonl", [{"images": ["x.png"], "question": "Q?", "answer": "a"}])
    # forced to llava, the row's keys are not llava's
    with pytest.raises(DataError, match=r"ours\.jsonl: line 1: unknown key 'question'.* Known keys \(llava layout\)"):
        load_rows(f, format="llava")
    with pytest.raises(DataError, match=r"ours\.jsonl: line 1: field 'conversations': must be a non-empty list"):
        load_rows(f, format="llava", unknown_keys="ignore")
    g = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hello", "label": 1}])
    with pytest.raises(DataError, match=r"odd\.jsonl: cannot tell the data layout from line 1 \(keys: text, label\)"):
        load_rows(g)


# -- video ---------------------------------------------------------------------------------------


def test_video_frames(tmp_path):
    frames = [f"frames/{k}.png" for k in range(6)]
    for k, name in enumerate(frames):
        png(tmp_path / name, (k * 40, 0, 0))
    f = write_jsonl(tmp_path / "v.jsonl", [{"video": frames, "question": "<video>What changes?", "answer": "red"}])
    row = load_rows(f).rows[0]
    assert len(row.video.frames) == 6
    loaded, fps = row.video.load(fps=2.0, max_frames=4)
    # 4 of 6 frames, evenly spread: indices round(j * 5 / 3) = 0, 2, 3, 5
    assert [pixel(im)[0] for im in loaded] == [0, 80, 120, 200]
    assert fps == pytest.approx(2.0 * 4 / 6)


# -- bad rows --------------------------------------------------------------------------------------


def bad_file(tmp_path: Path) -> Path:
    png(tmp_path / "ok.png")
    return write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"images": ["ok.png"], "question": "fine?", "answer": "yes"},
            {"images": ["ok.png"], "question": "", "answer": "yes"},
            {"images": ["ok.png"], "question": "no answer"},
            {"images": ["missing.png"], "question": "where?", "answer": "here"},
            {"images": ["ok.png"], "question": "Colour?", "options": ["red", "blue"], "answer": "green"},
            {"images": [{"bytes": None}], "question": "q", "answer": "a"},
            {"images": ["ok.png"], "question": "fine too?", "answer": "no"},
        ],
    )


@pytest.mark.parametrize(
    "row,pattern",
    [
        (1, r"line 2: field 'question': missing or empty"),
        (2, r"line 3: field 'answer': missing or empty"),
        (3, r"line 4: field 'images\[0\]': file not found: .*missing\.png"),
        (4, r"line 5: field 'answer': 'green' is neither an option letter A-B nor one of the options"),
        (5, r"line 6: field 'images\[0\]': an image mapping needs non-empty 'bytes' or 'path'"),
    ],
)
def test_bad_row_error_names_file_line_and_field(tmp_path, row, pattern):
    f = bad_file(tmp_path)
    lines = f.read_text().splitlines()
    # keep the good first row and the bad row under test; the bad one keeps its index by padding
    good = lines[0]
    f.write_text("\n".join([good] * row + [lines[row]]) + "\n")
    with pytest.raises(DataError, match=rf"{f}: {pattern}"):
        load_rows(f)


def test_skip_bad_rows_counts_and_logs_once(tmp_path, caplog):
    f = bad_file(tmp_path)
    with caplog.at_level(logging.WARNING):
        res = load_rows(f, skip_bad_rows=True)
    assert [r.question for r in res.rows] == ["fine?", "fine too?"]
    assert (res.total, res.skipped) == (7, 5)
    msgs = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(msgs) == 1
    assert msgs[0].startswith(f"skipped 5 of 7 rows in {f}: first: {f}: line 2: field 'question'")


def test_invalid_json_line_and_all_bad(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"question": "q", "answer": "a"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2: field '<json>': not valid JSON"):
        load_rows(f)
    g = write_jsonl(tmp_path / "allbad.jsonl", [{"question": "q"}, {"question": "r"}])
    with pytest.raises(DataError, match=r"no usable rows \(all 2 were bad; first: .*line 1: field 'answer'"):
        load_rows(g, skip_bad_rows=True)


def test_max_rows_and_folder(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"question": f"a{k}", "answer": "x"} for k in range(3)])
    write_parquet(d / "b.parquet", [{"question": f"b{k}", "answer": "y", "images": []} for k in range(2)])
    (d / "notes.txt").write_text("ignored")
    assert [r.question for r in load_rows(d).rows] == ["a0", "a1", "a2", "b0", "b1"]
    assert [r.question for r in load_rows(d, max_rows=4).rows] == ["a0", "a1", "a2", "b0"]
    with pytest.raises(DataError, match="data file not found"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_rows(d / "notes.txt")


def test_video_file_sampled_at_fps(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:  # 20 frames at 10 fps = 2 s, grey level 12 * k
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 12 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    f = write_jsonl(tmp_path / "v.jsonl", [{"video": "clip.mp4", "question": "Brighter?", "answer": "yes"}])
    video = load_rows(f).rows[0].video
    frames, fps = video.load(fps=2.0, max_frames=8)
    # at 2 fps: t = 0, 0.5, 1.0, 1.5 s -> frames 0, 5, 10, 15 (grey 0, 60, 120, 180; lossy codec)
    assert [im.size for im in frames] == [(64, 48)] * 4 and fps == pytest.approx(2.0)
    assert [float(np.asarray(im).mean()) for im in frames] == pytest.approx([0, 60, 120, 180], abs=3)
    frames, fps = video.load(fps=2.0, max_frames=3)  # thinned to sampled frames 0, 2, 3 (t = 0, 1.0, 1.5 s)
    assert [float(np.asarray(im).mean()) for im in frames] == pytest.approx([0, 120, 180], abs=3)
    assert fps == pytest.approx(2 / 1.5)
    g = write_jsonl(tmp_path / "bad.jsonl", [{"video": "nope.mp4", "question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"line 1: field 'video': file not found: .*nope\.mp4"):
        load_rows(g)


def test_unreadable_images(tmp_path):
    f = write_parquet(
        tmp_path / "b.parquet", [{"question": "q", "answer": "a", "images": [{"bytes": b"not an image", "path": None}]}]
    )
    with pytest.raises(
        DataError, match=r"b\.parquet: row 1: field 'images\[0\]\.bytes': image bytes \(12\) are not a readable image"
    ):
        load_rows(f)
    (tmp_path / "fake.png").write_bytes(b"\x89PNG but truncated")
    g = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "a", "images": ["fake.png"]}])
    # image files are opened and their header decoded when loading (mmpo.media_check) ...
    with pytest.raises(DataError, match=r"g\.jsonl: line 1: field 'images\[0\]': not a readable image \(.*fake\.png\)"):
        load_rows(g)
    with pytest.raises(DataError, match=r"image .*fake\.png cannot be read"):
        ImageSource(path=tmp_path / "fake.png").load()  # ... and again when a prompt is built
