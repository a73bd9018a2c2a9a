"""The real-image pathology demo set: labels follow the pixel rules, splits are disjoint, builds are reproducible."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.color import rgb2hed
from skimage.data import immunohistochemistry

from mmpo.errors import DataError
from mmpo_tasks.vlm_reasoning import pathology_demo as demo
from mmpo_tasks.vlm_reasoning.wsi import tissue_fraction


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The real source images (bundled in tasks/vlm_reasoning/demo_sources, so always present)."""
    return demo.find_data_dir()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, Path]:
    """Two builds: one fresh, one over a stale folder (other image size, a stray file)."""
    base = tmp_path_factory.mktemp("demo")
    first = demo.ensure_demo(base / "a", data_dir=data_dir)
    stale = base / "b"
    (stale / "images").mkdir(parents=True)
    (stale / "manifest.json").write_text(json.dumps({"version": demo.VERSION, "image_size": 99}))
    (stale / "stray.txt").write_text("left over")
    second = demo.ensure_demo(stale, data_dir=data_dir)
    assert first == {"train": base / "a" / "train.jsonl", "test": base / "a" / "test.jsonl"}
    assert second["train"] == stale / "train.jsonl"
    assert sorted(p.name for p in base.iterdir()) == ["a", "b"]  # no temporary folders left behind
    return base / "a", base / "b"


@pytest.fixture(scope="module")
def sources(data_dir: Path) -> dict[str, np.ndarray]:
    return {
        demo.SVS_NAME: tifffile.imread(data_dir / demo.SVS_NAME, key=0),
        demo.HE_TILE_NAME: np.asarray(Image.open(data_dir / demo.HE_TILE_NAME).convert("RGB")),
        demo.IHC_NAME: immunohistochemistry(),
    }


