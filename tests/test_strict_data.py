"""Strict data rows (issue 17, part 6): an unknown key in a data row of any plugin's loader is a
DataError naming the file, the 1-based line and the key with a did-you-mean; ``task.unknown_keys``
warn reports each key once and loads, ignore is silent; every task prints one summary line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmpo.config import load_config
from mmpo.data_rows import KeyCheck, LoadSummary, iter_rows, skip_reason
from mmpo.errors import ConfigError, DataError
from mmpo.tasks import build_task, build_task_from

ROOT = Path(__file__).resolve().parents[1]
UCI_CSV = ROOT / "tasks" / "forecasting" / "data_sources" / "beijing_pm25.csv"


def png(path: Path, colour=(200, 30, 30), size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


# -- the shared pieces ---------------------------------------------------------------------------


def test_key_check_modes_and_messages(tmp_path, capsys):
    allowed = ("images", "question", "answer")
    with pytest.raises(DataError) as e:
        KeyCheck("error").check({"imgs": [], "question": "q"}, allowed, "d.jsonl", "line 3")
    assert str(e.value).startswith("d.jsonl: line 3: unknown key 'imgs'. Did you mean 'images'?")
    assert "Known keys: answer, images, question" in str(e.value) and "task.unknown_keys" in str(e.value)
    with pytest.raises(DataError, match=r"line 1: unknown key 'prompt\[2\]\.txt'\. Did you mean 'text'\?"):
        KeyCheck().check({"txt": "x"}, ("type", "text"), "d.jsonl", "line 1", "prompt[2]")
    warn = KeyCheck("warn")
    for n in range(1, 4):  # the same key on three rows, and nested under two indices
        warn.check({"imgs": [], "question": "q"}, allowed, "d.jsonl", f"line {n}")
        warn.check({"txt": "x"}, ("text",), "d.jsonl", f"line {n}", f"prompt[{n}]")
    lines = warnings_of(capsys.readouterr().err)
    assert lines == [
        "warning: d.jsonl: line 1: unknown key 'imgs' is ignored. Did you mean 'images'? "
        "(said once per key; task.unknown_keys: ignore silences it)",
        "warning: d.jsonl: line 1: unknown key 'prompt[1].txt' is ignored. Did you mean 'text'? "
        "(said once per key; task.unknown_keys: ignore silences it)",
    ]
    KeyCheck("ignore").check({"imgs": []}, allowed, "d.jsonl", "line 1")
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError, match="task.unknown_keys='loud': use one of error, warn, ignore"):
        KeyCheck("loud")


def test_iter_rows_places_are_one_based(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"a": 1}\n\n{"a": 2}\n{oops\n')
    got = list(iter_rows(f))
    assert [p for p, _ in got] == ["line 1", "line 3", "line 4"] and got[1][1] == {"a": 2}
    assert "not valid JSON" in str(got[2][1])
    pq.write_table(pa.Table.from_pylist([{"a": 1}, {"a": 2}]), tmp_path / "b.parquet")
    assert [p for p, _ in iter_rows(tmp_path / "b.parquet")] == ["row 1", "row 2"]
    (tmp_path / "c.json").write_text('[{"a": 1}]')
    assert list(iter_rows(tmp_path / "c.json")) == [("row 1", {"a": 1})]


def test_iter_rows_kind_object_and_numbers(tmp_path):
    from mmpo.data import RecordError, read_records
    from mmpo.data_rows import iter_numbered_rows

    f = tmp_path / "hf.json"  # JSON lines under a .json name, as HF exports write them
    f.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(iter_rows(f, kind="jsonl")) == [("line 1", {"a": 1}), ("line 3", {"a": 2})]
    assert list(iter_numbered_rows(f, kind="jsonl")) == [("line", 1, {"a": 1}), ("line", 3, {"a": 2})]
    with pytest.raises(DataError, match=r"hf\.json: not valid JSON"):
        list(iter_rows(f))
    (tmp_path / "one.json").write_text('{"a": 1}')
    assert list(iter_rows(tmp_path / "one.json", allow_object=True)) == [("row 1", {"a": 1})]
    with pytest.raises(DataError, match=r"one\.json: a \.json data file must hold a list of rows, got dict"):
        list(iter_rows(tmp_path / "one.json"))
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        list(iter_rows(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        list(iter_rows(tmp_path / "bad.parquet"))
    # read_records (data_prep converters) names the line inside the RecordError it puts in place
    g = tmp_path / "g.jsonl"
    g.write_text('{"a": 1}\n{oops\n')
    got = read_records(g)
    assert got[0] == {"a": 1} and isinstance(got[1], RecordError) and str(got[1]).startswith("line 2: not valid JSON")


def test_summary_line_and_main_rank_only(capsys, monkeypatch):
    s = LoadSummary("demo", splits={"train": 8, "eval": 2}, held_out=2, held_out_why="eval_fraction=0.2")
    s.skip(skip_reason("images[0]", "file not found: /x/y.png"))
    s.skip(skip_reason("images[1]", "file not found: /x/z.png"))
    s.skip(skip_reason("answer", "missing or empty"))
    assert s.line() == (
        "demo data: train 8, eval 2 rows; 2 held out for evaluation (eval_fraction=0.2); "
        "3 skipped (images: file not found: 2, answer: missing or empty: 1)"
    )
    monkeypatch.setenv("RANK", "1")
    s.print()
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    s.print()
    assert capsys.readouterr().err == s.line() + "\n"


def test_build_task_passes_unknown_keys(tmp_path):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["task.unknown_keys=warn", "task.num_train=4"])
    task = build_task_from(cfg)
    assert task.unknown_keys == "warn" and task.seed == cfg.seed
    assert build_task("synthetic_vqa", {"num_train": 4}).unknown_keys == "error"
    with pytest.raises(ConfigError, match="task.unknown_keys"):
        build_task("synthetic_vqa", {"num_train": 4}, unknown_keys="strict")


def test_synthetic_vqa_prints_its_summary(capsys):
    build_task("synthetic_vqa", {"num_train": 12})
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "synthetic_vqa data: train 12, eval on demand questions (generated); 0 held out for evaluation "
        "(evaluation questions come from their own seed; one equal to a training question is skipped); 0 skipped"
    ]


# -- vlm_reasoning ---------------------------------------------------------------------------------


def _vqa_rows(n: int) -> list[dict]:
    return [
        {"id": f"q{k}", "images": ["x.png"], "question": f"Colour {k}?", "options": ["red", "blue"], "answer": "A"}
        for k in range(n)
    ]


def test_vlm_the_original_problem_imgs_and_option_now_fail(tmp_path):
    """Rows with ``imgs`` trained a VLM that never saw an image; ``option`` made an open question."""
    png(tmp_path / "x.png")
    rows = _vqa_rows(3)
    rows[1] = {**rows[1], "imgs": rows[1].pop("images")}
    data = jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as e:
        build_task("vlm_reasoning", {"train_file": str(data)})
    assert str(e.value).startswith(f"{data}: line 2: unknown key 'imgs'. Did you mean 'images'?")
    rows = _vqa_rows(3)
    rows[2] = {**rows[2], "option": rows[2].pop("options")}
    data = jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=rf"{data}: line 3: unknown key 'option'\. Did you mean 'options'\?"):
        build_task("vlm_reasoning", {"train_file": str(data)})


def test_vlm_misspelled_layout_marker_is_named(tmp_path):
    from mmpo_tasks.vlm_reasoning.data import load_rows

    data = jsonl(tmp_path / "d.jsonl", [{"id": "q0", "questoin": "Colour?", "answer": "red"}])
    with pytest.raises(DataError, match=r"cannot tell the data layout from line 1 .* Did you mean 'question'\?"):
        load_rows(data)


def test_vlm_warn_loads_and_reports_once_ignore_is_silent(tmp_path, capsys):
    from mmpo_tasks.vlm_reasoning.data import load_rows

    png(tmp_path / "x.png")
    rows = [{**r, "difficulty": "easy"} for r in _vqa_rows(4)]
    data = jsonl(tmp_path / "train.jsonl", rows)
    res = load_rows(data, unknown_keys="warn")
    assert len(res.rows) == 4 and all(len(r.images) == 1 and r.options == ["red", "blue"] for r in res.rows)
    assert warnings_of(capsys.readouterr().err) == [
        f"warning: {data}: line 1: unknown key 'difficulty' is ignored. "
        "(said once per key; task.unknown_keys: ignore silences it)"
    ]
    assert len(load_rows(data, unknown_keys="ignore").rows) == 4
    assert capsys.readouterr().err == ""


def test_vlm_nested_keys_of_chat_verl_and_llava_rows(tmp_path):
    from mmpo_tasks.vlm_reasoning.data import load_rows

    png(tmp_path / "x.png")
    trl = {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "txt": "Colour?"}]}],
        "image": "x.png",
        "solution": "red",
    }
    with pytest.raises(DataError, match=r"t\.jsonl: line 1: unknown key 'prompt\[0\]\.content\[1\]\.txt'\. Did"):
        load_rows(jsonl(tmp_path / "t.jsonl", [trl]))
    verl = {"prompt": [{"role": "user", "content": "<image>Colour?"}], "images": ["x.png"]}
    verl["reward_model"] = {"style": "rule", "groundtruth": "red"}
    with pytest.raises(DataError, match=r"unknown key 'reward_model\.groundtruth'\. Did you mean 'ground_truth'\?"):
        load_rows(jsonl(tmp_path / "v.jsonl", [verl]))
    msg = {"prompt": [{"role": "user", "contents": "Colour?"}], "solution": "red"}
    with pytest.raises(DataError, match=r"unknown key 'prompt\[0\]\.contents'\. Did you mean 'content'\?"):
        load_rows(jsonl(tmp_path / "m.jsonl", [msg]))
    llava = {"image": "x.png", "conversations": [{"form": "human", "value": "Q?"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(DataError, match=r"unknown key 'conversations\[0\]\.form'\. Did you mean 'from'\?"):
        load_rows(jsonl(tmp_path / "l.jsonl", [llava]))


def test_vlm_real_layouts_load_with_all_their_keys(tmp_path):
    """verl's geo3k parquet (data_source, prompt, images as {bytes, path}, ability, reward_model,
    extra_info), EasyR1 (problem, answer, images) and verl's agent-loop rows (agent_name) load."""
    from mmpo_tasks.vlm_reasoning.data import load_rows

    img = {"bytes": png(tmp_path / "x.png"), "path": None}
    geo3k = {
        "data_source": "hiyouga/geometry3k",
        "prompt": [{"role": "user", "content": "<image>Find x. Put the final answer in \\boxed{}."}],
        "images": [img],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "12"},
        "extra_info": {"split": "train", "index": 0, "answer": "12", "question": "Find x."},
    }
    pq.write_table(pa.Table.from_pylist([geo3k, {**geo3k, "agent_name": "tool_agent"}]), tmp_path / "g.parquet")
    rows = load_rows(tmp_path / "g.parquet").rows
    assert [r.answer for r in rows] == ["12", "12"] and rows[0].meta["source"] == "hiyouga/geometry3k"
    easy = {"images": [img], "problem": "<image>How many sides?", "answer": "3"}
    pq.write_table(pa.Table.from_pylist([easy]), tmp_path / "e.parquet")
    assert load_rows(tmp_path / "e.parquet").rows[0].answer == "3"
    with pytest.raises(DataError, match=r"e2\.parquet: row 1: unknown key 'anwser'\. Did you mean 'answer'\?"):
        pq.write_table(
            pa.Table.from_pylist([{"images": [img], "problem": "Q?", "anwser": "3"}]), tmp_path / "e2.parquet"
        )
        load_rows(tmp_path / "e2.parquet")


