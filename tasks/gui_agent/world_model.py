"""ScreenExplorer's world model, trained online: (pre-state, action) -> post-state embeddings.

ScreenExplorer fine-tunes a Llama-3.2-1B on (pre-state image tokens + text embedding + action
text) -> (post-state image tokens + text embedding) with MSE losses, 3 epochs on its buffer
after every episode (batch 2, lr 4e-5), and uses its error as the curiosity reward
(:func:`mmpo_tasks.gui_agent.exploration.curiosity_reward`). Here the states are the
:mod:`~mmpo_tasks.gui_agent.screen_embedding` vectors, the action text is feature-hashed by a
:class:`~mmpo_tasks.gui_agent.screen_embedding.TextEmbedder`, and the model is an MLP (two hidden
layers of 256, ReLU); for this small MLP we use lr 1e-3 (Adam) and batch 32 instead of the 1B
model's 4e-5 and 2. Init and shuffling are seeded, so a fit is reproducible.

The model keeps its own :class:`ReplayBuffer` of the last ``capacity`` transitions (4096), its
Adam state and its shuffling generator; :meth:`WorldModel.state_dict` holds all of them
(tensors and plain numbers) for a trainer's checkpoint.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from mmpo_tasks.gui_agent.screen_embedding import TextEmbedder

KEYS = ("pre_img", "pre_txt", "action", "post_img", "post_txt")


class ReplayBuffer:
    """The last ``capacity`` transitions, as float32 CPU tensors ``[N, *]`` (oldest first) under
    :data:`KEYS`: ``pre_img [N, D]``, ``pre_txt [N, Dt]``, ``action [N, Da]``, ``post_img [N, D]``,
    ``post_txt [N, Dt]``."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.data: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return 0 if not self.data else int(self.data["pre_img"].shape[0])

    def add(
        self,
        pre_img: torch.Tensor,
        pre_txt: torch.Tensor,
        action: torch.Tensor,
        post_img: torch.Tensor,
        post_txt: torch.Tensor,
    ) -> None:
        """Append ``B`` transitions (each ``[B, *]``; a single ``[*]`` is one transition), then
        drop the oldest beyond ``capacity``."""
        new = {}
        for k, v in zip(KEYS, (pre_img, pre_txt, action, post_img, post_txt)):
            v = v.detach().float().cpu()
            new[k] = v[None] if v.ndim == 1 else v
        b = new["pre_img"].shape[0]
        if any(v.ndim != 2 or v.shape[0] != b for v in new.values()):
            raise ValueError(f"expected [B, *] tensors with one B, got {[tuple(v.shape) for v in new.values()]}")
        if self.data:
            bad = [k for k in KEYS if new[k].shape[1] != self.data[k].shape[1]]
            if bad:
                raise ValueError(f"dimension mismatch with the buffer for {bad}")
            new = {k: torch.cat([self.data[k], new[k]]) for k in KEYS}
        self.data = {k: v[-self.capacity :].clone() for k, v in new.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, **{k: v.clone() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self.data = {k: state[k].float().cpu().clone() for k in KEYS if k in state}


class WorldModel:
    """MLP ``[pre_img; pre_txt; action] -> [post_img; post_txt]`` with dims ``D = img_dim``,
    ``Dt = txt_dim``, ``Da = action_dim``; trained with ``MSE(img) + MSE(txt)``."""

    def __init__(
        self,
        img_dim: int,
        txt_dim: int,
        *,
        action_dim: int = 256,
        hidden: int = 256,
        capacity: int = 4096,
        lr: float = 1e-3,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.img_dim, self.txt_dim, self.action_dim, self.hidden = img_dim, txt_dim, action_dim, hidden
        self.device = torch.device(device)
        self.action_embedder = TextEmbedder(action_dim)
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the global RNG alone
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Linear(img_dim + txt_dim + action_dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, img_dim + txt_dim),
            ).to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer = ReplayBuffer(capacity)

    def embed_actions(self, actions: Sequence[str]) -> torch.Tensor:
        """Action texts -> ``[B, Da]``."""
        return self.action_embedder.embed(list(actions))

    def _action(self, actions: Sequence[str] | torch.Tensor) -> torch.Tensor:
        return actions if isinstance(actions, torch.Tensor) else self.embed_actions(actions)

    def add(
        self,
        pre_img: torch.Tensor,
        pre_txt: torch.Tensor,
        actions: Sequence[str] | torch.Tensor,
        post_img: torch.Tensor,
        post_txt: torch.Tensor,
    ) -> None:
        """Append ``B`` transitions to the model's buffer (``actions``: ``B`` texts or ``[B, Da]``)."""
        self.buffer.add(pre_img, pre_txt, self._action(actions), post_img, post_txt)

    def forward(
        self, pre_img: torch.Tensor, pre_txt: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, D], [B, Dt], [B, Da]`` -> predicted ``([B, D], [B, Dt])`` (with grad)."""
        x = torch.cat([pre_img, pre_txt, action], dim=-1).float().to(self.device)
        out = self.net(x)
        return out[:, : self.img_dim], out[:, self.img_dim :]

    @torch.no_grad()
    def predict(
        self, pre_img: torch.Tensor, pre_txt: torch.Tensor, actions: Sequence[str] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted post-state embeddings ``(img [B, D], txt [B, Dt])`` on the inputs' device
        (``actions``: ``B`` texts or ``[B, Da]``)."""
        img, txt = self.forward(pre_img, pre_txt, self._action(actions).to(pre_img.device))
        return img.to(pre_img.device), txt.to(pre_img.device)

    def losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(MSE image, MSE text)`` of a batch of :data:`KEYS` tensors (means over elements)."""
        img, txt = self.forward(batch["pre_img"], batch["pre_txt"], batch["action"])
        mse = nn.functional.mse_loss
        return mse(img, batch["post_img"].to(self.device)), mse(txt, batch["post_txt"].to(self.device))

    def fit(
        self, buffer: ReplayBuffer | None = None, *, epochs: int = 3, batch_size: int = 32, lr: float | None = None
    ) -> dict[str, float]:
        """Train ``epochs`` passes over ``buffer`` (default: the model's own) in batches shuffled by
        the model's generator; ``lr`` (if given) replaces the optimizer's. Returns the mean losses
        of the last epoch (``loss``, ``img_loss``, ``txt_loss``) and ``steps``; ``{}`` when the
        buffer is empty."""
        buf = self.buffer if buffer is None else buffer
        n = len(buf)
        if n == 0 or epochs <= 0:
            return {}
        if lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        self.net.train()
        steps, sums = 0, [0.0, 0.0]
        for _ in range(epochs):
            sums, count = [0.0, 0.0], 0
            for idx in torch.randperm(n, generator=self.generator).split(batch_size):
                li, lt = self.losses({k: v[idx] for k, v in buf.data.items()})
                self.optimizer.zero_grad(set_to_none=True)
                (li + lt).backward()
                self.optimizer.step()
                sums[0] += float(li.detach()) * len(idx)
                sums[1] += float(lt.detach()) * len(idx)
                count += len(idx)
                steps += 1
            sums = [s / count for s in sums]
        self.net.eval()
        return {"loss": sums[0] + sums[1], "img_loss": sums[0], "txt_loss": sums[1], "steps": float(steps)}

    def state_dict(self) -> dict[str, Any]:
        """Weights, Adam state, shuffling-generator state, buffer and dims."""
        return {
            "config": {
                "img_dim": self.img_dim,
                "txt_dim": self.txt_dim,
                "action_dim": self.action_dim,
                "hidden": self.hidden,
            },
            "net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "generator": self.generator.get_state(),
            "buffer": self.buffer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"img_dim": self.img_dim, "txt_dim": self.txt_dim, "action_dim": self.action_dim, "hidden": self.hidden}
        if dict(state["config"]) != mine:
            raise ValueError(f"world-model checkpoint dims {state['config']} != this model's {mine}")
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.buffer.load_state_dict(state["buffer"])


__all__ = ["KEYS", "ReplayBuffer", "WorldModel"]