def _rows(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def _crop(sources: dict[str, np.ndarray], meta: dict) -> np.ndarray:
    x, y, w, h = meta["region"]
    return sources[meta["source"]][y : y + h, x : x + w]


def _hed_ratio(rgb: np.ndarray, other_channel: int) -> float:
    od = np.clip(rgb2hed(rgb), 0, None)
    return float(od[..., 0].mean() / max(od[..., other_channel].mean(), 1e-6))


def test_labels_follow_the_pixel_rules(built: tuple[Path, Path], sources: dict[str, np.ndarray]) -> None:
    root = built[0]
    for split in ("train", "test"):
        for row in _rows(root, split):
            meta, crop = row["meta"], _crop(sources, row["meta"])
            assert row["options"][ord(row["answer"]) - ord("A")] == meta["label"]
            if meta["qtype"] == "tissue":
                assert set(row["options"]) == {"tissue", "background"} and meta["source"] == demo.SVS_NAME
                f = tissue_fraction(crop)
                assert (f >= 0.6) if meta["label"] == "tissue" else (f <= 0.1)
            else:
                assert meta["qtype"] == "stain"
                ihc = meta["source"] == demo.IHC_NAME
                assert set(row["options"]) == ({"hematoxylin", "DAB"} if ihc else {"hematoxylin", "eosin"})
                c, m = (demo.IHC_BALANCE, demo.IHC_MARGIN) if ihc else (demo.HE_BALANCE, demo.HE_MARGIN)
                r = _hed_ratio(crop, 2 if ihc else 1)
                assert r == pytest.approx(meta["value"], abs=1e-3)
                assert (r >= c * m) if meta["label"] == "hematoxylin" else (r <= c / m)
                assert tissue_fraction(crop) >= (0.1 if ihc else 0.6)


def test_patches_keep_the_cue_at_56_pixels(built: tuple[Path, Path]) -> None:
    """What the model sees (the resized PNG) still shows the label: tissue vs glass, and the
    stain ratio on the same side of the balance point."""
    root = built[0]
    for split in ("train", "test"):
        for row in _rows(root, split):
            with Image.open(root / row["images"][0]) as im:
                assert im.size == (56, 56) and im.mode == "RGB"
                px = np.asarray(im)
            meta = row["meta"]
            if meta["qtype"] == "tissue":
                f = tissue_fraction(px)
                assert f >= 0.5 if meta["label"] == "tissue" else f <= 0.15
            else:
                ihc = meta["source"] == demo.IHC_NAME
                balance = demo.IHC_BALANCE if ihc else demo.HE_BALANCE
                assert (_hed_ratio(px, 2 if ihc else 1) > balance) == (meta["label"] == "hematoxylin")


def test_balance_and_size(built: tuple[Path, Path]) -> None:
    root = built[0]
    for split, (lo, hi) in {"train": (300, 700), "test": (100, 200)}.items():
        rows = _rows(root, split)
        assert lo <= len(rows) <= hi
        assert all(len(r["options"]) == 2 and r["answer"] in "AB" for r in rows)
        by_pair = Counter((tuple(sorted(r["options"])), r["meta"]["label"]) for r in rows)
        for pair in {p for p, _ in by_pair}:
            counts = [by_pair[(pair, label)] for label in pair]
            assert counts[0] == counts[1] > 0, (split, pair, counts)
        # a constant letter scores 0.5 (within one row per (pair, label) group)
        letters = Counter(r["answer"] for r in rows)
        assert abs(letters["A"] - letters["B"]) <= len(by_pair)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["image_size"] == 56
    assert sum(manifest["counts"].values()) == len(_rows(root, "train")) + len(_rows(root, "test"))


def test_splits_are_spatially_disjoint(built: tuple[Path, Path]) -> None:
    root = built[0]
    regions = {s: [r["meta"] for r in _rows(root, s)] for s in ("train", "test")}
    for a in regions["train"]:
        ax, ay, aw, ah = a["region"]
        for b in regions["test"]:
            if a["source"] != b["source"]:
                continue
            bx, by, bw, bh = b["region"]
            overlap = min(ax + aw, bx + bw) > max(ax, bx) and min(ay + ah, by + bh) > max(ay, by)
            assert not overlap, (a, b)
    ids = {s: {r["id"] for r in _rows(root, s)} for s in ("train", "test")}
    assert not ids["train"] & ids["test"]


def test_build_is_deterministic_and_cached(built: tuple[Path, Path]) -> None:
    a, b = built
    assert not (b / "stray.txt").exists()  # the stale folder was replaced whole
    for name in ("train.jsonl", "test.jsonl", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    images = sorted(p.name for p in (a / "images").iterdir())
    assert images == sorted(p.name for p in (b / "images").iterdir())
    assert all((a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in images)
    # a complete folder is not rebuilt
    before = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    assert demo.ensure_demo(a)["test"] == a / "test.jsonl"
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == before


def test_default_root_follows_mmpo_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MMPO_CACHE", str(tmp_path))
    assert demo.default_root() == tmp_path / "data" / f"pathology_demo_v{demo.VERSION}"
    assert demo.default_root(28) == tmp_path / "data" / f"pathology_demo_v{demo.VERSION}_28px"
    monkeypatch.delenv("MMPO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_root() == tmp_path / "home" / ".cache" / "mmpo" / "data" / f"pathology_demo_v{demo.VERSION}"


def test_a_foreign_folder_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"mine: exists and is not a pathology demo folder"):
        demo.ensure_demo(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_missing_sources_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"cmu_small_region\.svs"):
        demo.build(tmp_path / "out", data_dir=tmp_path)  # an empty folder
    monkeypatch.setenv("MMPO_PATHOLOGY_DATA", str(tmp_path / "elsewhere"))
    assert demo.data_dir_candidates()[0] == tmp_path / "elsewhere"


def test_build_cli_prints_the_balance(built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    import runpy

    main = runpy.run_path(str(Path(__file__).resolve().parents[2] / "data_prep" / "build_pathology_demo.py"))["main"]
    assert main(["--out", str(built[0])]) == 0  # already built: only reads and reports
    out = capsys.readouterr().out
    counts = json.loads((built[0] / "manifest.json").read_text())["counts"]
    for key, n in counts.items():
        split, qtype_label = key.split("/", 1)
        assert f"  {qtype_label}: {n}" in out
    assert (
        f"train: {built[0] / 'train.jsonl'} ({sum(v for k, v in counts.items() if k.startswith('train/'))} rows)" in out
    )
