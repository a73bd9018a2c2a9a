"""Vision-language-action policies: a VLM reads (image, instruction) and acts.

``TokenActionPolicy``: the action units are reserved action tokens the LM head emits
(discrete actions, or OpenVLA-style binned continuous actions: one token per dimension),
sampled from the full vocabulary; an output that is not an action token is an invalid action.

``LaplaceHeadPolicy`` (OpenVLA-OFT style, as RIPT-VLA trains it): an MLP-ResNet head on the
last prompt hidden state gives ``mu [B, D]`` and ``log b [B, D]`` (bias -3); rollouts sample
``a ~ Laplace(mu, b * s)`` (``s``: scale multiplier, 5 in RIPT's scripts) in the normalised
action space [-1, 1]; the log-prob of a step is summed over dimensions (one unit per step) or
kept per dimension.

Both expose ``act`` (for the env runner), ``log_probs`` (with grad, for the update), and
``demo_units`` (SFT targets), so trainers treat them alike.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn

from mmpo.policies.action_codecs import ActionCodec
from mmpo.policies.batching import append_completions, to_device
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout.env_runner import ActionBatch, Observation

DEFAULT_PROMPT = "What action should the robot take to {instruction}?"


def observation_messages(obs: Observation, template: str = DEFAULT_PROMPT) -> list[dict[str, Any]]:
    """The chat messages of one observation: the image, then the templated instruction."""
    from PIL import Image

    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.fromarray(obs.image)},
                {"type": "text", "text": template.format(instruction=obs.instruction)},
            ],
        }
    ]


class VLAPolicyBase:
    """Shared by the VLA policies: prompt encoding and the decoder's hidden states."""

    lm: CausalLMPolicy
    prompt_template: str

    def encode(self, obs: Observation) -> dict[str, torch.Tensor]:
        return self.lm.encode(observation_messages(obs, self.prompt_template))

    def _device(self, model: nn.Module) -> torch.device:
        return next(model.parameters()).device

    def _last_hidden(self, vlm: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden state ``[B, H]`` at each prompt's last position (prompts are left padded)."""
        decoder, _ = self.lm._decoder_and_head(vlm)
        full = to_device(inputs, self._device(vlm))
        kwargs = {k: v for k, v in full.items() if k != "input_ids"}
        return decoder(input_ids=full["input_ids"], use_cache=False, **kwargs).last_hidden_state[:, -1]


class TokenActionPolicy(VLAPolicyBase):
    """Action units = the ``codec.units_per_step`` action tokens of each step.

    Sampling draws from ``softmax(logits / temperature)`` over the whole vocabulary (special
    tokens masked, as in ``CausalLMPolicy``), so stored log-probs equal ``log_probs``.
    """

    def __init__(
        self, lm: CausalLMPolicy, codec: ActionCodec, *, temperature: float = 1.0, prompt_template: str = DEFAULT_PROMPT
    ) -> None:
        self.lm = lm
        self.codec = codec
        codec.bind(lm.tokenizer)
        self.temperature = temperature
        self.prompt_template = prompt_template

    @property
    def module(self) -> nn.Module:
        return self.lm.model

    def act(self, observations: list[Observation], *, generator: torch.Generator, greedy: bool = False) -> ActionBatch:
        encs = [self.encode(o) for o in observations]
        inputs = self.lm.collate(encs)
        model = self.lm.model
        decoder, head = self.lm._decoder_and_head(model)
        never = torch.tensor(self.lm.never_sample_ids, dtype=torch.long)
        B, U = len(encs), self.codec.units_per_step
        units = torch.zeros(B, U, dtype=torch.long)
        logp = torch.zeros(B, U)
        with torch.no_grad():
            for u in range(U):
                full = append_completions(inputs, units[:, :u], torch.ones(B, u, dtype=torch.long)) if u else inputs
                hidden = self._last_hidden(model, full)
                logits = head(hidden).float().cpu() / self.temperature
                if never.numel():
                    logits = logits.index_fill(-1, never, float("-inf"))
                logp_all = torch.log_softmax(logits, dim=-1)
                if greedy:
                    tok = logp_all.argmax(-1)
                else:
                    tok = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
                units[:, u] = tok
                logp[:, u] = logp_all.gather(-1, tok[:, None]).squeeze(-1)
        actions = [self.codec.decode(row) for row in units.tolist()]
        return ActionBatch(
            actions=actions, units=units, logp=logp, mask=torch.ones(B, U, dtype=torch.bool), encodings=encs
        )

    def log_probs(
        self,
        encodings: Sequence[dict[str, torch.Tensor]],
        units: torch.Tensor,
        mask: torch.Tensor,
        *,
        model: nn.Module | None = None,
    ) -> torch.Tensor:
        """``logp [B, U]`` (float32, with grad) of the action tokens ``units [B, U]``."""
        out = self.lm.log_probs(
            self.lm.collate(list(encodings)), units, mask, model=model, temperature=self.temperature, with_entropy=False
        )
        return out.logp

    def demo_units(self, action: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.codec.encode(action)
        return torch.tensor(ids, dtype=torch.long), torch.ones(len(ids), dtype=torch.bool)

    def save(self, folder: Any, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        self.lm.model.save_pretrained(folder, state_dict=state_dict)
        self.lm.processor.save_pretrained(folder)


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class LaplaceActionHead(nn.Module):
    """MLP-ResNet: hidden ``[B, H]`` -> ``(mu [B, D], log_b [B, D])``; mu starts at 0 and log b at
    ``log_scale_init`` (output layers zero-initialised, the biases set)."""

    def __init__(
        self, hidden_size: int, action_dim: int, *, width: int = 256, blocks: int = 2, log_scale_init: float = -3.0
    ) -> None:
        super().__init__()
        self.config = {
            "hidden_size": hidden_size,
            "action_dim": action_dim,
            "width": width,
            "blocks": blocks,
            "log_scale_init": log_scale_init,
        }
        self.inp = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width))
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.out_norm = nn.LayerNorm(width)
        self.mu = nn.Linear(width, action_dim)
        self.log_scale = nn.Linear(width, action_dim)
        # mu starts at the centre of the action range for every input: a random backbone's hidden
        # states put a default-initialised mu outside [-1, 1], where every sample clips alike
        nn.init.zeros_(self.mu.weight)
        nn.init.zeros_(self.mu.bias)
        nn.init.zeros_(self.log_scale.weight)
        nn.init.constant_(self.log_scale.bias, log_scale_init)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.out_norm(self.blocks(self.inp(hidden.float())))
        return self.mu(x), self.log_scale(x)


class VLAWithHead(nn.Module):
    """The trained module of a Laplace-head policy: the VLM and its action head."""

    def __init__(self, vlm: nn.Module, head: LaplaceActionHead) -> None:
        super().__init__()
        self.vlm = vlm
        self.head = head


def laplace_log_prob(a: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Elementwise ``log Laplace(a; mu, scale) = -log(2 scale) - |a - mu| / scale``."""
    return -torch.log(2 * scale) - (a - mu).abs() / scale


HEAD_FILE = "action_head.safetensors"


class LaplaceHeadPolicy(VLAPolicyBase):
    """Continuous actions from a Laplace head; ``units [B, D]`` are the normalised actions.

    reduce='sum': one unit per step, log p = sum over dimensions (RIPT's ``sum_on_action_dim``);
    'per_dim': D units per step.
    """

    def __init__(
        self,
        lm: CausalLMPolicy,
        module: VLAWithHead,
        low: Sequence[float],
        high: Sequence[float],
        *,
        scale_multiplier: float = 5.0,
        reduce: Literal["sum", "per_dim"] = "sum",
        prompt_template: str = DEFAULT_PROMPT,
    ) -> None:
        self.lm = lm
        self.module = module
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        self.scale_multiplier = scale_multiplier
        self.reduce = reduce
        self.prompt_template = prompt_template

    @property
    def units_per_step(self) -> int:
        return 1 if self.reduce == "sum" else int(self.low.shape[0])

    def distribution(
        self, inputs: dict[str, torch.Tensor], model: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``mu [B, D]`` and the sampling scale ``b * s [B, D]`` (float32)."""
        module = model if model is not None else self.module
        hidden = self._last_hidden(module.vlm, inputs)
        mu, log_b = module.head(hidden)
        return mu, log_b.exp() * self.scale_multiplier

    def _reduce(self, lp: torch.Tensor) -> torch.Tensor:
        return lp.sum(-1, keepdim=True) if self.reduce == "sum" else lp

    def to_env(self, a: np.ndarray) -> np.ndarray:
        """Normalised action in [-1, 1] (clipped) -> env units."""
        return (self.low + (np.clip(a, -1.0, 1.0) + 1.0) / 2.0 * (self.high - self.low)).astype(np.float32)

    def from_env(self, action: Any) -> np.ndarray:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        return 2.0 * (a - self.low) / (self.high - self.low) - 1.0

    def act(self, observations: list[Observation], *, generator: torch.Generator, greedy: bool = False) -> ActionBatch:
        encs = [self.encode(o) for o in observations]
        with torch.no_grad():
            mu, scale = self.distribution(self.lm.collate(encs))
            mu, scale = mu.float().cpu(), scale.float().cpu()
            if greedy:
                a = mu.clone()
            else:  # inverse CDF of Laplace(0, 1) from u ~ U(-1/2, 1/2)
                u = torch.rand(mu.shape, generator=generator) - 0.5
                a = mu - scale * u.sign() * torch.log1p(-2 * u.abs().clamp(max=0.5 - 1e-7))
            lp = self._reduce(laplace_log_prob(a, mu, scale))
        actions = [self.to_env(row) for row in a.numpy()]
        U = self.units_per_step
        return ActionBatch(
            actions=actions, units=a, logp=lp, mask=torch.ones(len(encs), U, dtype=torch.bool), encodings=encs
        )

    def log_probs(
        self,
        encodings: Sequence[dict[str, torch.Tensor]],
        units: torch.Tensor,
        mask: torch.Tensor,
        *,
        model: nn.Module | None = None,
    ) -> torch.Tensor:
        """``logp [B, U]`` of the normalised actions ``units [B, D]`` (with grad)."""
        mu, scale = self.distribution(self.lm.collate(list(encodings)), model)
        return self._reduce(laplace_log_prob(units.to(mu.device).float(), mu, scale))

    def demo_units(self, action: Any) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.tensor(self.from_env(action), dtype=torch.float32)
        return a, torch.ones(self.units_per_step, dtype=torch.bool)

    def save(self, folder: Any, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The VLM as a save_pretrained folder plus ``action_head.safetensors`` (config in its metadata)."""
        save_with_head(self, folder, state_dict)


def save_with_head(policy: Any, folder: Any, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save a head policy's ``module`` (``VLAWithHead``): the VLM as a save_pretrained folder (with
    the processor) and the head as ``action_head.safetensors``, its config in the metadata."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    state = state_dict if state_dict is not None else policy.module.state_dict()
    vlm_state = {k[len("vlm.") :]: v for k, v in state.items() if k.startswith("vlm.")}
    head_state = {k[len("head.") :]: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("head.")}
    policy.module.vlm.save_pretrained(folder, state_dict=vlm_state)
    policy.lm.processor.save_pretrained(folder)
    save_file(head_state, str(folder / HEAD_FILE), metadata={"config": json.dumps(policy.module.head.config)})


def read_head(folder: Any, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """``(config, state)`` of the ``kind`` head saved beside a VLM folder; None when there is none.
    ConfigError when the saved head is of another kind."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    from mmpo.errors import ConfigError

    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        config = json.loads((f.metadata() or {}).get("config", "{}"))
    saved = config.pop("kind", "laplace")
    if saved != kind:
        raise ConfigError(f"{path}: a {saved!r} action head; this policy needs a {kind!r} head")
    return config, load_file(str(path))


def load_action_head(folder: Any, hidden_size: int, action_dim: int, **defaults: Any) -> LaplaceActionHead:
    """The head saved beside a VLM folder, or a fresh one (``defaults``) when there is none."""
    from mmpo.errors import ConfigError

    saved = read_head(folder, "laplace")
    if saved is None:
        return LaplaceActionHead(hidden_size, action_dim, **defaults)
    config, state = saved
    if config.get("hidden_size") != hidden_size or config.get("action_dim") != action_dim:
        raise ConfigError(
            f"{folder}/{HEAD_FILE}: head for hidden {config.get('hidden_size')} / {config.get('action_dim')} actions, "
            f"the policy needs {hidden_size} / {action_dim}"
        )
    head = LaplaceActionHead(**config)
    head.load_state_dict(state)
    return head


__all__ = [
    "DEFAULT_PROMPT",
    "HEAD_FILE",
    "LaplaceActionHead",
    "LaplaceHeadPolicy",
    "TokenActionPolicy",
    "VLAWithHead",
    "laplace_log_prob",
    "load_action_head",
    "observation_messages",
    "read_head",
    "save_with_head",
]
