"""Run under torchrun as one "node" of a multi-node launch: record what the launcher told this
process (RANK, LOCAL_RANK, GROUP_RANK, WORLD_SIZE, ...) to OUT/env_rank{RANK}.json, then train and
dump like tests/helpers/train_and_dump.py (same arguments: OUT CONFIG [key=value ...]).

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT \\
        tests/helpers/node_train.py OUT CONFIG [key=value ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_and_dump import main  # noqa: E402

KEYS = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "ROLE_RANK", "MASTER_ADDR")

if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    seen = {k: os.environ.get(k) for k in KEYS} | {"cwd": os.getcwd()}
    (out / f"env_rank{os.environ['RANK']}.json").write_text(json.dumps(seen, indent=1))
    main()
