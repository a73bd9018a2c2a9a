"""What the token trainer hands the objective beyond rewards: the old-policy pass's extras, the
advantage estimator's inputs, the policy loss's inputs and the demonstration rows.

Each piece is computed only when the configured method declares it
(:mod:`mmpo.trainers.method_inputs`): pi_old's entropies (GTPO, GRPO-S, D3S, HAPO's sampler
statistics), its top-K log-probs (SimKO), CAPO's curvature statistics, answer clusters (SEED-GRPO,
COPO), judge scores of all-negative groups (Spectral PO), reward components (BNPO decomposition),
and the task's demonstrations (SRFT rows; DR-IRL's demonstration reward and data hardness).
"""

from __future__ import annotations

from typing import Any

import torch

from mmpo.policies.causal_lm import TokenLogProbs
from mmpo.rollout.batch import RolloutBatch
from mmpo.tasks import RolloutView


def score_rows(
    trainer: Any,
    batch: RolloutBatch,
    model: torch.nn.Module,
    *,
    entropy: bool = False,
    topk: int = 0,
    curvature: bool = False,
) -> TokenLogProbs:
    """The batch's completions scored under ``model`` without gradient, on the CPU, padded to the
    batch's width: ``logp [N, T]`` and the requested extras. The number of forward passes is fixed
    by the config, not by N: under ZeRO-3 a forward is collective, and filters may leave ranks with
    different row counts (an empty pass scores the trainer's stand-in row)."""
    parts: list[TokenLogProbs] = []
    mb = trainer.shape.micro_batch_size
    width = batch.completion_ids.shape[1]
    extras = {"topk": topk, "curvature": curvature} if topk or curvature else {}
    with torch.no_grad(), trainer.engine.autocast():
        for s in range(0, max(len(batch), trainer.rows_per_step()), mb):
            idx = list(range(s, min(s + mb, len(batch))))
            part = batch.select(idx) if idx else trainer._stand_in
            res = trainer.token_logprobs(part, model, entropy, **extras)
            if idx:
                parts.append(res)

    def cat(name: str, trailing: tuple[int, ...] = ()) -> torch.Tensor:
        ts = [getattr(p, name) for p in parts]
        if not ts:
            return torch.zeros(0, width, *trailing)
        pads = [(0, 0) * len(trailing) + (0, width - t.shape[1]) for t in ts]
        return torch.cat([torch.nn.functional.pad(t.float().cpu(), pad) for t, pad in zip(ts, pads)])

    out = TokenLogProbs(logp=cat("logp"), entropy=cat("entropy") if entropy else None)
    if topk:
        out.topk_logp, out.is_top1 = cat("topk_logp", (topk,)), cat("is_top1").bool()
    if curvature:
        out.curvature = cat("curvature", (4,))
    return out


def cluster_ids(task: Any, batch: RolloutBatch) -> torch.Tensor:
    """``[N]`` long: rows of a group whose parsed answers (``task.parse_prediction``, compared as
    stripped strings) are equal share an id; a row without an answer gets -1."""
    ids = torch.full((len(batch),), -1, dtype=torch.long)
    seen: dict[tuple[int, str], int] = {}
    for i, (sample, text) in enumerate(zip(batch.samples, batch.texts)):
        pred = task.parse_prediction(sample, text)
        key = "" if pred is None else str(pred).strip()
        if key:
            ids[i] = seen.setdefault((int(batch.group_ids[i]), key), len(seen))
    return ids


def components_matrix(batch: RolloutBatch) -> torch.Tensor:
    """``[N, M]`` reward components in name order (BNPO's decomposition); ``[N, 1]`` of the rewards
    when the task reports no component."""
    if not batch.components:
        return batch.rewards.float()[:, None]
    return torch.stack([batch.components[k].float() for k in sorted(batch.components)], dim=1)


def prompt_text(sample: Any) -> str:
    """The text of a sample's chat messages (images left out), for judges and encoders."""
    parts = []
    for m in sample.messages:
        content = m.get("content", "")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text")
    return "\n".join(p for p in parts if p)


def demonstration_rows(trainer: Any, batch: RolloutBatch) -> RolloutBatch | None:
    """One row per group of ``batch`` holding the task's demonstration for its prompt (tokenized,
    ended by EOS, sharing the group's prompt encoding), rewarded by the task like a rollout, with
    ``row_info['demo']`` True. None when no prompt of the batch has a demonstration."""
    task, pol = trainer.task, trainer.policy
    firsts = [int(i) for i in torch.nonzero(batch.rollout_index == 0).flatten()]
    picked, texts, ids = [], [], []
    for i in firsts:
        text = task.demonstration(batch.samples[i])
        if text is None:
            continue
        toks = pol.tokenizer(text, add_special_tokens=False)["input_ids"]
        picked.append(i)
        texts.append(text)
        ids.append(torch.tensor(list(toks)[: trainer.cfg.rollout.max_new_tokens - 1] + [pol.eos_token_ids[0]]))
    if not picked:
        return None
    width = max(len(t) for t in ids)
    completion = torch.full((len(ids), width), pol.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for r, t in enumerate(ids):
        completion[r, : len(t)] = t
        mask[r, : len(t)] = True
    samples = [batch.samples[i] for i in picked]
    group_ids = batch.group_ids[picked]
    out = task.reward_with_rollout(samples, texts, RolloutView(completion, mask, group_ids, tokenizer=pol.tokenizer))
    info = {k: v for k, v in out.row_info.items()}
    info["demo"] = torch.ones(len(picked), dtype=torch.bool)
    return RolloutBatch(
        samples,
        [batch.encodings[i] for i in picked],
        completion,
        mask,
        torch.zeros(len(picked), dtype=torch.bool),
        out.rewards.float(),
        group_ids,
        components={k: v.float() for k, v in out.components.items()},
        texts=texts,
        row_info=info,
        rollout_index=torch.full((len(picked),), -1, dtype=torch.long),
    )


def per_row(values: torch.Tensor, rows_of: torch.Tensor, group_ids: torch.Tensor, fill: float) -> torch.Tensor:
    """Broadcast per-group ``values [k]`` (groups ``rows_of [k]``) to ``[N]`` rows by group id."""
    out = torch.full((len(group_ids),), fill, dtype=torch.float32)
    for v, g in zip(values.tolist(), rows_of.tolist()):
        out[group_ids == g] = float(v)
    return out


def row_advantages(batch: RolloutBatch) -> torch.Tensor:
    """``[N]`` advantages: token-level ``[N, T]`` advantages averaged over each row's valid tokens."""
    adv = batch.advantages
    if adv is None or adv.dim() == 1:
        return adv
    mask = batch.mask.bool()
    return torch.where(mask, adv, torch.zeros_like(adv)).sum(1) / mask.sum(1).clamp_min(1)


__all__ = [
    "row_advantages",
    "cluster_ids",
    "components_matrix",
    "demonstration_rows",
    "per_row",
    "prompt_text",
    "score_rows",
]
