"""Build the offline real-image pathology demo set (tissue / stain questions, 2 options each)
and print its label balance.

    python data_prep/build_pathology_demo.py --out DIR [--image-size 56]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmpo.errors import MMPOError
from mmpo_tasks.vlm_reasoning.pathology_demo import DEFAULT_IMAGE_SIZE, default_root, ensure_demo, label_counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: the cache, " + str(default_root()) + ")")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="patch side in pixels (default 56)")
    p.add_argument("--data-dir", default=None, help="folder with cmu_small_region.svs and he_tile_stardist.jpg")
    a = p.parse_args(argv)
    try:
        files = ensure_demo(
            Path(a.out) if a.out else None, image_size=a.image_size, data_dir=Path(a.data_dir) if a.data_dir else None
        )
    except MMPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, path in files.items():
        counts = label_counts(path)
        print(f"{split}: {path} ({sum(counts.values())} rows)")
        for key, n in counts.items():
            print(f"  {key}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
