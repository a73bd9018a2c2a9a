"""Convert a multiple-choice pathology set (CSV or JSON lines with question, options A..E,
answer letter, image path) into the canonical JSONL of the vlm_reasoning task.

    python data_prep/mcq_to_jsonl.py questions.csv --out OUT [--image-root IMAGES]
"""

from __future__ import annotations

import argparse
import logging
import sys

from mmpo.errors import MMPOError
from mmpo_tasks.vlm_reasoning.convert import ConvertStats, mcq_to_jsonl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help=".csv / .tsv / .jsonl file")
    p.add_argument("--out", required=True, help="output folder (<out>/<src stem>.jsonl and <out>/images/)")
    p.add_argument(
        "--image-root", default=None, help="folder the image paths are relative to (default: the source file's)"
    )
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of stopping")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stats = ConvertStats()
    try:
        out = mcq_to_jsonl(a.src, a.out, image_root=a.image_root, skip_bad_rows=a.skip_bad_rows, stats=stats)
    except MMPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {stats.written} row(s) written, {stats.skipped} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
