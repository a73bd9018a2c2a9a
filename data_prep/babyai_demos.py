"""Generate BabyAI / MiniGrid demonstrations offline with BabyAI's own bot (no download, no GPU).

    python data_prep/babyai_demos.py --out DIR [--env BabyAI-GoToRedBallNoDists-v0] [--episodes 10]
        [--seed-start 0] [--tile-size 8] [--observation minigrid_partial] [--max-steps 64] [--overwrite]

The folder layout and the bot episodes: :mod:`mmpo_tasks.vla.demos` (``generate_demos``), which
``task.sft.demos: auto`` of the ript_vla recipe also uses to build them on first use. Read it back
with ``mmpo_tasks.vla.data.load_demos(DIR)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmpo.errors import MMPOError
from mmpo.rollout.env_runner import EnvSpec
from mmpo_tasks.vla.demos import GENERATOR, generate_demos

__all__ = ["GENERATOR", "generate_demos", "main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--env", default="BabyAI-GoToRedBallNoDists-v0", help="gymnasium id (default BabyAI-GoToRedBallNoDists-v0)"
    )
    p.add_argument("--episodes", type=int, default=10, help="successful episodes to write (default 10)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed; episodes use the seeds after it (default 0)")
    p.add_argument("--tile-size", type=int, default=8, help="MiniGrid pixels per tile (default 8)")
    p.add_argument(
        "--observation",
        default="minigrid_partial",
        choices=["minigrid_partial", "minigrid_full"],
        help="image the policy sees (default minigrid_partial)",
    )
    p.add_argument("--max-steps", type=int, default=64, help="step limit per episode; 0 = the env's own (default 64)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    a = p.parse_args(argv)
    spec = EnvSpec(id=a.env, observation=a.observation, tile_size=a.tile_size, max_steps=a.max_steps)
    try:
        meta = generate_demos(spec, a.episodes, a.seed_start, Path(a.out), overwrite=a.overwrite)
    except MMPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{a.out}: {meta['episodes']} episode(s), {meta['steps']} step(s), mean length {meta['mean_length']:.2f}, "
        f"{len(meta['skipped_seeds'])} failed seed(s) skipped ({a.env})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
