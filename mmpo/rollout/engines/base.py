"""What every rollout engine takes and returns.

An engine samples ``num_samples`` completions (a group) of each prompt in a collated batch.
Engines that run the policy in another process or library (vLLM) keep their own copy of the
weights: the trainer calls ``sync_weights`` after every optimizer update so the next rollout
samples from the new policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from mmpo.core.registry import Registry, did_you_mean
from mmpo.errors import ConfigError

#: engine name -> class ``Engine(policy, options)`` (``rollout.engine`` in the config)
ROLLOUT_ENGINES: Registry = Registry("rollout engine")


@dataclass
class GenerationSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    min_new_tokens: int = 0  # EOS cannot be sampled before this many tokens
    #: per-row temperatures ``[n]`` from a step's raw logits ``[n, V]`` (HAPO adaptive temperature);
    #: replaces ``temperature`` when set (hf engine's sampling loop only, checked at config load)
    temperature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def scale(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [n, V]`` divided by the sampling temperature (per row with ``temperature_fn``;
        unchanged when greedy): the distribution whose log-probs a sampling loop reports."""
        if self.greedy:
            return logits
        if self.temperature_fn is not None:
            return logits / self.temperature_fn(logits)[:, None].to(logits)
        return logits / self.temperature


@dataclass
class Generation:
    """Sampled completions of ``n`` prompts.

    completion_ids [n, T] long (pad after EOS), mask [n, T] bool (valid tokens, EOS included),
    truncated [n] bool (no EOS within ``max_new_tokens``), logprobs [n, T] float32 or None: the
    engine's own log-probs of the sampled tokens (0 where ``mask`` is False), used to check the
    trainer's recomputation and for importance-sampling correction.
    """

    completion_ids: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor
    logprobs: torch.Tensor | None = None


class RolloutEngine:
    """Base class: ``generate`` is required; ``sync_weights`` and ``close`` default to no-ops.

    Args:
        policy: the ``CausalLMPolicy`` (tokenizer, special ids, prompt encoding).
        options: ``rollout.engine_options`` from the config (engine-specific keys).
    """

    #: True when the engine samples from its own copy of the weights (needs ``sync_weights``).
    holds_weights: bool = False

    def __init__(self, policy: Any, options: dict[str, Any] | None = None) -> None:
        self.policy = policy
        self.options = dict(options or {})

    #: the ``rollout.engine_options`` keys this engine reads, with their defaults (unknown keys are refused at load)
    OPTIONS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def check_environment(cls, options: dict[str, Any]) -> None:
        """Refuse, before any model loads, unknown ``rollout.engine_options`` keys and options whose
        environment is missing (ConfigError naming how to make it); the default engine needs nothing."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            hint = did_you_mean(unknown[0], list(cls.OPTIONS))
            raise ConfigError(
                f"rollout.engine_options.{unknown[0]}: unknown option of {cls.__name__}.{hint} "
                f"Valid options: {', '.join(cls.OPTIONS) or '(none)'}."
            )

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
        """``num_samples`` completions of each of the ``k`` collated prompts ``prompt_inputs``
        (``input_ids [k, P]`` left-padded, with media); rows prompt-major, ``n = k * num_samples``."""
        raise NotImplementedError

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (called after each update)."""

    def close(self) -> None:
        """Release processes / memory held by the engine."""
