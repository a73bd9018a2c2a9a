"""The rollout batch: G completions per prompt, flattened to N rows (group-major)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from mmpo.tasks import Sample


@dataclass
class RolloutBatch:
    """N = (number of groups) x G trajectories of token action units.

    samples, encodings: per row (a group repeats its sample / prompt encoding G times).
    completion_ids [N, T], mask [N, T] bool, truncated [N] bool, rewards [N],
    components {name: [N]}, group_ids [N] long, advantages [N] (set after scoring),
    logp_old / logp_ref [N, T] (optional, filled by the trainer); logp_rollout [N, T] (the
    rollout engine's own sampling log-probs, when it reports them); row_info {name: [N]} (per-row
    data from the task's reward, e.g. ARES difficulty buckets).

    Multi-turn rows (agent rollouts): ``encodings[i]`` is the whole conversation (prompt, model
    turns and observations); ``conversation_lengths [N]`` counts its tokens after the prompt,
    which ``completion_ids`` holds left-aligned, with ``mask`` True only on the model's tokens.
    ``trajectories`` holds each row's ``AgentTrajectory`` (its turns, tool calls and results).

    ``rollout_index [N]``: which rollout of its group a row is (k of the task's
    ``rollout_messages(sample, k)``); by default the row's position in its group, as rolled out.

    ``entropy_old [N, T]``: pi_old's full-vocabulary entropy of each completion token (filled by
    the trainer when a filter ranks tokens by it, D3S). ``draw_advantages [N]`` (or ``[N, T]``):
    the advantages estimated on the whole draw a row came from, before CPPO pruning dropped its
    group's other rows (``cppo_prune`` with ``refill``; see :mod:`mmpo.trainers.token_draws`).
    """

    samples: list[Sample]
    encodings: list[dict[str, torch.Tensor]]
    completion_ids: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    advantages: torch.Tensor | None = None
    logp_old: torch.Tensor | None = None
    logp_ref: torch.Tensor | None = None
    logp_rollout: torch.Tensor | None = None
    row_info: dict[str, torch.Tensor] = field(default_factory=dict)
    conversation_lengths: torch.Tensor | None = None
    trajectories: list[Any] = field(default_factory=list)
    rollout_index: torch.Tensor | None = None
    entropy_old: torch.Tensor | None = None
    draw_advantages: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.rollout_index is None:  # built group-major and whole: k-th row of its group
            g = self.group_ids.long()
            starts = torch.ones_like(g, dtype=torch.bool)
            starts[1:] = g[1:] != g[:-1]
            first = torch.cummax(torch.where(starts, torch.arange(len(g)), 0), 0).values
            self.rollout_index = torch.arange(len(g)) - first

    def __len__(self) -> int:
        return len(self.samples)

    @classmethod
    def from_trajectories(
        cls,
        rows: list[Sample],
        trajs: list[Any],
        group_ids: torch.Tensor,
        pad_token_id: int,
        *,
        sampling_logprobs: bool = True,
        row_info: dict[str, torch.Tensor] | None = None,
    ) -> "RolloutBatch":
        """A batch of whole multi-turn conversations (agent trajectories, one per row; see the class
        docstring); ``sampling_logprobs``: keep the engine's log-probs as ``logp_rollout``."""
        from mmpo.rollout.agent_loop import trajectory_tensors

        t = trajectory_tensors(trajs, pad_token_id)
        return cls(
            rows,
            [tr.encoding for tr in trajs],
            t["completion_ids"],
            t["mask"],
            torch.tensor([tr.truncated for tr in trajs]),
            torch.zeros(len(rows)),
            group_ids,
            texts=["".join(tr.turn_texts) for tr in trajs],
            logp_rollout=t["logprobs"] if sampling_logprobs else None,
            row_info=dict(row_info or {}),
            conversation_lengths=t["lengths"],
            trajectories=trajs,
        )

    def select(self, idx: torch.Tensor | list[int]) -> "RolloutBatch":
        """Rows ``idx`` (completion width trimmed after the last valid token of any row)."""
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        il = idx_t.tolist()
        m = self.mask[idx_t]
        # the last True column + 1 (masks of multi-turn rows have gaps where observations are)
        width = int((m.long() * torch.arange(1, m.shape[1] + 1)).max().item()) if len(il) and m.numel() else 0
        width = max(width, 1)
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in il] if v else []
            elif isinstance(v, dict):
                out[f.name] = {k: t[idx_t][:, :width] if t.dim() >= 2 else t[idx_t] for k, t in v.items()}
            elif v.dim() == 2:
                out[f.name] = v[idx_t][:, :width]
            else:
                out[f.name] = v[idx_t]
        return RolloutBatch(**out)

    @staticmethod
    def concat(parts: list["RolloutBatch"], pad_token_id: int) -> "RolloutBatch":
        """Stack batches row-wise (2-D tensors right-padded to the widest)."""
        if len(parts) == 1:
            return parts[0]
        width = max(p.completion_ids.shape[1] for p in parts)
        out: dict[str, Any] = {}
        for f in fields(RolloutBatch):
            vals = [getattr(p, f.name) for p in parts]
            if any(v is None for v in vals):
                out[f.name] = None
            elif isinstance(vals[0], list):
                out[f.name] = [x for v in vals for x in v]
            elif isinstance(vals[0], dict):
                out[f.name] = {k: _cat_rows([v[k] for v in vals], width) for k in vals[0]}
            elif vals[0].dim() == 2:
                fill = pad_token_id if f.name == "completion_ids" else 0
                out[f.name] = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill) for v in vals])
            else:
                out[f.name] = torch.cat(vals)
        return RolloutBatch(**out)


def _cat_rows(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """Row-wise concatenation; ``[n, T, ...]`` tensors (per-token row info) right-padded to ``width``."""
    if tensors[0].dim() >= 2:
        tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1])) for t in tensors]
    return torch.cat(tensors)
