"""The option matrix: every registry entry x every trainer kind either builds a working objective
(stateful pieces carry and checkpoint their state) or is refused at load, naming the key, the value
and the trainer kind. Nothing in between, nothing silently ignored."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers.fake_inputs import fake_inputs

from mmpo.config import AlgorithmConfig
from mmpo.core import ADVANTAGES, AGGREGATIONS, GROUP_FILTERS, KL_ESTIMATORS, KL_SCHEDULES, POLICY_LOSSES
from mmpo.errors import ConfigError
from mmpo.trainers.algorithm import build_algorithm
from mmpo.trainers.kinds import KINDS, TrainerKind
from mmpo.trainers.update import UnitTerms, compose_loss

#: options an entry needs to run at all (no default for them)
REQUIRED = {
    "cppo_prune": {"prune_ratio": 0.5},
    "lspo": {"low_pct": 0.3, "high_pct": 0.7},
    "d3s": {},
}


class _Task:
    """A stand-in for a task's declarations (the builder reads only these attributes)."""

    name = "any"
    row_info_keys: tuple[str, ...] = ()
    unit_densities = None


class _AresTask(_Task):
    row_info_keys = ("bucket", "correct", "soft_cost")


def _cases() -> list[tuple[str, str, dict]]:
    """(registry, name, AlgorithmConfig overrides) for every entry of every objective registry."""
    out = []
    for name in ADVANTAGES.names():
        out.append(("advantage", name, {"advantage": name}))
    for name in POLICY_LOSSES.names():
        out.append(("loss", name, {"loss": name}))
    for name in AGGREGATIONS.names():
        out.append(("loss_agg", name, {"loss_agg": name}))
    for name in KL_ESTIMATORS.names():  # an estimator only matters with a KL term on
        out.append(("kl_estimator", name, {"kl_estimator": name, "kl_options": {"beta": 0.04}}))
    for name in KL_SCHEDULES.names():
        opts = {"beta": 0.04} if name == "constant" else {}
        out.append(("kl_schedule", name, {"kl_schedule": name, "kl_options": opts}))
    for name in GROUP_FILTERS.names():
        item = {"name": name, **REQUIRED.get(name, {})}
        out.append(("filters", name, {"filters": [item], "dynamic_sampling": name == "dynamic"}))
    out.append(("kl_placement", "reward", {"kl_placement": "reward", "kl_options": {"beta": 0.04}}))
    out.append(("entropy_coef", "0.01", {"entropy_coef": 0.01}))
    out.append(("dynamic_sampling", "true", {"dynamic_sampling": True}))
    return out


def _exercise(algo, kind: TrainerKind) -> None:
    """Run the built pieces on tensors of this kind's shape: advantages twice (state carried and
    round-tripped through state_dict), beta, and the composed loss with its gradient."""
    torch.manual_seed(0)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 0.1])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    keys = ["p0"] * 3 + ["p1"] * 3
    T = 5
    logp = (torch.randn(6, T) - 1.0).requires_grad_(True)
    mask = torch.ones(6, T, dtype=torch.bool)
    mask[0, 3:] = False
    given = fake_inputs((*algo.advantage_inputs, *algo.loss_inputs), rewards, logp, mask)
    first = algo.advantages(rewards, groups, prompt_keys=keys, inputs=given)
    assert first.shape in ((6,), (6, T)) and torch.isfinite(first).all()
    for name, state in algo.states.items():
        restored = type(state)()
        restored.load_state_dict(state.state_dict())
        assert restored.state_dict() == state.state_dict(), name
    algo.advantages(rewards.flip(0), groups, prompt_keys=keys, inputs=given)
    beta = algo.beta(3, 10, 0.02)
    assert beta >= 0.0 and (beta > 0.0) == algo.uses_kl or algo.config.kl_schedule != "constant"
    old = logp.detach() + 0.05 * torch.randn(6, T)
    terms = UnitTerms(logp, old, first, mask, entropy=torch.rand(6, T) if kind.entropy else None)
    terms.inputs = {n: given[n] for n in algo.loss_inputs}
    if algo.uses_kl:
        if algo.kl_estimator == "gaussian":
            mean = logp.unsqueeze(-1)
            terms.kl = algo.kl(mean, mean.detach() + 0.1, 0.5)
        else:
            terms.logp_ref = old - 0.1
    loss, metrics = compose_loss(terms, algo, beta, max_len=T)
    assert torch.isfinite(loss)
    loss.backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    if algo.uses_kl:
        assert "kl" in metrics


