"""A live MiniWoB++ episode in headless Chromium: a real click (by coordinates and by element)
earns the task reward; a killed browser fails the episode, is restarted, and no browser outlives
the environment."""

from __future__ import annotations

import os
import shutil
import signal

import psutil
import pytest

pytest.importorskip("miniwob")
if not shutil.which("chromium") or not shutil.which("chromedriver"):
    pytest.fail(
        "chromium and chromedriver must be installed (apt-get install chromium chromium-driver; .ci/run does it)"
    )

from mmpo_tasks.gui_agent.actions import Action  # noqa: E402
from mmpo_tasks.gui_agent.miniwob_env import MiniWobEnv  # noqa: E402


def _target(obs):
    return next(e for e in obs.dom if e["tag"] == "button" and e["text"] in obs.instruction)


def test_live_clicks_earn_the_task_reward_and_crash_recovery(no_leftover_browser):
    env = MiniWobEnv("click-test-2", timeout_s=30)
    try:
        obs = env.reset(seed=0)
        assert obs.screenshot.ndim == 3 and "Click button" in obs.instruction
        t = _target(obs)
        w, h = obs.screen_size
        x = (float(t["left"][0]) + float(t["width"][0]) / 2) / w
        y = (float(t["top"][0]) + float(t["height"][0]) / 2) / h
        _, r, done, info = env.step(Action("click", x=x, y=y), obs.screen_size)
        assert done and r > 0.5 and "env_error" not in info
        obs = env.reset(seed=1)
        wrong = next(e for e in obs.dom if e["tag"] == "button" and e["text"] not in obs.instruction)
        _, r, done, _ = env.step(Action("click_element", ref=int(wrong["ref"])), obs.screen_size)
        assert done and r < 0  # the wrong button
        # the browser dies mid-episode: the episode fails, the next reset works on a new browser
        obs = env.reset(seed=2)
        orphans = set(env._pids)  # the driver and its browser; killing the driver orphans the browser
        os.kill(env.env.unwrapped.instance.driver.service.process.pid, signal.SIGKILL)
        _, r, done, info = env.step(Action("click_element", ref=int(_target(obs)["ref"])), obs.screen_size)
        assert done and r == 0.0 and "env_error" in info and env.restarts == 1
        obs = env.reset(seed=3)
        _, r, done, _ = env.step(Action("click_element", ref=int(_target(obs)["ref"])), obs.screen_size)
        assert done and r > 0.5
    finally:
        env.close()  # the fixture checks that no browser outlives the environment
    assert orphans and not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in orphans
    )
