"""Rollouts in gymnasium environments whose observation is an RGB image plus a text instruction
(VLA robotics, GUI environments).

A *context* is an environment seed: every one of its K rollouts starts from ``reset(seed=s)``,
the same initial state. Contexts x K environments are stepped together; at each step the policy
acts on all running ones at once and returns, per row, the env action and its *action units*
(token ids or action dimensions) with their log-probs. Episodes keep those per step for the
update.

MiniGrid / BabyAI levels (``minigrid``) give ``image`` through their RGB observation wrappers
and the instruction as ``mission``; any environment with ``render_mode="rgb_array"`` gives the
image by rendering, with a fixed instruction from the config.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence

import numpy as np
import torch

from mmpo.errors import ConfigError


@dataclass
class SeedRange:
    """Environment seeds ``start, start+1, ..., start+count-1``."""

    start: int = field(default=0, metadata={"help": "First seed.", "min": 0})
    count: int = field(default=100, metadata={"help": "Number of seeds.", "min": 1})

    def seeds(self) -> list[int]:
        return list(range(self.start, self.start + self.count))


def check_disjoint(
    train: Sequence[int],
    held_out: Sequence[int],
    what: str = "eval_seeds",
    other: str = "the training seeds (task.train_seeds)",
) -> None:
    """Refuse held-out contexts that are also training contexts (the success rate would not be held out)."""
    both = sorted(set(train) & set(held_out))
    if both:
        shown = ", ".join(map(str, both[:8])) + (" ..." if len(both) > 8 else "")
        raise ConfigError(
            f"task.{what} overlap {other} in {len(both)} seed(s) ({shown}); "
            f"choose a disjoint range (e.g. task.{what}.start >= {max(train) + 1})"
        )


@dataclass
class EnvSpec:
    """Which environment, how its observation becomes (image, instruction), and what success is."""

    id: str = field(
        default="BabyAI-GoToRedBallNoDists-v0",
        metadata={"help": "gymnasium id (MiniGrid / BabyAI levels register on `import minigrid`)."},
    )
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Keyword arguments of gymnasium.make."})
    observation: Literal["minigrid_partial", "minigrid_full", "render", "image"] = field(
        default="minigrid_partial",
        metadata={
            "help": "'minigrid_partial' / 'minigrid_full': MiniGrid's RGBImgPartialObsWrapper / RGBImgObsWrapper; "
            "'render': env.render() with render_mode='rgb_array'; 'image': the observation's own 'image' entry "
            "(e.g. mmpo/MiniWoB-v0)."
        },
    )
    tile_size: int = field(
        default=8, metadata={"help": "MiniGrid pixels per tile (7x7 partial view -> 56 px at 8).", "min": 1}
    )
    image_size: int = field(
        default=0, metadata={"help": "Resize the image to this square size (pixels); 0 keeps it.", "min": 0}
    )
    instruction: str = field(
        default="",
        metadata={"help": "Instruction text when the observation has none (e.g. 'swing the pendulum upright')."},
    )
    instruction_key: str = field(
        default="mission", metadata={"help": "Observation key holding the instruction (MiniGrid: mission)."}
    )
    max_steps: int = field(
        default=0, metadata={"help": "Policy steps per episode; 0 = the environment's own limit.", "min": 0}
    )
    success: Literal["terminated_positive", "info_success", "return_above"] = field(
        default="terminated_positive",
        metadata={
            "help": "'terminated_positive': the episode terminated with a positive reward (MiniGrid); "
            "'info_success': info['success'] was true; 'return_above': the return reached success_threshold."
        },
    )
    success_threshold: float = field(default=0.0, metadata={"help": "Return threshold of success='return_above'."})
    noop_action: Any = field(
        default=None,
        metadata={
            "help": "Env action run for an invalid policy output; null: the env is not stepped (the step still counts)."
        },
    )
    max_envs: int = field(
        default=0,
        metadata={
            "help": "At most this many environments run at once (rollouts beyond it run in later waves); "
            "0 = one per rollout. Bounds the browsers of a GUI environment.",
            "min": 0,
        },
    )


@dataclass
class Observation:
    """What the policy sees: ``image [H, W, 3]`` uint8 and the instruction."""

    image: np.ndarray
    instruction: str


@dataclass
class ActionBatch:
    """A policy's decision for B observations.

    actions: the env action of each row, None where the output was invalid (a no-op);
    units [B, U]: the action units (token ids, or action dimensions for a continuous head);
    logp [B, U] float32: log-prob of each unit under the sampling policy; mask [B, U] bool;
    encodings: one opaque model input per row, kept for the update.
    """

    actions: list[Any]
    units: torch.Tensor
    logp: torch.Tensor
    mask: torch.Tensor
    encodings: list[Any]


class ActingPolicy(Protocol):
    def act(
        self, observations: list[Observation], *, generator: torch.Generator, greedy: bool = False
    ) -> ActionBatch: ...


@dataclass
class StepRecord:
    """One policy step: its model input, action units ``[U]``, their log-probs ``[U]`` and mask
    ``[U]``; the env action taken (None for a no-op), the env's reward and ``info`` of the step."""

    encoding: Any
    units: torch.Tensor
    logp: torch.Tensor
    mask: torch.Tensor
    valid: bool
    env_action: Any = None
    reward: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Episode:
    seed: int
    rollout: int
    steps: list[StepRecord] = field(default_factory=list)
    env_return: float = 0.0
    success: bool = False
    invalid_actions: int = 0
    instruction: str = ""
    frames: list[np.ndarray] = field(default_factory=list)
    #: with ``keep_observations`` or ``keep_images``: the observation before each step and the last
    #: one (``length + 1``; references to the observations the policy saw, not copies)
    observations: list[Observation] = field(default_factory=list)
    reset_info: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.steps)