@pytest.mark.parametrize("kind_name", sorted(KINDS))
@pytest.mark.parametrize(("key", "value", "overrides"), _cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_entry_works_or_is_refused_at_load(kind_name, key, value, overrides):
    kind = KINDS[kind_name]
    cfg = dataclasses.replace(AlgorithmConfig(), **overrides)
    task = _AresTask() if value == "ares_bucket" else _Task()
    try:
        algo = build_algorithm(cfg, kind, task)
    except ConfigError as e:
        msg = str(e)
        assert f"the {kind.name} trainer" in msg, msg
        # it names one of the keys this config set, with its value
        named = [f"algorithm.{k}" for k in overrides] + [
            f"algorithm.kl_options.{k}" for k in overrides.get("kl_options", {})
        ]
        assert any(n in msg for n in named), msg
        assert str(value).lower() in msg.lower() or any(
            repr(v) in msg for v in overrides.get("kl_options", {}).values()
        ), msg
        return
    _exercise(algo, kind)


def test_the_matrix_refuses_what_each_kind_cannot_compute():
    """Spot checks of the matrix's content (so a builder that accepted everything would fail)."""
    refused = {
        ("token", "kl_estimator", "gaussian"),
        ("denoising", "loss", "dcpo"),
        ("noise", "loss", "dcpo"),
        ("series", "loss", "dcpo"),
        ("noise", "kl_schedule", "grpo_d"),
        ("environment", "kl_placement", "reward"),
        ("series", "entropy_coef", 0.01),
        ("environment", "dynamic_sampling", True),
        ("denoising", "filters", "lspo"),
        ("series", "kl_placement", "reward"),
        ("denoising", "filters", "d3s"),
        ("series", "advantage", "gtpo"),
        ("environment", "loss", "simko"),
        ("denoising", "advantage", "seed_grpo"),
        ("token", "filters", "ript_skip"),
    }
    for kind_name, key, value in refused:
        if key == "filters":
            over = {"filters": [{"name": value, **REQUIRED.get(value, {})}]}
        elif key in ("advantage", "loss"):
            over = {key: value}
        elif key == "kl_schedule":
            over = {"kl_schedule": value}
        elif key in ("kl_estimator", "kl_placement"):
            over = {key: value, "kl_options": {"beta": 0.1}}
        else:
            over = {key: value}
        with pytest.raises(ConfigError, match=kind_name):
            build_algorithm(dataclasses.replace(AlgorithmConfig(), **over), KINDS[kind_name], _Task())


def test_ares_bucket_needs_a_task_with_buckets():
    cfg = dataclasses.replace(AlgorithmConfig(), kl_schedule="ares_bucket")
    with pytest.raises(ConfigError, match=r"kl_schedule='ares_bucket'.*token trainer.*bucket"):
        build_algorithm(cfg, KINDS["token"], _Task())
    assert "kl_schedule" in build_algorithm(cfg, KINDS["token"], _AresTask()).states


def test_auto_resolves_to_the_loss_default_aggregation_and_the_kind_estimator():
    gspo = build_algorithm(dataclasses.replace(AlgorithmConfig(), loss="gspo"), KINDS["token"])
    dcpo = build_algorithm(dataclasses.replace(AlgorithmConfig(), loss="dcpo"), KINDS["token"])
    ppo = build_algorithm(AlgorithmConfig(), KINDS["token"])
    assert (gspo.loss_agg, dcpo.loss_agg, ppo.loss_agg) == ("seq-mean-token-mean", "otm", "token-mean")
    explicit = build_algorithm(
        dataclasses.replace(AlgorithmConfig(), loss="gspo", loss_agg="token-mean"), KINDS["token"]
    )
    assert explicit.loss_agg == "token-mean"
    assert build_algorithm(AlgorithmConfig(), KINDS["series"]).kl_estimator == "gaussian"
    assert build_algorithm(AlgorithmConfig(), KINDS["token"]).kl_estimator == "k3"


def test_a_task_with_continuous_actions_narrows_the_environment_kind():
    class Continuous(_Task):
        unit_densities = True

    cfg = dataclasses.replace(AlgorithmConfig(), loss="dcpo")
    build_algorithm(cfg, KINDS["environment"], _Task())
    with pytest.raises(ConfigError, match="densities"):
        build_algorithm(cfg, KINDS["environment"], Continuous())