def test_vlm_pathology_demo_rows_are_strict_clean():
    """The offline demo set (real pathology images from the project's data) has no stray key."""
    from mmpo_tasks.vlm_reasoning.data import load_rows
    from mmpo_tasks.vlm_reasoning.pathology_demo import ensure_demo

    demo = ensure_demo()
    assert len(load_rows(demo["train"]).rows) > 0 and len(load_rows(demo["test"]).rows) > 0


def test_vlm_task_summary_counts_held_out_and_skipped(tmp_path, capsys):
    png(tmp_path / "x.png")
    rows = _vqa_rows(10) + [{"id": "gone", "images": ["nope.png"], "question": "Colour?", "answer": "red"}]
    data = jsonl(tmp_path / "train.jsonl", rows)
    task = build_task("vlm_reasoning", {"train_file": str(data), "eval_fraction": 0.2, "skip_bad_rows": True})
    assert (len(task.train_rows), len(task.eval_rows)) == (8, 2)
    summary = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlm_reasoning data")]
    assert summary == [
        "vlm_reasoning data: train 8, eval 2 rows; 2 held out for evaluation "
        "(eval_fraction=0.2 of task.train_file, no task.eval_file); 1 skipped (images: file not found: 1)"
    ]
    build_task("vlm_reasoning", {"train_file": str(data), "eval_file": str(data), "skip_bad_rows": True})
    assert capsys.readouterr().err.splitlines()[-1] == (
        "vlm_reasoning data: train 10, eval 10 rows; 0 held out for evaluation (evaluation reads task.eval_file); "
        "2 skipped (images: file not found: 2)"
    )


