"""MiniWoB++ as a gymnasium environment (live, headless Chromium) and the environment runner on it:
a seed picks the task, clicks given as [x, y] or as action text earn MiniWoB's raw reward, rollouts
run in waves of at most ``max_envs`` browsers and keep their observations and DOMs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("miniwob")
if not shutil.which("chromium") or not shutil.which("chromedriver"):
    pytest.fail(
        "chromium and chromedriver must be installed (apt-get install chromium chromium-driver; .ci/run does it)"
    )

import gymnasium  # noqa: E402

from mmpo.errors import ConfigError  # noqa: E402
from mmpo.rollout.env_runner import ActionBatch, EnvRunner, Observation  # noqa: E402
from mmpo_tasks.gui_agent.gym_env import ENV_ID, MiniWobGymEnv  # noqa: E402
from mmpo_tasks.gui_agent.miniwob_task import miniwob_env_spec  # noqa: E402
from mmpo_tasks.gui_agent.solver import ScriptedSolver  # noqa: E402


def _solver_click(env: MiniWobGymEnv) -> tuple[float, float]:
    step = ScriptedSolver(env.task).act(env.current)
    assert step is not None
    return step.action.x, step.action.y


def test_seed_picks_the_task_and_clicks_earn_the_raw_reward(no_leftover_browser):
    env = gymnasium.make(ENV_ID, tasks=["click-test-2", "focus-text"]).unwrapped
    try:
        assert env.task_of(7) == ("focus-text", 3) and env.task_of(6) == ("click-test-2", 3)
        obs, info = env.reset(seed=6)
        assert (
            info["task"] == "click-test-2"
            and obs["image"].shape == (210, 160, 3)
            and "Click button" in obs["instruction"]
        )
        assert info["screen_size"] == (160, 210) and info["dom"]
        before = env.get_frame()
        x, y = _solver_click(env)
        _, r, term, _, info = env.step(np.array([x, y]))  # a click as [x, y]
        assert term and r == 1.0 and info["success"]  # raw reward: 1 for success, not scaled by time
        frame = env.get_frame()  # the screen clicked on, the click ringed in red
        assert frame.shape == before.shape and tuple(frame[round(y * 210), round(x * 160) + 6]) == (255, 0, 0)
        assert np.array_equal(
            np.delete(frame, np.s_[round(y * 210) - 9 : round(y * 210) + 9], 0),
            np.delete(before, np.s_[round(y * 210) - 9 : round(y * 210) + 9], 0),
        )
        env.reset(seed=7)
        x, y = _solver_click(env)
        _, r, term, _, info = env.step(f"click({x:.4f}, {y:.4f})")  # the same as action text
        assert term and r == 1.0 and info["success"] and not info["malformed"]
        env.reset(seed=9)
        _, r, term, _, info = env.step("click(2, 'a')")  # malformed: a counted no-op
        assert info["malformed"] and not term and r == 0.0
    finally:
        env.close()


def test_unknown_task_and_reward_mode_are_config_errors():
    with pytest.raises(ConfigError, match="no-such-task"):
        MiniWobGymEnv(tasks=["click-test", "no-such-task"])
    with pytest.raises(ConfigError, match="reward"):
        MiniWobGymEnv(tasks=["click-test"], reward="dense")


class _RandomClicks:
    """A stand-in policy: uniform random clicks (the runner only needs ActionBatch rows)."""

    def __init__(self) -> None:
        self.seen: list[Observation] = []

    def act(self, observations, *, generator, greedy=False):
        xy = torch.rand(len(observations), 2, generator=generator)
        self.seen += observations
        return ActionBatch(
            actions=[row.numpy() for row in xy],
            units=xy,
            logp=torch.zeros(len(observations), 2),
            mask=torch.ones(len(observations), 2, dtype=torch.bool),
            encodings=[None] * len(observations),
        )


def test_runner_waves_bound_the_browsers_and_keep_observations(no_leftover_browser):
    spec = miniwob_env_spec(["click-test"], max_steps=2, image_size=56, max_envs=2)
    runner = EnvRunner(spec)
    try:
        eps = runner.run(_RandomClicks(), [5, 9], 2, generator=torch.Generator().manual_seed(0), keep_observations=True)
        assert len(runner._envs) == 2  # 4 rollouts, 2 browsers
        assert [(e.seed, e.rollout) for e in eps] == [(5, 0), (5, 1), (9, 0), (9, 1)]
        for ep in eps:
            assert 1 <= ep.length <= 2 and len(ep.observations) == ep.length + 1
            assert ep.observations[0].image.shape == (56, 56, 3) and ep.reset_info["dom"]
            assert all(s.info.get("screen_size") == (160, 210) for s in ep.steps)
            assert ep.success == any(s.reward > 0 for s in ep.steps)
        # both rollouts of a context start from the same screen
        assert np.array_equal(eps[0].observations[0].image, eps[1].observations[0].image)
        assert not np.array_equal(eps[0].observations[0].image, eps[2].observations[0].image)
    finally:
        runner.close()
