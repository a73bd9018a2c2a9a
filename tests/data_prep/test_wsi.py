"""Whole-slide tiling on the real SVS and on synthetic TIFFs written with tifffile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.color import rgb2hsv

from mmpo.errors import DataError
from mmpo_tasks.vlm_reasoning import wsi
from mmpo_tasks.vlm_reasoning.pathology_demo import SVS_NAME, find_data_dir


@pytest.fixture(scope="module")
def svs() -> Path:
    """The real SVS slide region (bundled in tasks/vlm_reasoning/demo_sources, so always present)."""
    return find_data_dir() / SVS_NAME


@pytest.fixture(scope="module")
def svs_level0(svs: Path) -> np.ndarray:
    """(2967, 2220, 3) uint8: level 0 decoded whole by tifffile."""
    return tifffile.imread(svs, key=0)


def reference_mask(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: the documented rule, computed independently through skimage's HSV conversion."""
    hsv = rgb2hsv(rgb)
    mean = rgb.astype(np.float64).mean(axis=-1)
    return (hsv[..., 1] >= wsi.MIN_SATURATION - 1e-9) & (mean < wsi.MAX_BRIGHTNESS) & (rgb.max(-1) >= wsi.MIN_VALUE)


def reference_fraction(rgb: np.ndarray) -> float:
    return float(reference_mask(rgb).mean())


@pytest.fixture(scope="module")
def svs_mask(svs_level0: np.ndarray) -> np.ndarray:
    """(H, W) bool: the rule on the whole level, with HSV saturation written out (max - min) / max
    (rgb2hsv on 6.6 Mpixels is slow; the two are compared on crops below)."""
    planes = [svs_level0[..., c].astype(np.float64) for c in range(3)]
    mx, mn = np.maximum.reduce(planes), np.minimum.reduce(planes)
    sat = np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)
    mean = sum(planes) / 3.0
    return (sat >= wsi.MIN_SATURATION - 1e-9) & (mean < wsi.MAX_BRIGHTNESS) & (mx >= wsi.MIN_VALUE)


def test_tissue_fraction_known_values() -> None:
    white = np.full((8, 8, 3), 242, np.uint8)
    pink = np.zeros((8, 8, 3), np.uint8) + np.array([220, 120, 170], np.uint8)  # eosin-like
    purple = np.zeros((8, 8, 3), np.uint8) + np.array([90, 60, 140], np.uint8)  # hematoxylin-like
    black = np.zeros((8, 8, 3), np.uint8) + np.array([0, 0, 12], np.uint8)  # saturated but black (dust)
    faint = np.zeros((8, 8, 3), np.uint8) + np.array([250, 236, 244], np.uint8)  # near-white
    assert wsi.tissue_fraction(white) == 0.0
    assert wsi.tissue_fraction(pink) == 1.0
    assert wsi.tissue_fraction(purple) == 1.0
    assert wsi.tissue_fraction(black) == 0.0
    assert wsi.tissue_fraction(faint) == 0.0
    half = np.concatenate([pink[:, :3], white[:, :5]], axis=1)
    assert wsi.tissue_fraction(half) == pytest.approx(3 / 8)
    rgba = np.concatenate([half, np.full((8, 8, 1), 255, np.uint8)], axis=-1)
    assert wsi.tissue_fraction(rgba) == pytest.approx(3 / 8)


def test_tissue_fraction_matches_hsv_reference(svs_level0: np.ndarray, svs_mask: np.ndarray) -> None:
    for y, x in [(0, 0), (1500, 800), (2000, 1200), (600, 400), (2700, 300)]:
        crop = svs_level0[y : y + 200, x : x + 200]
        assert wsi.tissue_fraction(crop) == pytest.approx(reference_fraction(crop), abs=1e-9)
        np.testing.assert_array_equal(svs_mask[y : y + 200, x : x + 200], reference_mask(crop))


def test_regions_read_tile_by_tile_match_the_full_level(svs: Path, svs_level0: np.ndarray) -> None:
    level = wsi.open_level(svs, 0)
    try:
        assert (level.height, level.width) == svs_level0.shape[:2] == (2967, 2220)
        rng = np.random.default_rng(0)
        regions = [(0, 0, 1, 1), (2219, 2966, 1, 1), (239, 239, 2, 2), (2000, 2800, 220, 167)]
        for _ in range(30):
            w, h = (int(v) for v in rng.integers(1, 500, 2))
            regions.append((int(rng.integers(0, 2220 - w + 1)), int(rng.integers(0, 2967 - h + 1)), w, h))
        for x, y, w, h in regions:
            np.testing.assert_array_equal(level.read(x, y, w, h), svs_level0[y : y + h, x : x + w])
        with pytest.raises(ValueError, match="outside"):
            level.read(2100, 0, 256, 256)
    finally:
        level.close()


