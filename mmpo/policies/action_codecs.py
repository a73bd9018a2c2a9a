"""Env actions <-> reserved action tokens of a VLM (VLA policies).

``DiscreteActions``: one token per step, ``<|act_NAME|>`` for each allowed env action.
``BinnedActions`` (OpenVLA style): a continuous action of D dimensions is D tokens, each one of
``bins`` uniform bins ``<|bin_K|>`` over ``[low_d, high_d]`` (shared across dimensions), decoded
to the bin centre.

The tokens are added to the tokenizer as ordinary (sampleable, never split) tokens and the
embeddings grow to hold them (``add_action_tokens``). Anything else the model emits is an
invalid action.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from mmpo.errors import ConfigError


class ActionCodec:
    """Maps env actions to ``units_per_step`` token ids and back."""

    units_per_step: int = 1

    def token_strings(self) -> list[str]:
        raise NotImplementedError

    def bind(self, tokenizer: Any) -> None:
        """Resolve the token ids (the tokens must already be in ``tokenizer``)."""
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        vocab = tok.get_vocab()
        missing = [t for t in self.token_strings() if t not in vocab]
        if missing:
            raise ConfigError(f"action tokens {missing[:4]} are not in the tokenizer; call add_action_tokens first")
        self.ids = [vocab[t] for t in self.token_strings()]
        self._index = {i: k for k, i in enumerate(self.ids)}

    def decode(self, ids: Sequence[int]) -> Any | None:
        """The env action of one step's token ids ``[U]``, or None when any id is not an action token."""
        raise NotImplementedError

    def encode(self, action: Any) -> list[int]:
        """Token ids ``[U]`` of an env action (SFT targets)."""
        raise NotImplementedError


class DiscreteActions(ActionCodec):
    """``names[k]`` <-> token ``<|act_names[k]|>`` <-> env action ``env_actions[k]``."""

    def __init__(self, names: Sequence[str], env_actions: Sequence[Any]) -> None:
        if not names or len(names) != len(env_actions) or len(set(names)) != len(names):
            raise ConfigError(f"task.policy.actions must be distinct names, one per env action; got {list(names)}")
        self.names = [str(n) for n in names]
        self.env_actions = list(env_actions)

    def token_strings(self) -> list[str]:
        return [f"<|act_{n}|>" for n in self.names]

    def decode(self, ids: Sequence[int]) -> Any | None:
        k = self._index.get(int(ids[0]))
        return None if k is None else self.env_actions[k]

    def encode(self, action: Any) -> list[int]:
        for k, a in enumerate(self.env_actions):
            if a == action:
                return [self.ids[k]]
        raise ConfigError(
            f"env action {action!r} is not one of the policy's actions {dict(zip(self.names, self.env_actions))}"
        )


class BinnedActions(ActionCodec):
    """D-dimensional actions in ``[low, high]`` as D tokens of ``bins`` uniform bins each."""

    def __init__(self, low: Sequence[float], high: Sequence[float], bins: int) -> None:
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        if self.low.shape != self.high.shape or self.low.ndim != 1 or not np.all(self.high > self.low):
            raise ConfigError(f"action bounds need low < high per dimension; got low={list(low)} high={list(high)}")
        if bins < 2:
            raise ConfigError(f"task.policy.bins={bins} must be >= 2")
        self.bins = int(bins)
        self.units_per_step = int(self.low.shape[0])

    def token_strings(self) -> list[str]:
        return [f"<|bin_{k}|>" for k in range(self.bins)]

    def centers(self, k: np.ndarray) -> np.ndarray:
        return self.low + (k + 0.5) * (self.high - self.low) / self.bins

    def decode(self, ids: Sequence[int]) -> np.ndarray | None:
        ks = [self._index.get(int(i)) for i in ids]
        if any(k is None for k in ks):
            return None
        return self.centers(np.asarray(ks, dtype=np.float64)).astype(np.float32)

    def encode(self, action: Any) -> list[int]:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != self.low.shape:
            raise ConfigError(f"action {a.tolist()} has {a.shape[0]} dimensions, the policy {self.units_per_step}")
        k = np.floor((a - self.low) / (self.high - self.low) * self.bins).clip(0, self.bins - 1).astype(int)
        return [self.ids[i] for i in k]


def add_action_tokens(model: torch.nn.Module, tokenizer: Any, info: Any, tokens: Sequence[str]) -> Any:
    """Add ``tokens`` (if missing) to the tokenizer as ordinary tokens, grow the model's
    embeddings when needed, and return ``info`` (a ``ModelInfo``) with the new ids sampleable."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    missing = [t for t in tokens if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        model.resize_token_embeddings(len(tok))  # new rows at the mean of the old ones (transformers' default)
    ids = set(tok.convert_tokens_to_ids(list(tokens)))
    return dataclasses.replace(
        info,
        special_token_ids=[i for i in info.special_token_ids if i not in ids],
        vocab_size=max(info.vocab_size, model.get_input_embeddings().weight.shape[0]),
    )


__all__ = ["ActionCodec", "BinnedActions", "DiscreteActions", "add_action_tokens"]