@dataclass
class EnvStart:
    """An environment after ``reset(seed)``: its observation, the reset info, a video frame
    ``[H, W, 3]`` (None unless asked) and its step limit."""

    observation: Observation
    info: dict[str, Any]
    frame: np.ndarray | None
    limit: int


@dataclass
class EnvStep:
    """What one ``env.step`` gave: the next observation, reward, end flags, info and a frame (or None)."""

    observation: Observation
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]
    frame: np.ndarray | None


def make_env(spec: EnvSpec, *, render: bool = False) -> Any:
    """``gymnasium.make(spec.id)`` with the wrappers that put an RGB image in the observation."""
    import gymnasium as gym

    if spec.id.startswith(("MiniGrid", "BabyAI")):
        import minigrid  # noqa: F401  (registers the MiniGrid / BabyAI ids)
    kwargs = dict(spec.kwargs)
    if spec.observation == "render" or render:
        kwargs.setdefault("render_mode", "rgb_array")
    try:
        env = gym.make(spec.id, **kwargs)
    except gym.error.Error as e:
        raise ConfigError(f"task.env.id={spec.id!r}: {e}") from e
    if spec.observation.startswith("minigrid"):
        from minigrid.wrappers import RGBImgObsWrapper, RGBImgPartialObsWrapper

        if not hasattr(env.unwrapped, "grid"):
            raise ConfigError(
                f"task.env.observation={spec.observation!r} needs a MiniGrid environment, not {spec.id!r}"
            )
        wrapper = RGBImgPartialObsWrapper if spec.observation == "minigrid_partial" else RGBImgObsWrapper
        env = wrapper(env, tile_size=spec.tile_size)
    return env


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """``image [H, W, 3]`` resized (bilinear) to ``[size, size, 3]``; unchanged when ``size`` is 0."""
    if not size or image.shape[0] == image.shape[1] == size:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def act_rows(
    policy: ActingPolicy,
    observations: list[Observation],
    generator: torch.Generator | list[torch.Generator],
    rows: list[int],
    greedy: bool,
) -> ActionBatch:
    """``policy.act`` on ``observations`` (those of episodes ``rows``): in one batch with one
    generator, or one observation at a time with episode ``rows[b]``'s own ``generator[rows[b]]``
    (greedy acting draws nothing: one batch)."""
    if isinstance(generator, torch.Generator) or greedy:
        gen = generator if isinstance(generator, torch.Generator) else generator[rows[0]]
        return policy.act(observations, generator=gen, greedy=greedy)
    parts = [policy.act([o], generator=generator[r], greedy=False) for o, r in zip(observations, rows)]
    return ActionBatch(
        actions=[a for p in parts for a in p.actions],
        units=torch.cat([p.units for p in parts]),
        logp=torch.cat([p.logp for p in parts]),
        mask=torch.cat([p.mask for p in parts]),
        encodings=[e for p in parts for e in p.encodings],
    )


