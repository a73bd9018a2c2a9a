"""Cut a whole-slide image into tissue tiles (PNG) with a tiles.jsonl index.

python data_prep/tile_wsi.py SLIDE.svs OUT_DIR --tile-size 256 --min-tissue 0.5
"""

from __future__ import annotations

import argparse
import sys

from mmpo.errors import MMPOError
from mmpo_tasks.vlm_reasoning.wsi import tile_slide


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slide", help="slide file (SVS / pyramidal TIFF; any OpenSlide format when openslide is installed)")
    p.add_argument("out_dir", help="folder for tiles/ and tiles.jsonl")
    p.add_argument("--tile-size", type=int, default=256, help="tile side in pixels of the level (default 256)")
    p.add_argument("--level", type=int, default=0, help="pyramid level, 0 = full resolution (default 0)")
    p.add_argument("--stride", type=int, default=None, help="step between tiles (default: the tile size)")
    p.add_argument(
        "--min-tissue", type=float, default=0.5, help="drop tiles with a smaller tissue fraction (default 0.5)"
    )
    p.add_argument("--max-tiles", type=int, default=0, help="stop after this many kept tiles (0: no limit)")
    a = p.parse_args(argv)
    try:
        rows = tile_slide(
            a.slide,
            a.out_dir,
            tile_size=a.tile_size,
            level=a.level,
            stride=a.stride,
            min_tissue=a.min_tissue,
            max_tiles=a.max_tiles,
        )
    except (MMPOError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(rows)} tile(s) written to {a.out_dir}/tiles, index {a.out_dir}/tiles.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
