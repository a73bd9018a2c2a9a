"""The token trainer's filters that change the batch: D3S after the advantage, CPPO pruning and LSPO
selection with ``refill`` (the draw loop of ``mmpo.trainers.token_draws``), checked on tensors and
on short real runs of configs/quickstart.yaml."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmpo.cli import main
from mmpo.config import load_config
from mmpo.core import GROUP_FILTERS
from mmpo.errors import ConfigError
from mmpo.rollout import filters
from mmpo.rollout.batch import RolloutBatch
from mmpo.rollout.prompt_samplers import PromptSampler
from mmpo.trainers.algorithm import build_algorithm
from mmpo.trainers.kinds import TOKEN

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def _batch(rewards: list[float], lengths: list[int], group_size: int, width: int = 4) -> RolloutBatch:
    """A rollout batch of len(rewards) rows in groups of ``group_size`` (placeholder samples)."""
    n = len(rewards)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return RolloutBatch(
        [f"s{i // group_size}" for i in range(n)],
        [{} for _ in range(n)],
        torch.arange(n * width).view(n, width),
        mask,
        torch.zeros(n, dtype=torch.bool),
        torch.tensor(rewards, dtype=torch.float32),
        torch.arange(n) // group_size,
    )


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _train(tmp_path: Path, name: str, *overrides: str) -> list[dict]:
    run = tmp_path / name
    common = [
        f"output_dir={run}",
        "trainer.max_steps=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=3",
        "eval.num_samples=8",
        "eval.batch_size=8",
        "trainer.eval_every=0",
        "task.num_train=64",
        "algorithm.dynamic_sampling=false",
        "algorithm.max_draws=6",
    ]
    assert main(["train", QUICK, *common, *overrides]) == 0
    return [line for line in _lines(run) if line["step"] > 0]


def _linear(p: float, start: float, end: float) -> float:
    return (1 - p) * start + p * end


# -- pure helpers ----------------------------------------------------------------------------------


def test_options_strip_refill_and_find_the_refill_entry():
    items = [{"name": "lspo", "low_pct": 20}, {"name": "cppo_prune", "prune_ratio": 0.5, "refill": True}]
    assert filters.refill_options(items, "cppo_prune") == {"prune_ratio": 0.5}
    assert filters.refill_options(items, "lspo") is None
    assert filters.refill_options([{"name": "lspo", "refill": False}], "lspo") is None


def test_shaped_rewards_add_the_soft_overlong_punishment():
    b = _batch([1.0, 1.0, 0.0], [2, 3, 4], group_size=3)
    items = [{"name": "soft_overlong_punishment", "cache_len": 2, "penalty": 1.0}]
    # max_len 4: no penalty up to 2 tokens, then -(len - 2) / 2
    assert torch.allclose(filters.shaped_rewards(b, items, 4), torch.tensor([1.0, 0.5, -1.0]))
    assert torch.equal(filters.shaped_rewards(b, [], 4), b.rewards)


def test_draw_keep_needs_dynamic_sampling_and_lspo_both():
    # 4 groups of 2: group 0 all-equal rewards (dynamic drops it); of the other three, mean lengths
    # 1, 2.5, 4: lspo's 30/70 percentiles of (1, 2.5, 4) are 1.9 and 3.1, so groups 1 and 3 pass
    b = _batch([1, 1, 0, 1, 0, 1, 1, 0], [4, 4, 1, 1, 2, 3, 4, 4], group_size=2)
    items = [{"name": "lspo", "refill": True}]
    keep = filters.draw_keep(b, items, dynamic_sampling=True)
    assert keep.tolist() == [False, False, True, True, False, False, True, True]
    # without dynamic sampling lspo sees all four groups (means 4, 1, 2.5, 4): P30 = 2.35, P70 = 4
    assert filters.draw_keep(b, items, dynamic_sampling=False).tolist() == [False, False, True, True] + [False] * 4
    # neither configured: everything is kept
    assert filters.draw_keep(b, [], dynamic_sampling=False).all()


def test_lspo_with_refill_is_left_to_the_draw_loop():
    b = _batch([1, 0, 1, 0, 1, 0], [1, 1, 2, 2, 4, 4], group_size=2)
    assert len(filters.before_advantage(b, [{"name": "lspo"}], 4)) == 4  # the middle group goes
    assert len(filters.before_advantage(b, [{"name": "lspo", "refill": True}], 4)) == 6


def test_batch_carries_entropy_old_and_draw_advantages():
    a, b = _batch([1, 0], [2, 3], 2), _batch([0, 1], [1, 1], 2)
    for part, shift in ((a, 0.0), (b, 10.0)):
        part.entropy_old = torch.arange(8, dtype=torch.float32).view(2, 4) + shift
        part.draw_advantages = torch.tensor([1.0, -1.0]) + shift
    both = RolloutBatch.concat([a, b], pad_token_id=0)
    assert torch.equal(both.draw_advantages, torch.tensor([1.0, -1.0, 11.0, 9.0]))
    picked = both.select([1, 2])
    assert torch.equal(picked.draw_advantages, torch.tensor([-1.0, 11.0]))
    # width trimmed to the last valid token of the picked rows (3), like the mask
    assert torch.equal(picked.entropy_old, torch.tensor([[4.0, 5.0, 6.0], [10.0, 11.0, 12.0]]))
    assert RolloutBatch.concat([a, _batch([1], [1], 1)], 0).entropy_old is None  # one part lacks it


# -- after the advantage: CPPO and D3S ---------------------------------------------------------------


def test_cppo_refill_restores_the_draw_advantages_and_prunes_an_unpruned_batch():
    b = _batch([1, 0, 0, 0], [1, 1, 1, 1], group_size=4)
    b.advantages = torch.tensor([0.1, 0.2, 0.3, 0.4])  # re-estimated on the kept rows
    items = [{"name": "cppo_prune", "prune_ratio": 0.5, "refill": True}]
    stats: dict[str, float] = {}
    fallback = filters.after_advantage(b.select([0, 1, 2, 3]), items, stats=stats)  # no draw advantages
    assert torch.equal(fallback.advantages, torch.tensor([0.3, 0.4])) and stats["rows_trained"] == 2.0
    b.draw_advantages = torch.tensor([1.5, -0.5, -0.5, -0.5])
    out = filters.after_advantage(b, items)
    assert len(out) == 4 and torch.equal(out.advantages, b.draw_advantages)


def test_d3s_after_advantage_matches_the_core_and_the_schedule():
    torch.manual_seed(0)
    b = _batch([1, 0, 1, 0, 0, 0, 1, 1], [4, 3, 2, 4, 1, 4, 4, 2], group_size=4)
    b.advantages = torch.tensor([1.0, -1.0, 0.8, -0.6, -0.3, -0.3, 0.9, 0.2])
    b.entropy_old = torch.rand(8, 4)
    items = [{"name": "d3s", "token_frac_init": 0.5}]
    stats: dict[str, float] = {}
    out = filters.after_advantage(b, items, progress=0.0, stats=stats)
    keep, tokens = GROUP_FILTERS.get("d3s")(b.advantages, b.entropy_old, b.mask, progress=0.0, token_frac_init=0.5)
    idx = torch.nonzero(keep).flatten()
    assert len(out) == 4 and out.samples == [b.samples[i] for i in idx.tolist()]
    assert torch.equal(out.mask, tokens[idx][:, : out.mask.shape[1]])
    m = int(b.mask[idx].sum())
    assert stats["d3s/sample_frac"] == 0.5 and stats["d3s/token_frac"] == round(0.5 * m) / m
    assert stats["rows_trained"] == 4.0
    # progress is clamped to [0, 1]: past the end is the final fractions (everything kept)
    late: dict[str, float] = {}
    out = filters.after_advantage(b, items, progress=3.0, stats=late)
    assert late["d3s/sample_frac"] == 1.0 and late["d3s/token_frac"] == 1.0 and torch.equal(out.mask, b.mask)


def test_d3s_without_entropies_is_an_error():
    b = _batch([1, 0], [2, 2], 2)
    b.advantages = torch.tensor([1.0, -1.0])
    with pytest.raises(ValueError, match="entropy_old"):
        filters.after_advantage(b, [{"name": "d3s"}])


# -- config checks ---------------------------------------------------------------------------------


def _build(*overrides: str):
    return build_algorithm(load_config(QUICK, list(overrides)), TOKEN)


def test_d3s_and_refill_are_accepted_at_load():
    algo = _build("algorithm.filters=[{name: d3s, sample_frac_init: 0.25}]")
    assert algo.config.filters[0]["name"] == "d3s"
    _build("algorithm.filters=[{name: cppo_prune, prune_ratio: 0.5, refill: true}, {name: lspo, refill: true}]")


@pytest.mark.parametrize(
    ("filters_value", "match"),
    [
        ("[{name: overlong_filter, refill: true}]", r"algorithm\.filters\[0\]\.refill=True.*'overlong_filter'"),
        ("[{name: lspo, refill: 1}]", r"algorithm\.filters\[0\]\.refill must be true or false, got 1"),
        ("[{name: d3s, progress: 0.5}]", r"progress"),
        ("[{name: d3s, bogus: 1}]", r"bogus"),
    ],
)
def test_bad_filter_options_are_refused(filters_value, match):
    with pytest.raises(ConfigError, match=match):
        _build(f"algorithm.filters={filters_value}")


def test_cppo_refill_refuses_a_stateful_advantage_and_kl_in_the_reward():
    cppo = "algorithm.filters=[{name: cppo_prune, prune_ratio: 0.5, refill: true}]"
    with pytest.raises(ConfigError, match=r"refill=True with algorithm.advantage='rank_ema'"):
        _build(cppo, "algorithm.advantage=rank_ema")
    with pytest.raises(ConfigError, match="kl_placement='reward'"):
        _build(cppo, "algorithm.kl_placement=reward", "algorithm.kl_options={beta: 0.01}")
    _build(cppo, "algorithm.kl_options={beta: 0.01}")  # KL in the loss is fine


# -- real runs -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_d3s_trains_the_scheduled_rows_and_tokens(tmp_path):
    lines = _train(tmp_path, "d3s", "rollout.prompts_per_step=2", "algorithm.filters=[{name: d3s}]")
    assert len(lines) == 2
    n = 8
    for line in lines:
        p = (line["step"] - 1) / 2  # progress of the step that wrote the line
        rows = max(1, round(_linear(p, 0.5, 1.0) * n))
        assert line["rows_trained"] == rows and line["d3s/sample_frac"] == rows / n
        kept = line["response_length"] * rows  # tokens trained (the batch's mask after D3S)
        valid = kept / line["d3s/token_frac"]  # valid tokens of the kept rows
        assert abs(valid - round(valid)) < 1e-4 and 0 < round(valid) <= 3 * rows
        assert round(kept) == max(1, round(_linear(p, 0.2, 1.0) * round(valid)))
    assert lines[0]["d3s/token_frac"] < 0.5 < lines[1]["d3s/token_frac"]


@pytest.mark.slow
def test_cppo_refill_trains_a_full_batch(tmp_path):
    cppo = "{name: cppo_prune, prune_ratio: 0.5}"
    plain = _train(tmp_path, "plain", "rollout.prompts_per_step=2", f"algorithm.filters=[{cppo}]")
    full = _train(tmp_path, "full", "rollout.prompts_per_step=2", f"algorithm.filters=[{cppo[:-1]}, refill: true}}]")
    for a, b in zip(plain, full):
        assert a["draws"] == 1.0 and a["rows_trained"] == 4.0  # half of each group pruned away
        assert b["draws"] == 2.0 and b["rows_trained"] == 8.0  # twice the prompts, pruned to the full 2 x 4


@pytest.mark.slow
def test_lspo_refill_draws_again_for_dropped_groups(tmp_path):
    lspo = "algorithm.filters=[{name: lspo, refill: true}]"
    once = _train(tmp_path, "once", "rollout.prompts_per_step=4", "algorithm.filters=[{name: lspo}]")
    again = _train(tmp_path, "again", "rollout.prompts_per_step=4", lspo)
    assert all(line["draws"] == 1.0 for line in once)
    for line in again:
        # 30/70 percentiles of 4 group means never keep the middle two groups: one draw is never enough
        assert line["draws"] >= 2.0
        # the batch is full (16 rows of 4 x 4) unless max_draws ran out first
        assert math.isclose(line["groups_kept_frac"] * line["draws"], 1.0) or line["draws"] == 6.0


@pytest.mark.slow
def test_refill_on_another_filter_is_refused_at_load(tmp_path, capsys):
    run = tmp_path / "refused"
    argv = ["train", QUICK, f"output_dir={run}", "algorithm.filters=[{name: overlong_filter, refill: true}]"]
    assert main(argv) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "algorithm.filters[0].refill=True: refill is an option of lspo and cppo_prune only" in err
    assert not (run / "metrics.jsonl").exists()


class _ObservingSampler(PromptSampler):
    """The uniform sampler, recording what the draw loop reports to it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list[int], torch.Tensor]] = []

    def observe(self, indices: list[int], rewards: torch.Tensor) -> None:
        self.calls.append((list(indices), rewards.clone()))
        super().observe(indices, rewards)


@pytest.mark.slow
def test_every_draw_reports_its_prompts_and_rewards_to_the_sampler(tmp_path):
    from mmpo.trainers import trainer_class_for
    from mmpo.trainers.token import StepClock

    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "task.num_train=64",
        "trainer.eval_every=0",
        "algorithm.dynamic_sampling=false",
        "algorithm.filters=[{name: lspo, refill: true}]",
    ]
    cfg = load_config(QUICK, overrides)
    trainer = trainer_class_for(cfg.task.name)(cfg, tmp_path / "run")
    trainer.sampler = _ObservingSampler(64, seed=0)
    batch, stats = trainer.rollout(StepClock())
    calls = trainer.sampler.calls
    assert len(calls) == stats["draws"] >= 2
    indices = [i for idx, _ in calls for i in idx]
    assert len(indices) == 4 * len(calls) == len(set(indices))  # each draw its own 4 prompts
    assert all(r.shape == (4, 4) for _, r in calls)
    assert math.isclose(float(torch.cat([r.flatten() for _, r in calls]).mean()), stats["reward_mean"], abs_tol=1e-6)
    # the kept rows are rows of the reported prompts
    assert {s.id for s in batch.samples} <= {trainer.task.train_sample(i).id for i in indices}
    trainer.close()
