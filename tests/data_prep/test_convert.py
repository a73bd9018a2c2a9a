"""Converters from public pathology VQA layouts, on small files written in the public layouts."""

from __future__ import annotations

import base64
import csv
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
from mmpo_tasks.vlm_reasoning.convert import ConvertStats, mcq_to_jsonl, pathvqa_to_jsonl


def _img(colour: tuple[int, int, int], size: tuple[int, int] = (12, 9)) -> Image.Image:
    arr = np.zeros((size[1], size[0], 3), np.uint8) + np.array(colour, np.uint8)
    arr[0, 0] = (255 - colour[0], 7, 9)  # one odd pixel, so orientation errors show
    return Image.fromarray(arr)


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


# ---------------------------------------------------------------------------- PathVQA


def _pathvqa_table(rows: list[tuple[object, str | None, str | None]]) -> pa.Table:
    """The Hugging Face datasets Parquet layout: image = struct<bytes: binary, path: string>."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table(
        {
            "image": pa.array([r[0] for r in rows], type=image_type),
            "question": pa.array([r[1] for r in rows], type=pa.string()),
            "answer": pa.array([r[2] for r in rows], type=pa.string()),
        }
    )


def test_pathvqa_parquet_with_image_bytes(tmp_path: Path) -> None:
    colours = [(200, 30, 40), (30, 200, 40), (30, 40, 200)]
    images = [_img(c) for c in colours]
    rows = [
        ({"bytes": _encode(images[0]), "path": "a.png"}, "Is this a granuloma?", "Yes"),
        ({"bytes": _encode(images[1].convert("P"), "PNG"), "path": None}, "Are the nuclei atypical?", "no"),
        ({"bytes": _encode(images[2]), "path": "c.png"}, "What is present?", " chronic inflammation "),
    ]
    # two shards, as Hugging Face writes them
    pq.write_table(_pathvqa_table(rows[:2]), tmp_path / "train-00000-of-00002.parquet")
    pq.write_table(_pathvqa_table(rows[2:]), tmp_path / "train-00001-of-00002.parquet")
    out = pathvqa_to_jsonl(sorted(tmp_path.glob("train-*.parquet")), tmp_path / "out", split_name="train")
    assert out == tmp_path / "out" / "train.jsonl"
    got = _read_jsonl(out)
    assert [r["id"] for r in got] == ["pathvqa-train-000000", "pathvqa-train-000001", "pathvqa-train-000002"]
    assert [r["answer"] for r in got] == ["yes", "no", "chronic inflammation"]
    assert [r["meta"]["qtype"] for r in got] == ["yes/no", "yes/no", "open"]
    assert [r["question"] for r in got] == [r[1] for r in rows]
    assert all(r["options"] is None for r in got)
    expected = [images[0], images[1].convert("P").convert("RGB"), images[2]]  # a palette image comes out as RGB
    for r, img in zip(got, expected):
        assert r["images"] == [f"images/{r['id']}.png"]
        np.testing.assert_array_equal(_pixels(out.parent / r["images"][0]), np.asarray(img))
    assert got[2]["meta"]["file"] == "train-00001-of-00002.parquet" and got[2]["meta"]["row"] == 0


def test_pathvqa_jsonl_with_paths_and_base64(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    a, b, c = _img((180, 60, 120)), _img((90, 60, 140)), _img((10, 10, 10))
    a.save(tmp_path / "imgs" / "a.jpg", quality=100)
    b.save(tmp_path / "imgs" / "b.png")
    lines = [
        {"image": {"bytes": None, "path": "imgs/a.jpg"}, "question": "q1", "answer": "YES"},
        {"image": "imgs/b.png", "question": "q2", "answer": "fibrosis"},
        {"image": {"bytes": base64.b64encode(_encode(c)).decode(), "path": None}, "question": "q3", "answer": "No."},
    ]
    src = tmp_path / "test.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    got = _read_jsonl(pathvqa_to_jsonl(src, tmp_path / "out", split_name="test"))
    assert [r["answer"] for r in got] == ["yes", "fibrosis", "no"]
    with Image.open(tmp_path / "imgs" / "a.jpg") as jpg:  # re-encoded from the decoded JPEG, losslessly
        np.testing.assert_array_equal(_pixels(tmp_path / "out" / got[0]["images"][0]), np.asarray(jpg.convert("RGB")))
    np.testing.assert_array_equal(_pixels(tmp_path / "out" / got[1]["images"][0]), np.asarray(b))
    np.testing.assert_array_equal(_pixels(tmp_path / "out" / got[2]["images"][0]), np.asarray(c))


def test_pathvqa_bad_rows_named_or_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _encode(_img((200, 30, 40)))
    rows = [
        ({"bytes": good, "path": None}, "Is it benign?", "yes"),
        ({"bytes": good, "path": None}, "What organ?", None),
        ({"bytes": b"\x89PNG not really", "path": None}, "What stain?", "h&e"),
        ({"bytes": good, "path": None}, "  ", "yes"),
        ({"bytes": good, "path": None}, "Is it malignant?", "no"),
    ]
    src = tmp_path / "val.parquet"
    pq.write_table(_pathvqa_table(rows), src)
    with pytest.raises(DataError, match=r"val\.parquet: row 1: field 'answer': missing"):
        pathvqa_to_jsonl([src], tmp_path / "out", split_name="val")
    stats = ConvertStats()
    with caplog.at_level(logging.WARNING):
        out = pathvqa_to_jsonl([src], tmp_path / "out", split_name="val", skip_bad_rows=True, stats=stats)
    got = _read_jsonl(out)
    assert [r["question"] for r in got] == ["Is it benign?", "Is it malignant?"]
    assert [r["id"] for r in got] == ["pathvqa-val-000000", "pathvqa-val-000001"]
    assert (stats.written, stats.skipped) == (2, 3)
    assert stats.errors[1].startswith(f"{src}: row 2: field 'image': cannot decode")
    assert stats.errors[2] == f"{src}: row 3: field 'question': empty"
    assert "skipped 3 bad row(s)" in caplog.text
    # limit
    out = pathvqa_to_jsonl([src], tmp_path / "lim", split_name="val", skip_bad_rows=True, limit=1)
    assert len(_read_jsonl(out)) == 1


# ---------------------------------------------------------------------------- multiple choice

MCQ_HEADER = ["id", "question", "A", "B", "C", "D", "E", "answer", "image", "explanation"]


def _write_csv(path: Path, rows: list[list[str]], header: list[str] = MCQ_HEADER) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def image_folder(tmp_path: Path) -> dict[str, np.ndarray]:
    folder = tmp_path / "images"
    folder.mkdir()
    colours = {"s1.png": (200, 30, 40), "s2.jpg": (30, 200, 40), "sub/s3.png": (30, 40, 200)}
    out = {}
    for name, colour in colours.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        _img(colour).save(folder / name, quality=100)
        with Image.open(folder / name) as im:
            out[name] = np.asarray(im.convert("RGB"))
    return out


def test_mcq_csv_with_options_a_to_e(tmp_path: Path, image_folder: dict[str, np.ndarray]) -> None:
    rows = [
        [
            "q-1",
            "Which stain is this?",
            "H&E",
            "PAS",
            "Trichrome",
            "Giemsa",
            "Congo red",
            "C",
            "s1.png",
            "Blue collagen.",
        ],
        ["q-2", "Grade?", "low", "high", "", "", "", "(b)", "s2.jpg", ""],
        ["q-3", "Which cell?", "neutrophil", "eosinophil", "lymphocyte", "", "", "lymphocyte", "sub/s3.png", ""],
        ["q-4", "Same slide again?", "yes", "no", "maybe", "", "", "A.", "s1.png", ""],
    ]
    src = tmp_path / "pathmcq.csv"
    _write_csv(src, rows)
    out = mcq_to_jsonl(src, tmp_path / "out", image_root=tmp_path / "images")
    assert out == tmp_path / "out" / "pathmcq.jsonl"
    got = _read_jsonl(out)
    assert [r["options"] for r in got] == [
        ["H&E", "PAS", "Trichrome", "Giemsa", "Congo red"],
        ["low", "high"],
        ["neutrophil", "eosinophil", "lymphocyte"],
        ["yes", "no", "maybe"],
    ]
    assert [r["answer"] for r in got] == ["C", "B", "C", "A"]
    assert [r["id"] for r in got] == [f"pathmcq-{i:06d}" for i in range(4)]
    assert [r["meta"]["source_id"] for r in got] == ["q-1", "q-2", "q-3", "q-4"]
    assert got[0]["solution"] == "Blue collagen." and "solution" not in got[1]
    # each distinct source image is written once, as PNG with the same pixels
    assert got[0]["images"] == got[3]["images"] != got[1]["images"]
    for r, name in zip(got, ["s1.png", "s2.jpg", "sub/s3.png"]):
        np.testing.assert_array_equal(_pixels(out.parent / r["images"][0]), image_folder[name])
    assert len(list((tmp_path / "out" / "images").iterdir())) == 3


def test_mcq_jsonl_images_relative_to_the_source(tmp_path: Path, image_folder: dict[str, np.ndarray]) -> None:
    src = tmp_path / "set.jsonl"
    rows = [
        {
            "question": "Two images?",
            "A": "same",
            "B": "different",
            "answer": "b",
            "image": ["images/s1.png", "images/s2.jpg"],
        },
        {"question": "Missing E?", "A": "x", "B": "y", "C": "z", "D": "w", "answer": "D", "image": "images/sub/s3.png"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = _read_jsonl(mcq_to_jsonl(src, tmp_path / "out"))
    assert [len(r["images"]) for r in got] == [2, 1]
    assert [r["answer"] for r in got] == ["B", "D"]
    assert got[1]["options"] == ["x", "y", "z", "w"]
    np.testing.assert_array_equal(_pixels(tmp_path / "out" / got[0]["images"][1]), image_folder["s2.jpg"])


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (["1", "Q?", "a", "", "c", "", "", "A", "s1.png", ""], r"row 0: field 'B': empty, but option C is set"),
        (
            ["1", "Q?", "a", "b", "", "", "", "D", "s1.png", ""],
            r"row 0: field 'answer': 'D' names option D, but only AB",
        ),
        (["1", "Q?", "a", "b", "", "", "", "maybe", "s1.png", ""], r"row 0: field 'answer': 'maybe' is neither"),
        (["1", "Q?", "a", "b", "", "", "", "", "s1.png", ""], r"row 0: field 'answer': empty"),
        (["1", "Q?", "a", "", "", "", "", "A", "s1.png", ""], r"row 0: field 'B': a multiple-choice row needs"),
        (
            ["1", "Q?", "a", "b", "", "", "", "A", "nope.png", ""],
            r"row 0: field 'image': image file .*nope\.png not found",
        ),
        (["1", "", "a", "b", "", "", "", "A", "s1.png", ""], r"row 0: field 'question': empty"),
    ],
)
def test_mcq_bad_row_gives_the_named_error(tmp_path: Path, image_folder: dict, row: list[str], message: str) -> None:
    src = tmp_path / "bad.csv"
    _write_csv(src, [row])
    with pytest.raises(DataError, match=r"bad\.csv: " + message):
        mcq_to_jsonl(src, tmp_path / "out", image_root=tmp_path / "images")


def test_mcq_skip_bad_rows_and_missing_column(tmp_path: Path, image_folder: dict) -> None:
    src = tmp_path / "mixed.csv"
    _write_csv(
        src,
        [
            ["1", "ok?", "a", "b", "", "", "", "A", "s1.png", ""],
            ["2", "bad?", "a", "b", "", "", "", "Z", "s1.png", ""],
            ["3", "ok too?", "a", "b", "c", "", "", "c", "s2.jpg", ""],
        ],
    )
    stats = ConvertStats()
    got = _read_jsonl(
        mcq_to_jsonl(src, tmp_path / "out", image_root=tmp_path / "images", skip_bad_rows=True, stats=stats)
    )
    assert [r["question"] for r in got] == ["ok?", "ok too?"] and [r["answer"] for r in got] == ["A", "C"]
    assert (stats.written, stats.skipped) == (2, 1) and "row 1: field 'answer'" in stats.first_error
    _write_csv(tmp_path / "nocol.csv", [["q", "a", "b", "A"]], header=["question", "A", "B", "answer"])
    with pytest.raises(DataError, match=r"nocol\.csv: missing column\(s\) \['image'\]"):
        mcq_to_jsonl(tmp_path / "nocol.csv", tmp_path / "out")


def _cli(name: str):
    import runpy

    return runpy.run_path(str(Path(__file__).resolve().parents[2] / "data_prep" / f"{name}.py"))["main"]


def test_clis_convert_and_report(tmp_path: Path, image_folder: dict, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "mini.csv"
    _write_csv(
        src,
        [
            ["1", "ok?", "a", "b", "", "", "", "B", "images/s1.png", ""],
            ["2", "bad?", "a", "b", "", "", "", "Q", "images/s1.png", ""],
        ],
    )
    assert _cli("mcq_to_jsonl")([str(src), "--out", str(tmp_path / "o1")]) == 2
    assert "mini.csv: row 1: field 'answer'" in capsys.readouterr().err
    assert _cli("mcq_to_jsonl")([str(src), "--out", str(tmp_path / "o1"), "--skip-bad-rows"]) == 0
    assert "1 row(s) written, 1 skipped" in capsys.readouterr().out
    assert _read_jsonl(tmp_path / "o1" / "mini.jsonl")[0]["answer"] == "B"
    pq.write_table(
        _pathvqa_table([({"bytes": _encode(_img((1, 2, 3))), "path": None}, "q?", "Yes")]), tmp_path / "p.parquet"
    )
    assert _cli("pathvqa_to_jsonl")([str(tmp_path / "p.parquet"), "--out", str(tmp_path / "o2"), "--split", "dev"]) == 0
    assert _read_jsonl(tmp_path / "o2" / "dev.jsonl")[0]["answer"] == "yes"
