"""The environment kind's evaluator (``mmpo.rollout.env_eval``) on real BabyAI with a sampling
policy: rows in the one evaluator's layout, each episode seeded by its held-out index (so a sharded
evaluation is the one-process evaluation, whatever the batch size), the metrics and the GIFs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("minigrid")

from mmpo.evaluate import run_evaluation, write_evaluation
from mmpo.rollout.env_config import EnvTaskConfig
from mmpo.rollout.env_eval import EnvEvaluator, action_text
from mmpo.rollout.env_runner import ActionBatch, EnvRunner, EnvSpec

BABYAI = EnvSpec(id="BabyAI-GoToRedBallNoDists-v0", observation="minigrid_partial", tile_size=8, max_steps=5)
SEEDS = list(range(100_000, 100_007))


class Codec:
    names = ["left", "right", "forward"]
    env_actions = [0, 1, 2]


class SamplingPolicy:
    """Samples one of 3 actions from the generator; a sampled 0 is invalid (None) 30% of the time."""

    codec = Codec()

    def act(self, observations, *, generator, greedy=False):
        a = torch.randint(0, 3, (len(observations), 1), generator=generator)
        actions = [None if int(x) == 0 and torch.rand(1, generator=generator) < 0.3 else int(x) for x in a[:, 0]]
        logp = torch.full((len(observations), 1), -float(np.log(3)))
        return ActionBatch(actions, a, logp, torch.ones_like(a, dtype=torch.bool), [None] * len(observations))


def _evaluator(batch_size: int, videos: int = 0) -> EnvEvaluator:
    return EnvEvaluator(
        SamplingPolicy(), EnvRunner(BABYAI), SEEDS, EnvTaskConfig(env=BABYAI), batch_size=batch_size, videos=videos
    )


def _written(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def test_a_sharded_evaluation_runs_the_episodes_of_one_process() -> None:
    one = run_evaluation(_evaluator(batch_size=7))
    assert [r["id"] for r in one.rows] == [f"seed{s}" for s in SEEDS]
    for world, batch_size in ((2, 7), (3, 2), (4, 1)):
        parts = [run_evaluation(_evaluator(batch_size), rank=r, world_size=world).rows for r in range(world)]
        gathered = run_evaluation(_evaluator(batch_size), rank=0, world_size=world, gather=lambda _: parts)
        assert _written(gathered.rows) == _written(one.rows), (world, batch_size)
        assert gathered.metrics == one.metrics
    # the episodes differ from seed to seed and are sampled (not all the same actions)
    assert len({r["prediction"] for r in one.rows}) > 1


def test_rows_metrics_and_videos(tmp_path: Path) -> None:
    ev = _evaluator(batch_size=3, videos=2)
    result = run_evaluation(ev)
    rows = result.rows
    for r, s in zip(rows, SEEDS):
        assert r["id"] == f"seed{s}" and r["answer"] is None
        assert r["input"] == f"go to the red ball (BabyAI-GoToRedBallNoDists-v0, seed {s})"
        actions = r["prediction"].split()
        assert len(actions) == r["length"] and set(actions) <= {"left", "right", "forward", "invalid"}
        assert r["invalid_actions"] == actions.count("invalid")
        assert r["success"] in (0.0, 1.0) and 1 <= r["length"] <= BABYAI.max_steps
    assert [bool(r["_frames"]) for r in rows] == [True, True] + [False] * 5  # only the first two are recorded
    m = result.metrics
    n_steps = sum(r["length"] for r in rows)
    assert m["episodes"] == 7.0 and m["success_rate"] == sum(r["success"] for r in rows) / 7
    assert 0.0 <= m["success_ci_low"] <= m["success_rate"] <= m["success_ci_high"] <= 1.0
    assert m["episode_length"] == pytest.approx(n_steps / 7)
    assert m["invalid_action_rate"] == pytest.approx(sum(r["invalid_actions"] for r in rows) / n_steps)
    out = write_evaluation(tmp_path / "eval", result, ev, "some/model")
    written = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert written == _written(rows)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == {"checkpoint": "some/model", **m}
    gifs = sorted(p.name for p in (tmp_path / "eval" / "videos").iterdir())
    assert gifs == ["seed100000.gif", "seed100001.gif"] and out["video_seed100000"].endswith("seed100000.gif")
    # one captioned frame per step plus the last view: taller than the rendered frame (the caption)
    first = rows[0]
    assert len(first["_frames"]) == first["length"] + 1 == len(first["_captions"])
    assert first["_captions"][0][1] == f"step 1/{int(first['length'])}: {first['prediction'].split()[0]}"
    assert first["_captions"][-1][1].startswith("end: success" if first["success"] else "end: failure")
    from PIL import Image

    with Image.open(tmp_path / "eval" / "videos" / "seed100000.gif") as gif:
        assert gif.n_frames == first["length"] + 1
        h, w = np.asarray(first["_frames"][0]).shape[:2]
        assert gif.size[0] >= w and gif.size[1] > h


def test_the_evaluation_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    run_evaluation(_evaluator(batch_size=4))
    assert torch.equal(torch.rand(3), expected)


def test_action_text() -> None:
    names = {0: "left", 2: "forward"}
    assert [action_text(a, names) for a in (0, np.int64(2), 1, None, "click(1, 2)")] == [
        "left",
        "forward",
        "1",
        "invalid",
        "click(1, 2)",
    ]
    assert action_text(np.array([0.5, -1.25], dtype=np.float32), {}) == "(0.5,-1.25)"
