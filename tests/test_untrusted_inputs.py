"""Untrusted inputs (issue 18, part 7): whatever a model writes in a tool call becomes a counted
invalid-call result, never an exception out of the agent loop; a row's media path is resolved
with symlinks followed and refused when it leaves its data folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mmpo.errors import DataError
from mmpo.models import load_model
from mmpo.paths import PathRefused, contained_path
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout.agent_loop import AgentLoop, AgentSettings
from mmpo.rollout.engines.base import Generation, RolloutEngine
from mmpo.rollout.tools import (
    MAX_JSON_DEPTH,
    MAX_MESSAGE_CHARS,
    Tool,
    ToolCallError,
    ToolResult,
    json_depth,
    parse_tool_calls,
)


class Echo(Tool):
    name = "echo"
    description = "Repeat a word."
    parameters = {
        "type": "object",
        "properties": {"word": {"type": "string", "maxLength": 20}},
        "required": ["word"],
        "additionalProperties": False,
    }

    def run(self, arguments: dict[str, Any], context: dict[str, Any]) -> ToolResult:
        return ToolResult(f"you said {arguments['word']}")


class Half(Tool):
    """A number in halves; any JSON value under ``data`` (for the depth boundary)."""

    name = "half"
    description = "Halve a number."
    parameters = {
        "type": "object",
        "properties": {"x": {"type": "number", "multipleOf": 0.5}, "data": {}},
        "additionalProperties": False,
    }

    def run(self, arguments: dict[str, Any], context: dict[str, Any]) -> ToolResult:
        return ToolResult(f"{1 / arguments['x']:g}")  # x = 0: the tool raises because of its arguments


TOOLS = {t.name: t for t in (Echo(), Half())}


def _call(args: str, name: str = "echo") -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {args}}}</tool_call>'


def _nested(depth: int) -> str:
    """Arguments ``{"data": [[...]]}`` whose whole call nests ``depth`` levels (envelope included)."""
    inner = depth - 2
    return '{"data": ' + "[" * inner + "]" * inner + "}"


#: model outputs that must each give one invalid-call result, with the reason the message names
MALFORMED: dict[str, str] = {
    "deep arrays": _call("[" * 5000 + "]" * 5000),
    "deep objects": _call('{"a": ' * 5000 + "1" + "}" * 5000),
    "deep, unclosed": _call("[" * 5000),
    "deep envelope": "<tool_call>" + "[" * 5000 + "</tool_call>",
    "one level too deep": _call(_nested(MAX_JSON_DEPTH + 1), "half"),
    "huge integer": _call('{"word": ' + "9" * 5000 + "}"),
    "huge integer, multipleOf": _call('{"x": 1' + "0" * 400 + "}", "half"),
    "NaN": _call('{"x": NaN}', "half"),
    "Infinity": _call('{"x": -Infinity}', "half"),
    "overflowing float": _call('{"word": 1e999}'),
    "unpaired surrogate": _call('{"word": "\\ud800"}'),
    "unicode name": _call('{"word": "hi"}', "éçho\u202e🙂"),
    "very long string": _call(json.dumps({"word": "x" * 20_000})),
    "very long name": _call("{}", "n" * 5_000),
    "null body": "<tool_call>null</tool_call>",
    "null name and arguments": '<tool_call>{"name": null, "arguments": null}</tool_call>',
    "null argument": _call('{"word": null}'),
    "NUL character": _call('{"word": "a\\u0000b", "x\\u0000": 1}'),
    "empty body": "<tool_call></tool_call>",
    "not JSON": _call("{word: hi}"),
    "unclosed string of escaped quotes": _call('{"word": "' + '\\"' * 20_000),
    "trailing garbage": _call('{"word": "hi"}} extra'),
    "unbalanced": '<tool_call>{"name": "echo", "arguments": {}}<tool_call>',
    "nested tags": "<tool_call><tool_call>{}</tool_call></tool_call>",
    "unknown tool": _call("{}", "rm"),
    "wrong type": _call('{"word": ["hi"]}'),
    "extra key": _call('{"word": "hi", "path": "/etc/passwd"}'),
    "two calls": _call('{"word": "a"}') + _call('{"word": "b"}'),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_calls_raise_only_a_short_tool_call_error(case: str) -> None:
    with pytest.raises(ToolCallError) as info:
        parse_tool_calls(MALFORMED[case], TOOLS)
    message = str(info.value)
    assert 0 < len(message) <= MAX_MESSAGE_CHARS
    if case.startswith("deep") or case == "one level too deep":
        assert f"deeper than {MAX_JSON_DEPTH} levels" in message
    if case in ("NaN", "Infinity", "huge integer, multipleOf"):  # Python's json reads them; the schema check fails
        assert message.startswith("invalid arguments for half")
    if case == "huge integer":
        assert "not valid JSON" in message and "digits" in message


def test_depth_scan_and_the_limit_itself() -> None:
    assert json_depth('[[1, "[[[{"], {"a": "\\"]]"}]') == 2  # brackets inside strings do not count
    assert json_depth("[" * 5000 + "]" * 5000) == 5000
    assert json_depth("[" * 5000, limit=32) == 33  # stops once past the limit
    assert json_depth('["a\\\\", [[]], "\\"[["]') == 3 and json_depth('"[[') == 0  # an unclosed string runs to the end
    call = parse_tool_calls(_call(_nested(MAX_JSON_DEPTH), "half"), TOOLS)[0]  # exactly at the limit: accepted
    depth, value = 2, call.arguments["data"]  # the envelope and the arguments object, then the arrays
    while isinstance(value, list):
        depth, value = depth + 1, value[0] if value else None
    assert depth == MAX_JSON_DEPTH
    ok = parse_tool_calls(_call('{"word": "日本🙂\u202e"}'), TOOLS)[0]
    assert ok.arguments == {"word": "日本🙂\u202e"}


class ScriptedEngine(RolloutEngine):
    """Emits each row's scripted turn texts as the model's tokens (so the loop sees exactly these
    strings); no log-probs (the loop stores zeros)."""

    def __init__(self, policy: CausalLMPolicy, scripts: list[list[str]]) -> None:
        super().__init__(policy)
        self.scripts = scripts
        self.turn = [0] * len(scripts)
        self.active = list(range(len(scripts)))

    def generate(self, model, prompt_inputs, settings, *, device, dtype=None, num_samples=1):  # noqa: ANN001
        pol = self.policy
        rows = []
        for i in self.active:
            rows.append(pol.tokenizer(self.scripts[i][self.turn[i]], add_special_tokens=False)["input_ids"])
            rows[-1].append(pol.eos_token_ids[0])
            self.turn[i] += 1
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pol.pad_token_id)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for k, r in enumerate(rows):
            ids[k, : len(r)] = torch.tensor(r)
            mask[k, : len(r)] = True
        self.active = [i for i in self.active if self.turn[i] < len(self.scripts[i])]
        return Generation(ids, mask, torch.zeros(len(rows), dtype=torch.bool), None)


def test_nothing_the_model_writes_raises_out_of_the_agent_loop() -> None:
    model, proc, info = load_model("tiny:qwen2_vl", tiny_overrides={"initializer_range": 0.1})
    pol = CausalLMPolicy.from_info(model, proc, info)
    cases = sorted(MALFORMED)
    scripts = [[MALFORMED[c], "<answer>A</answer>"] for c in cases]
    scripts.append([_call('{"x": 0}', "half"), "<answer>A</answer>"])  # the tool raises (1 / 0)
    scripts.append([_call('{"x": 1e308}', "half"), "<answer>A</answer>"])  # valid and huge: runs
    loop = AgentLoop(pol, ScriptedEngine(pol, scripts), TOOLS, AgentSettings(max_turns=2, tool_timeout_s=5.0))
    prompt = pol.encode([{"role": "user", "content": [{"type": "text", "text": "go"}]}])
    trajs = loop.run(pol.model, [prompt] * len(scripts), [{}] * len(scripts), device=torch.device("cpu"))
    for case, t in zip(cases, trajs):
        assert (t.malformed_calls, t.tool_calls, t.tool_errors) == (1, 0, 0), case
        assert t.observations[0].startswith("error: ") and len(t.observations[0]) <= MAX_MESSAGE_CHARS + 7, case
        assert t.answer == "A" and t.num_turns == 2, case  # the rollout went on after the error
    raised, huge = trajs[-2:]
    assert (raised.malformed_calls, raised.tool_calls, raised.tool_errors) == (0, 1, 1)
    assert raised.observations == ["error: half failed: ZeroDivisionError: division by zero"]
    assert (huge.tool_errors, huge.observations) == (0, ["1e-308"])
    assert "deeper than 32 levels" in trajs[cases.index("deep arrays")].transcript()


# -- paths --------------------------------------------------------------------------------------


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (200, 10, 10)).save(path)
    return path


def _outside_targets(tmp_path: Path) -> list[Path]:
    out = [_png(tmp_path / "elsewhere" / "secret.png")]
    if Path("/etc/hostname").is_file():
        out.append(Path("/etc/hostname"))
    return out


def test_contained_path(tmp_path: Path) -> None:
    data = tmp_path / "data"
    real = _png(data / "img" / "a.png")
    (data / "link_in.png").symlink_to(real)
    (data / "sub").mkdir()
    assert contained_path(data, "img/a.png") == real.resolve()
    assert contained_path(data, "link_in.png") == real.resolve()  # a link that stays inside
    assert contained_path(data, "sub/../img/a.png") == real.resolve()  # ".." that stays inside
    for target in _outside_targets(tmp_path):
        link = data / f"link_out_{target.name}"
        link.symlink_to(target)
        with pytest.raises(PathRefused, match=f"qa.jsonl: line 3: '{link.name}' resolves outside") as info:
            contained_path(data, link.name, "qa.jsonl: line 3")
        assert str(target.resolve()) in str(info.value) and isinstance(info.value, DataError)
    _png(tmp_path / "up.png")
    with pytest.raises(PathRefused, match="resolves outside"):
        contained_path(data, "../up.png")
    with pytest.raises(PathRefused, match="resolves outside"):
        contained_path(data, "img/../../up.png")
    with pytest.raises(PathRefused, match="absolute path"):
        contained_path(data, str(real))
    with pytest.raises(PathRefused, match="file not found"):
        contained_path(data, "img/none.png")
    (data / "loop_a").symlink_to(data / "loop_b")
    (data / "loop_b").symlink_to(data / "loop_a")
    with pytest.raises(PathRefused, match="cannot be resolved"):
        contained_path(data, "loop_a")


def test_gui_screenshot_symlinked_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    from mmpo_tasks.gui_agent.episodes import load_episodes

    data = tmp_path / "data"
    real = _png(data / "shots" / "a.png")
    (data / "shots" / "inside.png").symlink_to(real)
    step = {"action": "click(0.5, 0.25)"}
    rows = [
        {"id": "ok", "instruction": "go", "steps": [{**step, "screenshot": "shots/a.png"}]},
        {"id": "link_in", "instruction": "go", "steps": [{**step, "screenshot": "shots/inside.png"}]},
    ]
    targets = _outside_targets(tmp_path)
    for k, target in enumerate(targets):
        (data / "shots" / f"out{k}.png").symlink_to(target)
        rows.append({"id": f"out{k}", "instruction": "go", "steps": [{**step, "screenshot": f"shots/out{k}.png"}]})
    path = data / "episodes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    episodes, skipped = load_episodes(path)
    assert [e.id for e in episodes] == ["ok", "link_in"]
    assert [s["id"] for s in skipped] == [f"out{k}" for k in range(len(targets))]
    for k, (s, target) in enumerate(zip(skipped, targets)):
        assert s["error"].startswith(f"{path}: line {k + 3}: key 'steps[0].screenshot': 'shots/out{k}.png'")
        assert "resolves outside" in s["error"] and str(target.resolve()) in s["error"]


def test_video_paths_stay_in_their_folder(tmp_path: Path) -> None:
    pytest.importorskip("av")
    from mmpo_tasks.video_frames.data import load_video_qa
    from mmpo_tasks.video_frames.video import synthetic_event_video

    data = tmp_path / "data"
    data.mkdir()
    (data / "v").mkdir()
    video = data / "v" / "a.mp4"
    synthetic_event_video(video, seed=0, duration_s=2, num_events=1)
    (data / "inside.mp4").symlink_to(video)
    outside = tmp_path / "elsewhere.mp4"
    synthetic_event_video(outside, seed=1, duration_s=2, num_events=1)
    (data / "out.mp4").symlink_to(outside)
    row = {"question": "Which?", "options": ["x", "y"], "answer": "A"}
    rows = [
        {**row, "id": "plain", "video": "v/a.mp4"},
        {**row, "id": "link_in", "video": "inside.mp4"},
        {**row, "id": "absolute", "video": str(outside)},  # absolute paths are taken as they are
        {**row, "id": "link_out", "video": "out.mp4"},
        {**row, "id": "dotdot", "video": "../elsewhere.mp4"},
    ]
    if Path("/etc/hostname").is_file():
        (data / "host.mp4").symlink_to("/etc/hostname")
        rows.append({**row, "id": "hostname", "video": "host.mp4"})
    path = data / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, skipped = load_video_qa(path)
    assert [r["id"] for r in got] == ["plain", "link_in", "absolute"]
    assert got[1]["video"] == str(video.resolve()) and got[2]["video"] == str(outside.resolve())
    assert [s["id"] for s in skipped] == [r["id"] for r in rows[3:]]
    for s in skipped:
        assert s["error"].startswith(f"{path}: line {s['line']}: key 'video': ") and "resolves outside" in s["error"]
    assert str(outside.resolve()) in skipped[0]["error"]
    if len(skipped) == 3:
        assert os.path.realpath("/etc/hostname") in skipped[2]["error"]


def test_video_tools_take_integers_beyond_a_float(tmp_path: Path) -> None:
    pytest.importorskip("av")
    from mmpo_tasks.video_frames.tools import FrameAtTool, ReaderCache, VideoClipTool
    from mmpo_tasks.video_frames.video import synthetic_event_video

    synthetic_event_video(tmp_path / "a.mp4", seed=0, duration_s=2, num_events=1)
    cache = ReaderCache()
    frame_at, clip = FrameAtTool(cache), VideoClipTool(cache=cache)
    tools = {"frame_at": frame_at, "video_clip": clip}
    context = {"video": str(tmp_path / "a.mp4"), "clip_size": 32, "frame_size": 32}
    big = "1" + "0" * 400  # an integer JSON reads exactly; float() overflows on it
    (call,) = parse_tool_calls(f'<tool_call>{{"name": "frame_at", "arguments": {{"t_s": {big}}}}}</tool_call>', tools)
    res = frame_at.run(call.arguments, context)
    assert not res.error and len(res.images) == 1
    assert res.text.startswith("t_s=inf clamped to 2.0 s (the end of the video)")
    args = f'{{"start_s": -{big}, "end_s": {big}, "num_frames": 2}}'
    (call,) = parse_tool_calls(f'<tool_call>{{"name": "video_clip", "arguments": {args}}}</tool_call>', tools)
    res = clip.run(call.arguments, context)
    assert not res.error and len(res.images) == 2
    assert "start_s=-inf clamped to 0.0 s" in res.text and "end_s=inf clamped to 2.0 s" in res.text
