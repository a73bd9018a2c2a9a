"""Run under torchrun: ``tests/helpers/train_and_dump.py`` (train a config, every rank writes its
parameters and state to OUT/), and FIND's trainer also writes, as its run closes, its value net
with the value net's Adam state (OUT/value_rank{R}.safetensors).

    torchrun --nproc-per-node 2 tests/diffusion/diffusion_two_ranks.py OUT CONFIG [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import train_and_dump

from mmpo.trainers.diffusion_base import DiffusionTrainerBase

_close = DiffusionTrainerBase.close


def close(self: DiffusionTrainerBase) -> None:
    out, rank = Path(sys.argv[1]), self.engine.rank
    out.mkdir(parents=True, exist_ok=True)
    value = getattr(self, "value", None)
    if value is not None:
        tensors = {f"value.{k}": v.detach().float().cpu().clone() for k, v in value.state_dict().items()}
        for pid, st in self.value_opt.state_dict()["state"].items():
            tensors.update({f"opt.{pid}.{k}": torch.as_tensor(v).float().cpu().clone() for k, v in st.items()})
        save_file(tensors, str(out / f"value_rank{rank}.safetensors"))
    _close(self)


DiffusionTrainerBase.close = close  # type: ignore[method-assign]

if __name__ == "__main__":
    train_and_dump.main()