# -- video QA (framemind) ------------------------------------------------------------------------


def _video_row(i: int, **kw) -> dict:
    return {
        "id": f"v{i}",
        "video": "clip.mp4",
        "question": "Which colour?",
        "options": ["red", "blue"],
        "answer": "A",
    } | kw


def test_video_rows_unknown_key_warn_and_ignore(tmp_path, capsys):
    from mmpo_tasks.video_frames.data import load_video_qa

    (tmp_path / "clip.mp4").write_bytes(b"only its existence is checked here")
    bad = [_video_row(0), {**_video_row(1), "qestion": "?"}]
    data = jsonl(tmp_path / "qa.jsonl", bad)
    with pytest.raises(DataError, match=rf"{data}: line 2: unknown key 'qestion'\. Did you mean 'question'\?"):
        load_video_qa(data, check_videos=False)
    data = jsonl(tmp_path / "qa.jsonl", [{**_video_row(i), "source": "mine"} for i in range(3)])
    rows, skipped = load_video_qa(data, check_videos=False, unknown_keys="warn")
    assert len(rows) == 3 and not skipped and all("source" not in r["meta"] for r in rows)
    assert len(warnings_of(capsys.readouterr().err)) == 1
    assert len(load_video_qa(data, check_videos=False, unknown_keys="ignore")[0]) == 3
    assert capsys.readouterr().err == ""
    pq.write_table(pa.Table.from_pylist([_video_row(0, kinds="x")]), tmp_path / "qa.parquet")
    with pytest.raises(DataError, match=r"qa\.parquet: row 1: unknown key 'kinds'\. Did you mean 'kind'\?"):
        load_video_qa(tmp_path / "qa.parquet", check_videos=False)


