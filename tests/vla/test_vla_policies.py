"""VLA policies on the tiny Qwen2-VL: action codecs, reserved action tokens, stored rollout
log-probs equal re-scoring, the Laplace head's density and sampling, saving and loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmpo.errors import ConfigError
from mmpo.models import load_model
from mmpo.policies.action_codecs import BinnedActions, DiscreteActions, add_action_tokens
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.policies.vla import (
    LaplaceActionHead,
    LaplaceHeadPolicy,
    TokenActionPolicy,
    VLAWithHead,
    laplace_log_prob,
    load_action_head,
)
from mmpo.rollout.env_runner import Observation

TINY = {"initializer_range": 0.1, "head_init_std": 0.01}


def _obs(n: int, seed: int = 0) -> list[Observation]:
    rng = np.random.default_rng(seed)
    return [
        Observation(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8), f"go to the {c} ball")
        for c in ["red", "blue", "green", "grey"][:n]
    ]


def _token_policy(codec, temperature=1.0):
    model, proc, info = load_model("tiny:qwen2_vl", tiny_overrides=TINY)
    info = add_action_tokens(model, proc, info, codec.token_strings())
    return TokenActionPolicy(CausalLMPolicy.from_info(model, proc, info), codec, temperature=temperature), info


def test_discrete_codec_round_trip_and_invalid_ids():
    model, proc, info = load_model("tiny:qwen2_vl", tiny_overrides=TINY)
    codec = DiscreteActions(["left", "right", "forward"], [0, 1, 2])
    with pytest.raises(ConfigError, match="not in the tokenizer"):
        codec.bind(proc.tokenizer)
    before = len(proc.tokenizer)
    info2 = add_action_tokens(model, proc, info, codec.token_strings())
    codec.bind(proc.tokenizer)
    assert len(proc.tokenizer) == before + 3
    assert model.get_input_embeddings().weight.shape[0] >= len(proc.tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == model.get_input_embeddings().weight.shape[0]
    assert not set(codec.ids) & set(info2.special_token_ids)  # sampleable
    for a in (0, 1, 2):
        assert codec.decode(codec.encode(a)) == a
    assert codec.decode([codec.ids[0] - 1]) is None
    with pytest.raises(ConfigError, match="not one of the policy's actions"):
        codec.encode(5)
    # adding again is a no-op
    add_action_tokens(model, proc, info, codec.token_strings())
    assert len(proc.tokenizer) == before + 3
    # the tokenizer encodes the token string as that one id
    assert proc.tokenizer.encode("<|act_forward|>", add_special_tokens=False) == [codec.ids[2]]


def test_binned_codec_centres_and_bounds():
    codec = BinnedActions([-2.0, 0.0], [2.0, 1.0], bins=8)
    codec.ids = list(range(100, 108))
    codec._index = {i: k for k, i in enumerate(codec.ids)}
    a = np.array([0.3, 0.99])
    ids = codec.encode(a)
    assert ids == [100 + math.floor((0.3 + 2) / 4 * 8), 100 + 7]
    back = codec.decode(ids)
    assert np.all(np.abs(back - a) <= np.array([4 / 16, 1 / 16]) + 1e-6)
    assert codec.encode([-5.0, 5.0]) == [100, 107]  # clipped into the range
    assert codec.decode([100, 3]) is None
    with pytest.raises(ConfigError, match="low < high"):
        BinnedActions([1.0], [0.0], 4)


@pytest.mark.parametrize(
    "codec",
    [DiscreteActions(["left", "right", "forward"], [0, 1, 2]), BinnedActions([-2.0, -1.0], [2.0, 1.0], bins=16)],
)
def test_stored_token_logprobs_equal_rescoring(codec):
    policy, _ = _token_policy(codec, temperature=0.7)
    obs = _obs(4)
    batch = policy.act(obs, generator=torch.Generator().manual_seed(0))
    U = codec.units_per_step
    assert batch.units.shape == (4, U) and batch.logp.shape == (4, U)
    rescored = policy.log_probs(batch.encodings, batch.units, batch.mask)
    assert torch.allclose(rescored, batch.logp, atol=1e-4)
    for row, a in zip(batch.units.tolist(), batch.actions):
        assert a is None or a == codec.decode(row) or np.array_equal(a, codec.decode(row))
    again = policy.act(obs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.units, batch.units)
    greedy = policy.act(obs, generator=torch.Generator().manual_seed(1), greedy=True)
    assert torch.equal(greedy.units, policy.act(obs, generator=torch.Generator().manual_seed(2), greedy=True).units)


def test_demo_units_get_gradient_and_invalid_outputs_decode_to_none():
    codec = DiscreteActions(["left", "right", "forward"], [0, 1, 2])
    policy, _ = _token_policy(codec)
    units, mask = policy.demo_units(2)
    assert units.tolist() == [codec.ids[2]] and mask.tolist() == [True]
    enc = [policy.encode(o) for o in _obs(2)]
    logp = policy.log_probs(enc, units[None].repeat(2, 1), mask[None].repeat(2, 1))
    (-logp.mean()).backward()
    head = policy.module.get_output_embeddings().weight
    assert head.grad is not None and head.grad[codec.ids[2]].abs().sum() > 0
    # an untrained tiny VLM puts little mass on 3 of ~500 tokens: most sampled outputs are invalid
    batch = policy.act(_obs(4) * 4, generator=torch.Generator().manual_seed(0))
    assert sum(a is None for a in batch.actions) > 0


def test_laplace_log_prob_matches_torch():
    a, mu, b = torch.randn(5, 3), torch.randn(5, 3), torch.rand(5, 3) + 0.1
    ref = torch.distributions.Laplace(mu, b).log_prob(a)
    assert torch.allclose(laplace_log_prob(a, mu, b), ref, atol=1e-6)


def _laplace_policy(reduce="sum", s=5.0):
    model, proc, info = load_model("tiny:qwen2_vl", tiny_overrides=TINY)
    head = LaplaceActionHead(model.config.get_text_config().hidden_size, 2, width=32, blocks=1)
    return LaplaceHeadPolicy(
        CausalLMPolicy.from_info(model, proc, info),
        VLAWithHead(model, head),
        [-2.0, -1.0],
        [2.0, 1.0],
        scale_multiplier=s,
        reduce=reduce,
    )


def test_laplace_head_starts_at_log_scale_minus_3_and_samples_with_scale_b_times_s():
    policy = _laplace_policy(s=5.0)
    enc = policy.lm.collate([policy.encode(o) for o in _obs(1)])
    mu, scale = policy.distribution(enc)
    assert torch.allclose(scale, torch.full_like(scale, 5.0 * math.exp(-3.0)), rtol=1e-5)
    obs = _obs(1) * 400
    batch = policy.act(obs, generator=torch.Generator().manual_seed(0))
    dev = (batch.units - mu.detach()).abs().mean(0)
    # E|a - mu| = scale for a Laplace; 400 draws -> standard error ~5%
    assert torch.allclose(dev, scale[0].detach(), rtol=0.15)
    env = np.stack(batch.actions)
    assert env.shape == (400, 2) and env[:, 0].min() >= -2 and env[:, 0].max() <= 2 and env[:, 1].max() <= 1


@pytest.mark.parametrize("reduce", ["sum", "per_dim"])
def test_laplace_stored_logprobs_equal_rescoring(reduce):
    policy = _laplace_policy(reduce)
    batch = policy.act(_obs(3), generator=torch.Generator().manual_seed(0))
    assert batch.logp.shape == (3, 1 if reduce == "sum" else 2)
    rescored = policy.log_probs(batch.encodings, batch.units, batch.mask)
    assert torch.allclose(rescored, batch.logp, atol=1e-5)
    rescored.sum().backward()
    assert policy.module.head.mu.weight.grad is not None


def test_laplace_greedy_is_the_mean_and_env_bounds_map_linearly():
    policy = _laplace_policy()
    obs = _obs(2)
    g = policy.act(obs, generator=torch.Generator(), greedy=True)
    mu, _ = policy.distribution(policy.lm.collate(g.encodings))
    assert torch.allclose(g.units, mu.detach(), atol=1e-6)
    assert np.allclose(policy.to_env(np.array([-1.0, 1.0])), [-2.0, 1.0])
    assert np.allclose(policy.to_env(np.array([0.0, 0.0])), [0.0, 0.0])
    assert np.allclose(policy.from_env(policy.to_env(np.array([0.25, -0.5]))), [0.25, -0.5])
    units, _ = policy.demo_units(np.array([1.0, 0.5]))
    assert torch.allclose(units, torch.tensor([0.5, 0.5]))


def test_laplace_policy_save_and_load(tmp_path):
    policy = _laplace_policy()
    with torch.no_grad():
        policy.module.head.mu.bias.add_(0.3)
    policy.save(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "action_head.safetensors").is_file()
    head = load_action_head(tmp_path, policy.module.head.config["hidden_size"], 2)
    for k, v in policy.module.head.state_dict().items():
        assert torch.equal(head.state_dict()[k], v)
    with pytest.raises(ConfigError, match="action_head.safetensors"):
        load_action_head(tmp_path, policy.module.head.config["hidden_size"], 3)
