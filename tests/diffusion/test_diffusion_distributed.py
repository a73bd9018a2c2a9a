"""The diffusion kinds trained by 2 CPU processes (gloo) under DeepSpeed: Flow-GRPO under ZeRO-3
(ranks agree, and the saved pipeline holds the gathered, not the partitioned and empty, denoiser
weights) and under ZeRO-2 (ranks agree in weights and in the advantage estimator's state, which
every rank computes from the rewards of all ranks); FIND under ZeRO-2 (ranks agree in the noise
policy, in the value net each rank fits on every rank's rewards, and in the state), and its
sharded evaluation during training equals ``mmpo eval`` in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.dist import run_torchrun, train_two_ranks_and_compare
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "diffusion_two_ranks.py"
ZERO2 = f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes name their prompt files relative to the repository


def _two_ranks(out: Path, recipe: str, overrides: list[str], extra: tuple[str, ...] = ()) -> tuple[dict, list[dict]]:
    """Train ``recipe`` on 2 ranks with diffusion_two_ranks.py; check that both ranks end with equal
    parameters and state (and ``extra`` dumps, ``<name>_rank{R}.safetensors``); return rank 0's
    parameters and the two ranks' states."""
    dumps = [[out / f"{prefix}rank{r}.safetensors" for r in (0, 1)] for prefix in ("", *(f"{e}_" for e in extra))]
    files = [f for pair in dumps for f in pair] + [out / f"state_rank{r}.json" for r in (0, 1)]
    run_torchrun(
        [SCRIPT, out, ROOT / "configs" / f"{recipe}.yaml", *overrides],
        nproc=2,
        timeout=400,
        retries=1,
        done=lambda: all(f.exists() for f in files),
    )
    for pair in dumps:
        a, b = (load_file(str(f)) for f in pair)
        assert a.keys() == b.keys() and a, pair[0].name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{pair[0].name}: {k}"
    states = [json.loads((out / f"state_rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0] == states[1]
    return load_file(str(out / "rank0.safetensors")), states


@pytest.mark.slow
@pytest.mark.distributed
def test_flow_grpo_under_zero3_ranks_agree_and_the_saved_pipeline_is_whole(tmp_path):
    from diffusers import DiffusionPipeline

    run = tmp_path / "run"
    r0 = train_two_ranks_and_compare(
        tmp_path / "params",
        ROOT / "configs" / "flow_grpo.yaml",
        [
            f"output_dir={run}",
            f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}",
            "trainer.max_steps=2",
            "rollout.prompts_per_step=2",
            "rollout.group_size=4",
            "task.sampling.num_steps=3",
            "task.sampling.eval_num_steps=3",
            "eval.num_samples=2",
            "trainer.eval_every=0",
        ],
    )
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2]
    saved = DiffusionPipeline.from_pretrained(str(run / "model"), local_files_only=True).transformer.state_dict()
    for k, v in r0.items():
        torch.testing.assert_close(saved[k].float(), v, rtol=0, atol=0)
    # it trained: the weights moved from the tiny model's
    from mmpo.diffusion.pipeline import DiffusionModel

    init = dict(DiffusionModel.load("tiny:sd3").denoiser.named_parameters())
    assert any(not torch.equal(init[k].detach().float(), v) for k, v in r0.items())


@pytest.mark.slow
@pytest.mark.distributed
def test_flow_grpo_under_zero2_ranks_agree_in_weights_and_advantage_state(tmp_path):
    """``dcpo_sas`` keeps per-prompt reward statistics: estimated on every rank's groups, both ranks
    hold the statistics of all 2 steps x 2 ranks x 2 prompts."""
    run = tmp_path / "run"
    weights, states = _two_ranks(
        tmp_path / "dump",
        "flow_grpo",
        [
            f"output_dir={run}",
            ZERO2,
            "trainer.max_steps=2",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "task.sampling.num_steps=2",
            "task.sampling.eval_num_steps=2",
            "task.sampling.height=16",
            "task.sampling.width=16",
            "eval.num_samples=2",
            "trainer.eval_every=0",
            "algorithm.advantage=dcpo_sas",
        ],
    )
    assert states[0]["step"] == 2
    stats = states[0]["states"]["advantage"]["stats"]
    assert sum(s["visits"] for s in stats.values()) == 2 * 2 * 2  # groups: steps x ranks x prompts
    assert sum(s["n"] for s in stats.values()) == 2 * 2 * 2 * 2  # images: groups x G
    from mmpo.diffusion.pipeline import DiffusionModel

    init = dict(DiffusionModel.load("tiny:sd3").denoiser.named_parameters())
    assert weights.keys() == init.keys()
    assert any(not torch.equal(init[k].detach().float(), v) for k, v in weights.items())  # it trained
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2] and "eval/reward" in lines[-1]


@pytest.mark.slow
@pytest.mark.distributed
def test_find_under_zero2_ranks_agree_in_policy_value_net_and_evaluation(tmp_path):
    from mmpo.cli import main

    run = tmp_path / "run"
    small = [
        "task.sampling.num_steps=2",
        "task.sampling.eval_num_steps=2",
        "task.sampling.height=16",
        "task.sampling.width=16",
        "eval.num_samples=3",
        "eval.batch_size=3",
    ]
    weights, states = _two_ranks(
        tmp_path / "dump",
        "find",
        [
            f"output_dir={run}",
            ZERO2,
            "trainer.max_steps=2",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "trainer.eval_every=0",
            *small,
        ],
        extra=("value",),
    )
    assert set(weights) == {"mu", "sigma"}
    assert (weights["mu"] != 0).any() and (weights["sigma"] != 1).any()  # it trained
    assert states[0]["step"] == 2
    value = load_file(str(tmp_path / "dump" / "value_rank0.safetensors"))
    assert any(k.startswith("opt.") for k in value)  # the value net was fitted (same Adam state on both ranks)
    # the final evaluation, sharded over the 2 ranks (items [0, 1] and [2]), equals one process's (one batch of 3)
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2]
    assert (
        main(
            [
                "eval",
                str(ROOT / "configs" / "find.yaml"),
                f"output_dir={tmp_path / 'eval'}",
                *small,
                f"checkpoint={run}",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "eval" / "eval" / "metrics.json").read_text())
    assert metrics["reward"] == pytest.approx(lines[-1]["eval/reward"], abs=1e-5)
