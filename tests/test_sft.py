"""The supervised stage (mmpo/sft.py): fits what it is given, is reproducible for a seed, and
stops with a clear error on a non-finite loss."""

from __future__ import annotations

import pytest
import torch

from mmpo.errors import TrainingError
from mmpo.sft import SFTConfig, supervised_train


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    w = torch.tensor([1.5, -2.0, 0.5])
    return [(x[i], x[i] @ w + 0.3) for i in range(n)]


def _mse(model):
    def loss(batch):
        x = torch.stack([b[0] for b in batch])
        y = torch.stack([b[1] for b in batch])
        return ((model(x).squeeze(-1) - y) ** 2).mean()

    return loss


def test_fits_a_linear_map_and_reports_epoch_losses():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    data = _data()
    out = supervised_train(model, data, _mse(model), SFTConfig(epochs=60, batch_size=16, lr=0.05), progress=False)
    assert out["steps"] == 60 * 4 and len(out["history"]) == 60
    assert out["loss_last_epoch"] < 1e-3 < out["loss_first_epoch"]
    assert torch.allclose(model.weight.detach(), torch.tensor([[1.5, -2.0, 0.5]]), atol=0.02)
    assert model.bias.item() == pytest.approx(0.3, abs=0.02)


def test_same_seed_same_result_and_frozen_params_stay():
    results = []
    for _ in range(2):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
        model[0].requires_grad_(False)
        frozen = model[0].weight.clone()
        supervised_train(
            model, _data(), _mse(model), SFTConfig(epochs=3, batch_size=8, lr=0.01), seed=5, progress=False
        )
        assert torch.equal(model[0].weight, frozen)
        results.append(model[1].weight.detach().clone())
    assert torch.equal(results[0], results[1])


def test_non_finite_loss_and_empty_data_fail_clearly():
    model = torch.nn.Linear(3, 1)
    with pytest.raises(TrainingError, match="demo: non-finite loss at step 0"):
        supervised_train(
            model,
            _data(),
            lambda b: torch.tensor(float("nan"), requires_grad=True),
            SFTConfig(),
            desc="demo",
            progress=False,
        )
    with pytest.raises(TrainingError, match="no examples"):
        supervised_train(model, [], _mse(model), SFTConfig(), progress=False)
