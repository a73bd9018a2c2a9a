"""The quickstart trained by 2 CPU processes (gloo) under DeepSpeed ZeRO-2 and ZeRO-3."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.dist import run_torchrun

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "helpers" / "train_and_dump.py"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_ranks_agree_after_training(stage, tmp_path):
    out, run = tmp_path / "params", tmp_path / "run"
    args = [
        SCRIPT, out, ROOT / "configs" / "quickstart.yaml", f"output_dir={run}",
        f"deepspeed={ROOT / 'configs' / 'deepspeed' / f'zero{stage}.json'}",
        "trainer.max_steps=3", "rollout.prompts_per_step=2", "rollout.group_size=4",
        "rollout.max_new_tokens=3", "eval.num_samples=8", "task.num_train=64",
    ]
    done = lambda: (out / "rank0.safetensors").exists() and (out / "rank1.safetensors").exists()
    run_torchrun(args, nproc=2, timeout=400, retries=1, done=done)
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and len(r0) > 10
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # it trained: the saved model differs from the initial tiny model, and 3 steps were logged
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2, 3]
    from mmpo.models import load_model

    init, _, _ = load_model("tiny:qwen2_vl", seed=0)
    init_sd = dict(init.named_parameters())
    assert any(not torch.equal(init_sd[k].detach().float(), r0[k]) for k in r0 if k in init_sd)