def test_framemind_summary_line(capsys):
    opts = {"synthetic": {"num_train": 4, "num_eval": 2, "duration_s": 4.0, "num_events": 1}}
    build_task("framemind", opts)
    assert capsys.readouterr().err.splitlines()[-1] == (
        "framemind data: train 4, eval 2 rows; 0 held out for evaluation "
        "(synthetic videos: evaluation has its own set (seed + 1)); 0 skipped"
    )


# -- GUI episodes ----------------------------------------------------------------------------------


def _episode(i: int, **step_kw) -> dict:
    step = {"screenshot": "s.png", "action": "click(0.5, 0.5)", "target_box": None, "screen_size": None} | step_kw
    return {"id": f"e{i}", "instruction": "Press the button", "steps": [step, dict(step)], "meta": {"task": "t"}}


def test_gui_episode_and_step_keys(tmp_path, capsys):
    from mmpo_tasks.gui_agent.episodes import load_episodes

    png(tmp_path / "s.png")
    data = jsonl(tmp_path / "ep.jsonl", [_episode(0), {**_episode(1), "instrution": "x"}])
    with pytest.raises(DataError, match=rf"{data}: line 2: unknown key 'instrution'\. Did you mean 'instruction'\?"):
        load_episodes(data)
    data = jsonl(tmp_path / "ep.jsonl", [_episode(0, screenshoot="s.png")])
    with pytest.raises(DataError, match=r"line 1: unknown key 'steps\[0\]\.screenshoot'\. Did you mean 'screenshot'\?"):
        load_episodes(data)
    data = jsonl(tmp_path / "ep.jsonl", [_episode(i, note="n") for i in range(3)])
    episodes, skipped = load_episodes(data, unknown_keys="warn")
    assert len(episodes) == 3 and not skipped
    assert warnings_of(capsys.readouterr().err) == [
        f"warning: {data}: line 1: unknown key 'steps[0].note' is ignored. "
        "(said once per key; task.unknown_keys: ignore silences it)"
    ]
    load_episodes(data, unknown_keys="ignore")
    assert capsys.readouterr().err == ""


