"""The multi-turn agent loop on the tiny Qwen2-VL: strict tool-call parsing and schema
validation, async tools with timeouts and errors as observations, and the token / image
bookkeeping across turns (only model tokens trained; image features match image tokens; the
log-probs stored at each turn equal one forward over the whole conversation)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from PIL import Image

from mmpo.models import load_model
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout.agent_loop import AgentLoop, AgentSettings, score_trajectories, trajectory_tensors
from mmpo.rollout.engines.base import Generation, RolloutEngine
from mmpo.rollout.engines.hf import HFGenerateEngine
from mmpo.rollout.tools import Tool, ToolCallError, ToolResult, parse_answer, parse_tool_calls

TINY = {"initializer_range": 0.1}


class Echo(Tool):
    name = "echo"
    description = "Repeat a word."
    parameters = {
        "type": "object",
        "properties": {"word": {"type": "string", "maxLength": 20}},
        "required": ["word"],
        "additionalProperties": False,
    }

    def run(self, arguments, context):
        return ToolResult(f"you said {arguments['word']} in {context['room']}")


class Picture(Tool):
    name = "picture"
    description = "Show a coloured square."
    parameters = {
        "type": "object",
        "properties": {"color": {"enum": ["red", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    }

    def run(self, arguments, context):
        rgb = (255, 0, 0) if arguments["color"] == "red" else (0, 0, 255)
        return ToolResult(f"a {arguments['color']} square", images=[Image.new("RGB", (56, 56), rgb)])


class Slow(Tool):
    name = "slow"
    description = "Never answers in time."

    async def run(self, arguments, context):
        await asyncio.sleep(30)
        return ToolResult("too late")


class Boom(Tool):
    name = "boom"
    description = "Raises."

    def run(self, arguments, context):
        raise RuntimeError("disk on fire")


TOOLS = [Echo(), Picture(), Slow(), Boom()]


def test_strict_parsing_and_validation():
    tools = {t.name: t for t in TOOLS}
    calls = parse_tool_calls('I will look. <tool_call>{"name": "echo", "arguments": {"word": "hi"}}</tool_call>', tools)
    assert calls[0].name == "echo" and calls[0].arguments == {"word": "hi"}
    bad = {
        '<tool_call>{"name": "echo", "arguments": {"word": "hi"}}': "unbalanced",
        '<tool_call>{"name": "echo", "arguments": {"word": hi}}</tool_call>': "not valid JSON",
        '<tool_call>["echo"]</tool_call>': "nothing else",
        '<tool_call>{"name": "echo", "arguments": {"word": "hi"}, "x": 1}</tool_call>': "nothing else",
        '<tool_call>{"name": "rm", "arguments": {}}</tool_call>': "unknown tool 'rm'",
        (
            '<tool_call>{"name": "echo", "arguments": {"word": "hi", "path": "/etc/passwd"}}</tool_call>'
        ): "Additional properties",
        '<tool_call>{"name": "echo", "arguments": {}}</tool_call>': "'word' is a required property",
        '<tool_call>{"name": "picture", "arguments": {"color": "green"}}</tool_call>': "color",
        (
            '<tool_call>{"name": "echo", "arguments": {"word": "hi"}}</tool_call>'
            '<tool_call>{"name": "echo", "arguments": {"word": "x"}}</tool_call>'
        ): "at most 1",
    }
    for text, msg in bad.items():
        with pytest.raises(ToolCallError, match=msg):
            parse_tool_calls(text, tools)
    assert parse_answer("so <answer> B </answer>") == "B" and parse_answer("no answer") is None


def _policy():
    model, proc, info = load_model("tiny:qwen2_vl", tiny_overrides=TINY)
    return CausalLMPolicy.from_info(model, proc, info)


class ScriptedEngine(RolloutEngine):
    """Forces each row's scripted turn texts (the model's choices, so every tool path runs) and
    reports the real model's log-probs of the forced tokens in the context it had then."""

    def __init__(self, policy, scripts: list[list[str]]):
        super().__init__(policy)
        self.scripts = scripts
        self.turn = [0] * len(scripts)
        self.active = list(range(len(scripts)))

    def generate(self, model, prompt_inputs, settings, *, device, dtype=None, num_samples=1):
        pol = self.policy
        eos = pol.eos_token_ids[0]
        rows = []
        for i in self.active:
            text = self.scripts[i][self.turn[i]]
            rows.append(pol.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
            self.turn[i] += 1
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pol.pad_token_id)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for k, r in enumerate(rows):
            ids[k, : len(r)] = torch.tensor(r)
            mask[k, : len(r)] = True
        with torch.no_grad():
            lp = pol.log_probs(prompt_inputs, ids, mask, model=model).logp.masked_fill(~mask, 0.0)
        self.active = [i for i in self.active if self.turn[i] < len(self.scripts[i])]
        return Generation(ids, mask, torch.zeros(len(rows), dtype=torch.bool), lp)


def _prompts(pol, n):
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (56, 56), (0, 255, 0))},
                {"type": "text", "text": "what colour?"},
            ],
        }
    ]
    return [pol.encode(msgs) for _ in range(n)]


CALL = '<tool_call>{{"name": "{name}", "arguments": {args}}}</tool_call>'


