"""``tool_qa``: the reward layers on hand-written completions give the spec's values (TAPO format
gate and scorer, RL-Factory search-environment and step rewards), observations are masked out of
the loss, the real tools run inside the agent loop, and the recipe loads and trains a step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmpo.cli import main
from mmpo.config import load_config
from mmpo.core.aggregation import aggregate
from mmpo.errors import ConfigError
from mmpo.models import load_model
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout.agent_loop import AgentLoop, AgentSettings, AgentTrajectory, trajectory_tensors
from mmpo.rollout.engines.base import Generation, RolloutEngine
from mmpo.tasks import Sample, build_task
from mmpo.trainers import trainer_class_for
from mmpo_tasks.tool_qa.data import KINDS
from mmpo_tasks.tool_qa.rewards import (
    TAPO_TAGS,
    format_gate,
    levenshtein,
    normalize_answer,
    score_answer,
    search_env_reward,
    tool_step_rewards,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tool_rl.yaml")


# -- T6-a: TAPO's format gate ----------------------------------------------------------------
def test_t6a_format_gate() -> None:
    good = format_gate("<think>a</think><search>q</search><response>r</response><answer>x</answer>")
    assert good["valid"] and good["search_count"] == 1 and good["answer"] == "x"
    stray = "<think>a</think>text<answer>x</answer>"
    assert format_gate(stray, strict=False)["valid"]  # TAPO's unanchored scan
    assert not format_gate(stray, strict=True)["valid"]
    for text, why in (
        ("<think>a</think><answer>x</answer> extra", "after the answer"),
        ("<think>a</think><answer>x</answer><think>b</think>", "not <answer>"),
        ("<think>a</think><tool>q</tool><answer>x</answer>", "unknown tag <tool>"),
        ("no tags at all", "no <tag>"),
    ):
        for strict in (True, False):
            out = format_gate(text, tags=TAPO_TAGS, strict=strict)
            assert not out["valid"] and why in str(out["reason"]) and out["answer"] is None
    assert format_gate("<answer>" + "y" * 150 + "</answer>")["answer"] == "y" * 100  # TAPO: last 100 chars


# -- T6-b: TAPO's scorer -----------------------------------------------------------------------
def test_t6b_scorer() -> None:
    assert score_answer("barack obama", "obama", "nq")["score"] == 1.0
    assert score_answer("obamma", "obama", "nq")["score"] == pytest.approx(1 - 1 / 6)
    assert score_answer("paris", "london", "nq")["score"] == 0.0  # ratio 1.0 >= 0.5
    assert levenshtein("paris", "london") == 6 and levenshtein("obamma", "obama") == 1
    assert score_answer("3.1416", "3.14159", "calculator") == {"score": 1.0, "correct": True}
    assert score_answer("3.15", "3.14159", "calculator")["score"] == 0.0
    assert score_answer("Twelve", "12")["score"] == 1.0
    assert score_answer("10,139,080", ["1", "10139080"])["score"] == 1.0  # separators; max over truths
    assert score_answer("about 104", "100", "complex")["score"] == 1.0  # 4 % relative error
    assert score_answer("106", "100", "complex")["score"] == 0.0
    assert score_answer(None, "12")["score"] == 0.0
    assert normalize_answer("  Eleven  Apples. ") == "11 apples"
    with pytest.raises(ConfigError, match="source"):
        score_answer("1", "1", "fuzzy")


# -- T6-d: RL-Factory's search-environment reward ------------------------------------------
CALL = '<tool_call>{"name": "search", "arguments": {"query": "q"}}</tool_call>'


def test_t6d_search_env_reward() -> None:
    one = f"{CALL}\n<answer>x</answer>"
    three = f"{CALL}{CALL}{CALL}\n<answer>x</answer>"
    assert search_env_reward(one, True)["reward"] == pytest.approx(1.05)
    assert search_env_reward(three, True)["reward"] == pytest.approx(1.0)
    assert search_env_reward(one, False)["reward"] == pytest.approx(0.1)
    assert search_env_reward(f"{CALL} I think x", False)["reward"] == pytest.approx(-0.15)
    # tags that do not alternate cost -f even with an answer
    out = search_env_reward("<answer>x</answer><answer>y", True)
    assert out["answer_term"] == pytest.approx(-0.1) and out["reward"] == pytest.approx(1 - 0.05)
    # an answer inside <think> does not count
    assert search_env_reward("<think><answer>x</answer></think>", True)["has_answer"] == 0.0


def test_tool_step_rewards() -> None:
    assert tool_step_rewards([]) == {"step_reward": 0.0, "validity": 1.0}
    assert tool_step_rewards([(1, 0, False)])["step_reward"] == pytest.approx(0.1)
    assert tool_step_rewards([(1, 1, False)])["step_reward"] == pytest.approx(-0.1)
    assert tool_step_rewards([(0, 0, True)])["step_reward"] == pytest.approx(-0.05)
    out = tool_step_rewards([(2, 1, False), (1, 0, False), (0, 0, True)])
    assert out["step_reward"] == pytest.approx(0.0 + 0.1 - 0.05) and out["validity"] == pytest.approx(2 / 4)


# -- the task's reward on hand-written completions -------------------------------------------
def _task(**options) -> object:
    return build_task("tool_qa", options)


def test_task_rewards_on_hand_written_completions() -> None:
    task = _task()
    s = Sample("x", [], answer=["10139080"], meta={"kind": "product", "source": "calculator", "question": "q"})
    call = '<tool_call>{"name": "python", "arguments": {"code": "print(7390 * 1372)"}}</tool_call>'
    texts = [
        f"{call}\n<answer>10,139,080</answer>",  # right, one call
        f"{call}\n<answer>10139081</answer>",  # wrong
        "I guess 10139080",  # no answer tag
        f"{call}\n{call}\n{call}\n<answer>10139080</answer>",  # right, three calls
    ]
    out = task.reward([s] * 4, texts)
    assert out.rewards.tolist() == pytest.approx([1.05, 0.1, -0.15, 1.0])
    assert out.components["accuracy"].tolist() == [1, 0, 0, 1]
    assert out.components["format"].tolist() == [1, 1, 0, 1]
    tapo = _task(reward={"mode": "tapo"})
    assert tapo.reward([s] * 4, texts).rewards.tolist() == pytest.approx([1.0, 0.0, -1.0, 1.0])
    stray = tapo.reward([s], [f"{call} so <answer>10139080</answer>"]).rewards.tolist()
    loose = _task(reward={"mode": "tapo", "strict_format": False}).reward([s], [f"{call} so <answer>10139080</answer>"])
    assert stray == [-1.0] and loose.rewards.tolist() == [1.0]
    # the judge layer (a callable, stubbed): the larger of rule and judge scores counts
    task.judge = lambda question, pred, truths: 1.0 if pred == "ten million and change" else 0.0
    judged = task.reward([s], ["<answer>ten million and change</answer>"])
    assert judged.components["judge"].tolist() == [1.0] and judged.rewards.tolist() == pytest.approx([1.05])


def test_bad_options_raise_config_errors() -> None:
    for options, key in (
        ({"kinds": ["riddle"]}, "task.kinds"),
        ({"tools": ["shell"]}, "task.tools"),
        ({"tools": ["python", "python"]}, "task.tools"),
        ({"search": {"max_top_k": 2, "default_top_k": 3}}, "default_top_k"),
        ({"python": {"network": "wifi"}}, "network"),
        ({"reward": {"mode": "judge"}}, "mode"),
        ({"tool_timeout_s": 2.0, "python": {"timeout_s": 2.0}}, "tool_timeout_s"),
    ):
        with pytest.raises(ConfigError, match=key):
            _task(**options)


def test_questions_and_held_out_entities() -> None:
    task = _task()
    train = [task.train_sample(i) for i in range(50)]
    assert [s.meta["kind"] for s in train[:5]] == list(KINDS)
    prod = next(s for s in train if s.meta["kind"] == "product")
    a, b = (int(x) for x in prod.meta["question"].removeprefix("What is ").rstrip("?").split(" * "))
    assert prod.answer == [str(a * b)] and 1000 <= a <= 9999 and 1000 <= b <= 9999
    lst = next(s for s in train if s.meta["kind"] == "list_sum")
    nums = [int(x) for x in lst.meta["question"].split(": ")[1].rstrip("?").split(", ")]
    assert len(nums) == 12 and lst.answer == [str(sum(nums))]
    dens = next(s for s in train if s.meta["kind"] == "lookup_compute")
    city = next(c for c in task.world.cities if f"density of {c.name} " in dens.meta["question"])
    assert dens.answer == [f"{city.population / city.area_km2:.1f}"]
    # evaluation asks about entities that training never names
    names = {c.name for c in task.world.cities} | {p.name for p in task.world.people} | set(task.world.countries)
    train_names = {n for s in (task.train_sample(i) for i in range(500)) for n in names if n in s.meta["question"]}
    evals = task.eval_samples(40)
    eval_names = {n for s in evals for n in names if n in s.meta["question"]}
    assert eval_names and not (eval_names & train_names)
    assert task.tools() is task.tools()  # built once (the BM25 index)


# -- T6-c: observation tokens are masked out of the loss --------------------------------------
def test_t6c_observation_mask_and_token_mean_denominator() -> None:
    traj = AgentTrajectory(encoding={"input_ids": torch.arange(20).reshape(1, 20)}, prompt_len=8)
    traj.action_mask = [True] * 5 + [False] * 3 + [True] * 4
    traj.logprobs = [0.0] * 12
    t = trajectory_tensors([traj], pad_token_id=0)
    assert t["mask"][0].int().tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1]
    assert int(t["mask"].sum()) == 9
    loss = torch.ones(1, 12)
    loss[0, 5:8] = 1000.0  # observation positions: must not move the loss
    loss[0, :5] = 2.0
    assert float(aggregate(loss, t["mask"], "token-mean")) == pytest.approx((5 * 2 + 4 * 1) / 9)


class ScriptedEngine(RolloutEngine):
    """Forces each row's scripted turn texts (so that every tool path runs); log-probs 0."""

    def __init__(self, policy, scripts: list[list[str]]):
        super().__init__(policy)
        self.scripts, self.turn = scripts, [0] * len(scripts)
        self.active = list(range(len(scripts)))

    def generate(self, model, prompt_inputs, settings, *, device, dtype=None, num_samples=1):
        pol = self.policy
        rows = []
        for i in self.active:
            text = self.scripts[i][self.turn[i]]
            rows.append(pol.tokenizer(text, add_special_tokens=False)["input_ids"] + [pol.eos_token_ids[0]])
            self.turn[i] += 1
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pol.pad_token_id)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for k, r in enumerate(rows):
            ids[k, : len(r)], mask[k, : len(r)] = torch.tensor(r), True
        self.active = [i for i in self.active if self.turn[i] < len(self.scripts[i])]
        return Generation(ids, mask, torch.zeros(len(rows), dtype=torch.bool), torch.zeros(len(rows), T))


