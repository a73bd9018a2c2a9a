"""Greedy evaluation of a saved policy on a task's held-out samples (``mmpo eval``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmpo.checkpoint import save_json
from mmpo.errors import ConfigError
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout.engines.hf import GenerationSettings, HFGenerateEngine
from mmpo.tasks import Sample, build_task


def generate_greedy(
    policy: CausalLMPolicy, model: torch.nn.Module, samples: list[Sample], *, max_new_tokens: int,
    batch_size: int, device: torch.device,
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
    policy: CausalLMPolicy, model: torch.nn.Module, task: Any, samples: list[Sample], *, max_new_tokens: int,
    batch_size: int, device: torch.device, greedy: bool = True, settings: dict[str, Any] | None = None,
) -> list[Any]:
    """Multi-turn trajectories (greedy by default) of ``samples`` with the task's tools, each
    from its first rollout prompt; the global torch RNG is left untouched."""
    from mmpo.rollout.agent_loop import AgentLoop, AgentSettings

    opts = {**task.agent_settings(), **(settings or {})}
    loop = AgentLoop(policy, HFGenerateEngine(policy), task.tools(), AgentSettings(max_new_tokens=max_new_tokens, greedy=greedy, **opts))
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


def resolve_checkpoint(checkpoint: str) -> str:
    """A save_pretrained or LoRA adapter folder, or a run folder (its ``model/``), or ``tiny:<kind>``."""
    if checkpoint.startswith("tiny:"):
        return checkpoint
    path = Path(checkpoint)
    for folder in (path / "model", path):
        if (folder / "config.json").exists() or (folder / "adapter_config.json").exists():
            return str(folder)
    raise ConfigError(
        f"checkpoint='{checkpoint}' is neither a save_pretrained folder (with config.json), nor a LoRA "
        "adapter folder (with adapter_config.json), nor a run folder with a model/ inside."
    )


def evaluate_checkpoint(cfg: Any, checkpoint: str | None, run_dir: Path) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (default: the config's model.path); write predictions and metrics."""
    from mmpo.engine import resolve_device
    from mmpo.models import load_model

    path = resolve_checkpoint(checkpoint) if checkpoint else cfg.model.path
    device = resolve_device(cfg.device)
    model, processor, info = load_model(
        path, seed=cfg.seed, tiny_overrides=cfg.model.tiny if path.startswith("tiny:") else None, device=device
    )
    policy = CausalLMPolicy.from_info(model, processor, info)
    task = build_task(cfg.task.name, cfg.task.options, seed=cfg.seed)
    samples = task.eval_samples(cfg.eval.num_samples)
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    if task.tools():  # multi-turn: the whole conversation is the prediction
        trajs = run_agent(policy, model, task, samples, max_new_tokens=max_new, batch_size=cfg.eval.batch_size, device=device)
        texts = ["".join(t.turn_texts) for t in trajs]
        metrics = task.eval_trajectories(samples, trajs)
        per_row = task.reward_trajectories(samples, trajs).components
    else:
        texts = generate_greedy(policy, model, samples, max_new_tokens=max_new, batch_size=cfg.eval.batch_size, device=device)
        metrics = task.eval_metrics(samples, texts)
        per_row = task.reward(samples, texts).components  # each prediction's reward components
    out_dir = Path(run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / "predictions.jsonl"
    tmp = pred_path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for i, (s, t) in enumerate(zip(samples, texts)):
            row = {"id": s.id, "prediction": t, "answer": s.answer}
            row.update({k: float(v[i]) for k, v in per_row.items()})
            f.write(json.dumps(row) + "\n")
    tmp.replace(pred_path)
    save_json(out_dir / "metrics.json", {"checkpoint": path, **metrics})
    return {"metrics": metrics, "predictions": str(pred_path)}
