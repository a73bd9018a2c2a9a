"""Public surface of mmpo.core: exports, registry contents, unknown names, state classes."""

from __future__ import annotations

import json

import pytest

import mmpo.core as core
from mmpo.core import registry
from mmpo.errors import UnknownNameError

REGISTRIES = {
    "ADVANTAGES": {"grpo", "drgrpo", "batch_std", "global_std", "rloo", "bnpo", "dcpo_sas", "rank_ema", "flat_batch"},
    "POLICY_LOSSES": {"ppo_clip", "gspo", "dcpo", "ce_gppo", "aspo", "no_clip_pg"},
    "KL_ESTIMATORS": {"k1", "abs", "k2", "k3", "k1+", "k3+", "gaussian"},
    "KL_SCHEDULES": {"constant", "grpo_d", "othink_v", "pi_target", "ares_bucket"},
    "GROUP_FILTERS": {
        "dynamic",
        "overlong_filter",
        "soft_overlong_punishment",
        "cppo_prune",
        "ript_skip",
        "lspo",
        "d3s",
    },
    "AGGREGATIONS": {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "otm"},
}

STATEFUL = {
    ("ADVANTAGES", "dcpo_sas"),
    ("ADVANTAGES", "rank_ema"),
    ("KL_SCHEDULES", "pi_target"),
    ("KL_SCHEDULES", "ares_bucket"),
    ("GROUP_FILTERS", "ript_skip"),
}


def test_exports():
    for name in [
        "ADVANTAGES",
        "POLICY_LOSSES",
        "KL_ESTIMATORS",
        "KL_SCHEDULES",
        "GROUP_FILTERS",
        "AGGREGATIONS",
        "aggregate",
        "chunk_log_ratio",
        "kl_to_reward",
        "entropy",
        "Registry",
    ]:
        assert hasattr(core, name), name
    assert core.Registry is registry.Registry
    assert callable(core.entropy.token_entropy)


@pytest.mark.parametrize("reg_name", sorted(REGISTRIES))
def test_registry_contents(reg_name):
    assert REGISTRIES[reg_name] <= set(getattr(core, reg_name).names())


@pytest.mark.parametrize("reg_name", sorted(REGISTRIES))
def test_unknown_name_lists_valid_names(reg_name):
    reg = getattr(core, reg_name)
    with pytest.raises(UnknownNameError) as err:
        reg.get("definitely_not_registered")
    message = str(err.value)
    for name in reg.names():
        assert name in message


def test_did_you_mean():
    with pytest.raises(UnknownNameError, match="Did you mean 'grpo'"):
        core.ADVANTAGES.get("grpoo")


@pytest.mark.parametrize("reg_name", sorted(REGISTRIES))
def test_state_classes(reg_name):
    reg = getattr(core, reg_name)
    for name in reg.names():
        cls = registry.state_class(reg.get(name))
        if (reg_name, name) in STATEFUL:
            state = cls()
            d = state.state_dict()
            assert json.loads(json.dumps(d)) == d
            fresh = cls()
            fresh.load_state_dict(d)
            assert fresh.state_dict() == d
        else:
            assert cls is None, (reg_name, name)
