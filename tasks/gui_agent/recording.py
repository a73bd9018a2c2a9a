"""GUI episodes recorded offline from the scripted MiniWoB++ solver (live headless Chromium, no download).

For each task (one browser, reused across its seeds) and each seed, ``MiniWobEnv.reset(seed)`` and
:class:`mmpo_tasks.gui_agent.solver.ScriptedSolver` act until the episode ends or ``max_steps``
steps. Layout of the folder (written in ``<out>.tmp-<pid>``, then renamed into place):

- ``screenshots/<task>/s00007_t01.png``: the screenshot seen *before* step 1 of seed 7;
- ``episodes.jsonl``: the GUI episode layout of ``mmpo_tasks.gui_agent.episodes`` (read it back
  with ``load_episodes(DIR / "episodes.jsonl")``): id ``<task>-s<seed>``, the instruction, steps
  ``{"screenshot", "action" (click(x, y) normalised / type("...")), "target_box" (the normalised
  box of the element clicked or typed into), "screen_size"}``, and meta ``{"task", "seed",
  "reward" (``MiniWobEnv``'s last step reward), "raw_reward"? (MiniWoB's undiscounted one),
  "success" (the episode ended with reward > 0), "steps", "env_error"?}``;
- ``meta.json``: ``{"tasks", "seeds", "only_success", "max_steps", "episodes", "steps",
  "per_task": {task: {"runs", "successes", "success_rate", "mean_steps", "first_episode_s" (with the
  browser start), "seconds_per_episode" (the others), "browser_restarts"}},
  "dropped": [{"task", "seed", "reason"}], "generator"}``.

An episode without a step (the solver found no target on the first screen, or the browser failed
at reset) cannot be stored and is listed in ``dropped``, as are failed episodes with
``only_success``. :func:`record_episodes` writes a folder you name
(``data_prep/miniwob_episodes.py``); :func:`cached_episodes` builds one on first use in the cache
(the hiconagent task with an empty ``task.data``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from mmpo.cache import build_once
from mmpo.checkpoint import atomic_folder, check_output_folder
from mmpo.errors import ConfigError, DataError
from mmpo.rollout.recording import save_png
from mmpo_tasks.gui_agent.episodes import GuiEpisode, GuiStep, save_episodes
from mmpo_tasks.gui_agent.miniwob_env import MiniWobEnv
from mmpo_tasks.gui_agent.solver import SOLVABLE_TASKS, ScriptedSolver, check_task

GENERATOR = "mmpo_tasks.gui_agent.solver.ScriptedSolver"
EPISODES_FILE = "episodes.jsonl"
#: bump when the folder layout or the solver's episodes change: cached folders are then rebuilt
FORMAT = 1


def parse_seeds(specs: Sequence[str]) -> list[int]:
    """Seeds from specs ``A:B`` (A..B-1) or ``N``, in order, repeats dropped."""
    seeds: list[int] = []
    for spec in specs:
        try:
            if ":" in spec:
                a, b = spec.split(":")
                part = list(range(int(a), int(b)))
                if not part:
                    raise ValueError
            else:
                part = [int(spec)]
        except ValueError:
            raise ConfigError(f"--seeds {spec!r}: want A:B (seeds A..B-1, A < B) or one integer N") from None
        if any(s < 0 for s in part):
            raise ConfigError(f"--seeds {spec!r}: seeds must be >= 0")
        seeds += part
    if not seeds:
        raise ConfigError("--seeds: no seed given")
    return list(dict.fromkeys(seeds))


def _run_episode(
    env: MiniWobEnv, solver: ScriptedSolver, task: str, seed: int, folder: Path, max_steps: int
) -> tuple[GuiEpisode | None, str]:
    """One solver episode; screenshots are written under ``folder`` as the episode runs. Returns
    the episode (None when it has no step) and, for a dropped one, why."""
    try:
        obs = env.reset(seed=seed)
    except Exception as e:  # the browser failed twice in a row
        return None, f"browser failed at reset: {type(e).__name__}: {str(e)[:200]}"
    solver.reset()
    instruction = obs.instruction
    steps: list[GuiStep] = []
    reward, done, info = 0.0, False, {}
    shots = folder / "screenshots" / task
    shots.mkdir(parents=True, exist_ok=True)
    while not done and len(steps) < max_steps:
        step = solver.act(obs)
        if step is None:
            break
        path = shots / f"s{seed:05d}_t{len(steps):02d}.png"
        save_png(obs.screenshot, path)
        steps.append(
            GuiStep(screenshot=str(path), action=step.action, target_box=step.target_box, screen_size=obs.screen_size)
        )
        next_obs, reward, done, info = env.step(step.action, obs.screen_size)
        if next_obs is None:  # the browser failed: the episode ended, failed
            break
        obs = next_obs
    if not steps:
        return None, "the solver found no target on the first screen"
    meta: dict[str, Any] = {
        "task": task,
        "seed": seed,
        "reward": float(reward),
        "success": bool(done and reward > 0),
        "steps": len(steps),
    }
    if "raw_reward" in info:
        meta["raw_reward"] = float(info["raw_reward"])
    if "env_error" in info:
        meta["env_error"] = info["env_error"]
    return GuiEpisode(id=f"{task}-s{seed}", instruction=instruction, steps=steps, meta=meta), ""


def record_episodes(
    tasks: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    *,
    only_success: bool = False,
    max_steps: int = 16,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the solver on every (task, seed) and write ``out`` (layout: module docstring); returns
    the meta dict (also written as ``out/meta.json``)."""
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ConfigError(f"--tasks: no task given; solvable tasks: {', '.join(SOLVABLE_TASKS)}")
    for task in tasks:
        check_task(task)  # before any browser starts
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"seeds must be a non-empty list of integers >= 0, got {seeds[:10]}")
    if max_steps < 1:
        raise ConfigError(f"--max-steps must be at least 1, got {max_steps}")
    out = Path(out)
    check_output_folder(out, overwrite)

    from tqdm import tqdm

    kept: list[GuiEpisode] = []
    dropped: list[dict[str, Any]] = []
    per_task: dict[str, dict[str, Any]] = {}
    with atomic_folder(
        out, before_replace=lambda: check_output_folder(out, overwrite)
    ) as tmp:  # re-checked: something may have appeared meanwhile
        bar = tqdm(total=len(tasks) * len(seeds), unit="ep", disable=not progress, desc="miniwob")
        try:
            for task in tasks:
                env, solver = MiniWobEnv(task), ScriptedSolver(task)
                runs = successes = n_steps = 0
                seconds: list[float] = []
                try:
                    for seed in seeds:
                        t0 = time.perf_counter()
                        ep, why = _run_episode(env, solver, task, seed, tmp, max_steps)
                        seconds.append(time.perf_counter() - t0)
                        runs += 1
                        successes += bool(ep is not None and ep.meta["success"])
                        bar.update(1)
                        bar.set_postfix(task=task, success=f"{successes}/{runs}")
                        if ep is None:
                            dropped.append({"task": task, "seed": seed, "reason": why})
                            continue
                        n_steps += len(ep.steps)
                        if only_success and not ep.meta["success"]:
                            dropped.append(
                                {"task": task, "seed": seed, "reason": f"failed (reward {ep.meta['reward']:.3f})"}
                            )
                            for s in ep.steps:
                                Path(s.screenshot).unlink(missing_ok=True)
                            continue
                        kept.append(ep)
                finally:
                    env.close()
                per_task[task] = {
                    "runs": runs,
                    "successes": successes,
                    "success_rate": successes / max(runs, 1),
                    "mean_steps": n_steps / max(runs, 1),
                    # the first episode also starts the browser (about 2 s)
                    "first_episode_s": seconds[0] if seconds else 0.0,
                    "seconds_per_episode": sum(seconds[1:]) / (len(seconds) - 1) if len(seconds) > 1 else sum(seconds),
                    "browser_restarts": env.restarts,
                }
        finally:
            bar.close()
        if not kept:
            first = (
                f"; first: {dropped[0]['task']} seed {dropped[0]['seed']}: {dropped[0]['reason']}" if dropped else ""
            )
            browser = any(d["reason"].startswith("browser failed") for d in dropped)
            hint = " (MiniWoB++ runs in Chromium: `make install` installs chromium, chromium-driver)" if browser else ""
            raise DataError(f"no episode to write: all {len(tasks) * len(seeds)} were dropped{first}{hint}")
        save_episodes(kept, tmp / EPISODES_FILE)
        meta: dict[str, Any] = {
            "tasks": tasks,
            "seeds": seeds,
            "only_success": only_success,
            "max_steps": max_steps,
            "episodes": len(kept),
            "steps": sum(len(ep.steps) for ep in kept),
            "per_task": per_task,
            "dropped": dropped,
            "generator": GENERATOR,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def cached_episodes(
    tasks: Sequence[str], seeds: Sequence[int], *, only_success: bool = True, max_steps: int = 16
) -> Path:
    """The ``episodes.jsonl`` of the solver's episodes of ``tasks`` x ``seeds``, recorded into the
    cache the first time (:func:`mmpo.cache.build_once`: one progress line, then the recording's
    own bar)."""
    tasks, seeds = list(dict.fromkeys(tasks)), list(dict.fromkeys(int(s) for s in seeds))
    settings = {
        "tasks": tasks,
        "seeds": seeds,
        "only_success": only_success,
        "max_steps": max_steps,
        "format": FORMAT,
    }
    what = f"MiniWoB++ episodes ({len(tasks)} task(s) x {len(seeds)} seed(s) of the scripted solver, headless Chromium)"
    folder = build_once(
        "miniwob-episodes",
        settings,
        lambda out: record_episodes(tasks, seeds, out, only_success=only_success, max_steps=max_steps),
        what,
    )
    return folder / EPISODES_FILE


__all__ = ["EPISODES_FILE", "GENERATOR", "cached_episodes", "parse_seeds", "record_episodes"]
