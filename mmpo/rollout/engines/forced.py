"""An engine that emits given turn texts instead of sampling: expert demonstrations of multi-turn
tasks (a cold start before RL: the tool calls, their real observations, the answer), and tests.

Row ``i`` of the agent loop gets ``scripts[i][j]`` (tokenised, then EOS) at its ``j``-th turn. The
loop calls ``generate`` with its still-active rows in order; a script must end where its row
ends (an answer or a turn without a call), so the engine drops a row when its script is used up.
Log-probs are not reported.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mmpo.rollout.engines.base import Generation, GenerationSettings, RolloutEngine


class ForcedTextEngine(RolloutEngine):
    def __init__(self, policy: Any, scripts: Sequence[Sequence[str]]) -> None:
        super().__init__(policy)
        self.scripts = [list(s) for s in scripts]
        self.turn = [0] * len(self.scripts)
        self.active = [i for i, s in enumerate(self.scripts) if s]

    def generate(
        self,
        model: torch.nn.Module,
        prompt_inputs: dict[str, torch.Tensor],
        settings: GenerationSettings,
        *,
        device: torch.device,
        dtype: torch.dtype | None = None,
        num_samples: int = 1,
    ) -> Generation:
        pol = self.policy
        if num_samples != 1 or prompt_inputs["input_ids"].shape[0] != len(self.active):
            raise RuntimeError(
                f"forced engine: {prompt_inputs['input_ids'].shape[0]} rows x {num_samples} asked, "
                f"{len(self.active)} scripts active "
                "(a script must end where its row ends)"
            )
        rows = []
        for i in self.active:
            text = self.scripts[i][self.turn[i]]
            rows.append(pol.tokenizer(text, add_special_tokens=False)["input_ids"] + [pol.eos_token_ids[0]])
            self.turn[i] += 1
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pol.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for k, r in enumerate(rows):
            ids[k, : len(r)] = torch.tensor(r)
            mask[k, : len(r)] = True
        self.active = [i for i in self.active if self.turn[i] < len(self.scripts[i])]
        return Generation(ids, mask, torch.zeros(len(rows), dtype=torch.bool), None)


__all__ = ["ForcedTextEngine"]
