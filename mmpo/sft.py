"""A small supervised trainer: fit a module to examples before RL (e.g. behaviour cloning of
demonstrations for RIPT-VLA, or a forecaster's MSE stage).

The caller supplies the examples and ``loss_fn(batch) -> scalar``; this loop owns the rest:
shuffled minibatches (seeded), AdamW with warmup + cosine decay, gradient clipping, a progress
bar and a loss history. It runs in one process; saving the result is the caller's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from mmpo.engine import lr_factor
from mmpo.errors import TrainingError

#: a run's supervised stage 1 writes its model to ``<run>/sft/model``
SFT_DIR = "sft"


@dataclass
class SFTConfig:
    """Supervised stage settings."""

    epochs: int = field(default=10, metadata={"help": "Passes over the examples.", "min": 1})
    batch_size: int = field(default=32, metadata={"help": "Examples per optimizer step.", "min": 1})
    lr: float = field(
        default=1e-3,
        metadata={"help": "AdamW learning rate (tiny models ~1e-3; 7B VLAs ~2e-5 full, 5e-4 LoRA).", "gt": 0.0},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay.", "min": 0.0})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps.", "min": 0})
    lr_schedule: str = field(
        default="cosine", metadata={"help": "constant | linear | cosine (decays to 0 by the last step)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; 0 disables.", "min": 0.0})


def supervised_train(
    module: nn.Module,
    examples: Sequence[Any],
    loss_fn: Callable[[list[Any]], torch.Tensor],
    cfg: SFTConfig,
    *,
    seed: int = 0,
    desc: str = "sft",
    progress: bool = True,
) -> dict[str, Any]:
    """Train the parameters of ``module`` that require grad on ``examples``.

    ``loss_fn`` receives a list of examples (one minibatch) and returns the mean loss.
    Returns ``{"steps", "loss_first_epoch", "loss_last_epoch", "history"}`` (epoch mean losses).
    A non-finite loss stops with a TrainingError naming the step.
    """
    if not examples:
        raise TrainingError(f"{desc}: no examples to train on")
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.lr_schedule, cfg.warmup_steps, total))
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    bar = None
    if progress:
        bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
    was_training = module.training
    module.train()
    step = 0
    try:
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(examples), generator=gen).tolist()
            losses = []
            for s in range(0, len(order), cfg.batch_size):
                batch = [examples[i] for i in order[s : s + cfg.batch_size]]
                loss = loss_fn(batch)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"{desc}: non-finite loss at step {step} (epoch {epoch}); lower the learning rate"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                step += 1
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", epoch=epoch)
            history.append(sum(losses) / len(losses))
    finally:
        if bar is not None:
            bar.close()
        module.train(was_training)
    if progress:  # one line that stays when the bar is gone
        tqdm.write(
            f"{desc}: {len(examples)} examples, {cfg.epochs} epoch(s), {step} steps, "
            f"epoch loss {history[0]:.4g} -> {history[-1]:.4g}"
        )
    return {"steps": step, "loss_first_epoch": history[0], "loss_last_epoch": history[-1], "history": history}


__all__ = ["SFT_DIR", "SFTConfig", "supervised_train"]


@dataclass
class CompletionExample:
    """A prompt encoding (as ``CausalLMPolicy.encode`` returns it) and the target completion's
    token ids ``[T]`` (EOS appended)."""

    encoding: dict[str, torch.Tensor]
    ids: torch.Tensor


def completion_examples(
    policy: Any, prompts: Sequence[list[dict[str, Any]]], targets: Sequence[str]
) -> list[CompletionExample]:
    """Encode chat ``prompts`` and their target texts for :func:`completion_nll`."""
    tok = policy.tokenizer
    out = []
    for messages, text in zip(prompts, targets):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [policy.eos_token_ids[0]]
        out.append(CompletionExample(policy.encode(messages), torch.tensor(ids, dtype=torch.long)))
    return out


def completion_nll(policy: Any, batch: list[CompletionExample], model: nn.Module | None = None) -> torch.Tensor:
    """Mean negative log-likelihood per target token of a batch of :class:`CompletionExample`."""
    T = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), T), policy.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    out = policy.log_probs(policy.collate([e.encoding for e in batch]), ids, mask, model=model, with_entropy=False)
    m = mask.to(out.logp.device).float()
    return -(out.logp * m).sum() / m.sum()


def warm_start_setup(cfg: Any) -> tuple[Any, nn.Module, Any, Any]:
    """``(task, model, processor, policy)`` of a run config, seeded, for a supervised warm start
    before RL (the model from ``model.path``, a ``CausalLMPolicy`` around it)."""
    from mmpo.models import load_model
    from mmpo.policies.causal_lm import CausalLMPolicy
    from mmpo.tasks import build_task_from
    from mmpo.trainers.loop import seed_everything

    seed_everything(cfg.seed)
    task = build_task_from(cfg)
    model, processor, info = load_model(cfg.model.path, seed=cfg.seed, tiny_overrides=cfg.model.tiny)
    return task, model, processor, CausalLMPolicy.from_info(model, processor, info)


def save_warm_start(model: nn.Module, processor: Any, out: str, result: dict[str, Any]) -> None:
    """Write ``out`` atomically: the model and processor as a save_pretrained folder (for
    ``model.path=<out>``) and ``warm_start.json`` with the training result."""
    import json
    from pathlib import Path

    from mmpo.checkpoint import atomic_folder

    model.eval()
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (Path(tmp) / "warm_start.json").write_text(json.dumps(result, indent=1))
