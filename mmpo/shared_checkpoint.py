"""The checkpoint a distributed run resumes from, agreed by every rank.

A run folder is written by global rank 0 (metrics, evaluations, the final model); a checkpoint
folder also holds one file set per rank (``rng_rank{R}.*`` and DeepSpeed's
``zero_pp_rank_{R}_*`` optimizer shards, plus the ZeRO-3 weight shards), written by that rank into
the folder rank 0 created. So a resume needs every rank to see the same checkpoint: the run folder
on a filesystem shared by the nodes, or copied whole to every node. When the ranks see different
checkpoints (typically: each node has its own disk, so rank 0's node holds the finished
checkpoint and the other nodes only an unfinished ``.tmp-step_*`` folder) one rank would resume
while another started over, and the run would hang or silently diverge; this refuses to start
instead. See docs/distributed.md ("DeepSpeed across machines").
"""

from __future__ import annotations

import socket
from pathlib import Path

from mmpo import checkpoint as ckpt
from mmpo.engine import Engine
from mmpo.errors import CheckpointError


def agreed_checkpoint(run_dir: str | Path, engine: Engine) -> Path | None:
    """:func:`mmpo.checkpoint.usable_checkpoint` of ``run_dir`` on every rank (collective), or
    raise CheckpointError when the ranks do not all see the same step (naming each rank's host
    and step). One process: the same as ``usable_checkpoint``."""
    latest = ckpt.usable_checkpoint(run_dir, report=engine.is_main)
    step = None if latest is None else ckpt.checkpoint_step(latest)
    views = engine.all_gather_object((socket.gethostname(), step))
    if len({s for _, s in views}) > 1:
        said = [f"rank {r} on {host}: {'none' if s is None else f'step {s}'}" for r, (host, s) in enumerate(views)]
        seen = ", ".join(said)
        raise CheckpointError(
            f"the ranks see different checkpoints in {Path(run_dir) / ckpt.CHECKPOINTS_DIR} ({seen}); "
            "a resume needs the same run folder on every node: put output_dir on a filesystem shared "
            "by the nodes (or copy the checkpoint to every node), see docs/distributed.md"
        )
    return latest


__all__ = ["agreed_checkpoint"]