class EnvRunner:
    """Runs K rollouts per context (seed) of one environment spec, all environments in lockstep.

    ``run`` is deterministic given the seeds and the policy's generator: every rollout of a
    context starts from ``reset(seed=context)``.
    """

    def __init__(self, spec: EnvSpec) -> None:
        self.spec = spec
        self._envs: list[Any] = []
        make_env(spec).close()  # a bad id or wrapper fails at construction

    def _pool(self, n: int) -> list[Any]:
        while len(self._envs) < n:
            self._envs.append(make_env(self.spec))
        return self._envs[:n]

    def observe(self, env: Any, obs: Any) -> Observation:
        """The (image, instruction) of a raw observation."""
        spec = self.spec
        if spec.observation == "render":
            image = env.render()
        elif isinstance(obs, dict) and "image" in obs:
            image = obs["image"]
        else:
            raise ConfigError(f"task.env: the observation of {spec.id!r} has no 'image'; use observation: render")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ConfigError(f"task.env: {spec.id!r} gave an image of shape {image.shape}, not [H, W, 3]")
        text = spec.instruction
        if isinstance(obs, dict) and spec.instruction_key in obs:
            text = str(obs[spec.instruction_key])
        return Observation(image=resize_square(image.astype(np.uint8), spec.image_size), instruction=text)

    @staticmethod
    def frame(env: Any, observation: Observation) -> np.ndarray:
        """A frame for videos: MiniGrid's full top view when it has one, else the observation image."""
        get_frame = getattr(env.unwrapped, "get_frame", None)
        if callable(get_frame):
            try:
                return np.asarray(get_frame(highlight=True, tile_size=16))
            except TypeError:
                pass
        return observation.image

    def reset_env(self, env: Any, seed: int) -> tuple[Any, dict[str, Any]]:
        """``env.reset(seed=seed)``: the raw observation and info."""
        with contextlib.redirect_stdout(io.StringIO()):  # MiniGrid prints rejected placements
            obs, info = env.reset(seed=int(seed))
        return obs, info

    def _reset(self, env: Any, seed: int) -> Any:
        return self.reset_env(env, seed)[0]

    def _max_steps(self, env: Any) -> int:
        if self.spec.max_steps:
            return self.spec.max_steps
        limit = getattr(env.spec, "max_episode_steps", None) or getattr(env.unwrapped, "max_steps", None)
        if not limit:
            raise ConfigError(f"task.env.max_steps must be set: {self.spec.id!r} has no step limit of its own")
        return int(limit)

    def _success(self, terminated: bool, reward: float, info: dict[str, Any], ep: Episode) -> bool:
        rule = self.spec.success
        if rule == "terminated_positive":
            return bool(terminated and reward > 0)
        if rule == "info_success":
            return ep.success or bool(info.get("success", False))
        return False  # return_above is decided at the end

    def run(
        self,
        policy: ActingPolicy,
        contexts: Sequence[int],
        rollouts_per_context: int,
        *,
        generator: torch.Generator | Sequence[torch.Generator],
        greedy: bool = False,
        record_frames: bool = False,
        keep_observations: bool = False,
        keep_images: bool = False,
    ) -> list[Episode]:
        """Episodes of ``rollouts_per_context`` rollouts per seed in ``contexts``, context-major
        (``[c0 r0, c0 r1, ..., c1 r0, ...]``); in waves of ``spec.max_envs`` environments when set.

        ``record_frames``: a video frame per step (:meth:`frame`); ``keep_observations``: every
        observation, the reset info and each step's info; ``keep_images``: every observation only
        (e.g. for the GIF of a logged rollout).

        ``generator``: one for the whole batch, or one per episode (context-major): then each
        episode's sampling depends on its own generator only (the policy acts on one observation
        at a time unless ``greedy``)."""
        rows = [(int(c), k) for c in contexts for k in range(rollouts_per_context)]
        if not isinstance(generator, torch.Generator) and len(generator) != len(rows):
            raise ValueError(f"{len(generator)} generators for {len(rows)} episodes")
        wave = self.spec.max_envs or len(rows)
        episodes: list[Episode] = []
        for s in range(0, len(rows), max(1, wave)):
            gens = generator if isinstance(generator, torch.Generator) else list(generator[s : s + wave])
            episodes += self._run_wave(
                policy, rows[s : s + wave], gens, greedy, record_frames, keep_observations, keep_images
            )
        if self.spec.success == "return_above":
            for ep in episodes:
                ep.success = ep.env_return >= self.spec.success_threshold
        return episodes

    def start_envs(self, seeds: Sequence[int], frames: bool) -> list[EnvStart]:
        """Reset environments ``0 .. len(seeds)-1`` of the pool (made as needed) to ``seeds``: the
        start of each (observation, reset info, a video frame when ``frames``, step limit).
        :class:`mmpo.rollout.ray_envs.RayEnvRunner` runs this in Ray actors."""
        out = []
        for seed, env in zip(seeds, self._pool(len(seeds))):
            raw, info = self.reset_env(env, seed)
            obs = self.observe(env, raw)
            out.append(EnvStart(obs, dict(info), self.frame(env, obs) if frames else None, self._max_steps(env)))
        return out

    def step_envs(self, moves: Sequence[tuple[int, Any]], frames: bool) -> list[EnvStep]:
        """``env.step(action)`` of pool environment ``i`` for each ``(i, action)``, in order."""
        out = []
        for i, action in moves:
            env = self._envs[i]
            raw, reward, terminated, truncated, info = env.step(action)
            obs = self.observe(env, raw)
            frame = self.frame(env, obs) if frames else None
            out.append(EnvStep(obs, float(reward), bool(terminated), bool(truncated), dict(info), frame))
        return out

    def _run_wave(
        self,
        policy: ActingPolicy,
        rows: list[tuple[int, int]],
        generator: torch.Generator | list[torch.Generator],
        greedy: bool,
        record_frames: bool,
        keep_observations: bool,
        keep_images: bool = False,
    ) -> list[Episode]:
        """One episode per ``(seed, rollout)`` row, all environments in lockstep: the policy acts
        on every running one at once, then :meth:`step_envs` steps them."""
        keep = keep_observations or keep_images
        n = len(rows)
        if n == 0:
            return []
        starts = self.start_envs([seed for seed, _ in rows], record_frames)
        episodes: list[Episode] = []
        current: list[Observation] = []
        for (seed, k), st in zip(rows, starts):
            ep = Episode(
                seed=seed,
                rollout=k,
                instruction=st.observation.instruction,
                reset_info=st.info if keep_observations else {},
            )
            if record_frames:
                ep.frames.append(st.frame)
            if keep:
                ep.observations.append(st.observation)
            episodes.append(ep)
            current.append(st.observation)
        limits = [st.limit for st in starts]
        noop = self.spec.noop_action
        running = list(range(n))
        while running:
            batch = act_rows(policy, [current[i] for i in running], generator, running, greedy)
            moves: list[tuple[int, Any]] = []  # (episode, env action) of the rows that step their env
            for row, i in enumerate(running):
                action = batch.actions[row]
                valid = action is not None
                rec = StepRecord(
                    batch.encodings[row], batch.units[row], batch.logp[row], batch.mask[row], valid, env_action=action
                )
                episodes[i].steps.append(rec)
                if not valid:
                    episodes[i].invalid_actions += 1
                if valid or noop is not None:
                    moves.append((i, action if valid else noop))
            results = dict(zip([i for i, _ in moves], self.step_envs(moves, record_frames)))
            still = []
            for i in running:
                ep, res = episodes[i], results.get(i)
                terminated = truncated = False
                if res is not None:
                    terminated, truncated = res.terminated, res.truncated
                    ep.env_return += res.reward
                    ep.success = self._success(terminated, res.reward, res.info, ep)
                    current[i] = res.observation
                    ep.steps[-1].reward = res.reward
                    if keep_observations:
                        ep.steps[-1].info = res.info
                if keep:
                    ep.observations.append(current[i])
                if record_frames:  # one frame per step (an un-stepped no-op repeats the last)
                    ep.frames.append(res.frame if res is not None else ep.frames[-1])
                if not (terminated or truncated or ep.length >= limits[i]):
                    still.append(i)
            running = still
        return episodes

    def close(self) -> None:
        """Close every environment; in parallel, since a browser environment takes a while to quit."""
        import concurrent.futures

        if self._envs:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(self._envs))) as pool:
                list(pool.map(lambda env: env.close(), self._envs))
        self._envs = []


__all__ = [
    "ActingPolicy",
    "ActionBatch",
    "EnvRunner",
    "act_rows",
    "EnvSpec",
    "EnvStart",
    "EnvStep",
    "Episode",
    "Observation",
    "SeedRange",
    "StepRecord",
    "check_disjoint",
    "make_env",
    "resize_square",
]
