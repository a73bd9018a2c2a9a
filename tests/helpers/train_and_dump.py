"""Run under torchrun: train a config with its task's real trainer, then every rank writes its full
parameters (gathered under ZeRO-3) to OUT/rank{R}.safetensors.

    torchrun --nproc-per-node 2 tests/helpers/train_and_dump.py OUT CONFIG [key=value ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmpo.config import load_config
from mmpo.tasks import trainer_class_for


def main() -> None:
    out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    cfg = load_config(config, overrides)
    trainer = trainer_class_for(cfg.task.name)(cfg, Path(cfg.output_dir))
    trainer.train()
    with trainer.engine.gathered_params():
        params = {n: p.detach().float().cpu().clone() for n, p in trainer.engine.module.named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(params, str(out / f"rank{trainer.engine.rank}.safetensors"))
    trainer.engine.barrier()
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()
