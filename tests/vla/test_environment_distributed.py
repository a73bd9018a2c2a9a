"""The environment kind under 2 CPU processes (gloo) with DeepSpeed ZeRO-2: the BabyAI RIPT recipe,
each rank running its own environments on its share of the contexts, with a step in which one
rank keeps no context (it updates on a stand-in episode with weight 0); the ranks end with equal
weights, training moved them, the skip state holds both ranks' contexts, and a resumed run
continues on both ranks.

How one rank is left without a context, deterministically: 1-step episodes on 2 training seeds,
one context per rank per step (``prompts_per_step=1``, ``max_draws=1``), so the sharded sampler
gives one rank seed 36 and the other seed 37 at every step. In seed 37 no single action reaches
the red ball: its 8 rollouts all fail, the group is discarded (dynamic sampling) and that rank
keeps nothing. In seed 36 'forward' succeeds: the near-uniform tiny policy (sampling among the 3
action tokens only) gives 8 mixed rollouts, so the other rank keeps its context and trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("minigrid")
pytest.importorskip("deepspeed")

from helpers.dist import train_two_ranks_and_compare

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = [
    f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}",
    "task.sft.demos=''",
    "task.env.max_steps=1",
    "task.train_seeds.start=36",
    "task.train_seeds.count=2",
    "task.policy.action_vocab=actions",
    "rollout.group_size=8",
    "rollout.prompts_per_step=1",
    "task.ript.max_draws=1",
    # 2 optimizer steps of 4 episodes, 2 micro batches each: the empty rank runs 4 padding slots
    "trainer.update_epochs=1",
    "trainer.minibatch_size=4",
    "trainer.micro_batch_size=2",
    "eval.num_samples=3",
    "eval.batch_size=2",
    "task.eval_videos=0",  # 2 held-out seeds on rank 0, 1 on rank 1
    "trainer.eval_every=1",
    "trainer.save_every=1",
    "trainer.keep_last=0",
]


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_one_without_a_context_agree_and_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = ROOT / "configs" / "ript_vla_babyai.yaml"
    overrides = [f"output_dir={run}", *OVERRIDES]
    r0 = train_two_ranks_and_compare(tmp_path / "params", config, [*overrides, "trainer.max_steps=2"])
    lines = _lines(run)
    assert [line["step"] for line in lines] == [0, 1, 2]
    for line in lines[1:]:
        # per-rank counts averaged over the 2 ranks: one rank kept its context, the other discarded its own
        assert line["rollout/contexts_drawn"] == 1.0 and line["rollout/contexts_run"] == 1.0
        assert line["rollout/contexts_kept"] == 0.5 and line["rollout/discarded_all_equal"] == 0.5
        assert line["rollout/episode_length"] == 1.0
        assert line["optimizer_steps"] == 2.0 and line["skipped_updates"] == 0.0  # both ranks stepped twice
        assert line["train_units"] == 4.0  # 8 one-token episodes on one rank, none on the other
        assert "pg_loss" in line and "reward" in line
    for line in lines:
        assert line["eval/episodes"] == 3.0
    # the skip state holds both ranks' contexts; each rank's sampler position is kept
    state = json.loads((run / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert set(state["states"]["ript_skip"]["stats"]) == {"36", "37"}
    assert all(len(v) == 16 for v in state["states"]["ript_skip"]["stats"].values())  # 2 steps x 8 rollouts
    samplers = state["rank_samplers"]
    assert len(samplers) == 2 and samplers[0] == state["sampler"] and samplers[0] != samplers[1]

    # training moved the weights: the layers differ from the initial tiny model's
    from mmpo.models import load_model

    init, _, _ = load_model("tiny:qwen2_vl", seed=0, tiny_overrides={"initializer_range": 0.1, "head_init_std": 0.01})
    init_sd = {k: v.detach().float() for k, v in init.named_parameters()}
    same_shape = [k for k in r0 if k in init_sd and init_sd[k].shape == r0[k].shape]
    assert len(same_shape) > 10 and any(not torch.equal(init_sd[k], r0[k]) for k in same_shape)

    # resumed on 2 ranks: one more step, the ranks still agree, the contexts are still split
    train_two_ranks_and_compare(tmp_path / "params3", config, [*overrides, "trainer.max_steps=3"])
    lines = _lines(run)
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    assert lines[3]["rollout/contexts_kept"] == 0.5 and lines[3]["rollout/discarded_all_equal"] == 0.5
    assert lines[3]["optimizer_steps"] == 2.0
    state = json.loads((run / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert all(len(v) == 24 for v in state["states"]["ript_skip"]["stats"].values())
