"""The pointing policy (GUI clicks as the choice of an image token): cell geometry, a uniform start,
stored log-probs equal to the training pass, gradients through the VLM, and save/load with its head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmpo.errors import ConfigError
from mmpo.models import load_model
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.policies.pointer import PointerHead, PointerPolicy, load_pointer_head
from mmpo.policies.vla import LaplaceActionHead, VLAWithHead, save_with_head
from mmpo.rollout.env_runner import Observation


@pytest.fixture(scope="module")
def policy():
    model, proc, info = load_model("tiny:qwen2_vl", seed=0)
    lm = CausalLMPolicy.from_info(model, proc, info)
    return PointerPolicy(
        lm,
        VLAWithHead(model, PointerHead(model.config.get_text_config().hidden_size, 16)),
        (4, 4),
        prompt_template="{instruction}",
    )


def _obs(seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8), f"click {seed}")


def test_cells_tile_the_screen_row_major(policy):
    assert policy.cells == 16
    for i in range(16):
        assert policy.cell_of(policy.cell_center(i)) == i
    np.testing.assert_allclose(policy.cell_center(6), [2.5 / 4, 1.5 / 4])  # row 1, column 2
    assert policy.cell_of([1.0, 1.0]) == 15 and policy.cell_of([0.0, 0.0]) == 0
    units, mask = policy.demo_units(np.array([0.9, 0.1]))
    assert units.tolist() == [3] and mask.tolist() == [True]


def test_uniform_start_and_stored_logp_equal_the_training_pass(policy):
    obs = [_obs(s) for s in range(3)]
    batch = policy.act(obs, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(batch.logp, torch.full((3, 1), -math.log(16)))  # zero query: uniform
    for a, u in zip(batch.actions, batch.units[:, 0].tolist()):
        np.testing.assert_allclose(a, policy.cell_center(u), atol=1e-6)
    with torch.no_grad():
        policy.module.head.query.weight.normal_(0, 1.0)  # a non-uniform head
    batch = policy.act(obs, generator=torch.Generator().manual_seed(0))
    logp = policy.log_probs(batch.encodings, batch.units, batch.mask)
    torch.testing.assert_close(logp.detach(), batch.logp, atol=1e-5, rtol=1e-5)
    (-logp.sum()).backward()
    grads = [p.grad for p in policy.module.vlm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_save_and_load_keep_the_head(policy, tmp_path):
    save_with_head(policy, tmp_path)
    head = load_pointer_head(tmp_path, policy.module.head.config["hidden_size"], 16)
    for k, v in policy.module.head.state_dict().items():
        torch.testing.assert_close(head.state_dict()[k], v)
    with pytest.raises(ConfigError, match="pointer"):  # a Laplace head's folder is not a pointer's
        laplace = type("P", (), {"module": VLAWithHead(policy.module.vlm, LaplaceActionHead(64, 2)), "lm": policy.lm})()
        save_with_head(laplace, tmp_path / "laplace")
        load_pointer_head(tmp_path / "laplace", 64)
    bad = _obs(0)
    bad.image = np.zeros((56, 56, 3), np.uint8)  # a different image size: a different grid
    with pytest.raises(ValueError, match="image tokens"):
        policy.act([bad], generator=torch.Generator().manual_seed(0))
