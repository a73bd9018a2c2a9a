"""Greedy (or sampled) decoding of held-out prompts with the plain transformers engine: single-turn
completions and multi-turn agent trajectories (the token evaluator's predictions)."""

from __future__ import annotations

from typing import Any

import torch

from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout.engines.hf import GenerationSettings, HFGenerateEngine
from mmpo.tasks import Sample


def generate_greedy(
    policy: CausalLMPolicy,
    model: torch.nn.Module,
    samples: list[Sample],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[str]:
    """Greedy completions (text) for ``samples``; the global torch RNG is left untouched."""
    engine = HFGenerateEngine(policy)
    settings = GenerationSettings(max_new_tokens, greedy=True)
    texts: list[str] = []
    for s in range(0, len(samples), batch_size):
        part = samples[s : s + batch_size]
        inputs = policy.collate([policy.encode(x.messages) for x in part])
        gen = engine.generate(model, inputs, settings, device=device)
        texts.extend(policy.decode(gen.completion_ids, gen.mask))
    return texts


def run_agent(
    policy: CausalLMPolicy,
    model: torch.nn.Module,
    task: Any,
    samples: list[Sample],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    greedy: bool = True,
    settings: dict[str, Any] | None = None,
) -> list[Any]:
    """Multi-turn trajectories (greedy by default) of ``samples`` with the task's tools, each
    from its first rollout prompt; the global torch RNG is left untouched."""
    from mmpo.rollout.agent_loop import AgentLoop, AgentSettings

    opts = {**task.agent_settings(), **(settings or {})}
    loop = AgentLoop(
        policy,
        HFGenerateEngine(policy),
        task.tools(),
        AgentSettings(max_new_tokens=max_new_tokens, greedy=greedy, **opts),
    )
    state = torch.get_rng_state()
    out: list[Any] = []
    try:
        for s in range(0, len(samples), batch_size):
            part = samples[s : s + batch_size]
            encodings = [policy.encode(task.rollout_messages(x, 0)) for x in part]
            out.extend(loop.run(model, encodings, [task.tool_context(x) for x in part], device=device))
    finally:
        torch.set_rng_state(state)
    return out


__all__ = ["generate_greedy", "run_agent"]
