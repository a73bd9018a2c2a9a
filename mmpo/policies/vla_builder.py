"""Building a VLA policy from an environment task's config (``task.policy``): action tokens added
to a loaded VLM (``discrete`` / ``binned``), or a Laplace action head (``laplace``), or a pointer
head over the image-token grid (``pointer``). Shared by every environment task.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from mmpo.errors import ConfigError
from mmpo.policies.action_codecs import BinnedActions, DiscreteActions, add_action_tokens
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.policies.vla import (
    LaplaceActionHead,
    LaplaceHeadPolicy,
    TokenActionPolicy,
    VLAWithHead,
    load_action_head,
    observation_messages,
)
from mmpo.rollout.env_config import EnvTaskConfig
from mmpo.rollout.env_runner import EnvRunner, Observation


def env_action_values(runner: EnvRunner, names: list[str]) -> list[Any]:
    """MiniGrid-style envs: the value of each action name in ``env.unwrapped.actions``."""
    env = runner._pool(1)[0]
    enum = getattr(env.unwrapped, "actions", None)
    if enum is None:
        raise ConfigError(
            f"task.policy.action_values must be given: {runner.spec.id!r} has no `actions` enum to look names up in"
        )
    values = []
    for n in names:
        try:
            values.append(int(enum[n]))
        except KeyError:
            names_ = [a.name for a in enum]
            raise ConfigError(f"task.policy.actions: {n!r} is not an action of {runner.spec.id!r} ({names_})") from None
    return values


def box_bounds(runner: EnvRunner, low: list[float], high: list[float]) -> tuple[list[float], list[float]]:
    """``(low, high)`` as configured, else the bounds of the env's Box action space."""
    if low and high:
        return list(low), list(high)
    space = runner._pool(1)[0].action_space
    if not hasattr(space, "low"):
        raise ConfigError(f"task.policy.low/high must be given: {runner.spec.id!r} has no Box action space")
    return [float(x) for x in np.asarray(space.low).reshape(-1)], [float(x) for x in np.asarray(space.high).reshape(-1)]


def build_vla_policy(
    model: torch.nn.Module, processor: Any, info: Any, tc: EnvTaskConfig, runner: EnvRunner, model_dir: str | None
) -> Any:
    """The configured policy around a loaded VLM (action tokens added, or a Laplace head built/loaded).

    ``model_dir``: the local folder the model came from (a trained policy folder carries its head);
    None for a base VLM (``tiny:``), which gets a fresh head.
    """
    p = tc.policy
    if not info.is_vlm:
        raise ConfigError(
            f"model.path={info.path!r} is a text-only model; a VLA policy needs a VLM (e.g. tiny:qwen2_vl)"
        )
    if p.action_space == "laplace":
        low, high = box_bounds(runner, p.low, p.high)
        hidden = model.config.get_text_config().hidden_size
        sizes = {"width": p.head_width, "blocks": p.head_blocks, "log_scale_init": p.log_scale_init}
        if model_dir:  # a trained policy folder carries its head; a base VLM gets a fresh one
            head = load_action_head(model_dir, hidden, len(low), **sizes)
        else:
            head = LaplaceActionHead(hidden, len(low), **sizes)
        lm = CausalLMPolicy.from_info(model, processor, info)
        return LaplaceHeadPolicy(
            lm,
            VLAWithHead(model, head),
            low,
            high,
            scale_multiplier=p.scale_multiplier,
            reduce=p.logp_reduce,
            prompt_template=p.prompt_template,
        )
    if p.action_space == "pointer":
        return build_pointer_policy(model, processor, info, tc, runner, model_dir)
    if p.action_space == "discrete":
        codec: Any = DiscreteActions(p.actions, p.action_values or env_action_values(runner, p.actions))
    else:
        low, high = box_bounds(runner, p.low, p.high)
        codec = BinnedActions(low, high, p.bins)
    info = add_action_tokens(model, processor, info, codec.token_strings())
    if p.action_vocab == "actions":
        allowed = set(getattr(processor, "tokenizer", processor).convert_tokens_to_ids(codec.token_strings()))
        info = dataclasses.replace(info, special_token_ids=[i for i in range(info.vocab_size) if i not in allowed])
    lm = CausalLMPolicy.from_info(model, processor, info)
    return TokenActionPolicy(lm, codec, temperature=p.temperature, prompt_template=p.prompt_template)


def build_pointer_policy(
    model: torch.nn.Module, processor: Any, info: Any, tc: EnvTaskConfig, runner: EnvRunner, model_dir: str | None
) -> Any:
    """A pointer policy over the image-token grid of the environment's (fixed-size) observations."""
    from mmpo.policies.pointer import PointerPolicy, load_pointer_head

    p = tc.policy
    low, high = box_bounds(runner, p.low, p.high)
    if len(low) != 2:
        raise ConfigError(
            f"task.policy.action_space=pointer points at 2-D positions; {runner.spec.id!r} has {len(low)}-D actions"
        )
    if not runner.spec.image_size:
        raise ConfigError(
            "task.policy.action_space=pointer needs a fixed observation size: set task.env.image_size (e.g. 224)"
        )
    hidden = model.config.get_text_config().hidden_size
    head = load_pointer_head(model_dir, hidden, p.pointer_dim)
    lm = CausalLMPolicy.from_info(model, processor, info)
    blank = Observation(np.zeros((runner.spec.image_size,) * 2 + (3,), np.uint8), "")
    probe = lm.encode(observation_messages(blank, p.prompt_template))
    merge = int(getattr(model.config.vision_config, "spatial_merge_size", 2))
    _, h, w = (int(v) for v in probe["image_grid_thw"][0])
    return PointerPolicy(
        lm,
        VLAWithHead(model, head),
        (h // merge, w // merge),
        low,
        high,
        temperature=p.temperature,
        prompt_template=p.prompt_template,
    )


__all__ = ["box_bounds", "build_pointer_policy", "build_vla_policy", "env_action_values"]