def test_real_tools_in_the_agent_loop_with_masked_observations() -> None:
    task = _task(max_turns=3)
    model, proc, info = load_model("tiny:qwen2")
    pol = CausalLMPolicy.from_info(model, proc, info)
    prod = task.train_sample(3)
    look = task.train_sample(0)
    assert prod.meta["kind"] == "product" and look.meta["kind"] == "lookup"
    a, b = prod.meta["question"].removeprefix("What is ").rstrip("?").split(" * ")
    word = look.meta["question"].rstrip("?").split()[-1]
    py = '<tool_call>{"name": "python", "arguments": {"code": "print(%s * %s)"}}</tool_call>' % (a, b)
    se = '<tool_call>{"name": "search", "arguments": {"query": "%s", "top_k": 2}}</tool_call>' % look.meta["question"]
    loop_bomb = '<tool_call>{"name": "python", "arguments": {"code": "while True: pass"}}</tool_call>'
    scripts = [
        [py, f"<answer>{prod.answer[0]}</answer>"],
        [se, f"<answer>{look.answer[0]}</answer>"],
        [loop_bomb, '<tool_call>{"name": "search", "arguments": {"query": 5}}</tool_call>', "<answer>0</answer>"],
    ]
    settings = AgentSettings(**{**task.agent_settings(), "max_new_tokens": 200})
    loop = AgentLoop(pol, ScriptedEngine(pol, scripts), task.tools(), settings)
    samples = [prod, look, prod]
    enc = [pol.encode(s.messages) for s in samples]
    trajs = loop.run(pol.model, enc, [task.tool_context(s) for s in samples], device=torch.device("cpu"))
    t0, t1, t2 = trajs
    assert t0.observations == [prod.answer[0]]  # the sandbox computed the product
    assert t1.observations[0].startswith("Doc 1 (id: p") and f"population of {word} is" in t1.observations[0]
    assert "timed out" in t2.observations[0] and "invalid arguments for search" in t2.observations[1]
    assert (t2.tool_calls, t2.tool_errors, t2.malformed_calls) == (1, 1, 1)
    # observation tokens (the tool-role turns) are attended to but not trained
    for t in trajs:
        after = t.encoding["input_ids"][0, t.prompt_len :]
        mask = torch.tensor(t.action_mask)
        model_text = pol.tokenizer.decode(after[mask])
        obs_text = pol.tokenizer.decode(after[~mask])
        assert "<tool_response>" not in model_text and "<tool_response>" in obs_text
        assert all(o.splitlines()[0] in obs_text for o in t.observations)
        assert "Doc 1" not in model_text and "timed out" not in model_text and "invalid arguments" not in model_text
        snippets = [settings.observation_template.format(content=o) for o in t.observations]
        n_obs = sum(len(pol.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in snippets)
        assert int((~mask).sum()) == n_obs  # exactly the tool-role turns are masked
    out = task.reward_trajectories(samples, trajs)
    assert out.rewards.tolist() == pytest.approx([1.05, 1.05, 0.1])
    assert out.components["tool_calls"].tolist() == [1, 1, 1]
    assert out.components["tool_step_reward"].tolist() == pytest.approx([0.1, 0.1, -0.1 - 0.05])
    assert out.components["tool_validity"].tolist() == pytest.approx([1.0, 1.0, 0.0])


# -- the recipe ------------------------------------------------------------------------------
def test_recipe_prepares_and_trains_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    cfg = load_config(CONFIG, [])
    task, algo = trainer_class_for(cfg.task.name).prepare(cfg)
    assert task.name == "tool_qa" and [t.name for t in task.tools()] == ["python", "search"]
    run = tmp_path / "run"
    small = [
        "trainer.max_steps=1",
        "rollout.group_size=2",
        "rollout.prompts_per_step=2",
        "rollout.max_new_tokens=16",
        "algorithm.max_draws=1",
        "task.max_turns=2",
        "eval.num_samples=2",
        "eval.batch_size=2",
    ]
    assert main(["train", CONFIG, f"output_dir={run}", *small]) == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 1
    for key in ("reward/accuracy", "reward/format", "reward/tool_validity", "reward/tool_calls", "loss"):
        assert key in lines[-1], key
