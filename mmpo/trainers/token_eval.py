"""The token kind's evaluator: greedy completions (or multi-turn agent trajectories) of the task's
held-out samples, scored by the task (see :mod:`mmpo.evaluate` for the row layout).

A row carries its inputs: ``input`` (the user text), ``options`` (``Sample.meta["options"]``, when
the task has them), ``images`` (the prompt's images, a video's frames as one GIF, then the images
the tool results showed: the file an image was read from when ``Sample.meta["image_files"]``, one
entry per image / video part of the user turns, names it; else the image, saved under ``media/``
by :func:`mmpo.evaluate.write_evaluation`), ``completion`` (the whole text; an agent's
turns with each tool call and result) and ``prediction`` (the answer it gives:
``task.parse_prediction``, or an agent's ``<answer>``)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from mmpo.evaluate import resolve_model_folder
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout.greedy import generate_greedy, run_agent
from mmpo.tasks import Sample
from mmpo.trainers.token_samples import image_refs, prompt_media, prompt_text


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
        from mmpo.tasks import build_task_from

        if not checkpoint or checkpoint.startswith("tiny:"):
            path = checkpoint or cfg.model.path
        else:
            path = str(resolve_model_folder(checkpoint))
        device = resolve_device(cfg.device)
        tiny = cfg.model.tiny if path.startswith("tiny:") else None
        model, processor, info = load_model(path, seed=cfg.seed, tiny_overrides=tiny, device=device)
        policy = CausalLMPolicy.from_info(model, processor, info)
        task = build_task_from(cfg)
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
        return [
            self.row(s, text, trajs[i], {k: float(v[i]) for k, v in scores.items()})
            for i, (s, text) in enumerate(zip(items, texts))
        ]

    def row(self, sample: Sample, text: str, traj: Any, scores: dict[str, float]) -> dict[str, Any]:
        """The row of one item (module docstring); ``traj``: its agent trajectory or None."""
        messages = self.task.rollout_messages(sample, 0) if traj is not None else sample.messages
        media = prompt_media(messages)
        images = image_refs(media, sample.meta.get("image_files"))
        if traj is not None:
            completion, prediction = traj.transcript(len(media) + 1), traj.answer
            images += traj.result_images()
        else:
            completion, prediction = text, self.task.parse_prediction(sample, text)
        row: dict[str, Any] = {"id": sample.id, "input": prompt_text(messages), "prediction": prediction}
        row.update({"answer": sample.answer, "completion": completion})
        if sample.meta.get("options"):
            row["options"] = list(sample.meta["options"])
        row["images"] = images
        row.update(scores)
        row["_trajectory"] = traj  # for the task's metrics; not written
        return row

    def summarize(self, items: list[Sample], rows: list[dict[str, Any]]) -> dict[str, float]:
        if self.task.tools():
            return self.task.eval_trajectories(items, [r["_trajectory"] for r in rows])
        return self.task.eval_metrics(items, [r["completion"] for r in rows])

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
