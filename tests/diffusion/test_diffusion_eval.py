"""The diffusion kinds on the one evaluator: each item's noise is seeded by its index among all
items (sharded and single-process evaluations give the same images), the row layout, the
checkpoint evaluator (no optimizer, no engine) equal to the live one, and advantages estimated
over the rows of every rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpo.captions import LINE_HEIGHT, MARGIN
from mmpo.config import load_config
from mmpo.diffusion.evaluation import ImageEvaluator, item_noise
from mmpo.errors import ConfigError
from mmpo.evaluate import run_evaluation
from mmpo.trainers.diffusion_base import image_evaluator
from mmpo.trainers.noise import FindTrainer

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    f"task.prompts={ROOT / 'configs/prompts/shapes.jsonl'}",
    "task.sampling.height=16",
    "task.sampling.width=16",
    "task.sampling.num_steps=2",
    "task.sampling.eval_num_steps=2",
    "rollout.group_size=2",
    "rollout.prompts_per_step=2",
    "eval.num_samples=3",
    "eval.batch_size=3",
]


def _cfg(*extra: str):
    return load_config(ROOT / "configs" / "find.yaml", [*SMALL, *extra])


@pytest.fixture(scope="module")
def find(tmp_path_factory):
    trainer = FindTrainer(_cfg(), tmp_path_factory.mktemp("find"))
    trainer.tracker.close()
    with torch.no_grad():  # a policy away from N(0, I), so the Gaussians matter
        policy = trainer.engine.module
        policy.mu.copy_(torch.linspace(-1, 1, policy.mu.numel()).view_as(policy.mu))
        policy.sigma.mul_(0.5)
    return trainer


def _evaluator(trainer: FindTrainer, batch_size: int = 3) -> ImageEvaluator:
    ev = image_evaluator(trainer.cfg, trainer.task, trainer.image_sampler())
    ev.batch_size = batch_size
    return ev


def test_item_noise_depends_on_the_item_index_only():
    shape = (4, 2, 2)
    whole = item_noise(7, 0, 3, shape)
    assert whole.shape == (3, *shape)
    torch.testing.assert_close(item_noise(7, 1, 2, shape), whole[1:], rtol=0, atol=0)
    expected = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(item_noise(7, 2, 1, shape)[0], expected, rtol=0, atol=0)
    assert not torch.equal(whole[0], whole[1])


def test_sharded_evaluation_equals_one_process(find):
    """2 ranks (items [0, 1] and [2], each a batch of its own) give the rows of 1 rank (one batch of 3)."""
    ev = _evaluator(find)
    one = run_evaluation(ev, rank=0, world_size=1)
    rank1 = run_evaluation(ev, rank=1, world_size=2).rows  # its own rows (gather of one)
    two = run_evaluation(ev, rank=0, world_size=2, gather=lambda rows: [rows, rank1])
    assert [r["id"] for r in two.rows] == [r["id"] for r in one.rows] == ["eval-0", "eval-1", "eval-2"]
    for a, b in zip(one.rows, two.rows):
        torch.testing.assert_close(a["_image"], b["_image"], rtol=0, atol=1e-5)
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-5)
    assert two.metrics["reward"] == pytest.approx(one.metrics["reward"], abs=1e-5)
    # a batch of one item reproduces that item's row of the whole batch
    alone = ev.predict(ev.items()[1:2], 1)[0]
    torch.testing.assert_close(alone["_image"], one.rows[1]["_image"], rtol=0, atol=1e-5)
    # a different offset is different noise
    assert not torch.allclose(ev.predict(ev.items()[1:2], 0)[0]["_image"], alone["_image"], atol=1e-3)


def test_rows_metrics_and_artifacts(find, tmp_path):
    ev = _evaluator(find, batch_size=2)
    result = run_evaluation(ev)
    row = result.rows[1]
    assert row["id"] == "eval-1" and row["input"] == "a white square on the right"
    assert row["prediction"] == "images.png#1" and row["answer"] == {"box": [0.5, 0.0, 1.0, 1.0]}
    assert {"reward", "shape_at"} <= set(row) and row["_image"].shape == (3, 16, 16)
    assert set(result.metrics) == {"reward", "shape_at"}
    assert result.metrics["reward"] == pytest.approx(sum(r["reward"] for r in result.rows) / 3, abs=1e-7)
    state = torch.get_rng_state()
    ev.predict(ev.items(), 0)
    assert torch.equal(torch.get_rng_state(), state)  # evaluation leaves the global RNG alone
    from PIL import Image

    out = ev.write_artifacts(tmp_path, ev.items(), result.rows)
    # 3 images, 2 a row; each 16 px image upscaled x8 over 3 caption lines (the prompt twice, the reward)
    cell_h = 128 + 3 * LINE_HEIGHT + 2 * MARGIN
    assert Image.open(out["images"]).size == (2 * 128 + 3 * 2, 2 * cell_h + 3 * 2)


def test_checkpoint_evaluator_loads_no_engine_and_equals_the_live_policy(find, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import mmpo.engine

    def no_engine(*args, **kwargs):
        raise AssertionError("the checkpoint evaluator built a training engine")

    monkeypatch.setattr(mmpo.engine.Engine, "build", staticmethod(no_engine))
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    state = {k: v.detach().clone() for k, v in find.engine.module.state_dict().items()}
    save_file(state, str(model / "noise_policy.safetensors"))
    ev, label = FindTrainer.checkpoint_evaluator(_cfg(), str(tmp_path / "run"))
    assert label == str(model)
    loaded, live = run_evaluation(ev), run_evaluation(_evaluator(find))
    for a, b in zip(loaded.rows, live.rows):
        torch.testing.assert_close(a["_image"], b["_image"], rtol=0, atol=1e-6)
    assert loaded.metrics == pytest.approx(live.metrics, abs=1e-6)
    # untrained (no checkpoint): the model.path pipeline with N(0, I)
    base, label = FindTrainer.checkpoint_evaluator(_cfg(), None)
    assert label == "tiny:sd"
    assert not torch.allclose(run_evaluation(base).rows[0]["_image"], live.rows[0]["_image"], atol=1e-3)
    with pytest.raises(ConfigError, match="noise_policy.safetensors"):
        FindTrainer.checkpoint_evaluator(_cfg(), str(tmp_path))


def test_advantages_are_estimated_over_the_rows_of_every_rank(tmp_path, monkeypatch):
    """Rank 1 of 2 (simulated): its advantages are its slice of the estimator over both ranks'
    rows, each rank's groups kept apart; ``global_std``'s std is that of all rows."""
    trainer = FindTrainer(_cfg("task.baseline=group", "algorithm.advantage=global_std"), tmp_path)
    trainer.tracker.close()
    other_rows = [trainer.task.train_sample(i) for i in (0, 0, 1, 1)]
    mine_rows = [trainer.task.train_sample(i) for i in (2, 2, 3, 3)]
    other, mine = torch.tensor([0.0, 1.0, 5.0, 9.0]), torch.tensor([0.5, 0.7, 2.0, 2.0])
    groups = torch.tensor([0, 0, 1, 1])
    monkeypatch.setattr(trainer.engine, "rank", 1)
    monkeypatch.setattr(
        trainer.engine,
        "all_gather_object",
        lambda obj: [(other, groups, [s.meta["prompt"] for s in other_rows], {}), obj],
    )
    adv = trainer.advantages(mine, groups, [s.meta["prompt"] for s in mine_rows])
    everything = trainer.algo.advantages(torch.cat([other, mine]), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    torch.testing.assert_close(adv, everything[4:])
    alone = trainer.algo.advantages(mine, groups)
    assert not torch.allclose(adv, alone)  # this rank's rows alone have another std