def test_hiconagent_summary_line(tmp_path, capsys):
    from mmpo_tasks.gui_agent.hicon_task import _held_out

    png(tmp_path / "s.png")
    rows = [_episode(i) for i in range(10)] + [_episode(10, screenshot="gone.png")]
    data = jsonl(tmp_path / "ep.jsonl", rows)
    task = build_task("hiconagent", {"data": str(data), "eval_fraction": 0.3})
    n_eval = sum(_held_out(f"e{i}", 0.3) for i in range(10))
    assert 0 < n_eval < 10 and len(task.eval_episodes) == n_eval
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"hiconagent data: train {10 - n_eval}, eval {n_eval} episodes; {n_eval} held out for evaluation "
        "(eval_fraction=0.3 of task.data (by episode id)); 1 skipped (steps.screenshot: file not found: 1); "
        f"steps: train {2 * (10 - n_eval)}, eval {2 * n_eval}"
    )


# -- VLA demonstrations ----------------------------------------------------------------------------


def _demo_folder(folder: Path, steps: list[dict]) -> Path:
    folder.mkdir(parents=True)
    png(folder / "frames" / "f.png")
    (folder / "meta.json").write_text(json.dumps({"env": {"id": "BabyAI-GoToRedBallNoDists-v0"}, "seeds": [0, 1]}))
    jsonl(folder / "demos.jsonl", steps)
    return folder


def _step(episode: int, t: int, **kw) -> dict:
    row = {"episode": episode, "seed": episode, "t": t, "image": "frames/f.png", "instruction": "go to the red ball"}
    return row | {"action": 2, "action_name": "forward"} | kw


def test_vla_demo_keys_warn_and_summary(tmp_path, capsys):
    from mmpo_tasks.vla.data import load_demos

    bad = _demo_folder(tmp_path / "bad", [_step(0, 0), _step(0, 1, acton=2)])
    with pytest.raises(DataError, match=r"demos\.jsonl: line 2: unknown key 'acton'\. Did you mean 'action'\?"):
        load_demos(bad)
    folder = _demo_folder(tmp_path / "ok", [_step(0, 0, reward=0), _step(0, 1, reward=1), _step(1, 0, reward=1)])
    summary = LoadSummary("ript_vla demonstrations", unit="steps")
    steps, _ = load_demos(folder, max_episodes=1, unknown_keys="warn", summary=summary)
    assert len(steps) == 2 and len(warnings_of(capsys.readouterr().err)) == 1
    assert summary.line() == (
        "ript_vla demonstrations data: sft 2 steps; 0 held out for evaluation; 1 skipped (beyond max_episodes=1: 1)"
    )
    assert len(load_demos(folder, unknown_keys="ignore")[0]) == 3 and capsys.readouterr().err == ""


def test_environment_task_summary_line(capsys):
    task = build_task(
        "ript_vla", {"train_seeds": {"start": 0, "count": 50}, "eval_seeds": {"start": 1000, "count": 10}}
    )
    assert (len(task.train_seeds), len(task.eval_seeds)) == (50, 10)
    assert capsys.readouterr().err.splitlines()[-1] == (
        "ript_vla data: train 50, eval 10 environment seeds; 0 held out for evaluation "
        "(eval_seeds, disjoint from train_seeds); 0 skipped"
    )


# -- diffusion prompts -----------------------------------------------------------------------------


def test_diffusion_prompt_keys_follow_the_rewards(tmp_path, capsys):
    from mmpo_tasks.diffusion.data import load_prompts

    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "a red image", "color": "red"}, {"prompt": "blue", "colour": "blue"}])
    with pytest.raises(DataError) as e:
        load_prompts(str(f), "task.prompts", meta_keys={"color"})
    assert str(e.value).startswith(f"{f}: line 2: unknown key 'colour'. Did you mean 'color'?")
    assert "Known keys ('prompt' and the keys task.rewards read): color, prompt" in str(e.value)
    with pytest.raises(DataError, match=r"task\.prompts: item 2: unknown key 'bx'\. Did you mean 'box'\?"):
        load_prompts(
            [{"prompt": "a", "box": [0, 0, 1, 1]}, {"prompt": "b", "bx": [0, 0, 1, 1]}],
            "task.prompts",
            meta_keys={"box"},
        )
    warned = load_prompts(str(f), "task.prompts", meta_keys={"color"}, unknown_keys="warn")
    assert [p.meta for p in warned] == [{"color": "red"}, {}]  # the unknown key never reaches the meta
    assert len(warnings_of(capsys.readouterr().err)) == 1
    assert [p.meta for p in load_prompts(str(f), "task.prompts", meta_keys=None)] == [
        {"color": "red"},
        {"colour": "blue"},
    ]


