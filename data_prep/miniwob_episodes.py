"""Record GUI episodes offline from the scripted MiniWoB++ oracle (live headless Chromium, no download).

    python data_prep/miniwob_episodes.py --out DIR --tasks click-test-2 click-button ... --seeds 0:50
        [--only-success] [--max-steps 16] [--overwrite] [--no-progress]

``--seeds`` takes one or more specs: ``A:B`` (seeds A..B-1) or ``N``. The folder layout and the
recording: :mod:`mmpo_tasks.gui_agent.recording` (``record_episodes``), which the hiconagent
recipe also uses to build its episodes on first use when ``task.data`` is empty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmpo.errors import MMPOError
from mmpo_tasks.gui_agent.recording import EPISODES_FILE, GENERATOR, parse_seeds, record_episodes
from mmpo_tasks.gui_agent.solver import SOLVABLE_TASKS

__all__ = ["EPISODES_FILE", "GENERATOR", "main", "parse_seeds", "record_episodes"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        metavar="TASK",
        help=f"MiniWoB tasks; solvable: {', '.join(SOLVABLE_TASKS)}",
    )
    p.add_argument(
        "--seeds", nargs="+", default=["0:10"], metavar="SPEC", help="seed specs A:B (A..B-1) or N (default 0:10)"
    )
    p.add_argument("--only-success", action="store_true", help="keep only the episodes that earned a positive reward")
    p.add_argument("--max-steps", type=int, default=16, help="step limit per episode (default 16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        meta = record_episodes(
            a.tasks,
            parse_seeds(a.seeds),
            Path(a.out),
            only_success=a.only_success,
            max_steps=a.max_steps,
            overwrite=a.overwrite,
            progress=not a.no_progress,
        )
    except MMPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.out}: {meta['episodes']} episode(s), {meta['steps']} step(s), {len(meta['dropped'])} dropped")
    for task, s in meta["per_task"].items():
        print(
            f"  {task}: success {s['successes']}/{s['runs']} ({s['success_rate']:.0%}), "
            f"{s['mean_steps']:.2f} steps, {s['seconds_per_episode']:.2f} s/episode"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
