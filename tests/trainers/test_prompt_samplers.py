"""PROMPT_SAMPLERS (mmpo.rollout.prompt_samplers): ``uniform`` draws what PromptSampler always
drew, ``vade`` (VADE, arXiv 2511.18902) prefers samples whose rollouts are likely to disagree,
resumes exactly from its JSON state, refuses bad options at config load; the trainers report
rewards back (draw_prompts keeps the indices of replaced rows right) and checkpoint every
rank's state; a diffusion run with ``rollout.prompt_sampler=vade`` resumes identically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mmpo.cli import main
from mmpo.config import load_config
from mmpo.data import PromptSampler as DataPromptSampler
from mmpo.errors import ConfigError, DataError
from mmpo.media_check import draw_prompts
from mmpo.rollout.prompt_samplers import (
    PROMPT_SAMPLERS,
    PromptSampler,
    VadeSampler,
    build_prompt_sampler,
    resume_sampler,
    sampler_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
KW = {"seed": 0, "rank": 0, "world_size": 1, "group_size": 4}


def _vade(n: int, seed: int = 0, **options: Any) -> VadeSampler:
    sampler = build_prompt_sampler("vade", options, n, **{**KW, "seed": seed})
    assert isinstance(sampler, VadeSampler)
    return sampler


def _rewards(*groups: list[float]) -> torch.Tensor:
    return torch.tensor(groups, dtype=torch.float32)


# -- uniform --------------------------------------------------------------------------------------
def test_uniform_draws_the_same_indices_as_before() -> None:
    """Hand-recorded from the PromptSampler that mmpo.data held before the registry existed."""
    assert DataPromptSampler is PromptSampler
    s = build_prompt_sampler("uniform", {}, 5, **{**KW, "seed": 7})
    assert isinstance(s, PromptSampler)
    assert [s.next(3) for _ in range(4)] == [[0, 1, 3], [2, 4, 3], [1, 2, 4], [0, 0, 1]]
    assert s.state_dict() == {"epoch": 2, "pos": 2}
    ranks = [build_prompt_sampler("uniform", {}, 7, seed=2, rank=k, world_size=2, group_size=4) for k in range(2)]
    assert [r.next(5) for r in ranks] == [[2, 3, 6, 5, 5], [4, 0, 1, 3, 6]]
    assert [r.state_dict() for r in ranks] == [{"epoch": 1, "pos": 1}, {"epoch": 1, "pos": 4}]
    ordered = build_prompt_sampler("uniform", {"shuffle": False}, 3, **KW)
    assert ordered.next(4) == [0, 1, 2, 0]


def test_uniform_reports_its_draws_and_ignores_rewards() -> None:
    s = PromptSampler(6, seed=1)
    s.begin_step(0)
    a, b = s.next(2), s.next(1)
    assert s.last_indices == a + b
    before = s.state_dict()
    s.observe(s.last_indices, _rewards([1, 0], [0, 0], [1, 1]))
    assert s.last_indices == [] and s.state_dict() == before


# -- vade: selection ------------------------------------------------------------------------------
def test_vade_prefers_prior_uncertain_and_mixed_samples_without_repeats_in_a_step() -> None:
    s = _vade(6, thompson=False)
    s.begin_step(0)
    assert s.next(6) == [0, 1, 2, 3, 4, 5]  # all at the prior (score 0.25): ties by index
    # samples 0, 1 always solved, 2, 3 three times of 4, 4 half the time; 5 not rolled out
    s.observe([0, 1, 2, 3, 4], _rewards([1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 1, 1], [1, 0, 1, 0]))
    s.begin_step(1)
    # decayed one step (gamma_s 0.99): 4 keeps mean 1/2 (score 0.25) as the prior 5 does; 2, 3 near
    # (4, 2): ~2/9; 0, 1 near (5, 1): ~5/36
    assert s.next(2) == [4, 5]
    assert s.next(2) == [2, 3]  # not twice in a step
    assert s.next(3) == [0, 1, 4]  # every candidate taken: all available again
    assert s.last_indices == [4, 5, 2, 3, 0, 1, 4]


def test_vade_thompson_draws_favour_the_uncertain_sample() -> None:
    s = _vade(3, seed=5, gamma_s=1.0)  # no slow decay: the evidence keeps its weight for the 300 steps
    s.observe([0, 1, 2], _rewards([1] * 4, [0] * 4, [1, 0, 1, 0]))
    s.observe([0, 1, 2], _rewards([1] * 4, [0] * 4, [0, 1, 0, 1]))
    counts = [0, 0, 0]
    for step in range(1, 301):
        s.begin_step(step)
        counts[s.next(1)[0]] += 1
    assert counts[2] > 200 and counts[0] + counts[1] > 0  # mostly the mixed one, the others still explored


def test_vade_nondegenerate_score_and_a_candidate_pool() -> None:
    s = _vade(8, score="nondegenerate", thompson=False, pool=3)
    s.observe([0, 1, 2, 3, 4, 5, 6], _rewards(*([[1, 1, 1, 1]] * 7)))
    s.begin_step(1)
    draws = [s.next(2) for _ in range(3)]
    assert all(len(d) == 2 for d in draws)
    flat = [i for d in draws for i in d]
    assert len(set(flat)) == 6  # no repeat inside the step
    # a pool of 3 random candidates from 8: the unvisited 7 wins whenever it is in the pool
    assert 7 in flat
    # a pool smaller than the draw grows to it: the whole shard in one call
    t = _vade(5, pool=2, thompson=False)
    assert sorted(t.next(5)) == [0, 1, 2, 3, 4]


def test_vade_shards_by_rank() -> None:
    parts = [build_prompt_sampler("vade", {}, 10, seed=3, rank=k, world_size=3, group_size=2) for k in range(3)]
    draws = [p.next(3) for p in parts]
    for k, d in enumerate(draws):
        assert all(i % 3 == k for i in d)
    assert len({i for d in draws for i in d}) == 9  # disjoint shards {0,3,6,9}, {1,4,7}, {2,5,8}
    tiny = build_prompt_sampler("vade", {}, 2, seed=3, rank=3, world_size=4, group_size=2)
    assert sorted(tiny.next(2)) == [0, 1]  # fewer samples than ranks: every sample


# -- vade: rewards ----------------------------------------------------------------------------------
def test_vade_maps_rewards_to_successes() -> None:
    s = _vade(3, gamma_f=1.0, reward_min=-1.0, reward_max=3.0)
    # (r + 1) / 4 clamped to [0, 1]: 1 -> 0.5, 3 -> 1, -1 -> 0, 7 -> 1; NaN is not counted
    s.observe([0, 1], _rewards([1, 3, -1, 7], [float("nan"), -5, 1, 1]))
    p = s.posteriors
    assert (float(p.a[0]), float(p.b[0])) == (1 + 2.5, 1 + 1.5)
    assert (float(p.a[1]), float(p.b[1])) == (1 + 1.0, 1 + 2.0)  # G = 3 finite rewards
    with pytest.raises(ValueError, match="rewards"):
        s.observe([0, 1], _rewards([1, 1, 1, 1]))


def test_vade_decays_with_the_steps_the_loop_reports() -> None:
    s = _vade(1, gamma_f=0.5, gamma_s=0.5)
    s.begin_step(3)
    s.observe([0], _rewards([1, 1, 1, 1, 1, 1, 0, 0]))
    s.begin_step(5)
    s.observe([0], _rewards([1, 1, 0, 0, 0, 0, 0, 0]))
    assert (float(s.posteriors.a[0]), float(s.posteriors.b[0])) == (3.75, 7.25)  # as in tests/core/test_vade.py


# -- vade: state ----------------------------------------------------------------------------------
def test_vade_reloaded_from_json_continues_with_identical_indices() -> None:
    a = _vade(20, seed=11, pool=6)
    for step in range(3):
        a.begin_step(step)
        idx = a.next(4)
        a.observe(idx, torch.rand(4, 4, generator=torch.Generator().manual_seed(step)).round())
    a.next(2)  # mid-step: the taken ones stay taken
    state = json.loads(json.dumps(a.state_dict()))
    b = _vade(20, seed=999, pool=6)  # another seed: everything comes from the state
    b.load_state_dict(state)
    assert b.next(3) == a.next(3)
    for step in range(3, 6):
        a.begin_step(step)
        b.begin_step(step)
        ia, ib = a.next(4), b.next(4)
        assert ia == ib
        r = torch.rand(4, 4, generator=torch.Generator().manual_seed(step)).round()
        a.observe(ia, r)
        b.observe(ib, r)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ConfigError, match="20 samples"):
        _vade(21).load_state_dict(state)
    with pytest.raises(ConfigError, match="not a vade sampler"):
        _vade(20).load_state_dict({"epoch": 0, "pos": 3})


def test_each_rank_resumes_its_own_state_and_other_world_sizes_merge_posteriors() -> None:
    ranks = [build_prompt_sampler("vade", {}, 6, seed=1, rank=k, world_size=2, group_size=2) for k in range(2)]
    for step, r in enumerate([_rewards([1, 0], [1, 1]), _rewards([0, 0], [1, 0])]):
        for s in ranks:
            s.begin_step(step)
            s.observe(s.next(2), r)
    states = [json.loads(json.dumps(s.state_dict())) for s in ranks]
    trainer_state = sampler_checkpoint(ranks[0], states)
    assert trainer_state["sampler"] == states[0] and trainer_state["rank_samplers"] == states
    fresh = build_prompt_sampler("vade", {}, 6, seed=1, rank=1, world_size=2, group_size=2)
    resume_sampler(fresh, trainer_state, rank=1, world_size=2)
    assert fresh.state_dict() == states[1]
    one = build_prompt_sampler("vade", {}, 6, seed=1, rank=0, world_size=1, group_size=2)
    resume_sampler(one, trainer_state, rank=0, world_size=1)  # one process now: rank 0's, every posterior
    seen = sorted(i for s in states for i in s["posteriors"]["index"])
    assert one.posteriors.state_dict()["index"] == seen and len(set(seen)) == len(seen) >= 4  # disjoint shards
    for s in states:
        for i, a in zip(s["posteriors"]["index"], s["posteriors"]["a"]):
            assert float(one.posteriors.a[i]) == a
    single = sampler_checkpoint(one, None)
    assert "rank_samplers" not in single  # one process: the checkpoint holds the one state


# -- config -----------------------------------------------------------------------------------------
def _load(*overrides: str) -> Any:
    return load_config(ROOT / "configs" / "diffusion_demo.yaml", list(overrides))


def test_config_selects_a_sampler_and_refuses_bad_options_at_load() -> None:
    cfg = _load("rollout.prompt_sampler=vade", "rollout.prompt_sampler_options={gamma_s: 0.5, pool: 4}")
    assert cfg.rollout.prompt_sampler == "vade" and cfg.rollout.prompt_sampler_options == {"gamma_s": 0.5, "pool": 4}
    assert _load().rollout.prompt_sampler == "uniform"
    with pytest.raises(ConfigError, match=r"unknown option 'rollout.prompt_sampler_options.gama_f'.*gamma_f"):
        _load("rollout.prompt_sampler=vade", "rollout.prompt_sampler_options={gama_f: 0.5}")
    with pytest.raises(ConfigError, match=r"rollout.prompt_sampler_options.gamma_f=1.5"):
        _load("rollout.prompt_sampler=vade", "rollout.prompt_sampler_options={gamma_f: 1.5}")
    with pytest.raises(ConfigError, match=r"rollout.prompt_sampler_options.score='entropy'"):
        _load("rollout.prompt_sampler=vade", "rollout.prompt_sampler_options={score: entropy}")
    with pytest.raises(ConfigError, match=r"unknown option 'rollout.prompt_sampler_options.seed'"):
        _load("rollout.prompt_sampler=vade", "rollout.prompt_sampler_options={seed: 3}")  # the trainer's
    with pytest.raises(ConfigError, match=r"unknown option 'rollout.prompt_sampler_options.gamma_f'.*'uniform'"):
        _load("rollout.prompt_sampler_options={gamma_f: 0.5}")
    with pytest.raises(ConfigError, match=r"rollout.prompt_sampler.*'vada'.*vade"):
        _load("rollout.prompt_sampler=vada")
    assert set(PROMPT_SAMPLERS.names()) >= {"uniform", "vade"}


# -- draw_prompts: a replaced row ------------------------------------------------------------------
class _Task:
    """Training samples 0..n-1; ``bad`` ones fail to build (a vanished image)."""

    skip_bad_rows = True

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad

    def train_sample(self, i: int) -> str:
        if i in self.bad:
            raise DataError(f"sample {i}: image missing")
        return f"s{i}"


def test_draw_prompts_reports_the_replacement_not_the_bad_row(capsys: pytest.CaptureFixture[str]) -> None:
    sampler = PromptSampler(6, shuffle=False)
    samples, dropped = draw_prompts(_Task({1}), sampler, 3)
    assert samples == ["s0", "s2", "s3"] and dropped == 1
    assert sampler.last_indices == [0, 2, 3]
    sampler.observe(sampler.last_indices, _rewards([1, 0], [1, 0], [1, 0]))
    vade = _vade(6, thompson=False)
    samples, dropped = draw_prompts(_Task({0}), vade, 2)
    assert samples == ["s1", "s2"] and dropped == 1 and vade.last_indices == [1, 2]
    assert "sample 0" in capsys.readouterr().err


# -- a run ------------------------------------------------------------------------------------------
SMALL_DIFFUSION = [
    "task.sampling.num_steps=4",
    "task.sampling.eval_num_steps=4",
    "task.chunks.sizes=[2,2]",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "eval.num_samples=2",
    "eval.batch_size=2",
    "trainer.eval_at_start=false",
    "trainer.save_every=1",
    "trainer.keep_last=0",
    "rollout.prompt_sampler=vade",
]


def _train(run: Path, steps: int) -> None:
    argv = ["train", "configs/diffusion_demo.yaml", f"output_dir={run}", *SMALL_DIFFUSION, f"trainer.max_steps={steps}"]
    assert main(argv) == 0


def _state(run: Path, step: int) -> dict[str, Any]:
    return json.loads((run / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())


@pytest.mark.slow
def test_diffusion_run_with_vade_checkpoints_posteriors_and_resumes_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the recipe names its prompt files relative to the repository
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(straight, 2)
    _train(split, 1)
    _train(split, 2)  # resumes from step 1
    s1, s2 = _state(straight, 1)["sampler"], _state(straight, 2)["sampler"]
    post = s2["posteriors"]
    assert s2["step"] == 1 and post["size"] == 4  # the recipe's 4 prompts
    assert set(post["t"]) <= {0, 1} and 1 in post["t"] and post["index"]
    # 2 prompts x G=2 colour rewards in [0, 1] per step: each observed sample holds its evidence
    for a, b in zip(post["a"], post["b"]):  # prior 2 + G=2 rewards, or an older 2 decayed by 0.99 (step) x 0.9
        assert a >= 1.0 and b >= 1.0
        assert any(math.isclose(a + b, v) for v in (4.0, 4.0 + 2 * 0.99 * 0.9))
    assert s1["posteriors"]["t"] and set(s1["posteriors"]["t"]) == {0}
    assert _state(split, 2) == _state(straight, 2)  # posteriors, generator and step counters
    wa = load_file(str(straight / "checkpoints" / "step_00000002" / "engine" / "model.safetensors"))
    wb = load_file(str(split / "checkpoints" / "step_00000002" / "engine" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_environment_run_reports_every_context_it_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gymnasium")
    monkeypatch.chdir(ROOT)
    run = tmp_path / "env"
    argv = [
        "train",
        "configs/ript_vla_continuous.yaml",
        f"output_dir={run}",
        "task.env.max_steps=4",
        "rollout.group_size=2",
        "rollout.prompts_per_step=2",
        "task.ript.reward=env_return",
        "task.policy.head_width=32",
        "trainer.update_epochs=1",
        "eval.num_samples=2",
        "eval.batch_size=2",
        "trainer.eval_at_start=false",
        "trainer.max_steps=2",
        "rollout.prompt_sampler=vade",
        "rollout.prompt_sampler_options={reward_min: -70, reward_max: 0}",  # 4 Pendulum steps: >= -65.1
    ]
    assert main(argv) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"reward"' in line]
    post = _state(run, 2)["sampler"]["posteriors"]
    assert len(lines) == 2 and sum(line["rollout/contexts_run"] for line in lines) == 4 == len(post["index"])
    assert all(a + b == pytest.approx(4.0) for a, b in zip(post["a"], post["b"]))  # prior 2 + K=2 episodes each
    # successes: each episode's return mapped by (r + 70) / 70; every context kept (continuous returns)
    expected = sum(4 * (line["reward"] + 70) / 70 for line in lines)
    assert sum(a - 1 for a in post["a"]) == pytest.approx(expected, abs=1e-4)
