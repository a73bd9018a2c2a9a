"""A small real-image pathology question set whose answers are checked from the pixels.

Built offline from three real images:

* ``cmu_small_region.svs`` (H&E whole-slide region, OpenSlide test data CMU-1-Small-Region),
  cut into non-overlapping tiles by :func:`mmpo_tasks.vlm_reasoning.wsi.iter_tiles`;
* ``he_tile_stardist.jpg`` (an H&E tile shipped with stardist);
* ``skimage.data.immunohistochemistry()`` (IHC colon tissue: hematoxylin + DAB).

Two question types, each multiple choice with two options (chance = 0.5):

* ``tissue``: "Is this patch tissue or background?" (slide tiles). Label from
  :func:`~mmpo_tasks.vlm_reasoning.wsi.tissue_fraction`: tissue when >= 0.6, background when
  <= 0.1, ambiguous tiles skipped.
* ``stain``: "Which stain dominates this patch?" Options hematoxylin / eosin for H&E crops,
  hematoxylin / DAB for IHC crops. Label by colour deconvolution (``skimage.color.rgb2hed``,
  negative optical densities clipped to 0): r = mean(H) / mean(E) (or mean(H) / mean(DAB)).
  The channels of rgb2hed are not on a common scale, so the balance point ``c`` where a patch
  looks half purple, half pink (or brown) was set by eye on contact sheets of these images
  (c = 1.5 for H/E, c = 0.6 for H/DAB); a patch is hematoxylin when r >= c * m, the other stain
  when r <= c / m, with the margin m = 1.3 (H&E) or 1.7 (IHC); patches in between are skipped.
  H&E patches need a tissue fraction >= 0.6, IHC patches >= 0.1 (IHC stroma is pale).

Every crop is labelled at full resolution, then resized to ``image_size`` x ``image_size``
(Lanczos) and saved as PNG. Train and test come from disjoint regions of each image (square
blocks, about one in five a test block; a crop that would straddle a train and a test block is
dropped), so no pixel is in both splits. Labels are balanced per (question type, option pair,
split) by deterministic subsampling; rows are shuffled with a fixed seed. Options keep a fixed
order per question (as in "A. yes B. no" benchmarks), so the answer letter depends on the image
alone; with balanced labels a constant letter still scores only chance (0.5).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from mmpo.errors import DataError

from .wsi import iter_tiles, tissue_fraction

VERSION = 2
DEFAULT_IMAGE_SIZE = 56
SVS_NAME = "cmu_small_region.svs"
HE_TILE_NAME = "he_tile_stardist.jpg"
IHC_NAME = "skimage_immunohistochemistry"

TISSUE_MIN, BACKGROUND_MAX = 0.6, 0.1  # tissue-fraction thresholds of the `tissue` question
HE_BALANCE, HE_MARGIN = 1.5, 1.3  # mean(H) / mean(E) balance point and margin
IHC_BALANCE, IHC_MARGIN = 0.6, 1.7  # mean(H) / mean(DAB)
HE_MIN_TISSUE, IHC_MIN_TISSUE = 0.6, 0.1

# (crop size, stride, split block size) in source pixels
SVS_CROP = (96, 96, 384)
HE_TILE_CROP = (50, 25, 100)
IHC_CROP = (64, 16, 128)
# rows kept per label, per split, for each (question type, option pair)
CAP = {"train": 110, "test": 30}
SEED = 1234

QUESTIONS = {
    "tissue": ("Is this patch tissue or background?", ("tissue", "background")),
    "stain_he": ("Which stain dominates this patch?", ("hematoxylin", "eosin")),
    "stain_ihc": ("Which stain dominates this patch?", ("hematoxylin", "DAB")),
}
LETTERS = "AB"


def data_dir_candidates() -> list[Path]:
    """Folders searched for the pathology source files, in order."""
    out = []
    if os.environ.get("MMPO_PATHOLOGY_DATA"):
        out.append(Path(os.environ["MMPO_PATHOLOGY_DATA"]))
    out.append(Path(__file__).resolve().parent / "demo_sources")  # bundled copies (see its README)
    repo = Path(__file__).resolve().parents[2]
    out += [repo.parent / "shared" / "data" / "pathology", repo / "shared" / "data" / "pathology"]
    return out


def find_data_dir() -> Path:
    """The first candidate folder holding both source files, else DataError saying where to get them."""
    cands = data_dir_candidates()
    for d in cands:
        if (d / SVS_NAME).is_file() and (d / HE_TILE_NAME).is_file():
            return d
    raise DataError(
        f"pathology demo: {SVS_NAME} and {HE_TILE_NAME} not found in any of "
        f"{', '.join(str(c) for c in cands)}; set MMPO_PATHOLOGY_DATA to a folder holding them "
        "(CMU-1-Small-Region.svs from the OpenSlide test data, renamed; the H&E tile from the stardist wheel)"
    )


def default_root(image_size: int = DEFAULT_IMAGE_SIZE) -> Path:
    """``$MMPO_CACHE/data/pathology_demo_v1`` (or under ``~/.cache/mmpo``); a suffix for non-default sizes."""
    cache = Path(os.environ.get("MMPO_CACHE") or Path.home() / ".cache" / "mmpo")
    name = f"pathology_demo_v{VERSION}" + ("" if image_size == DEFAULT_IMAGE_SIZE else f"_{image_size}px")
    return cache / "data" / name


# ---------------------------------------------------------------------------- pixel rules


def stain_ratio(rgb: np.ndarray, pair: str) -> float:
    """mean(H) / mean(E) (``pair="he"``) or mean(H) / mean(DAB) (``pair="ihc"``) of an (H, W, 3) uint8 crop.

    Optical densities come from ``skimage.color.rgb2hed``, negatives clipped to 0.
    """
    from skimage.color import rgb2hed

    hed = np.clip(rgb2hed(np.asarray(rgb)[..., :3]), 0.0, None).reshape(-1, 3).mean(axis=0)
    other = hed[1] if pair == "he" else hed[2]
    return float(hed[0] / max(other, 1e-6))


def tissue_label(fraction: float) -> str | None:
    """'tissue' (>= TISSUE_MIN), 'background' (<= BACKGROUND_MAX) or None (ambiguous)."""
    if fraction >= TISSUE_MIN:
        return "tissue"
    if fraction <= BACKGROUND_MAX:
        return "background"
    return None


def stain_label(rgb: np.ndarray, pair: str, fraction: float | None = None) -> tuple[str | None, float]:
    """(label or None when ambiguous or too little tissue, stain ratio or NaN) of an (H, W, 3) uint8 crop.

    ``fraction``: the crop's tissue fraction when already known.
    """
    balance, margin, min_tissue, other = (
        (HE_BALANCE, HE_MARGIN, HE_MIN_TISSUE, "eosin")
        if pair == "he"
        else (IHC_BALANCE, IHC_MARGIN, IHC_MIN_TISSUE, "DAB")
    )
    if (tissue_fraction(rgb) if fraction is None else fraction) < min_tissue:
        return None, float("nan")
    ratio = stain_ratio(rgb, pair)
    if ratio >= balance * margin:
        return "hematoxylin", ratio
    if ratio <= balance / margin:
        return other, ratio
    return None, ratio


# ---------------------------------------------------------------------------- spatial split


def is_test_block(bx: int, by: int) -> bool:
    """About one block in five is a test block, spread over the image."""
    return (bx + 2 * by) % 5 == 0


def region_split(x: int, y: int, size: int, block: int) -> str | None:
    """'train' / 'test' when the crop (x, y, size, size) lies in blocks of one split only, else None."""
    splits = {
        "test" if is_test_block(bx, by) else "train"
        for by in range(y // block, (y + size - 1) // block + 1)
        for bx in range(x // block, (x + size - 1) // block + 1)
    }
    return splits.pop() if len(splits) == 1 else None


def crops(height: int, width: int, size: int, stride: int) -> Iterator[tuple[int, int]]:
    """Top-left corners (x, y) of full ``size`` crops every ``stride`` pixels, row-major."""
    for y in range(0, height - size + 1, stride):
        for x in range(0, width - size + 1, stride):
            yield x, y


# ---------------------------------------------------------------------------- build


@dataclass
class Candidate:
    group: str  # key of QUESTIONS
    label: str
    split: str
    source: str
    region: tuple[int, int, int, int]  # x, y, w, h in source pixels
    value: float  # tissue fraction or stain ratio
    pixels: np.ndarray  # (h, w, 3) uint8


def _svs_candidates(svs: Path) -> list[Candidate]:
    """Non-overlapping level-0 tiles from :func:`wsi.iter_tiles` (what ``tile_slide`` writes
    with ``min_tissue=0``, kept in memory)."""
    size, stride, block = SVS_CROP
    out: list[Candidate] = []
    for x, y, rgb, frac in iter_tiles(svs, tile_size=size, stride=stride, level=0):
        split = region_split(x, y, size, block)
        if split is None:
            continue
        label = tissue_label(frac)
        if label is not None:
            out.append(Candidate("tissue", label, split, SVS_NAME, (x, y, size, size), frac, rgb))
        slabel, ratio = stain_label(rgb, "he", frac)
        if slabel is not None:
            out.append(Candidate("stain_he", slabel, split, SVS_NAME, (x, y, size, size), ratio, rgb))
    return out


def _image_candidates(rgb: np.ndarray, source: str, pair: str, geometry: tuple[int, int, int]) -> list[Candidate]:
    size, stride, block = geometry
    out: list[Candidate] = []
    for x, y in crops(rgb.shape[0], rgb.shape[1], size, stride):
        split = region_split(x, y, size, block)
        if split is None:
            continue
        crop = rgb[y : y + size, x : x + size]
        label, ratio = stain_label(crop, pair)
        if label is not None:
            out.append(Candidate(f"stain_{pair}", label, split, source, (x, y, size, size), ratio, crop))
    return out


def load_sources(data_dir: Path) -> dict[str, np.ndarray]:
    """The two whole images cut into crops (the slide is read tile by tile by wsi.py)."""
    from skimage.data import immunohistochemistry

    return {
        HE_TILE_NAME: np.asarray(Image.open(data_dir / HE_TILE_NAME).convert("RGB")),
        IHC_NAME: np.asarray(immunohistochemistry())[..., :3],
    }


def _balance(cands: list[Candidate], rng: random.Random) -> list[Candidate]:
    """Per (group, split): the same number of each label, at most CAP[split] each."""
    by_key: dict[tuple[str, str, str], list[Candidate]] = {}
    for c in cands:
        by_key.setdefault((c.group, c.split, c.label), []).append(c)
    kept: list[Candidate] = []
    for group in QUESTIONS:
        labels = QUESTIONS[group][1]
        for split in ("train", "test"):
            pools = [by_key.get((group, split, lab), []) for lab in labels]
            n = min(min(len(p) for p in pools), CAP[split])
            for pool in pools:
                kept += rng.sample(pool, n)
    return kept


def build(out_dir: Path, *, image_size: int = DEFAULT_IMAGE_SIZE, data_dir: Path | None = None) -> dict[str, Any]:
    """Write train.jsonl, test.jsonl, images/ and manifest.json into ``out_dir`` (created). Returns the manifest."""
    data_dir = data_dir or find_data_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    cands = _svs_candidates(data_dir / SVS_NAME)
    srcs = load_sources(data_dir)
    cands += _image_candidates(srcs[HE_TILE_NAME], HE_TILE_NAME, "he", HE_TILE_CROP)
    cands += _image_candidates(srcs[IHC_NAME], IHC_NAME, "ihc", IHC_CROP)

    rng = random.Random(SEED)
    kept = _balance(cands, rng)
    counts: Counter[str] = Counter()
    paths: dict[str, Path] = {}
    for split in ("train", "test"):
        rows = [c for c in kept if c.split == split]
        rng.shuffle(rows)
        lines = []
        for i, c in enumerate(rows):
            text, names = QUESTIONS[c.group]
            options = list(names)  # fixed order; labels are balanced, so any constant letter scores 0.5
            rel = f"images/{split}-{i:05d}.png"
            Image.fromarray(c.pixels).resize((image_size, image_size), Image.Resampling.LANCZOS).save(out_dir / rel)
            qtype = c.group.split("_")[0]
            lines.append(
                json.dumps(
                    {
                        "id": f"pathdemo-{split}-{i:05d}",
                        "images": [rel],
                        "question": text,
                        "options": options,
                        "answer": LETTERS[options.index(c.label)],
                        "meta": {
                            "source": c.source,
                            "qtype": qtype,
                            "label": c.label,
                            "region": list(c.region),
                            "value": round(c.value, 4),
                        },
                    }
                )
            )
            counts[f"{split}/{qtype}/{c.label}"] += 1
        paths[split] = out_dir / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n")
    manifest = {"version": VERSION, "image_size": image_size, "counts": dict(sorted(counts.items()))}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _is_complete(root: Path, image_size: int) -> bool:
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        m.get("version") == VERSION
        and m.get("image_size") == image_size
        and (root / "train.jsonl").is_file()
        and (root / "test.jsonl").is_file()
    )


def _replaceable(root: Path) -> bool:
    """An empty folder, or one an earlier build wrote (it has a demo manifest.json)."""
    if not root.is_dir():
        return False
    if not any(root.iterdir()):
        return True
    try:
        return "version" in json.loads((root / "manifest.json").read_text()) and (root / "images").is_dir()
    except (OSError, ValueError, TypeError):
        return False


def ensure_demo(
    root: Path | None = None, *, image_size: int = DEFAULT_IMAGE_SIZE, data_dir: Path | None = None
) -> dict[str, Path]:
    """Build the demo set once into ``root`` (default :func:`default_root`) and return its files.

    The set is built in a temporary sibling folder and renamed into place, so ``root`` is either
    absent or complete. A ``root`` built earlier with another version or image size (or an
    empty folder) is replaced; any other existing folder is refused with a DataError.

    Returns:
        {"train": root/train.jsonl, "test": root/test.jsonl}
    """
    root = Path(root) if root is not None else default_root(image_size)
    files = {"train": root / "train.jsonl", "test": root / "test.jsonl"}
    if _is_complete(root, image_size):
        return files
    if root.exists() and not _replaceable(root):
        raise DataError(
            f"{root}: exists and is not a pathology demo folder (no manifest.json from an earlier build); "
            "pick a new or empty folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp, image_size=image_size, data_dir=data_dir)
        if root.exists():  # stale (other version / size) or incomplete: move it aside first
            if _is_complete(root, image_size):  # another process finished first
                return files
            old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(root, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root, image_size):  # lost a race to a broken folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def label_counts(jsonl: Path) -> dict[str, int]:
    """{"<qtype>/<label>": count} of a demo JSONL file."""
    counts: Counter[str] = Counter()
    for line in Path(jsonl).read_text().splitlines():
        if line.strip():
            meta = json.loads(line)["meta"]
            counts[f"{meta['qtype']}/{meta['label']}"] += 1
    return dict(sorted(counts.items()))