def test_multi_turn_bookkeeping_with_images_across_turns():
    pol = _policy()
    scripts = [
        [
            CALL.format(name="picture", args='{"color": "red"}'),
            CALL.format(name="picture", args='{"color": "blue"}'),
            "<answer>red</answer>",
        ],
        [CALL.format(name="echo", args='{"word": "hi"}'), "<answer>B</answer>"],
        ["I just answer. <answer>A</answer>"],
        [CALL.format(name="echo", args='{"word": 5}'), CALL.format(name="boom", args="{}"), "no idea"],
    ]
    loop = AgentLoop(pol, ScriptedEngine(pol, scripts), TOOLS, AgentSettings(max_turns=4, tool_timeout_s=2.0))
    prompts = _prompts(pol, 4)
    contexts = [{"room": f"room{i}"} for i in range(4)]
    trajs = loop.run(pol.model, prompts, contexts, device=torch.device("cpu"))
    t0, t1, t2, t3 = trajs
    assert [t.num_turns for t in trajs] == [3, 2, 1, 3]
    assert [t.answer for t in trajs] == ["red", "B", "A", None]
    assert (t0.tool_calls, t0.tool_errors, t0.malformed_calls) == (2, 0, 0)
    assert t1.observations == ["you said hi in room1"]  # the tool saw its row's context
    assert (t3.malformed_calls, t3.tool_calls, t3.tool_errors) == (1, 1, 1)
    assert (
        "invalid arguments for echo" in t3.observations[0]
        and "boom failed: RuntimeError: disk on fire" in t3.observations[1]
    )
    # images: the prompt's plus one per picture call, in token order
    img_id = pol.model.config.image_token_id
    for t, n_img in ((t0, 3), (t1, 1), (t2, 1), (t3, 1)):
        assert int(t.encoding["image_grid_thw"].shape[0]) == n_img
        pads = int((t.encoding["input_ids"] == img_id).sum())
        merge = 4  # spatial_merge_size ** 2
        assert pads == int(t.encoding["image_grid_thw"].prod(-1).sum()) // merge
        assert torch.equal(t.encoding["mm_token_type_ids"][0].bool(), t.encoding["input_ids"][0] == img_id)
    # only model tokens are trained; observation tokens (with their image pads) are not
    for t in trajs:
        after = t.encoding["input_ids"][0, t.prompt_len :]
        assert len(after) == t.length
        mask = torch.tensor(t.action_mask)
        assert not bool((after[mask] == img_id).any())
        model_text = pol.tokenizer.decode(after[mask])
        assert "<tool_response>" not in model_text and "you said" not in model_text
    # one forward over the whole conversations gives the log-probs each turn had when sampled
    logp, mask = score_trajectories(pol, trajs)
    stored = trajectory_tensors(trajs, pol.pad_token_id)["logprobs"]
    assert torch.allclose(logp[mask], stored[mask], atol=2e-4)
    logp[mask].sum().backward()
    assert pol.model.get_output_embeddings().weight.grad is not None


def test_timeouts_and_concurrency_never_stop_the_rollout():
    pol = _policy()
    scripts = [[CALL.format(name="slow", args="{}"), "<answer>A</answer>"] for _ in range(4)]
    loop = AgentLoop(
        pol, ScriptedEngine(pol, scripts), TOOLS, AgentSettings(max_turns=3, tool_timeout_s=0.3, max_concurrency=4)
    )
    t = time.perf_counter()
    trajs = loop.run(pol.model, _prompts(pol, 4), [{}] * 4, device=torch.device("cpu"))
    assert time.perf_counter() - t < 10  # four 30-s tools cut at 0.3 s, concurrently
    for tr in trajs:
        assert tr.answer == "A" and tr.tool_errors == 1
        assert tr.observations == ["error: slow timed out after 0.3 s"]


def test_turn_cap_and_real_sampling_engine():
    """With the real sampling engine the loop ends every row at an answer, a non-call or the cap,
    and the engine's sampling log-probs equal the one-forward re-scoring."""
    pol = _policy()
    loop = AgentLoop(pol, HFGenerateEngine(pol), TOOLS, AgentSettings(max_turns=2, max_new_tokens=6))
    torch.manual_seed(0)
    trajs = loop.run(pol.model, _prompts(pol, 3), [{}] * 3, device=torch.device("cpu"))
    for t in trajs:
        assert 1 <= t.num_turns <= 2 and sum(t.action_mask) > 0
    logp, mask = score_trajectories(pol, trajs)
    stored = trajectory_tensors(trajs, pol.pad_token_id)["logprobs"]
    assert torch.allclose(logp[mask], stored[mask], atol=2e-4)
    # a scripted row that keeps calling tools stops at the cap with no observation after it
    loop = AgentLoop(
        pol,
        ScriptedEngine(pol, [[CALL.format(name="echo", args='{"word": "a"}')] * 2]),
        TOOLS,
        AgentSettings(max_turns=2),
    )
    (t,) = loop.run(pol.model, _prompts(pol, 1), [{"room": "r"}], device=torch.device("cpu"))
    assert t.num_turns == 2 and t.answer is None and len(t.observations) == 1 and t.action_mask[-1]
