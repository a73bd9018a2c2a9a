"""Convert PathVQA (Hugging Face datasets layout: parquet shards or JSON lines with image,
question, answer) into the canonical JSONL of the vlm_reasoning task.

    python data_prep/pathvqa_to_jsonl.py data/train-*.parquet --out OUT --split train
"""

from __future__ import annotations

import argparse
import logging
import sys

from mmpo.errors import MMPOError
from mmpo_tasks.vlm_reasoning.convert import ConvertStats, pathvqa_to_jsonl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="+", help=".parquet / .jsonl files of one split")
    p.add_argument("--out", required=True, help="output folder (<out>/<split>.jsonl and <out>/images/)")
    p.add_argument("--split", required=True, help="split name, used in the file name and the row ids")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of stopping")
    p.add_argument("--limit", type=int, default=0, help="stop after this many rows (0: all)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stats = ConvertStats()
    try:
        out = pathvqa_to_jsonl(
            a.src, a.out, split_name=a.split, skip_bad_rows=a.skip_bad_rows, limit=a.limit, stats=stats
        )
    except MMPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {stats.written} row(s) written, {stats.skipped} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
