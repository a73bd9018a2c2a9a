"""A KV cache for sampling loops that writes into preallocated room instead of concatenating.

transformers' ``DynamicLayer`` grows by ``torch.cat`` at every decoding step, copying the whole
cache each time (quadratic in the completion length; about a third of a tiny model's decoding
time on CPU). ``PreallocatedLayer`` reserves room for the completion at prefill and writes each
step's keys and values in place. It is for inference only: in-place writes would break autograd
through the cache, so the log-prob passes keep ``DynamicCache``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys / values ``[batch, heads, length, head_dim]`` are views of
    buffers with ``reserve`` extra positions (grown by doubling if ever exceeded)."""

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve = int(reserve)
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        room = key_states.shape[-2] + self.reserve
        self._k = key_states.new_empty(*key_states.shape[:-2], room, key_states.shape[-1])
        self._v = value_states.new_empty(*value_states.shape[:-2], room, value_states.shape[-1])
        self.is_initialized = True

    def _refresh(self) -> None:
        self.keys = self._k[..., : self.length, :]
        self.values = self._v[..., : self.length, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:
            extra = max(end - self._k.shape[-2], self._k.shape[-2])
            self._k = torch.cat([self._k, self._k.new_empty(*self._k.shape[:-2], extra, self._k.shape[-1])], dim=-2)
            self._v = torch.cat([self._v, self._v.new_empty(*self._v.shape[:-2], extra, self._v.shape[-1])], dim=-2)
        self._k[..., self.length : end, :] = key_states
        self._v[..., self.length : end, :] = value_states
        self.length = end
        self._refresh()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length:
            self._k = self._k.index_select(0, beam_idx.to(self._k.device))
            self._v = self._v.index_select(0, beam_idx.to(self._v.device))
            self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._k, self._v = self._k[indices], self._v[indices]
            self._refresh()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PreallocatedLayer is for sampling loops; crop is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._refresh()


def preallocated_cache(reserve: int) -> Cache:
    """A cache whose layers (created on first use, one per decoder layer) keep room for ``reserve``
    tokens beyond the prompt."""
    return Cache(layer_class_to_replicate=lambda: PreallocatedLayer(reserve))