def test_diffusion_task_reads_its_rewards_keys_and_prints_summary(tmp_path, capsys):
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "a red image", "color": "red"}, {"prompt": "x", "colr": "blue"}])
    rewards = [{"name": "target_color", "meta_key": "color"}]
    with pytest.raises(DataError, match=r"line 2: unknown key 'colr'\. Did you mean 'color'\?"):
        build_task("flow_grpo", {"prompts": str(f), "rewards": rewards})
    # a reward server is sent whole rows: any key may be for it
    server = [{"name": "reward_server", "url": "http://127.0.0.1:9/score"}]
    task = build_task("flow_grpo", {"prompts": str(f), "rewards": server})
    assert task.prompts[1].meta == {"colr": "blue"}
    assert capsys.readouterr().err.splitlines()[-1] == (
        "flow_grpo data: train 2, eval 2 prompts; 0 held out for evaluation "
        "(no task.eval_prompts: evaluation reuses the training prompts with fixed noise seeds); 0 skipped"
    )
    shapes = ROOT / "configs" / "prompts" / "shapes.jsonl"
    build_task(
        "find",
        {"prompts": str(shapes), "eval_prompts": str(shapes), "rewards": [{"name": "shape_at", "box_key": "box"}]},
    )
    n = len(shapes.read_text().splitlines())
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"find data: train {n}, eval {n} prompts; 0 held out")


# -- forecasting -------------------------------------------------------------------------------------


def test_forecast_parquet_columns_are_strict(tmp_path, capsys):
    from mmpo_tasks.forecasting.data import load_pm25, load_pm25_csv

    frame = load_pm25_csv(UCI_CSV).iloc[:48]
    table = frame.reset_index().rename(columns={"weather_filled": "weather_filed"})
    table.to_parquet(tmp_path / "s.parquet", index=False)
    with pytest.raises(
        DataError, match=r"s\.parquet: columns: unknown column 'weather_filed'\. Did you mean 'weather_filled'\?"
    ):
        load_pm25(tmp_path / "s.parquet")
    assert len(load_pm25(tmp_path / "s.parquet", unknown_keys="warn")) == 48
    assert len(warnings_of(capsys.readouterr().err)) == 1


def test_forecast_csv_extra_columns_ignored_misspelled_ones_named(tmp_path):
    """The UCI CSV is an external layout: extra columns are ignored (and listed); every column read
    is required, so a misspelled one is a missing column with the closest found."""
    from mmpo_tasks.forecasting.data import load_pm25_csv

    lines = UCI_CSV.read_text().splitlines()[:49]
    (tmp_path / "extra.csv").write_text("\n".join([lines[0] + ",station"] + [x + ",US" for x in lines[1:]]) + "\n")
    frame = load_pm25_csv(tmp_path / "extra.csv")
    assert len(frame) == 48 and frame.attrs["ignored_columns"] == ["station"]
    (tmp_path / "typo.csv").write_text("\n".join([lines[0].replace("pm2.5", "pm25")] + lines[1:]) + "\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['pm2\.5'\].*For 'pm2\.5', did you mean 'pm25'\?"):
        load_pm25_csv(tmp_path / "typo.csv")


def test_forecast_summary_of_the_real_csv():
    """The UCI file: 43,824 hours 2010-2014, PM2.5 empty in 2,067 (its README)."""
    from mmpo_tasks.forecasting.data import load_splits

    summary = LoadSummary("airquality_grpo")
    load_splits(UCI_CSV, train_years=[2010], val_years=[2011], test_years=[2012], summary=summary)
    hours = {"train": 8760, "val": 8760, "test": 8784}
    assert summary.splits == hours and summary.held_out == 8760 + 8784
    assert summary.skipped == {"year in no split": 43824 - sum(hours.values())}
    assert "PM2.5 unmeasured in 2067 hours (never imputed)" in summary.notes
    assert summary.line().startswith(
        "airquality_grpo data: train 8760, val 8760, test 8784 hours; 17544 held out for evaluation "
        "(by calendar year: val_years [2011], test_years [2012]); 17520 skipped (year in no split: 17520)"
    )