def test_tile_real_svs(svs: Path, svs_level0: np.ndarray, svs_mask: np.ndarray, tmp_path: Path) -> None:
    size = 256
    rows = wsi.tile_slide(svs, tmp_path, tile_size=size, min_tissue=0.5)
    # every full tile of the grid, with its reference tissue fraction
    grid = [(x, y) for y in range(0, 2967 - size + 1, size) for x in range(0, 2220 - size + 1, size)]
    assert len(grid) == 8 * 11
    fractions = {(x, y): float(svs_mask[y : y + size, x : x + size].mean()) for x, y in grid}
    expected = [(x, y) for x, y in grid if fractions[(x, y)] >= 0.5]
    assert [(r["x"], r["y"]) for r in rows] == expected
    assert 0 < len(rows) < len(grid)  # background tiles were dropped, tissue tiles kept
    assert any(f < 0.05 for f in fractions.values())  # the slide does have background tiles
    for r in rows:
        assert 0.5 <= r["tissue_fraction"] <= 1.0
        assert r["tissue_fraction"] == pytest.approx(fractions[(r["x"], r["y"])], abs=1e-5)
        assert (r["level"], r["size"], r["slide"]) == (0, size, str(svs))
        tile = np.asarray(Image.open(tmp_path / r["path"]))
        np.testing.assert_array_equal(tile, svs_level0[r["y"] : r["y"] + size, r["x"] : r["x"] + size])
    index = [json.loads(line) for line in (tmp_path / "tiles.jsonl").read_text().splitlines()]
    assert index == rows
    assert sorted(p.name for p in (tmp_path / "tiles").iterdir()) == sorted(Path(r["path"]).name for r in rows)


def test_stride_and_max_tiles(svs: Path, tmp_path: Path) -> None:
    all_rows = wsi.tile_slide(svs, tmp_path / "a", tile_size=200, stride=150, min_tissue=0.9)
    assert all(r["x"] % 150 == 0 and r["y"] % 150 == 0 for r in all_rows)
    assert len(all_rows) > 3
    first = wsi.tile_slide(svs, tmp_path / "b", tile_size=200, stride=150, min_tissue=0.9, max_tiles=3)
    assert first == [dict(r) for r in all_rows[:3]]


def _write_tiff(
    path: Path, image: np.ndarray, *, tile: tuple[int, int] | None = (64, 64), pyramid: bool = False
) -> None:
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=tile, photometric="rgb", subifds=1 if pyramid else None)
        if pyramid:
            tw.write(image[::2, ::2], tile=tile, photometric="rgb", subfiletype=1)


def test_background_only_tiff_gives_no_tiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    glass = rng.integers(236, 250, size=(300, 260, 3), dtype=np.uint8)  # grey-white with noise
    glass[100:102, 50:90] = (60, 40, 120)  # a thin speck of dust: far below min_tissue
    _write_tiff(tmp_path / "glass.tif", glass)
    rows = wsi.tile_slide(tmp_path / "glass.tif", tmp_path / "out", tile_size=64, min_tissue=0.5)
    assert rows == []
    assert (tmp_path / "out" / "tiles.jsonl").read_text() == ""
    assert list((tmp_path / "out" / "tiles").iterdir()) == []


def test_synthetic_pyramid_levels_and_strips(tmp_path: Path) -> None:
    img = np.full((256, 384, 3), 245, np.uint8)
    img[:, :128] = (200, 100, 160)  # tissue in the left third
    _write_tiff(tmp_path / "pyr.tif", img, pyramid=True)
    rows0 = wsi.tile_slide(tmp_path / "pyr.tif", tmp_path / "l0", tile_size=64, level=0)
    assert sorted({r["x"] for r in rows0}) == [0, 64] and len(rows0) == 2 * 4
    assert all(r["tissue_fraction"] == 1.0 for r in rows0)
    rows1 = wsi.tile_slide(tmp_path / "pyr.tif", tmp_path / "l1", tile_size=32, level=1)
    assert [(r["x"], r["y"]) for r in rows1] == [(x, y) for y in (0, 32, 64, 96) for x in (0, 32)]
    with pytest.raises(DataError, match=r"pyr\.tif: level 2 does not exist \(the slide has 2 level"):
        wsi.tile_slide(tmp_path / "pyr.tif", tmp_path / "l2", level=2)
    # a TIFF stored in strips is decoded whole, within the size guard
    _write_tiff(tmp_path / "strips.tif", img, tile=None)
    rows_s = wsi.tile_slide(tmp_path / "strips.tif", tmp_path / "s", tile_size=64)
    assert [(r["x"], r["y"]) for r in rows_s] == [(r["x"], r["y"]) for r in rows0]


def test_strip_level_over_the_size_guard_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_tiff(tmp_path / "strips.tif", np.full((100, 100, 3), 200, np.uint8), tile=None)
    monkeypatch.setattr(wsi, "MAX_DECODE_PIXELS", 5_000)
    with pytest.raises(DataError, match=r"strips\.tif: level 0 \(100x100.*not tiled.*openslide"):
        wsi.tile_slide(tmp_path / "strips.tif", tmp_path / "out")


def test_missing_or_unreadable_slide_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere\.svs: slide file not found"):
        wsi.tile_slide(tmp_path / "nowhere.svs", tmp_path / "out")
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"this is not a TIFF file at all")
    with pytest.raises(DataError, match=r"broken\.svs: cannot read"):
        wsi.tile_slide(bad, tmp_path / "out")


def test_tile_wsi_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import runpy

    main = runpy.run_path(str(Path(__file__).resolve().parents[2] / "data_prep" / "tile_wsi.py"))["main"]
    img = np.full((128, 192, 3), 245, np.uint8)
    img[:64] = (150, 60, 150)
    _write_tiff(tmp_path / "s.tif", img)
    assert main([str(tmp_path / "s.tif"), str(tmp_path / "out"), "--tile-size", "64", "--min-tissue", "0.9"]) == 0
    assert capsys.readouterr().out.startswith("3 tile(s) written")
    assert [(r["x"], r["y"]) for r in map(json.loads, (tmp_path / "out" / "tiles.jsonl").read_text().splitlines())] == [
        (0, 0),
        (64, 0),
        (128, 0),
    ]
    assert main([str(tmp_path / "missing.svs"), str(tmp_path / "out")]) == 2
    assert "missing.svs: slide file not found" in capsys.readouterr().err
