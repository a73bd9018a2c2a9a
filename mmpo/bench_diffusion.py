"""``mmpo bench --diffusion``: per diffusion recipe, an RL step's time over the time to sample its group.

Sampling the group (the SDE or DDIM rollout plus the VAE decode) is the floor of an RL step: every
image must be drawn. The rest is the update: for each trained denoising step a forward and a
backward (about three forwards), the reference forward when beta > 0, the optimizer step. So the
ratio is bounded below by about ``1 + 3 * trained / sampled`` (more with KL): training fewer of the
sampled steps (``task.timestep_fraction``, Flow-GRPO-Fast's and MixGRPO's idea) is what brings it
down. Each line gives the measured ratio, the goal (at most 1.5), and that bound's parts measured:
the update's seconds per trained step over the rollout's seconds per sampled step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

RECIPES = ("flow_grpo", "chunk_grpo", "find", "diffusion_demo")
GOAL = 1.5


def _sampled_and_trained(cfg: Any) -> tuple[int, int | None]:
    """(denoising steps sampled per image, steps trained per image or None when the update trains
    no denoiser step, e.g. FIND's noise distribution)."""
    from mmpo.config import from_dict
    from mmpo.tasks import get_task_class

    t = from_dict(get_task_class(cfg.task.name).Config, dict(cfg.task.options), where="task")
    sampled = int(t.sampling.num_steps)
    if cfg.task.name == "find":
        return sampled, None
    fraction = float(getattr(t, "timestep_fraction", 1.0))
    return sampled, max(1, int(sampled * fraction))


def run_diffusion_bench(
    recipes: tuple[str, ...] = RECIPES, overrides: list[str] | None = None, *, steps: int = 3, warmup: int = 1
) -> Iterator[dict[str, Any]]:
    """One JSON-able row per recipe: :func:`mmpo.bench.run_bench`'s numbers plus the ratio, the goal
    and the measured cost of a trained step relative to a sampled one."""
    from mmpo.bench import run_bench
    from mmpo.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in recipes:
        cfg = load_config(str(root / f"{name}.yaml"), list(overrides or []))
        row = run_bench(cfg, Path("."), steps=steps, warmup=warmup)
        sampled, trained = _sampled_and_trained(cfg)
        ratio = row["step_over_rollout"]
        row.update(recipe=name, sampled_steps=sampled, trained_steps=trained, goal=GOAL, goal_met=ratio <= GOAL)
        if trained:
            per_trained = row["update_s"] / trained
            per_sampled = row["rollout_s"] / sampled
            row["trained_step_over_sampled_step"] = round(per_trained / max(per_sampled, 1e-9), 2)
        yield row
