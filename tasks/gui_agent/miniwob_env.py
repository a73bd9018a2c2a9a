"""MiniWoB++ tasks in headless Debian Chromium (``miniwob`` + Selenium, offline) behind the GUI
action space, with crash recovery.

Observation: the screenshot (``[H, W, 3]`` uint8), the instruction (utterance) and the DOM
elements. Actions are ``mmpo_tasks.gui_agent.actions.Action``: ``click(x, y)`` (normalised to the
screenshot) and ``click_element(ref)`` map to MiniWoB's CLICK_COORDS / CLICK_ELEMENT,
``type(text)`` to TYPE_TEXT; the others (and malformed actions) are no-ops here.

Rewards are MiniWoB's (benchmark mode): ``raw`` (default: +1 success, -1 failure, not scaled by
time) or ``time_decayed`` (MiniWoB's original reward, scaled by the elapsed share of the
episode's time limit). MiniWoB's 10 s episode limit is lifted unless ``episode_time_limit_s``.

A browser that crashes or hangs (any WebDriver error, or a call slower than ``timeout_s``) is
closed and restarted; the episode is marked failed (``info["env_error"]``, reward 0) and the next
``reset`` starts on a fresh browser. ``close`` quits the driver and its browser.
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmpo_tasks.gui_agent.actions import Action

DEFAULTS = {
    "MINIWOB_CHROME_BINARY": "/usr/bin/chromium",
    "MINIWOB_CHROMEDRIVER": "/usr/bin/chromedriver",
    "SE_OFFLINE": "true",
}


@dataclass
class GuiObservation:
    screenshot: np.ndarray
    instruction: str
    dom: list[dict[str, Any]] = field(default_factory=list)

    @property
    def screen_size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return int(self.screenshot.shape[1]), int(self.screenshot.shape[0])


class MiniWobEnv:
    """One MiniWoB++ task (e.g. ``click-test-2``), restarted when its browser fails."""

    def __init__(
        self, task: str, *, timeout_s: float = 30.0, reward: str = "raw", episode_time_limit_s: float | None = None
    ) -> None:
        for k, v in DEFAULTS.items():
            os.environ.setdefault(k, v)
        import miniwob  # noqa: F401  (registers the miniwob/* ids)

        if reward not in ("raw", "time_decayed"):
            raise ValueError(f"MiniWobEnv reward={reward!r}: use 'raw' or 'time_decayed'")
        self.task = task
        self.timeout_s = timeout_s
        self.reward = reward
        self.episode_time_limit_s = episode_time_limit_s
        self.env: Any = None
        self.restarts = 0
        self._pids: set[int] = set()  # the driver and its browser processes
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    # -- browser lifecycle ---------------------------------------------------------------------
    def _make(self) -> Any:
        import gymnasium
        from miniwob.reward import get_original_reward, get_raw_reward

        processor = get_raw_reward if self.reward == "raw" else get_original_reward
        env = gymnasium.make(f"miniwob/{self.task}-v1", render_mode=None, reward_processor=processor)
        # MiniWoB ends an episode after 10 s of wall time; with many browsers stepped in lockstep
        # that clock measures the batch, not the agent, so it is lifted unless asked for
        limit_ms = int(1000 * self.episode_time_limit_s) if self.episode_time_limit_s else 2**31 - 1
        self._call(lambda: env.reset(seed=0))  # loads the page; the limit holds from the next episode
        self._call(lambda: env.unwrapped.instance.driver.execute_script(f"core.EPISODE_MAX_TIME = {limit_ms};"))
        return env

    def _call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` with the timeout (a hung browser raises TimeoutError)."""
        return self._pool.submit(fn, *args).result(timeout=self.timeout_s)

    def _restart(self) -> None:
        self.restarts += 1
        self._kill()
        self.env = None

    def _track(self) -> None:
        """Remember the driver's process tree: if the driver dies, its browser is orphaned."""
        import psutil

        try:
            drv = psutil.Process(self.env.unwrapped.instance.driver.service.process.pid)
            self._pids |= {drv.pid} | {c.pid for c in drv.children(recursive=True)}
        except Exception:
            pass

    def _kill(self) -> None:
        import psutil

        env, self.env = self.env, None
        if env is not None:
            try:
                env.close()
            except Exception:  # a crashed driver cannot quit its browser
                pass
        procs = []
        for pid in self._pids:
            try:
                p = psutil.Process(pid)
                procs += [p, *p.children(recursive=True)]
            except psutil.Error:
                pass
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=5)
        self._pids = set()

    def _obs(self, raw: dict[str, Any]) -> GuiObservation:
        return GuiObservation(
            np.asarray(raw["screenshot"], dtype=np.uint8), str(raw["utterance"]), list(raw["dom_elements"])
        )

    # -- gymnasium-like API ----------------------------------------------------------------------
    def reset(self, seed: int) -> GuiObservation:
        """Start an episode (a fresh browser after a failure; one retry if the browser dies now)."""
        for attempt in range(2):
            try:
                if self.env is None:
                    self.env = self._make()
                raw, _ = self._call(lambda: self.env.reset(seed=int(seed)))
                self._track()
                return self._obs(raw)
            except Exception:
                self._restart()
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def to_miniwob(self, action: Action, screen_size: tuple[int, int]) -> Any | None:
        """The MiniWoB action of ``action``, or None for a no-op."""
        from miniwob.action import ActionTypes

        u = self.env.unwrapped
        if action.kind == "click":
            return u.create_action(
                ActionTypes.CLICK_COORDS,
                coords=np.array([action.x * screen_size[0], action.y * screen_size[1]], dtype=np.float32),
            )
        if action.kind == "click_element":
            return u.create_action(ActionTypes.CLICK_ELEMENT, ref=int(action.ref))
        if action.kind == "type":
            return u.create_action(ActionTypes.TYPE_TEXT, text=str(action.text))
        return None

    def step(
        self, action: Action, screen_size: tuple[int, int]
    ) -> tuple[GuiObservation | None, float, bool, dict[str, Any]]:
        """``(observation, reward, done, info)``. A browser failure ends the episode as failed
        (reward 0, ``info["env_error"]``) and restarts the browser for the next reset."""
        try:
            a = self.to_miniwob(action, screen_size)
            if a is None:
                a = self.env.unwrapped.create_action(
                    __import__("miniwob.action", fromlist=["ActionTypes"]).ActionTypes.NONE
                )
            raw, reward, terminated, truncated, info = self._call(lambda: self.env.step(a))
            return self._obs(raw), float(reward), bool(terminated or truncated), dict(info)
        except Exception as e:
            self._restart()
            return None, 0.0, True, {"env_error": f"{type(e).__name__}: {str(e)[:200]}"}

    def close(self) -> None:
        self._kill()
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["GuiObservation", "MiniWobEnv"]
