"""A pointing policy for GUI agents: click by choosing one of the screenshot's image tokens
(GUI-Actor-style coordinate-free grounding).

A query from the prompt's last hidden state scores every image token's last hidden state,
``logit_i = <W_q h_last, W_k h_i> / sqrt(d)``; the policy samples a token and clicks the centre of
its cell in the merged-patch grid (Qwen-VL: a 2x2 merge of 14 px patches, so a 224 px screenshot
is an 8 x 8 grid). Token-numbered coordinates need the model to read absolute positions, which a
RoPE-only decoder has no direct access to; scoring the image tokens needs only their content
("this patch is a button"), which a small model learns quickly.

``units [B, 1]`` hold the chosen token index (row-major over the grid); the head's query is
zero-initialised, so the first policy is uniform over the cells.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mmpo.policies.batching import to_device
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.policies.vla import DEFAULT_PROMPT, VLAPolicyBase, VLAWithHead, read_head, save_with_head
from mmpo.rollout.env_runner import ActionBatch, Observation


class PointerHead(nn.Module):
    """``(h_last [B, H], h_tokens [B, P, H]) -> logits [B, P]``."""

    def __init__(self, hidden_size: int, dim: int = 64) -> None:
        super().__init__()
        self.config = {"kind": "pointer", "hidden_size": hidden_size, "dim": dim}
        self.norm = nn.LayerNorm(hidden_size)
        self.query = nn.Linear(hidden_size, dim)
        self.key = nn.Linear(hidden_size, dim)
        nn.init.zeros_(self.query.weight)  # uniform over the cells at the start
        nn.init.zeros_(self.query.bias)

    def forward(self, last: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.query(self.norm(last.float()))
        k = self.key(self.norm(tokens.float()))
        return torch.einsum("bd,bpd->bp", q, k) / math.sqrt(q.shape[-1])


class PointerPolicy(VLAPolicyBase):
    """Clicks at the centre of a chosen image-token cell; env action ``low + xy (high - low)``
    with ``xy`` in ``[0, 1]^2`` (x to the right, y down).

    grid: ``(rows, cols)`` of the merged-token grid every observation must have (fixed by the
    environment's square image size).
    """

    def __init__(
        self,
        lm: CausalLMPolicy,
        module: VLAWithHead,
        grid: tuple[int, int],
        low: Sequence[float] = (0.0, 0.0),
        high: Sequence[float] = (1.0, 1.0),
        *,
        temperature: float = 1.0,
        prompt_template: str = DEFAULT_PROMPT,
    ) -> None:
        self.lm = lm
        self.module = module
        self.grid = (int(grid[0]), int(grid[1]))
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        self.temperature = temperature
        self.prompt_template = prompt_template
        self.image_token_id = int(module.vlm.config.image_token_id)

    @property
    def cells(self) -> int:
        return self.grid[0] * self.grid[1]

    def logits(self, inputs: dict[str, torch.Tensor], model: nn.Module | None = None) -> torch.Tensor:
        """``[B, rows * cols]`` scores of the image-token cells (float32)."""
        module = model if model is not None else self.module
        decoder, _ = self.lm._decoder_and_head(module.vlm)
        full = to_device(inputs, self._device(module.vlm))
        kwargs = {k: v for k, v in full.items() if k != "input_ids"}
        hidden = decoder(input_ids=full["input_ids"], use_cache=False, **kwargs).last_hidden_state
        is_image = full["input_ids"] == self.image_token_id
        counts = is_image.sum(-1)
        if not bool((counts == self.cells).all()):
            raise ValueError(
                f"pointer policy: prompts hold {counts.tolist()} image tokens, the grid {self.grid} needs {self.cells} "
                "(one image of the fixed size)"
            )
        tokens = hidden[is_image].view(hidden.shape[0], self.cells, hidden.shape[-1])
        return module.head(hidden[:, -1], tokens) / self.temperature

    def cell_center(self, index: int) -> np.ndarray:
        """Normalised ``[x, y]`` of cell ``index`` (row-major)."""
        rows, cols = self.grid
        r, c = divmod(int(index), cols)
        return np.array([(c + 0.5) / cols, (r + 0.5) / rows])

    def cell_of(self, xy: Sequence[float]) -> int:
        """The cell holding normalised point ``xy``."""
        rows, cols = self.grid
        c = min(cols - 1, max(0, int(float(xy[0]) * cols)))
        r = min(rows - 1, max(0, int(float(xy[1]) * rows)))
        return r * cols + c

    def act(self, observations: list[Observation], *, generator: torch.Generator, greedy: bool = False) -> ActionBatch:
        encs = [self.encode(o) for o in observations]
        with torch.no_grad():
            logp_all = torch.log_softmax(self.logits(self.lm.collate(encs)).cpu(), dim=-1)
        idx = logp_all.argmax(-1) if greedy else torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
        logp = logp_all.gather(-1, idx[:, None])
        actions = [(self.low + self.cell_center(i) * (self.high - self.low)).astype(np.float32) for i in idx.tolist()]
        return ActionBatch(
            actions=actions,
            units=idx[:, None],
            logp=logp,
            mask=torch.ones(len(encs), 1, dtype=torch.bool),
            encodings=encs,
        )

    def log_probs(
        self,
        encodings: Sequence[dict[str, torch.Tensor]],
        units: torch.Tensor,
        mask: torch.Tensor,
        *,
        model: nn.Module | None = None,
    ) -> torch.Tensor:
        """``logp [B, 1]`` of the chosen cells ``units [B, 1]`` (with grad)."""
        logits = self.logits(self.lm.collate(list(encodings)), model)
        return torch.log_softmax(logits, dim=-1).gather(-1, units.to(logits.device).long())

    def demo_units(self, action: Any) -> tuple[torch.Tensor, torch.Tensor]:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        xy = (a - self.low) / (self.high - self.low)
        return torch.tensor([self.cell_of(xy)], dtype=torch.long), torch.ones(1, dtype=torch.bool)

    def save(self, folder: Any, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The VLM as a save_pretrained folder plus ``action_head.safetensors``."""
        save_with_head(self, folder, state_dict)


def load_pointer_head(folder: Any | None, hidden_size: int, dim: int = 64) -> PointerHead:
    """The pointer head saved beside a VLM folder, or a fresh one."""
    from mmpo.errors import ConfigError

    saved = read_head(folder, "pointer") if folder else None
    if saved is None:
        return PointerHead(hidden_size, dim)
    config, state = saved
    if config.get("hidden_size") != hidden_size:
        raise ConfigError(
            f"{folder}: pointer head for hidden size {config.get('hidden_size')}, the model has {hidden_size}"
        )
    head = PointerHead(**config)
    head.load_state_dict(state)
    return head


__all__ = ["PointerHead", "PointerPolicy", "load_pointer_head"]
