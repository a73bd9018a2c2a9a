"""Logged rollouts of the token trainer (samples/step_<step>.parquet) and evaluation rows that carry
their inputs (predictions.jsonl: input, options, images, completion), in training and `mmpo eval`."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmpo.cli import main
from mmpo.evaluate import EvalResult, image_references, step_eval_dir, truncate_step_evals, write_evaluation
from mmpo.rollout.agent_loop import AgentTrajectory
from mmpo.rollout.tools import ToolCall
from mmpo.samples import COLUMNS, samples_file
from mmpo.tasks import TASKS, RewardOutput, build_task
from mmpo.trainers.token_samples import prompt_media, prompt_text, row_advantage
from mmpo_tasks.synthetic_vqa.task import SyntheticVQATask

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
FRAMEMIND = str(ROOT / "configs" / "framemind.yaml")
PATHOLOGY = str(ROOT / "configs" / "pathology_demo.yaml")
TASK_OPTS = {"num_train": 64, "question_types": ["colour", "count"]}  # the quickstart's, with num_train=64
SMALL = [
    "task.name=length_reward_test",
    "task.num_train=64",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=3",
    "algorithm.dynamic_sampling=false",  # 2 x 4 rows every step
    "eval.num_samples=4",
    "eval.batch_size=4",
]


class _LengthConfig(SyntheticVQATask.Config):
    pass


class LengthRewardTask(SyntheticVQATask):
    """synthetic_vqa plus ``length`` (characters of the completion) at weight 0.01: the rewards of
    a group spread even while the random model never answers right."""

    name = "length_reward_test"
    Config = _LengthConfig

    def reward(self, samples, completions):
        out = super().reward(samples, completions)
        length = torch.tensor([float(len(c)) for c in completions])
        return RewardOutput(out.rewards + 0.01 * length, {**out.components, "length": length})


@pytest.fixture(autouse=True)
def _register():
    if "length_reward_test" not in TASKS:
        TASKS.add("length_reward_test", LengthRewardTask)


def _lines(run: Path) -> dict[int, dict]:
    return {d["step"]: d for d in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _content(sample, kind: str) -> list:
    return [c[kind] for c in sample.messages[-1]["content"] if c["type"] == kind]


def _predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


# -- pieces ---------------------------------------------------------------------------------------


def test_transcript_names_each_call_result_and_image():
    frame = Image.new("RGB", (8, 6))
    t = AgentTrajectory(
        encoding={},
        prompt_len=0,
        turn_texts=['<tool_call>{"name": "frame_at"}</tool_call> ', "<tool_call>x", " <answer>B</answer>"],
        turn_calls=[[ToolCall("frame_at", {"t_s": 1.5})], [], []],
        observations=["Frame at 1.5 s.", "error: unbalanced <tool_call> tags"],
        observation_images=[[frame, frame], []],
    )
    assert t.transcript(first_image=3) == (
        'assistant: <tool_call>{"name": "frame_at"}</tool_call>\n'
        '[tool call] frame_at({"t_s": 1.5})\n'
        "[tool result] Frame at 1.5 s. [image 3] [image 4]\n"
        "assistant: <tool_call>x\n"
        "[tool result] error: unbalanced <tool_call> tags\n"
        "assistant: <answer>B</answer>"
    )
    assert t.result_images() == [frame, frame]


def test_prompt_text_and_media_read_the_user_turns(tmp_path):
    big, frames = Image.new("RGB", (90, 30)), [Image.new("RGB", (10, 10)) for _ in range(3)]
    Image.new("RGB", (5, 7)).save(tmp_path / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "y.bmp")
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "video", "video": frames},
                {"type": "image", "image": big},
                {"type": "text", "text": "Q1"},
                {"type": "image", "image": str(tmp_path / "x.png")},
                {"type": "image", "image": str(tmp_path / "y.bmp")},  # not a browser image: decoded
                {"type": "text", "text": "Q2"},
            ],
        },
    ]
    assert prompt_text(messages) == "Q1\nQ2"
    assert prompt_text([{"role": "system", "content": "only"}]) == "only"
    media = prompt_media(messages)
    assert media[0] == frames and media[1] is big and media[2] == str((tmp_path / "x.png").resolve())
    assert isinstance(media[3], Image.Image) and media[3].size == (4, 4) and len(media) == 4


def test_row_advantage_is_the_mean_over_the_rows_tokens():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert row_advantage(torch.tensor([0.5, -1.0]), mask, 1) == -1.0
    per_token = torch.tensor([[1.0, 3.0, 100.0], [2.0, 7.0, 7.0]])
    assert row_advantage(per_token, mask, 0) == 2.0 and row_advantage(per_token, mask, 1) == 2.0


def test_evaluation_images_become_references(tmp_path):
    class NoPictures:
        def write_artifacts(self, out_dir, items, rows):
            return {}

    src = tmp_path / "src.png"
    Image.new("RGB", (3, 2)).save(src)
    frames = [Image.new("RGB", (6, 4), (k, 0, 0)) for k in range(3)]
    rows = [{"id": "a", "images": [str(src), Image.new("RGB", (7, 5)), frames], "_raw": 1}, {"id": "b"}]
    out = tmp_path / "ev"
    (out / "media").mkdir(parents=True)
    (out / "media" / "stale.png").write_bytes(b"old")
    write_evaluation(out, EvalResult([0, 1], rows, {"m": 1.0}), NoPictures(), "ck", step=7)
    a, b = _predictions(out)
    assert a["images"] == [str(src), "media/00000_1.png", "media/00000_2.gif"] and "_raw" not in a
    assert b == {"id": "b"} and sorted(p.name for p in (out / "media").iterdir()) == ["00000_1.png", "00000_2.gif"]
    with Image.open(out / a["images"][1]) as im:
        assert im.size == (7, 5)
    with Image.open(out / a["images"][2]) as im:
        assert im.n_frames == 3 and im.size == (6, 4)
    assert json.loads((out / "metrics.json").read_text()) == {"checkpoint": "ck", "step": 7, "m": 1.0}
    assert image_references([], out, 0) == []


def test_step_folders_and_their_truncation(tmp_path):
    assert step_eval_dir(tmp_path, 40) == tmp_path / "eval" / "step_00000040"
    for step in (0, 40, 80):
        step_eval_dir(tmp_path, step).mkdir(parents=True)
    (tmp_path / "eval" / "metrics.json").write_text("{}")  # `mmpo eval`'s files are never touched
    truncate_step_evals(tmp_path, 40)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["metrics.json", "step_00000000", "step_00000040"]


# -- a quickstart run -----------------------------------------------------------------------------


@pytest.mark.slow
def test_quickstart_logs_whole_groups_and_leaves_evaluations_per_step(tmp_path):
    run = tmp_path / "run"
    args = [f"output_dir={run}", "trainer.max_steps=2", "trainer.eval_every=1", "trainer.log_samples=6"]
    assert main(["train", QUICK, *args, *SMALL]) == 0
    task = build_task("length_reward_test", TASK_OPTS)
    lines = _lines(run)
    for step in (1, 2):
        table = pq.read_table(samples_file(run, step))
        assert table.column_names == [*COLUMNS, "reward/accuracy", "reward/format", "reward/length", "media"]
        rows = table.to_pylist()
        assert len(rows) == 6  # min(log_samples, 8 rows): a whole group of 4, then 2 of the next
        groups = [r["group"] for r in rows]
        assert groups == [groups[0]] * 4 + [groups[4]] * 2 and groups[0] != groups[4]
        for r in rows:
            assert r["step"] == step and r["reward/length"] == len(r["completion"])
            total = r["reward/accuracy"] + 0.2 * r["reward/format"] + 0.01 * r["reward/length"]
            assert r["reward"] == pytest.approx(total, abs=1e-5)
            sample = task.train_sample(int(r["prompt_id"].removeprefix("train-")))
            assert r["prompt"] == _content(sample, "text")[0]
            (png,) = r["media"]
            with Image.open(run / "samples" / png) as im:  # the prompt's image, at its size
                assert im.format == "PNG" and im.size == (56, 56)
                assert np.array_equal(_pixels(im), _pixels(_content(sample, "image")[0]))
        rewards = torch.tensor([r["reward"] for r in rows[:4]], dtype=torch.float64)
        grpo = (rewards - rewards.mean()) / (rewards.std() + 1e-6)  # the whole group: its GRPO advantages
        assert [r["advantage"] for r in rows[:4]] == pytest.approx(grpo.tolist(), abs=1e-4)
        assert abs(sum(r["advantage"] for r in rows[:4])) < 1e-4
    # every evaluation, at step 0 and after each step, left its rows and metrics on disk
    evals = task.eval_samples(4)
    for step in (0, 1, 2):
        folder = run / "eval" / f"step_{step:08d}"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["step"] == step and metrics["checkpoint"] == str(run)
        for key in ("accuracy", "format", "accuracy/colour", "accuracy/count"):
            assert metrics[key] == pytest.approx(lines[step][f"eval/{key}"]), key
        preds = _predictions(folder)
        assert [p["id"] for p in preds] == [s.id for s in evals]
        for p, s in zip(preds, evals):
            assert list(p)[:7] == ["id", "input", "prediction", "answer", "completion", "options", "images"]
            assert p["input"] == _content(s, "text")[0] and p["options"] == s.meta["options"]
            assert p["prediction"] == task.parse_prediction(s, p["completion"])
            assert p["accuracy"] == float(p["prediction"] == s.answer)
            (ref,) = p["images"]
            with Image.open(folder / ref) as im:
                assert np.array_equal(_pixels(im), _pixels(_content(s, "image")[0]))
    # `mmpo eval` of the run writes beside the step folders, not into them
    assert main(["eval", QUICK, f"checkpoint={run}", *SMALL]) == 0
    names = {p.name for p in (run / "eval").iterdir()}
    assert names == {"step_00000000", "step_00000001", "step_00000002", "metrics.json", "predictions.jsonl", "media"}
    assert json.loads((run / "eval" / "metrics.json").read_text())["checkpoint"] == str(run / "model")
    final = [p["completion"] for p in _predictions(run / "eval")]
    assert final == [p["completion"] for p in _predictions(run / "eval" / "step_00000002")]  # the same weights


@pytest.mark.slow
def test_every_row_logged_matches_the_step_metrics_and_zero_logs_nothing(tmp_path):
    every, none = tmp_path / "every", tmp_path / "none"
    common = ["trainer.max_steps=1", "trainer.eval_every=0", "eval.num_samples=0", *SMALL]
    assert main(["train", QUICK, f"output_dir={every}", "trainer.log_samples=100", *common]) == 0
    rows = pq.read_table(samples_file(every, 1)).to_pylist()
    line = _lines(every)[1]
    assert len(rows) == 8  # min(100, 2 prompts x 4)
    assert np.mean([r["reward"] for r in rows]) == pytest.approx(line["reward_mean"], abs=1e-6)
    for k in ("accuracy", "format", "length"):
        assert np.mean([r[f"reward/{k}"] for r in rows]) == pytest.approx(line[f"reward/{k}"], abs=1e-6)
    assert np.mean([abs(r["advantage"]) for r in rows]) == pytest.approx(line["advantage_abs_mean"], abs=1e-6)
    assert len({r["group"] for r in rows}) == 2
    assert main(["train", QUICK, f"output_dir={none}", "trainer.log_samples=0", *common]) == 0
    assert (none / "metrics.jsonl").is_file() and not (none / "samples").exists()


# -- an agent run (FrameMind) ---------------------------------------------------------------------


@pytest.mark.slow
def test_agent_rows_show_each_tool_call_its_result_and_frames(tmp_path):
    """A FrameMind step whose turns are given (``ForcedTextEngine``, the engine of the cold start):
    the real tools run, the real reward scores the trajectories, and the logged rows show them."""
    from mmpo.config import load_config
    from mmpo.rollout.engines.forced import ForcedTextEngine
    from mmpo.trainers import trainer_class_for

    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "task.synthetic.num_train=4",
        "task.synthetic.num_eval=2",
        "task.synthetic.duration_s=4",
        "task.synthetic.num_events=1",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "eval.num_samples=2",
        "eval.batch_size=2",
        "rollout.max_new_tokens=8",
        "trainer.max_steps=1",
        "trainer.log_samples=8",
    ]
    cfg = load_config(FRAMEMIND, overrides)
    trainer = trainer_class_for(cfg.task.name)(cfg, cfg.output_dir)
    clip = '<tool_call>{"name": "video_clip", "arguments": {"start_s": 0, "end_s": 2, "num_frames": 2}}</tool_call>'
    per_group = [
        ['<tool_call>{"name": "frame_at", "arguments": {"t_s": 1.0}}</tool_call>', "<answer>A</answer>"],
        [clip, "<answer>B</answer>"],
        ["<answer>A</answer>"],
        ["I do not know"],
    ]
    assert trainer.agent is not None
    trainer.agent.engine = ForcedTextEngine(trainer.policy, per_group * 2)
    trainer.train()
    rows = pq.read_table(samples_file(cfg.output_dir, 1)).to_pylist()
    assert len(rows) == 8 and [r["group"] for r in rows] == [0] * 4 + [1] * 4
    ladder = [n for n, _ in cfg.task.options["ladder"]]  # DRFS: rollout k starts from ladder[k]'s frames
    w = cfg.task.options["reward"]
    for i, r in enumerate(rows):
        k = i % 4
        shown = {0: 1, 1: 2}.get(k, 0)  # frames the tool results showed
        assert len(r["media"]) == ladder[k] + shown
        assert r["completion"].startswith(f"assistant: {per_group[k][0]}")
        for path in r["media"]:
            with Image.open(Path(cfg.output_dir) / "samples" / path) as im:
                assert max(im.size) == 56  # ladder and tool frames are 56 px on the longer side
        gate = r["reward/accuracy"]
        total = w["accuracy"] * gate + w["format"] * r["reward/format"]
        total += gate * (w["tool"] * r["reward/tool_use"] + w["turn_bonus"] * r["reward/turn_bonus"])
        assert r["reward"] == pytest.approx(total, abs=1e-6)
        assert r["reward/tool_use"] == float(k < 2) and r["reward/turns"] == (2.0 if k < 2 else 1.0)
    first = rows[0]["completion"]
    n = ladder[0] + 1
    assert '[tool call] frame_at({"t_s": 1.0})' in first
    assert f"[tool result] Frame at 1.0 s (the video is 4.0 s long). [image {n}]" in first
    assert first.endswith("assistant: <answer>A</answer>")
    assert '[tool call] video_clip({"start_s": 0, "end_s": 2, "num_frames": 2})' in rows[1]["completion"]
    assert f"[image {ladder[1] + 1}] [image {ladder[1] + 2}]" in rows[1]["completion"]
    assert rows[3]["completion"] == "assistant: I do not know"
    # its evaluation rows: the transcript, the initial setting's frames (then any the tools showed)
    setting = ladder[cfg.task.options["initial_setting"]]
    for p in _predictions(Path(cfg.output_dir) / "eval" / "step_00000001"):
        assert p["completion"].startswith("assistant: ") and p["options"] == ["red", "green", "blue", "yellow"]
        assert len(p["images"]) == setting + p["completion"].count("[image ")
        assert p["input"].startswith("Video of 4.0 s")
        assert p["prediction"] is None or p["prediction"] in p["completion"]


# -- evaluation rows of a VLM task with image files -----------------------------------------------


@pytest.mark.slow
def test_vlm_evaluation_rows_reference_their_image_files(tmp_path):
    Image.new("RGB", (100, 60), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 30), (0, 0, 255)).save(tmp_path / "c.bmp")
    for k in range(4):
        Image.new("RGB", (56, 56), (k * 60, 0, 0)).save(tmp_path / f"f{k}.png")
    inline = io.BytesIO()
    Image.new("RGB", (30, 20), (0, 255, 0)).save(inline, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(inline.getvalue()).decode()
    rows = [
        {"id": "file", "images": ["a.png"], "question": "Which colour?", "options": ["red", "blue"], "answer": "A"},
        {"id": "vid", "video": [f"f{k}.png" for k in range(4)], "question": "Brighter?", "answer": "yes"},
        {"id": "bytes", "images": [uri], "question": "Colour?", "answer": "green"},
        {"id": "bmp", "images": ["c.bmp"], "question": "Colour?", "options": ["red", "blue"], "answer": "B"},
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = [f"task.train_file={data}", f"task.eval_file={data}", "eval.num_samples=4", f"output_dir={out}"]
    assert main(["eval", PATHOLOGY, "checkpoint=tiny:qwen2_vl", "rollout.max_new_tokens=4", *args]) == 0
    preds = {p["id"]: p for p in _predictions(out / "eval")}
    assert preds["file"]["images"] == [str((tmp_path / "a.png").resolve())]
    assert preds["file"]["options"] == ["red", "blue"] and "options" not in preds["vid"]
    assert preds["file"]["input"].startswith("Which colour?\nA. red\nB. blue")
    with Image.open(out / "eval" / preds["vid"]["images"][0]) as im:  # the video's frames, one GIF
        assert im.format == "GIF" and im.n_frames == 4 and im.size == (56, 56)
    with Image.open(out / "eval" / preds["bytes"]["images"][0]) as im:  # decoded from the row: saved
        assert im.format == "PNG" and im.size == (30, 20)
    with Image.open(out / "eval" / preds["bmp"]["images"][0]) as im:  # a BMP file: re-encoded as PNG
        assert im.format == "PNG" and im.size == (40, 30)
    task = build_task("vlm_reasoning", {"train_file": str(data), "eval_file": str(data), "template": "direct"})
    for s in task.eval_samples(4):
        p = preds[s.id]
        assert p["prediction"] == task.parse_prediction(s, p["completion"])
        assert p["accuracy"] == task.reward([s], [p["completion"]]).components["accuracy"].item()


# -- rollouts with their own prompts (HiconAgent's DCS) -------------------------------------------


@pytest.mark.slow
def test_rollouts_with_their_own_prompts_log_their_own_history(tmp_path):
    """HiconAgent's DCS gives each rollout of a group its own history length: each logged row
    shows its own prompt (history screenshots + the current screen)."""
    from mmpo_tasks.gui_agent.actions import Action
    from mmpo_tasks.gui_agent.episodes import GuiEpisode, GuiStep, save_episodes

    episodes = []
    for e in range(6):
        steps = []
        for t in range(4):
            path = tmp_path / f"ep{e}_t{t}.png"
            Image.new("RGB", (80, 100), (40 * t, 20 * e, 100)).save(path)
            steps.append(GuiStep(str(path), Action("click", x=0.5, y=0.5), (0.4, 0.4, 0.6, 0.6), (80, 100)))
        episodes.append(GuiEpisode(f"ep{e}", f"click the middle {e}", steps))
    save_episodes(episodes, tmp_path / "episodes.jsonl")
    run = tmp_path / "run"
    opts = {"data": str(tmp_path / "episodes.jsonl"), "image_size": 56, "dcs_total_steps": 20}
    args = [f"task.{k}={v}" for k, v in opts.items()] + ["rollout.prompts_per_step=2", "rollout.group_size=4"]
    args += ["rollout.max_new_tokens=4", "eval.num_samples=0", "trainer.max_steps=1", "trainer.log_samples=8"]
    assert main(["train", str(ROOT / "configs" / "hiconagent.yaml"), f"output_dir={run}", *args]) == 0
    rows = pq.read_table(samples_file(run, 1)).to_pylist()
    task = build_task("hiconagent", {**opts, "eval_fraction": 0.2, "max_history": 2})
    task.begin_step(1, 1)  # the schedule the step used
    samples = {task.train_sample(i).id: task.train_sample(i) for i in range(task.num_train())}
    histories = []
    for i, r in enumerate(rows):
        sample, k = samples[r["prompt_id"]], i % 4
        histories.append(task.history_length(sample, k))
        messages = task.rollout_messages(sample, k)
        assert len(r["media"]) == histories[-1] + 1 and r["prompt"] == prompt_text(messages)
        for path, image in zip(r["media"], prompt_media(messages)):
            with Image.open(run / "samples" / path) as im:
                assert np.array_equal(_pixels(im), _pixels(image))
    assert len(rows) == 8 and len(set(histories)) > 1  # the rows of a group differ
