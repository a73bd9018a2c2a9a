"""MiniWoB++ as a gymnasium environment for the environment runner (``mmpo.rollout.env_runner``),
so the RL trainers of environment tasks (RIPT's rounds, GRPO on env seeds) drive a live browser.

``gymnasium.make("mmpo/MiniWoB-v0", tasks=["click-test-2", "click-button"])`` (registered when this
module is imported). A seed picks the task (``tasks[seed % len(tasks)]``) and the task's own seed,
so held-out seeds are held-out instances of every task.

Observation ``{"image": [H, W, 3] uint8, "instruction": str}``; ``info["dom"]`` holds the DOM
elements and ``info["screen_size"]`` the screenshot's ``(width, height)``. Actions:

- an array ``[x, y]`` in ``[0, 1]^2`` (the ``Box`` action space): a click at normalised
  coordinates (a VLA-style policy emits it as two binned tokens);
- an action text (``"click(0.5, 0.4)"``, ``"type('hi')"``, ``"enter()"``; see ``actions.py``) or
  an ``Action``: anything the GUI action space holds (malformed text is a no-op, counted in
  ``info["malformed"]``).

``info["success"]`` is True once MiniWoB's reward is positive (``reward``: ``raw`` +1 / -1, or
MiniWoB's ``time_decayed``; its 10 s episode limit is lifted unless ``episode_time_limit_s``). \
A browser crash or hang ends the
episode as failed (``info["env_error"]``); the next reset starts on a fresh browser. One browser
per task is kept open (a task switch costs no restart).
"""

from __future__ import annotations

import string
from typing import Any, Sequence

import gymnasium
import numpy as np

from mmpo.errors import ConfigError
from mmpo_tasks.gui_agent.actions import Action, parse_action
from mmpo_tasks.gui_agent.miniwob_env import GuiObservation, MiniWobEnv

ENV_ID = "mmpo/MiniWoB-v0"


class MiniWobGymEnv(gymnasium.Env):
    """See the module docstring."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        tasks: Sequence[str] | str = ("click-test-2",),
        timeout_s: float = 30.0,
        reward: str = "raw",
        episode_time_limit_s: float | None = None,
        render_mode: str | None = None,
    ) -> None:
        self.tasks = [tasks] if isinstance(tasks, str) else [str(t) for t in tasks]
        if not self.tasks:
            raise ConfigError("task.env.kwargs.tasks: give at least one MiniWoB task (e.g. click-test-2)")
        self._check_tasks()
        if reward not in ("raw", "time_decayed"):
            raise ConfigError(
                f"task.env.kwargs.reward={reward!r}: use 'raw' (+1/-1) or 'time_decayed' (MiniWoB's original)"
            )
        self.timeout_s = float(timeout_s)
        self.reward = reward
        self.episode_time_limit_s = episode_time_limit_s
        self.render_mode = render_mode
        self.action_space = gymnasium.spaces.Box(0.0, 1.0, shape=(2,), dtype=np.float32)
        self.observation_space = gymnasium.spaces.Dict(
            {
                "image": gymnasium.spaces.Box(0, 255, shape=(210, 160, 3), dtype=np.uint8),
                "instruction": gymnasium.spaces.Text(max_length=4096, charset=string.printable),
            }
        )
        self._envs: dict[str, MiniWobEnv] = {}
        self.task: str = self.tasks[0]
        self.current: GuiObservation | None = None
        self._acted_on: np.ndarray | None = None  # the screen the last action was taken on
        self._action: Action | None = None

    def _check_tasks(self) -> None:
        from importlib import resources

        try:
            pages = resources.files("miniwob") / "html" / "miniwob"
            known = {p.name[:-5] for p in pages.iterdir() if p.name.endswith(".html")}
        except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
            return  # the package layout is not the one we know: let the browser complain
        bad = [t for t in self.tasks if t not in known]
        if bad:
            raise ConfigError(f"task.env.kwargs.tasks: unknown MiniWoB task(s) {bad} (e.g. {sorted(known)[:8]} ...)")

    def task_of(self, seed: int) -> tuple[str, int]:
        """The task of context ``seed`` and the seed the task is reset with."""
        return self.tasks[seed % len(self.tasks)], seed // len(self.tasks)

    def _observation(self, obs: GuiObservation) -> dict[str, Any]:
        return {"image": obs.screenshot, "instruction": obs.instruction}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        self.task, task_seed = self.task_of(int(seed or 0))
        if self.task not in self._envs:
            self._envs[self.task] = MiniWobEnv(
                self.task, timeout_s=self.timeout_s, reward=self.reward, episode_time_limit_s=self.episode_time_limit_s
            )
        self.current = self._envs[self.task].reset(task_seed)
        self._acted_on, self._action = None, None
        return self._observation(self.current), {
            "dom": self.current.dom,
            "task": self.task,
            "screen_size": self.current.screen_size,
        }

    def to_action(self, action: Any) -> Action:
        """The GUI action of an env action (see the module docstring)."""
        if isinstance(action, Action):
            return action
        if isinstance(action, str):
            text = action if "<action>" in action else f"<action>{action}</action>"
            return parse_action(text)
        xy = np.asarray(action, dtype=np.float64).reshape(-1)
        if xy.shape != (2,) or not np.all(np.isfinite(xy)):
            return Action("noop", malformed=True, error=f"a click needs [x, y], got {action!r}")
        x, y = np.clip(xy, 0.0, 1.0)
        return Action("click", x=float(x), y=float(y))

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        if self.current is None:
            raise RuntimeError("MiniWobGymEnv.step before reset")
        gui = self.to_action(action)
        self._acted_on, self._action = self.current.screenshot, gui
        obs, reward, done, info = self._envs[self.task].step(gui, self.current.screen_size)
        info = dict(info, task=self.task, malformed=gui.malformed, success=reward > 0)
        if obs is None:  # the browser failed: the episode ends, failed, on its last screen
            obs = self.current
            info["success"] = False
            reward = 0.0
        self.current = obs
        info["dom"] = obs.dom
        info["screen_size"] = obs.screen_size
        return self._observation(obs), float(reward), bool(done), False, info

    def get_frame(self, **_: Any) -> np.ndarray:
        """A frame for episode videos: the screen the last action was taken on with the click
        marked (a red ring), or the current screen right after a reset."""
        if self._acted_on is None:
            return self.current.screenshot if self.current is not None else np.zeros((210, 160, 3), np.uint8)
        from PIL import Image, ImageDraw

        image = Image.fromarray(self._acted_on)
        a = self._action
        if a is not None and a.kind == "click":
            x, y, r = a.x * image.width, a.y * image.height, 6
            ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), outline=(255, 0, 0), width=2)
        return np.asarray(image)

    def render(self) -> np.ndarray | None:
        return None if self.current is None else self.current.screenshot

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs = {}


if ENV_ID not in gymnasium.registry:
    gymnasium.register(ENV_ID, entry_point=MiniWobGymEnv, max_episode_steps=None, disable_env_checker=True)

__all__ = ["ENV_ID", "MiniWobGymEnv"]
