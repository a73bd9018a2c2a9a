"""Run under torchrun: train a config with its task's real trainer, then every rank writes its full
parameters (gathered under ZeRO-3) to OUT/rank{R}.safetensors and the state that must agree across
ranks (step, the algorithm's and the task's states, the last KL) to OUT/state_rank{R}.json.

    torchrun --nproc-per-node 2 tests/helpers/train_and_dump.py OUT CONFIG [key=value ...]

``MMPO_TEST_EMPTY_RANK=R:S`` (token trainer) makes the advantage-side filters leave rank R with
no row at step S (1-based), as a filter that drops every completion of that rank would.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmpo.config import load_config
from mmpo.trainers import trainer_class_for


def _empty_rank_at(spec: str) -> None:
    from mmpo.rollout import filters

    rank, step = (int(x) for x in spec.split(":"))
    real = filters.after_advantage
    calls = {"n": 0}

    def after_advantage(batch, filters, **kwargs):
        calls["n"] += 1
        out = real(batch, filters, **kwargs)
        if calls["n"] == step and int(os.environ["RANK"]) == rank:
            return out.select([])
        return out

    filters.after_advantage = after_advantage


def main() -> None:
    out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if os.environ.get("MMPO_TEST_EMPTY_RANK"):
        _empty_rank_at(os.environ["MMPO_TEST_EMPTY_RANK"])
    cfg = load_config(config, overrides)
    trainer = trainer_class_for(cfg.task.name)(cfg, Path(cfg.output_dir))
    trainer.train()
    with trainer.engine.gathered_params():
        params = {n: p.detach().float().cpu().clone() for n, p in trainer.engine.module.named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(params, str(out / f"rank{trainer.engine.rank}.safetensors"))
    # the state that must move alike on every rank: step, the algorithm's and the task's states, the last KL
    state = trainer.trainer_state()
    keep = {k: state[k] for k in ("step", "bad_steps", "states", "task", "last_kl")}
    (out / f"state_rank{trainer.engine.rank}.json").write_text(json.dumps(keep, indent=1, sort_keys=True))
    trainer.engine.barrier()
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()
