"""``tool_qa``: question answering that needs tools, for tool-use RL in the style of TAPO
(arXiv 2510.07038) and RL-Factory (arXiv 2509.06980), offline. See ``docs/plugins/tool_qa.md``.

Questions are answerable only by computing (products of 4-digit numbers, sums of long lists)
or by searching a generated encyclopaedia of fictional facts (:mod:`mmpo_tasks.tool_qa.data`).
The model calls ``python(code)`` (:mod:`mmpo.rollout.python_tool`, a sandboxed subprocess) and
``search(query, top_k)`` (:mod:`mmpo.rollout.search_tool`, BM25) through the multi-turn agent
loop in the Qwen / RL-Factory protocol (``<tool_call>{...}</tool_call>``; each observation a
separate tool-role turn whose tokens are masked out of the loss), and ends with
``<answer>...</answer>``.

Rewards are layered (:mod:`mmpo_tasks.tool_qa.rewards`), each layer logged:

* ``reward.mode: search_env`` (default, RL-Factory): 1 + 0.5 s for a correct answer, s for a
  wrong one, -f + 0.5 s without one (s: the answer-tag and tool-overuse terms, f =
  ``format_weight``); correctness is the TAPO scorer's (score > 0.9) for the question's kind;
* ``reward.mode: tapo``: -1 when the model's text breaks the tag grammar (``strict_format``:
  anchored, our default; false: TAPO's unanchored scan), else the answer score in [0, 1];
* ``reward.process_weight`` (default 0, off as in RL-Factory): adds that weight times the sum
  of RL-Factory's tool step rewards; RL-Factory puts them on each turn's last token, here they
  are added to the sequence reward (a design choice: rewards are per row here);
* ``judge`` (an attribute, a callable ``(question, prediction, ground_truths) -> float``, None
  by default): RL-Factory's model-judge layer; the answer score becomes the larger of the rule
  score and the judge's.

The model's text is its turns joined by newlines; tool observations are not part of it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from mmpo.data_rows import LoadSummary
from mmpo.errors import ConfigError
from mmpo.tasks import RewardOutput, Sample, TokenTask
from mmpo_tasks.tool_qa.data import KINDS, build_world, make_question
from mmpo_tasks.tool_qa.rewards import (
    QWEN_TAGS,
    format_gate,
    last_answer,
    score_answer,
    search_env_reward,
    tool_step_rewards,
)

TOOL_NAMES = ("python", "search")
DEFAULT_PROMPT = (
    "Answer the question. The facts are in an encyclopaedia of fictional places and people: look them up "
    "with the search tool; compute with the python tool (print the result). Call one tool per turn as "
    '<tool_call>{{"name": "search", "arguments": {{"query": "population of X"}}}}</tool_call> or '
    '<tool_call>{{"name": "python", "arguments": {{"code": "print(12 * 34)"}}}}</tool_call>, '
    "and finish with <answer>...</answer> (a number without separators, or a name).\n"
    "Tools: {tools}.\nQuestion: {question}"
)


@dataclass
class WorldOptions:
    seed: int = field(default=0, metadata={"help": "Seed of the generated encyclopaedia (names and facts)."})
    num_countries: int = field(default=8, metadata={"help": "Fictional countries.", "min": 1})
    cities_per_country: int = field(
        default=6, metadata={"help": "Cities per country (the first is the capital).", "min": 1}
    )
    num_people: int = field(default=48, metadata={"help": "Fictional people, each born in a city.", "min": 1})


@dataclass
class PythonToolOptions:
    timeout_s: float = field(default=2.0, metadata={"help": "Wall-clock limit of one run (TAPO: 2 s).", "gt": 0.0})
    memory_mb: int = field(default=1024, metadata={"help": "Address-space limit (RLIMIT_AS) in MiB.", "min": 64})
    max_processes: int = field(default=32, metadata={"help": "RLIMIT_NPROC of the sandbox.", "min": 1})
    max_file_mb: float = field(
        default=1.0, metadata={"help": "Largest file the code may write, stdout included (RLIMIT_FSIZE).", "gt": 0.0}
    )
    max_output_chars: int = field(
        default=1024, metadata={"help": "Characters of output shown to the model (TAPO: 1024).", "min": 16}
    )
    max_code_chars: int = field(default=8000, metadata={"help": "Longest code argument accepted.", "min": 1})
    network: Literal["auto", "namespace", "audit"] = field(
        default="auto",
        metadata={
            "help": "How the network is cut: namespace (unshare --net), audit (a socket-refusing audit hook), "
            "auto (namespace when it works here)."
        },
    )


@dataclass
class SearchToolOptions:
    max_top_k: int = field(default=5, metadata={"help": "Largest top_k the model may ask for.", "min": 1})
    default_top_k: int = field(default=3, metadata={"help": "top_k when the call gives none (TAPO: 3).", "min": 1})
    max_output_chars: int = field(default=2048, metadata={"help": "Characters of results shown.", "min": 64})


@dataclass
class ToolQAReward:
    mode: Literal["search_env", "tapo"] = field(
        default="search_env",
        metadata={"help": "search_env: RL-Factory's layered reward; tapo: -1 on a format violation, else the score."},
    )
    format_weight: float = field(
        default=0.1, metadata={"help": "RL-Factory's f: weight of the answer-tag and tool-overuse terms.", "min": 0.0}
    )
    max_calls: int = field(
        default=2, metadata={"help": "More tool calls than this cost -f (RL-Factory overuse term).", "min": 0}
    )
    strict_format: bool = field(
        default=True,
        metadata={"help": "tapo mode: only whitespace between tag blocks (false: TAPO's unanchored scan)."},
    )
    process_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of RL-Factory's summed tool step rewards (0: off, as RL-Factory).", "min": 0.0},
    )


@dataclass
class ToolQAConfig:
    kinds: list[str] = field(
        default_factory=lambda: list(KINDS),
        metadata={"help": "Question kinds: lookup, two_hop, lookup_compute (search), product, list_sum (python)."},
    )
    num_train: int = field(default=4096, metadata={"help": "Distinct training questions (cycled).", "min": 1})
    tools: list[str] = field(
        default_factory=lambda: list(TOOL_NAMES), metadata={"help": "Tools offered: python, search."}
    )
    world: WorldOptions = field(default_factory=WorldOptions, metadata={"help": "The generated encyclopaedia."})
    python: PythonToolOptions = field(default_factory=PythonToolOptions, metadata={"help": "The python sandbox."})
    search: SearchToolOptions = field(default_factory=SearchToolOptions, metadata={"help": "The BM25 search tool."})
    max_turns: int = field(
        default=4, metadata={"help": "Turn cap of a rollout (TAPO: 4 tool rounds; RL-Factory: 2).", "min": 1}
    )
    tool_timeout_s: float = field(
        default=10.0, metadata={"help": "Agent-loop timeout of one call (RL-Factory: 10 s).", "gt": 0.0}
    )
    max_concurrency: int = field(default=8, metadata={"help": "Tool calls running at once.", "min": 1})
    reward: ToolQAReward = field(default_factory=ToolQAReward, metadata={"help": "Reward layers."})
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "User message ({tools}, {question})."})


class ToolQATask(TokenTask):
    """Questions answerable only with the ``python`` and ``search`` tools, in the multi-turn agent
    loop; layered TAPO / RL-Factory rewards (module docstring). ``judge``: an optional callable
    ``(question, prediction, ground_truths) -> score`` (RL-Factory's judge layer; None: off)."""

    name = "tool_qa"
    description = "questions needing python or BM25 search over a generated encyclopaedia (TAPO / RL-Factory)"
    Config = ToolQAConfig

    def __init__(self, config: ToolQAConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        bad = [k for k in config.kinds if k not in KINDS]
        if bad or not config.kinds:
            raise ConfigError(f"task.kinds: {bad or '[]'} not valid; choose from {list(KINDS)}")
        bad = [t for t in config.tools if t not in TOOL_NAMES]
        if bad or not config.tools or len(set(config.tools)) != len(config.tools):
            raise ConfigError(f"task.tools: {config.tools} not valid; give each of {list(TOOL_NAMES)} at most once")
        s = config.search
        if s.default_top_k > s.max_top_k:
            raise ConfigError(f"task.search.default_top_k={s.default_top_k} is above max_top_k={s.max_top_k}")
        if "python" in config.tools and config.tool_timeout_s <= config.python.timeout_s:
            raise ConfigError(
                f"task.tool_timeout_s={config.tool_timeout_s:g} must exceed task.python.timeout_s="
                f"{config.python.timeout_s:g}: the agent loop would give up before the sandbox reports"
            )
        w = config.world
        self.world = build_world(w.seed, w.num_countries, w.cities_per_country, w.num_people)
        #: RL-Factory's judge layer: ``(question, prediction, ground_truths) -> score in [0, 1]``
        self.judge: Callable[[str, str, list[str]], float] | None = None
        self._tools: list[Any] | None = None
        self._train_texts: set[str] | None = None
        self.data_summary = LoadSummary(
            self.name,
            unit="questions (generated)",
            splits={"train": config.num_train, "eval": "on demand", "passages": len(self.world.passages)},
            held_out_why="evaluation asks about held-out entities (every fifth city, country, person) and "
            "skips an arithmetic question equal to a training one",
        )
        self.data_summary.print()

    # -- samples --------------------------------------------------------------------------------
    def _make(self, split: str, index: int) -> Sample:
        rng = random.Random(f"tool_qa-{split}-{self.seed}-{index}")
        kind = self.config.kinds[index % len(self.config.kinds)]
        q = make_question(self.world, kind, rng, split)
        text = self.config.prompt.format(tools=", ".join(self.config.tools), question=q.text)
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        return Sample(
            id=f"{split}-{index}",
            messages=messages,
            answer=q.answers,
            meta={"kind": kind, "source": q.source, "question": q.text},
        )

    def num_train(self) -> int:
        return self.config.num_train

    def train_sample(self, index: int) -> Sample:
        return self._make("train", index % self.config.num_train)

    def eval_samples(self, n: int) -> list[Sample]:
        """``n`` held-out questions; one whose text is a training question's is skipped."""
        if self._train_texts is None:
            self._train_texts = {self._make("train", i).meta["question"] for i in range(self.config.num_train)}
        out: list[Sample] = []
        i = 0
        while len(out) < n and i < 100 * (n + 10):
            s = self._make("eval", i)
            i += 1
            if s.meta["question"] not in self._train_texts:
                out.append(s)
        return out

    def demonstration(self, sample: Sample) -> str:
        """A well-formed final turn with the right answer (no tool call)."""
        return f"<answer>{sample.answer[0]}</answer>"

    # -- tools ----------------------------------------------------------------------------------
    def tools(self) -> list[Any]:
        """The configured tools, built once (the BM25 index is built here)."""
        if self._tools is None:
            from mmpo.rollout.python_tool import PythonTool, SandboxLimits
            from mmpo.rollout.search_tool import SearchTool

            c = self.config
            built: list[Any] = []
            for name in c.tools:
                if name == "python":
                    p = c.python
                    limits = SandboxLimits(
                        timeout_s=p.timeout_s,
                        memory_mb=p.memory_mb,
                        max_processes=p.max_processes,
                        max_file_mb=p.max_file_mb,
                        max_output_chars=p.max_output_chars,
                        network=p.network,
                    )
                    limits.check("task.python")
                    built.append(PythonTool(limits, max_code_chars=p.max_code_chars))
                else:
                    s = c.search
                    built.append(
                        SearchTool(
                            self.world.passages,
                            max_top_k=s.max_top_k,
                            default_top_k=s.default_top_k,
                            max_output_chars=s.max_output_chars,
                        )
                    )
            self._tools = built
        return self._tools

    def agent_settings(self) -> dict[str, Any]:
        c = self.config
        return {
            "max_turns": c.max_turns,
            "tool_timeout_s": c.tool_timeout_s,
            "max_concurrency": c.max_concurrency,
            "max_calls_per_turn": 1,
        }

    # -- rewards --------------------------------------------------------------------------------
    def score_text(self, sample: Sample, text: str, tool_turns: list[tuple[int, int, bool]]) -> dict[str, float]:
        """Every reward layer of the model's ``text`` (its turns joined) for ``sample``, and the
        total under ``reward``; ``tool_turns``: per tool turn ``(calls, failed, malformed)``."""
        w = self.config.reward
        gate = format_gate(text, tags=QWEN_TAGS, strict=w.strict_format)
        pred = last_answer(text)
        ans = score_answer(pred, sample.answer, sample.meta["source"])
        score = float(ans["score"])
        out: dict[str, float] = {}
        if self.judge is not None and pred is not None:
            judged = float(self.judge(sample.meta["question"], pred, list(sample.answer)))
            out["judge"] = judged
            score = max(score, judged)
        correct = score > 0.9
        env = search_env_reward(text, correct, format_weight=w.format_weight, max_calls=w.max_calls)
        steps = tool_step_rewards(tool_turns)
        if w.mode == "tapo":
            total = score if gate["valid"] else -1.0
        else:
            total = env["reward"]
        total += w.process_weight * steps["step_reward"]
        out.update(
            {
                "accuracy": float(correct),
                "answer_score": score,
                "format": float(bool(gate["valid"])),
                "answer_tags": float(env["answer_term"] > 0),
                "overuse": float(env["overuse_term"] < 0),
                "has_answer": env["has_answer"],
                "tool_step_reward": steps["step_reward"],
                "tool_validity": steps["validity"],
                "total": total,
            }
        )
        return out

    @staticmethod
    def tool_turns(trajectory: Any) -> list[tuple[int, int, bool]]:
        """``(calls, failed, malformed)`` per tool turn that got an observation, from an
        ``AgentTrajectory``. A call made on the last allowed turn is never run and not counted.
        With one call a turn (this task's setting) the failures are the trajectory's
        ``tool_errors``; which turn failed does not change the layer's sum, so they are put first."""
        executed = [calls for calls in trajectory.turn_calls[: len(trajectory.observations)]]
        n_calls = sum(len(c) for c in executed)
        malformed = sum(1 for c in executed if not c)
        failed = min(trajectory.tool_errors, n_calls)
        turns = [(1, 1, False)] * failed + [(1, 0, False)] * (n_calls - failed)
        return turns + [(0, 0, True)] * malformed

    def reward_trajectories(self, samples: list[Sample], trajectories: list[Any]) -> RewardOutput:
        rows = [self.score_text(s, "\n".join(t.turn_texts), self.tool_turns(t)) for s, t in zip(samples, trajectories)]
        for r, t in zip(rows, trajectories):
            r.update(
                {
                    "turns": float(t.num_turns),
                    "tool_calls": float(t.tool_calls),
                    "tool_errors": float(t.tool_errors),
                    "malformed_calls": float(t.malformed_calls),
                }
            )
        keys = [k for k in rows[0] if k != "total"] if rows else []
        comps = {k: torch.tensor([r.get(k, 0.0) for r in rows], dtype=torch.float32) for k in keys}
        return RewardOutput(rewards=torch.tensor([r["total"] for r in rows], dtype=torch.float32), components=comps)

    def reward(self, samples: list[Sample], completions: list[str]) -> RewardOutput:
        """Single-text scoring (no tool turns): the same layers on each completion."""
        rows = [self.score_text(s, c, []) for s, c in zip(samples, completions)]
        keys = [k for k in rows[0] if k != "total"] if rows else []
        comps = {k: torch.tensor([r.get(k, 0.0) for r in rows], dtype=torch.float32) for k in keys}
        return RewardOutput(rewards=torch.tensor([r["total"] for r in rows], dtype=torch.float32), components=comps)

    def eval_trajectories(self, samples: list[Sample], trajectories: list[Any]) -> dict[str, float]:
        """reward, each component's mean, and ``accuracy/<kind>``."""
        metrics = super().eval_trajectories(samples, trajectories)
        acc = self.reward_trajectories(samples, trajectories).components["accuracy"]
        for kind in self.config.kinds:
            idx = [i for i, s in enumerate(samples) if s.meta["kind"] == kind]
            if idx:
                metrics[f"accuracy/{kind}"] = float(acc[idx].mean())
        return metrics


__all__ = ["PythonToolOptions", "SearchToolOptions", "ToolQAConfig", "ToolQAReward", "ToolQATask", "WorldOptions"]
