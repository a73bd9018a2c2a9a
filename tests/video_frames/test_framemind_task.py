"""The FrameMind task end to end: DRFS starting settings, the composite reward on constructed
trajectories, the token trainer running multi-turn rollouts (scoring whole conversations), and
`mmpo eval` of a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpo.cli import main
from mmpo.rollout.agent_loop import AgentTrajectory
from mmpo.tasks import build_task

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "framemind.yaml")
SMALL = [
    "task.synthetic.num_train=4",
    "task.synthetic.num_eval=2",
    "task.synthetic.duration_s=4",
    "task.synthetic.num_events=1",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=8",
    "eval.num_samples=2",
    "eval.batch_size=2",
    "trainer.eval_every=0",
]
OPTS = {"synthetic": {"num_train": 4, "num_eval": 2, "duration_s": 4.0, "num_events": 1}}


def _traj(answer=None, turns=1, calls=0, errors=0, malformed=0):
    return AgentTrajectory(
        encoding={},
        prompt_len=0,
        num_turns=turns,
        tool_calls=calls,
        tool_errors=errors,
        malformed_calls=malformed,
        answer=answer,
    )


def test_drfs_walks_the_ladder_and_eval_uses_the_initial_setting():
    task = build_task("framemind", {**OPTS, "ladder": [[4, 56], [2, 56], [1, 84]], "initial_setting": 1})
    s = task.train_sample(0)
    counts = [sum(c["type"] == "image" for c in task.rollout_messages(s, k)[0]["content"]) for k in range(4)]
    assert counts == [4, 2, 1, 4]
    big = [c["image"] for c in task.rollout_messages(s, 2)[0]["content"] if c["type"] == "image"][0]
    assert max(big.size) == 84
    e = task.eval_samples(1)[0]
    assert all(sum(c["type"] == "image" for c in task.rollout_messages(e, k)[0]["content"]) == 2 for k in range(3))
    ctx = task.tool_context(s)
    assert Path(ctx["video"]).is_file() and set(ctx) == {"video", "clip_size", "frame_size"}
    nodrfs = build_task("framemind", {**OPTS, "drfs": False, "initial_setting": 0})
    assert {sum(c["type"] == "image" for c in nodrfs.rollout_messages(s, k)[0]["content"]) for k in range(3)} == {8}


def test_composite_reward_on_constructed_trajectories():
    task = build_task("framemind", OPTS)
    s = task.train_sample(0)
    right, wrong = s.answer, next(l for l in "ABCD" if l != s.answer)
    trajs = [
        _traj(right, turns=2, calls=1),  # correct, a tool used, 2 turns
        _traj(right, turns=1),  # correct, no tool
        _traj(wrong, turns=3, calls=2),  # wrong: shaping does not pay
        _traj(None, turns=3, calls=1, errors=1),  # no answer, the only call failed
        _traj("Z", turns=1),  # not an option letter
        _traj(right, turns=2, malformed=1),  # a malformed call is not a tool turn
    ]
    out = task.reward_trajectories([s] * 6, trajs)
    c = out.components
    assert c["accuracy"].tolist() == [1, 1, 0, 0, 0, 1]
    assert c["format"].tolist() == [1, 1, 1, 0, 0, 0]
    assert c["tool_use"].tolist() == [1, 0, 1, 0, 0, 0]
    assert c["turn_bonus"].tolist() == [1, 0, 1, 0, 0, 0]
    assert out.rewards.tolist() == pytest.approx([1 + 0.2 + 0.2 + 0.5, 1.2, 0.2, 0.0, 0.0, 1.0])
    loose = build_task("framemind", {**OPTS, "reward": {"shaping_needs_correct": False}})
    assert loose.reward_trajectories([s] * 6, trajs).rewards.tolist() == pytest.approx(
        [1.9, 1.2, 0.2 + 0.2 + 0.5, 0.0, 0.0, 1.0]
    )


def test_grpo_steps_with_multi_turn_rollouts_and_eval(tmp_path):
    run = tmp_path / "run"
    assert main(["train", CONFIG, f"output_dir={run}", "trainer.max_steps=2", *SMALL]) == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2]
    for k in ("reward/accuracy", "reward/tool_use", "reward/turns", "reward/format", "loss", "grad_norm"):
        assert k in lines[1], k
    assert "eval/accuracy" in lines[-1] and "eval/tool_use" in lines[-1]
    assert main(["eval", CONFIG, f"checkpoint={run}", f"output_dir={tmp_path / 'ev'}", *SMALL]) == 0
    rows = [json.loads(l) for l in (tmp_path / "ev" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"prediction", "accuracy", "tool_use"} <= set(rows[0])


def test_bad_ladder_is_refused():
    from mmpo.errors import ConfigError

    with pytest.raises(ConfigError, match="task.ladder"):
        build_task("framemind", {**OPTS, "ladder": [[0, 56]]})
    with pytest.raises(ConfigError, match="initial_setting=5"):
        build_task("framemind", {**OPTS, "initial_setting": 5})
    with pytest.raises(ConfigError, match="3 events need duration_s >= 5 s; got 4"):
        build_task("framemind", {"synthetic": {"num_events": 3, "duration_s": 4.0}})


def test_warm_start_builds_expert_conversations_with_real_observations(tmp_path):
    """Expert conversations run the real tools (observations with the clip's frames) and the
    cold start fits the expert's tokens only."""

    from mmpo.config import load_config
    from mmpo.models import load_model
    from mmpo.policies.causal_lm import CausalLMPolicy
    from mmpo.sft import SFTConfig
    from mmpo_tasks.video_frames.warm_start import expert_trajectories, warm_start

    cfg = load_config(CONFIG, SMALL)
    task = build_task(cfg.task.name, cfg.task.options)
    model, proc, info = load_model(cfg.model.path, tiny_overrides=cfg.model.tiny)
    pol = CausalLMPolicy.from_info(model, proc, info)
    trajs = expert_trajectories(task, pol, model, examples=6, tool_fraction=0.5, seed=1)
    with_tool = [t for t in trajs if t.tool_calls]
    assert with_tool and len(with_tool) < 6
    for t, i in zip(trajs, range(6)):
        s = task.train_sample(i % task.num_train())
        assert t.answer == s.answer and t.tool_errors == 0 and t.malformed_calls == 0
    t = with_tool[0]
    assert t.num_turns == 2 and "8 frame(s) of 0.0-4.0 s" in t.observations[0]
    n_prompt_images = int(t.encoding["image_grid_thw"].shape[0]) - 8  # video_clip returned 8 frames
    assert n_prompt_images >= 1
    out = warm_start(
        cfg, str(tmp_path / "warm"), examples=8, tool_fraction=0.5, sft=SFTConfig(epochs=2, batch_size=4, lr=1e-3)
    )
    assert out["loss_last_epoch"] < out["loss_first_epoch"]
    assert (tmp_path / "warm" / "config.json").is_file() and (tmp_path / "warm" / "warm_start.json").is_file()


def test_bad_rows_are_skipped_with_a_count(tmp_path, capsys):
    """A corrupt and a missing video skip their rows (the run goes on) and are reported."""
    import json as _json

    from mmpo_tasks.video_frames.video import synthetic_event_video

    info = synthetic_event_video(tmp_path / "ok.mp4", seed=1, duration_s=4.0, num_events=1)
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    q = info["questions"][0]
    rows = [
        {"id": "ok", "video": "ok.mp4", "question": q["question"], "options": q["options"], "answer": q["answer"]},
        {"id": "corrupt", "video": "bad.mp4", "question": "?", "options": ["a", "b"], "answer": "A"},
        {"id": "missing", "video": "nope.mp4", "question": "?", "options": ["a", "b"], "answer": "A"},
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    task = build_task("framemind", {"data": str(data), "eval_data": str(data)})
    assert [r["id"] for r in task.train_rows] == ["ok"]
    assert {x["id"] for x in task.skipped} == {"corrupt", "missing"}
    err = capsys.readouterr().err
    assert "framemind: skipped 4 row(s)" in err  # 2 in the training file, 2 in the eval file
