"""BabyAI / MiniGrid demonstrations made offline by BabyAI's own bot (no download, no GPU).

Episode i runs ``BabyAIBot`` from ``reset(seed=s)`` for seeds ``s = seed_start, seed_start+1, ...``;
only successful episodes (terminated with a positive reward) are kept: a seed whose bot episode
fails is listed in ``skipped_seeds`` and the next seed is tried, up to 10 x episodes seeds. The
images are made by the training-time ``EnvRunner.observe`` of the same ``EnvSpec``, so they are
exactly what the policy sees. Layout of the folder (written in ``<out>.tmp-<pid>``, then renamed
into place):

- ``frames/ep00003_t012.png``: the observation image the bot acted on at step 12 of episode 3;
- ``demos.jsonl``: one line per step, ``{"episode", "seed", "t", "image" (relative to the folder),
  "instruction", "action" (env action id), "action_name" (MiniGrid ``Actions`` name)}``;
- ``meta.json``: ``{"env" (the EnvSpec), "episodes", "steps", "seeds", "skipped_seeds",
  "mean_length", "generator"}``.

Read it back with :func:`mmpo_tasks.vla.data.load_demos`. :func:`generate_demos` writes a folder
you name (``data_prep/babyai_demos.py``); :func:`cached_demos` builds one on first use in the
cache (``task.sft.demos: auto``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from mmpo.cache import build_once
from mmpo.checkpoint import atomic_folder, check_output_folder
from mmpo.errors import ConfigError, DataError
from mmpo.rollout.env_runner import EnvRunner, EnvSpec, make_env
from mmpo.rollout.recording import save_png

GENERATOR = "minigrid.utils.baby_ai_bot.BabyAIBot"
SEED_ATTEMPTS_PER_EPISODE = 10
#: bump when the folder layout or the bot episodes change: cached folders are then rebuilt
FORMAT = 1


@dataclasses.dataclass
class _BotEpisode:
    seed: int
    images: list[np.ndarray]
    instructions: list[str]
    actions: list[int]
    success: bool


def _run_bot(runner: EnvRunner, env: Any, seed: int) -> _BotEpisode:
    """One bot episode from ``reset(seed)``; the image of step t is the observation the bot acted on."""
    from minigrid.utils.baby_ai_bot import BabyAIBot

    obs = runner._reset(env, seed)
    bot = BabyAIBot(env.unwrapped)
    limit = runner._max_steps(env)
    ep = _BotEpisode(seed=seed, images=[], instructions=[], actions=[], success=False)
    while len(ep.actions) < limit:
        seen = runner.observe(env, obs)
        try:
            action = int(bot.replan())
        except Exception:  # the bot gives up on some layouts (e.g. unreachable goals): a failed seed
            return ep
        ep.images.append(seen.image)
        ep.instructions.append(seen.instruction)
        ep.actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            ep.success = bool(terminated and float(reward) > 0)
            break
    return ep


def generate_demos(
    spec: EnvSpec, episodes: int, seed_start: int, out: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """Write ``episodes`` successful bot episodes of ``spec`` to ``out`` (layout: module docstring);
    returns the meta dict (also written as ``out/meta.json``)."""
    if episodes < 1:
        raise ConfigError(f"--episodes must be at least 1, got {episodes}")
    if seed_start < 0:
        raise ConfigError(f"--seed-start must be >= 0, got {seed_start}")
    if spec.tile_size < 1 or spec.max_steps < 0:
        raise ConfigError(f"--tile-size must be >= 1 and --max-steps >= 0, got {spec.tile_size} and {spec.max_steps}")
    out = Path(out)
    check_output_folder(out, overwrite)

    runner = EnvRunner(spec)
    env = make_env(spec)
    kept: list[_BotEpisode] = []
    skipped: list[int] = []
    attempts = SEED_ATTEMPTS_PER_EPISODE * episodes
    try:
        for seed in range(seed_start, seed_start + attempts):
            ep = _run_bot(runner, env, seed)
            if ep.success:
                kept.append(ep)
            else:
                skipped.append(seed)
            if len(kept) == episodes:
                break
    finally:
        env.close()
    if len(kept) < episodes:
        raise DataError(
            f"{spec.id}: the bot succeeded in only {len(kept)} of {attempts} seeds "
            f"({seed_start}..{seed_start + attempts - 1}); {episodes} successful episodes were asked for "
            f"(raise --max-steps, or choose a level the bot solves)"
        )

    steps = sum(len(ep.actions) for ep in kept)
    meta: dict[str, Any] = {
        "env": dataclasses.asdict(spec),
        "episodes": len(kept),
        "steps": steps,
        "seeds": [ep.seed for ep in kept],
        "skipped_seeds": skipped,
        "mean_length": steps / len(kept),
        "generator": GENERATOR,
    }

    from minigrid.core.actions import Actions

    with atomic_folder(
        out, before_replace=lambda: check_output_folder(out, overwrite)
    ) as tmp:  # re-checked: something may have appeared meanwhile
        (tmp / "frames").mkdir()
        with open(tmp / "demos.jsonl", "w", encoding="utf-8") as f:
            for i, ep in enumerate(kept):
                for t, (image, text, action) in enumerate(zip(ep.images, ep.instructions, ep.actions)):
                    rel = f"frames/ep{i:05d}_t{t:03d}.png"
                    save_png(image, tmp / rel)
                    row = {
                        "episode": i,
                        "seed": ep.seed,
                        "t": t,
                        "image": rel,
                        "instruction": text,
                        "action": action,
                        "action_name": Actions(action).name,
                    }
                    f.write(json.dumps(row) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def cached_demos(spec: EnvSpec, episodes: int, seed_start: int = 0) -> Path:
    """The folder of ``episodes`` bot demonstrations of ``spec`` from ``seed_start`` on, built
    into the cache the first time (:func:`mmpo.cache.build_once`, one progress line)."""
    settings = {"env": dataclasses.asdict(spec), "episodes": episodes, "seed_start": seed_start, "format": FORMAT}
    return build_once(
        "babyai-demos",
        settings,
        lambda out: generate_demos(spec, episodes, seed_start, out),
        f"BabyAI demonstrations ({episodes} bot episodes of {spec.id})",
    )


__all__ = ["GENERATOR", "cached_demos", "generate_demos"]
