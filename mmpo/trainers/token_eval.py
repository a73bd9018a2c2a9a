"""The token kind's evaluator: greedy completions (or multi-turn agent trajectories) of the task's
held-out samples, scored by the task (see :mod:`mmpo.evaluate` for the row layout)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from mmpo.evaluate import resolve_model_folder
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout.greedy import generate_greedy, run_agent
from mmpo.tasks import Sample


def prompt_text(sample: Sample) -> str:
    """The text of a sample's messages (images and videos left out), turns joined by newlines."""
    parts = []
    for m in sample.messages:
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text")
    return "\n".join(p for p in parts if p)


class TokenEvaluator:
    """Greedy decoding of ``num_samples`` held-out samples with ``model`` (the live training
    module, or a checkpoint loaded for ``mmpo eval``). ``params`` wraps generation (ZeRO-3
    gathers the sharded parameters there)."""

    def __init__(
        self,
        policy: CausalLMPolicy,
        model: torch.nn.Module,
        task: Any,
        *,
        num_samples: int,
        max_new_tokens: int,
        batch_size: int,
        device: torch.device,
        params: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.policy, self.model, self.task = policy, model, task
        self.num_samples, self.max_new_tokens, self.batch_size, self.device = (
            num_samples,
            max_new_tokens,
            batch_size,
            device,
        )
        self.params = params
        self._items: list[Sample] | None = None

    @classmethod
    def from_checkpoint(cls, cfg: Any, checkpoint: str | None) -> tuple[TokenEvaluator, str]:
        """The policy of ``checkpoint`` (a run folder, a save_pretrained or adapter folder,
        ``tiny:<kind>``; default: the config's model.path) and the task, loaded without an
        optimizer or a training engine; returns ``(evaluator, what was loaded)``."""
        from mmpo.engine import resolve_device
        from mmpo.models import load_model
        from mmpo.tasks import build_task

        if not checkpoint or checkpoint.startswith("tiny:"):
            path = checkpoint or cfg.model.path
        else:
            path = str(resolve_model_folder(checkpoint))
        device = resolve_device(cfg.device)
        tiny = cfg.model.tiny if path.startswith("tiny:") else None
        model, processor, info = load_model(path, seed=cfg.seed, tiny_overrides=tiny, device=device)
        policy = CausalLMPolicy.from_info(model, processor, info)
        task = build_task(cfg.task.name, cfg.task.options, seed=cfg.seed)
        return cls(policy, model, task, **eval_sizes(cfg), device=device), path

    def items(self) -> list[Sample]:
        if self._items is None:
            self._items = self.task.eval_samples(self.num_samples) if self.num_samples else []
        return self._items

    def predict(self, items: list[Sample], offset: int) -> list[dict[str, Any]]:
        kw = dict(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, device=self.device)
        state = torch.get_rng_state()  # greedy decoding must not move the training RNG
        try:
            with self.params():
                if self.task.tools():  # multi-turn: the whole conversation is the prediction
                    trajs = run_agent(self.policy, self.model, self.task, items, **kw)
                    texts = ["".join(t.turn_texts) for t in trajs]
                    scores = self.task.reward_trajectories(items, trajs).components
                else:
                    trajs = [None] * len(items)
                    texts = generate_greedy(self.policy, self.model, items, **kw)
                    scores = self.task.reward(items, texts).components
        finally:
            torch.set_rng_state(state)
        rows = []
        for i, (s, text) in enumerate(zip(items, texts)):
            row = {"id": s.id, "input": prompt_text(s), "prediction": text, "answer": s.answer}
            row.update({k: float(v[i]) for k, v in scores.items()})
            row["_trajectory"] = trajs[i]  # for the task's metrics; not written
            rows.append(row)
        return rows

    def summarize(self, items: list[Sample], rows: list[dict[str, Any]]) -> dict[str, float]:
        if self.task.tools():
            return self.task.eval_trajectories(items, [r["_trajectory"] for r in rows])
        return self.task.eval_metrics(items, [r["prediction"] for r in rows])

    def write_artifacts(self, out_dir: Path, items: list[Sample], rows: list[dict[str, Any]]) -> dict[str, str]:
        return {}


def eval_sizes(cfg: Any) -> dict[str, int]:
    """The evaluator's sizes from ``eval.*`` (``max_new_tokens`` 0: the rollout's)."""
    e = cfg.eval
    return {
        "num_samples": e.num_samples,
        "max_new_tokens": e.max_new_tokens or cfg.rollout.max_new_tokens,
        "batch_size": e.batch_size,
    }


__all__ = ["TokenEvaluator", "eval_sizes", "prompt_text"]
