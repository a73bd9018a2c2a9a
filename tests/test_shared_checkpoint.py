"""mmpo.shared_checkpoint in one process (a world of one): the rank's own usable checkpoint.
The refusal when ranks on separate disks see different checkpoints is tested across 2 torchrun
nodes in tests/test_multinode.py."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mmpo import checkpoint as ckpt
from mmpo.engine import EngineOptions, TorchEngine
from mmpo.shared_checkpoint import agreed_checkpoint


def test_one_process_gets_its_newest_complete_checkpoint(tmp_path: Path) -> None:
    engine = TorchEngine(nn.Linear(2, 1), EngineOptions(lr=0.1, device="cpu", precision="fp32"))
    assert agreed_checkpoint(tmp_path, engine) is None
    for step in (2, 4):
        with ckpt.atomic_checkpoint(tmp_path, step) as folder:
            ckpt.save_json(folder / "trainer_state.json", {"step": step})
    ckpt.temp_checkpoint_dir(tmp_path, 6).mkdir()  # an unfinished save does not count
    assert agreed_checkpoint(tmp_path, engine) == ckpt.checkpoint_dir(tmp_path, 4)
