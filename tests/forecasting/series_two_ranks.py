"""Run under torchrun: ``tests/helpers/train_and_dump.py`` (train a config, every rank writes its
parameters and state to OUT/), and every series trainer also writes, as its run closes, its
reference model (OUT/reference_rank{R}.safetensors).

    torchrun --nproc-per-node 2 tests/forecasting/series_two_ranks.py OUT CONFIG [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import train_and_dump

from mmpo.trainers.series import SeriesTrainer

_close = SeriesTrainer.close


def close(self: SeriesTrainer) -> None:
    out, rank = Path(sys.argv[1]), self.engine.rank
    out.mkdir(parents=True, exist_ok=True)
    if self.ref_model is not None:
        ref = {n: p.detach().float().cpu().clone() for n, p in self.ref_model.named_parameters()}
        save_file(ref, str(out / f"reference_rank{rank}.safetensors"))
    _close(self)


SeriesTrainer.close = close  # type: ignore[method-assign]

if __name__ == "__main__":
    train_and_dump.main()
