"""Multi-turn agent rollouts: generate -> parse a tool call -> invoke -> append the observation
(text and/or images) -> generate again, until an answer or the turn cap. Batched over all rows
(a whole group, or several), on any rollout engine.

Token bookkeeping. Each row keeps one growing encoding of its whole conversation: the prompt,
then per turn the model's sampled tokens (kept as sampled, never re-tokenised) and the
observation, encoded by the processor from a chat-template snippet (its image pads expanded, its
``pixel_values`` / ``image_grid_thw`` appended after the earlier images, so image features stay
in the order of their tokens). ``action_mask`` marks the model's tokens: only they are trained;
observation tokens are attended to but masked out of the loss.

Tools run asynchronously (asyncio) with a per-call timeout and a concurrency limit; a malformed
call (counted in ``malformed_calls``), a tool that raises or one that hangs (``tool_errors``)
yields an error observation the model sees, and the rollout goes on: nothing the model writes
raises out of :meth:`AgentLoop.run`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mmpo.policies.batching import TOKEN_KEYS
from mmpo.rollout.engines.base import GenerationSettings, RolloutEngine
from mmpo.rollout.tools import Tool, ToolCall, ToolCallError, ToolResult, parse_answer, parse_tool_calls

OBSERVATION_TEMPLATE = (
    "\n<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
)
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
log = logging.getLogger(__name__)


@dataclass
class AgentSettings:
    max_turns: int = 4
    max_new_tokens: int = 64  # per turn
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    tool_timeout_s: float = 10.0
    max_concurrency: int = 8
    max_calls_per_turn: int = 1
    observation_template: str = OBSERVATION_TEMPLATE


@dataclass
class AgentTrajectory:
    """One row's conversation. ``encoding``: prompt + everything after it (batch dim 1);
    ``action_mask`` / ``logprobs`` cover the tokens after the first ``prompt_len`` (True / the
    sampling log-prob on the model's tokens, False / 0 on observation tokens)."""

    encoding: dict[str, torch.Tensor]
    prompt_len: int
    action_mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_texts: list[str] = field(default_factory=list)
    #: the tool calls parsed from each turn (an empty list when the turn made none or a malformed one)
    turn_calls: list[list[ToolCall]] = field(default_factory=list)
    #: the observation after turn j: its text, and the images it showed the model (PIL)
    observations: list[str] = field(default_factory=list)
    observation_images: list[list[Any]] = field(default_factory=list)
    num_turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0  # tools that raised, timed out or refused their arguments
    malformed_calls: int = 0  # calls that could not be parsed or validated
    answer: str | None = None
    truncated: bool = False  # a turn hit max_new_tokens without ending

    @property
    def length(self) -> int:
        return len(self.action_mask)

    def transcript(self, first_image: int = 1) -> str:
        """The conversation after the prompt, readable: per turn ``assistant: <text>``, then each
        ``[tool call] name({arguments})`` and ``[tool result] <text>``; the images a result showed
        are named ``[image k]``, numbered from ``first_image`` in the order of
        :meth:`result_images`."""
        lines: list[str] = []
        k = first_image
        for j, text in enumerate(self.turn_texts):
            lines.append(f"assistant: {text.strip()}")
            for call in self.turn_calls[j] if j < len(self.turn_calls) else []:
                lines.append(f"[tool call] {call.name}({json.dumps(call.arguments, ensure_ascii=False)})")
            if j < len(self.observations):
                images = self.observation_images[j] if j < len(self.observation_images) else []
                shown = "".join(f" [image {k + i}]" for i in range(len(images)))
                k += len(images)
                lines.append(f"[tool result] {self.observations[j].strip()}{shown}")
        return "\n".join(lines)

    def result_images(self) -> list[Any]:
        """Every image the tool results showed, in order (PIL)."""
        return [im for images in self.observation_images for im in images]


def append_encoding(
    enc: dict[str, torch.Tensor], ids: torch.Tensor, more: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``enc`` followed by token ``ids [L]`` (attended), plus the media of ``more`` (the
    processor's output for those tokens) appended after ``enc``'s."""
    out = dict(enc)
    ids = ids.to(enc["input_ids"].dtype).reshape(1, -1)
    out["input_ids"] = torch.cat([enc["input_ids"], ids], dim=1)
    out["attention_mask"] = torch.cat(
        [enc["attention_mask"], torch.ones_like(ids, dtype=enc["attention_mask"].dtype)], dim=1
    )
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in enc:
            extra = more[key] if more is not None and key in more else torch.zeros_like(ids)
            out[key] = torch.cat([enc[key], extra.to(enc[key].dtype).reshape(1, -1)], dim=1)
    for key, value in (more or {}).items():
        if key in TOKEN_KEYS or not torch.is_tensor(value):
            continue
        out[key] = torch.cat([enc[key], value], dim=0) if key in enc else value
    return out


class AgentLoop:
    """Runs multi-turn rollouts of a ``CausalLMPolicy`` through a rollout engine with ``tools``."""

    def __init__(
        self, policy: Any, engine: RolloutEngine, tools: Sequence[Tool] | dict[str, Tool], settings: AgentSettings
    ) -> None:
        self.policy = policy
        self.engine = engine
        self.tools = dict(tools) if isinstance(tools, dict) else {t.name: t for t in tools}
        self.settings = settings

    # -- observations --------------------------------------------------------------------------
    def encode_observation(self, result: ToolResult) -> dict[str, torch.Tensor]:
        """The processor's encoding of an observation snippet (text and images)."""
        s = self.settings
        content = result.text + "".join(IMAGE_PLACEHOLDER for _ in result.images)
        text = s.observation_template.format(content=content)
        proc = self.policy.processor
        if result.images and self.policy.is_vlm:
            enc = proc(text=[text], images=list(result.images), return_tensors="pt")
        else:
            tok = self.policy.tokenizer
            enc = tok([text], return_tensors="pt", add_special_tokens=False)
        return {k: v for k, v in enc.items() if torch.is_tensor(v)}

    # -- tools -----------------------------------------------------------------------------------
    async def _call(self, call: ToolCall, context: dict[str, Any], sem: asyncio.Semaphore) -> ToolResult:
        tool = self.tools[call.name]
        async with sem:
            try:
                if inspect.iscoroutinefunction(tool.run):
                    coro = tool.run(call.arguments, context)
                else:
                    coro = asyncio.to_thread(tool.run, call.arguments, context)
                result = await asyncio.wait_for(coro, timeout=self.settings.tool_timeout_s)
            except asyncio.TimeoutError:
                return ToolResult(f"error: {call.name} timed out after {self.settings.tool_timeout_s:g} s", error=True)
            except Exception as e:  # a failing tool must never stop training
                return ToolResult(f"error: {call.name} failed: {type(e).__name__}: {str(e)[:200]}", error=True)
        if not isinstance(result, ToolResult):
            return ToolResult(f"error: {call.name} returned {type(result).__name__}, not a ToolResult", error=True)
        return result

    def run_tools(self, jobs: list[tuple[int, ToolCall, dict[str, Any]]]) -> dict[int, list[ToolResult]]:
        """Run ``(row, call, context)`` jobs concurrently; results per row in call order."""

        async def main() -> list[ToolResult]:
            sem = asyncio.Semaphore(self.settings.max_concurrency)
            return await asyncio.gather(*(self._call(call, ctx, sem) for _, call, ctx in jobs))

        results = asyncio.run(main()) if jobs else []
        out: dict[int, list[ToolResult]] = {}
        for (row, _, _), res in zip(jobs, results):
            out.setdefault(row, []).append(res)
        return out

    # -- one turn of one row (also the steps of the branching loop, mmpo.rollout.agent_branching) ----
    def absorb_turn(
        self, t: AgentTrajectory, ids: torch.Tensor, logprobs: torch.Tensor, text: str, truncated: bool
    ) -> tuple[bool, list[ToolCall], str | None]:
        """Append a sampled turn (``ids [L]``, their sampling ``logprobs [L]``, decoded ``text``) to
        ``t`` and read it: ``(goes_on, calls, error)``. ``goes_on`` is False when the row ends here
        (truncated, an answer, or neither an answer nor a call); ``error`` is the observation text
        of a malformed call (then ``calls`` is empty and the row goes on)."""
        t.encoding = append_encoding(t.encoding, ids)
        t.action_mask += [True] * len(ids)
        t.logprobs += [float(x) for x in logprobs]
        t.num_turns += 1
        t.turn_texts.append(text)
        t.turn_calls.append([])
        if truncated:
            t.truncated = True
            return False, [], None
        answer = parse_answer(text)
        if answer is not None:
            t.answer = answer
            return False, [], None
        if "<tool_call>" not in text and "</tool_call>" not in text:
            return False, [], None  # neither an answer nor a call: the rollout ends
        try:
            calls = parse_tool_calls(text, self.tools, max_calls=self.settings.max_calls_per_turn)
        except ToolCallError as e:
            t.malformed_calls += 1
            return True, [], f"error: {e}"
        except Exception as e:  # the parser's contract is ToolCallError only; model text must never stop a run
            log.warning("tool-call parsing raised %s; treated as a malformed call", type(e).__name__, exc_info=True)
            t.malformed_calls += 1
            return True, [], f"error: the tool call could not be parsed ({type(e).__name__})"
        t.tool_calls += len(calls)
        t.turn_calls[-1] = calls
        return True, calls, None

    def turn_result(self, t: AgentTrajectory, parts: list[ToolResult], error: str | None) -> ToolResult:
        """The one observation of a turn: ``error`` (a malformed call), else the results of its
        calls joined (their failures counted in ``t.tool_errors``)."""
        if error is not None:
            return ToolResult(error, error=True)
        t.tool_errors += sum(r.error for r in parts)
        return ToolResult(
            "\n".join(r.text for r in parts), [im for r in parts for im in r.images], any(r.error for r in parts)
        )

    def append_observation(self, t: AgentTrajectory, res: ToolResult) -> dict[str, torch.Tensor]:
        """Encode ``res`` and append it to ``t`` (masked out of the loss); returns its encoding
        (``input_ids [1, L]`` and media)."""
        obs = self.encode_observation(res)
        t.encoding = append_encoding(t.encoding, obs["input_ids"][0], obs)
        n_obs = int(obs["input_ids"].shape[1])
        t.action_mask += [False] * n_obs
        t.logprobs += [0.0] * n_obs
        t.observations.append(res.text)
        t.observation_images.append(list(res.images))
        return obs

    # -- the loop --------------------------------------------------------------------------------
    def run(
        self,
        model: torch.nn.Module,
        encodings: Sequence[dict[str, torch.Tensor]],
        contexts: Sequence[dict[str, Any]],
        *,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> list[AgentTrajectory]:
        """One trajectory per prompt encoding (rows are independent; repeat an encoding G times
        for a group). ``contexts[i]`` is what row i's tools may use (e.g. its video)."""
        s = self.settings
        pol = self.policy
        trajs = [AgentTrajectory(encoding=dict(e), prompt_len=int(e["input_ids"].shape[1])) for e in encodings]
        gen = GenerationSettings(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, greedy=s.greedy
        )
        active = list(range(len(trajs)))
        for turn in range(s.max_turns):
            if not active:
                break
            out = self.engine.generate(
                model, pol.collate([trajs[i].encoding for i in active]), gen, device=device, dtype=dtype
            )
            jobs: list[tuple[int, ToolCall, dict[str, Any]]] = []
            errors: dict[int, str] = {}
            still = []
            for row, i in enumerate(active):
                t = trajs[i]
                m = out.mask[row].bool()
                ids = out.completion_ids[row][m]
                lps = out.logprobs[row][m] if out.logprobs is not None else torch.zeros(len(ids))
                text = pol.decode(out.completion_ids[row : row + 1], out.mask[row : row + 1])[0]
                goes_on, calls, error = self.absorb_turn(t, ids, lps, text, bool(out.truncated[row]))
                if not goes_on:
                    continue
                if error is not None:
                    errors[i] = error
                jobs += [(i, c, contexts[i]) for c in calls]
                still.append(i)
            if turn == s.max_turns - 1:
                break  # no observation after the last turn
            results = self.run_tools(jobs)
            for i in still:
                self.append_observation(trajs[i], self.turn_result(trajs[i], results.get(i, []), errors.get(i)))
            active = still
        return trajs


def task_agent(policy: Any, engine: RolloutEngine, task: Any, rollout: Any) -> AgentLoop | None:
    """The agent loop of a training run: ``task``'s tools, sampling settings from ``rollout``
    (the run's ``rollout.*``) and the rest from ``task.agent_settings()``; None for a task without
    tools (single-turn rollouts)."""
    tools = task.tools()
    if not tools:
        return None
    if task.needs_token_entropy:
        from mmpo.errors import ConfigError

        raise ConfigError(f"task {task.name!r}: token-entropy rewards are not available for multi-turn rollouts")
    r = rollout
    settings = AgentSettings(
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        **task.agent_settings(),
    )
    return AgentLoop(policy, engine, tools, settings)


def trajectory_tensors(trajs: Sequence[AgentTrajectory], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The tokens after each prompt, left-aligned: ``completion_ids [n, T]`` (pad after a row's
    end), ``mask [n, T]`` (True on the model's tokens), ``logprobs [n, T]`` (their sampling
    log-probs, 0 elsewhere), ``lengths [n]`` (tokens after the prompt, observations included)."""
    T = max(1, max(t.length for t in trajs))
    ids = torch.full((len(trajs), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(trajs), T, dtype=torch.bool)
    lps = torch.zeros(len(trajs), T)
    for i, t in enumerate(trajs):
        if t.length:
            ids[i, : t.length] = t.encoding["input_ids"][0, t.prompt_len :]
            mask[i, : t.length] = torch.tensor(t.action_mask)
            lps[i, : t.length] = torch.tensor(t.logprobs)
    return {"completion_ids": ids, "mask": mask, "logprobs": lps, "lengths": torch.tensor([t.length for t in trajs])}


def score_trajectories(
    policy: Any,
    trajs: Sequence[AgentTrajectory],
    *,
    model: torch.nn.Module | None = None,
    temperature: float = 1.0,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``[n, T]`` (with grad) of every token after the prompts, and the ``mask [n, T]``
    of the model's tokens (train on those only); one forward over the whole conversations."""
    t = trajectory_tensors(trajs, policy.pad_token_id)
    out = policy.score_conversations(
        [tr.encoding for tr in trajs],
        t["lengths"],
        t["completion_ids"],
        t["mask"],
        model=model,
        temperature=temperature,
        with_entropy=False,
        device=device,
    )
    return out.logp, t["mask"]


__all__ = [
    "AgentLoop",
    "AgentSettings",
    "AgentTrajectory",
    "append_encoding",
    "score_trajectories",
    "task_agent",
    "trajectory_tensors",
]
