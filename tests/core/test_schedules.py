"""KL coefficient schedules: constant, GRPO-D V shape (section D), PI controller."""

from __future__ import annotations

import json
import math

import pytest

from mmpo.core import KL_SCHEDULES, state_class
from mmpo.errors import ConfigError

GRPO_D = KL_SCHEDULES.get("grpo_d")
PI = KL_SCHEDULES.get("pi_target")


def test_constant():
    assert KL_SCHEDULES.get("constant")(17, 100, beta=0.04) == 0.04
    assert state_class(KL_SCHEDULES.get("constant")) is None


def test_grpo_d_section_d_points():
    kw = dict(beta_min=0.04, beta_max=0.1, explore_frac=0.3)
    beta_mid = 0.07
    assert GRPO_D(0, 100, **kw) == pytest.approx(beta_mid)  # beta(0) = beta_mid
    assert GRPO_D(30, 100, **kw) == pytest.approx(0.04)  # beta(w) = beta_min
    assert GRPO_D(100, 100, **kw) == pytest.approx(0.1)  # beta(t_tot) = beta_max
    assert GRPO_D(15, 100, **kw) == pytest.approx(0.055)  # halfway down
    assert GRPO_D(65, 100, **kw) == pytest.approx(0.04 + 0.06 * 35 / 70)  # halfway up
    assert GRPO_D(250, 100, **kw) == pytest.approx(0.1)
    # geometry setting 0.0 / 0.02
    assert GRPO_D(0, 10, beta_min=0.0, beta_max=0.02) == pytest.approx(0.01)


def test_othink_v_alias_and_errors():
    assert KL_SCHEDULES.get("othink_v") is GRPO_D
    with pytest.raises(ConfigError):
        GRPO_D(0, 0)
    assert GRPO_D(0, 10, explore_frac=0.0) == pytest.approx(0.07)


def test_pi_target_two_updates_by_hand():
    state = PI.state_cls()
    b1 = PI(1, 100, state=state, kl=12.0)
    # kl_ema = 12, e = 2, I = 2: beta = 5e-4 * exp(0.08*2 + 0.02*2)
    assert b1 == pytest.approx(5e-4 * math.exp(0.2))
    b2 = PI(2, 100, state=state, kl=8.0)
    ema = 0.95 * 12 + 0.05 * 8  # 11.8
    err, integ = ema - 10, 0.95 * 2 + (ema - 10)
    assert b2 == pytest.approx(b1 * math.exp(0.08 * err + 0.02 * integ))
    assert state.kl_ema == pytest.approx(11.8) and state.err_i == pytest.approx(3.7)
    # no observation: beta unchanged
    assert PI(3, 100, state=state) == b2


def test_pi_target_bounds():
    state = PI.state_cls()
    assert PI(1, 10, state=state, kl=1e6) == 0.1
    state = PI.state_cls()
    for _ in range(50):
        beta = PI(1, 10, state=state, kl=0.0, target=1000.0)
    assert beta == 5e-6
    assert PI(0, 10) == 5e-4  # fresh state, no observation: beta_init


def test_pi_target_state_round_trip():
    state = PI.state_cls()
    for kl in (3.0, 14.0, 9.0):
        PI(0, 10, state=state, kl=kl)
    restored = PI.state_cls()
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert PI(0, 10, state=state, kl=20.0) == PI(0, 10, state=restored, kl=20.0)
    assert state_class(PI) is PI.state_cls
