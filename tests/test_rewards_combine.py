"""Weighted sum of named reward components."""

import pytest
import torch

from mmpo.errors import ConfigError
from mmpo.rewards import weighted_sum


def test_weighted_sum_values_and_logging():
    acc = torch.tensor([1.0, 0.0, 1.0, 0.0])
    fmt = torch.tensor([1.0, 1.0, 0.0, 0.0])
    found = torch.tensor([1, 1, 1, 0])
    out = weighted_sum({"accuracy": acc, "format": fmt, "answer_found": found}, {"accuracy": 1.0, "format": 0.5})
    # 1*acc + 0.5*fmt; answer_found has no weight (0)
    assert out.rewards.tolist() == [1.5, 0.5, 1.0, 0.0]
    assert out.rewards.dtype == torch.float32
    assert set(out.components) == {"accuracy", "format", "answer_found"}
    assert out.components["answer_found"].dtype == torch.float32
    assert out.components["answer_found"].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_zero_weight_is_logged_not_rewarded():
    out = weighted_sum({"a": torch.tensor([2.0, 3.0]), "b": torch.tensor([5.0, 7.0])}, {"a": -1.0, "b": 0.0})
    assert out.rewards.tolist() == [-2.0, -3.0]
    assert out.components["b"].tolist() == [5.0, 7.0]


def test_unknown_weight_names_it():
    with pytest.raises(ConfigError, match="'formt'.*components: accuracy, format"):
        weighted_sum({"accuracy": torch.zeros(2), "format": torch.zeros(2)}, {"formt": 1.0})


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="same shape"):
        weighted_sum({"a": torch.zeros(2), "b": torch.zeros(3)}, {"a": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        weighted_sum({}, {})
