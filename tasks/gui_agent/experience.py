"""ScreenExplorer's experience stream and its distillation into the next model generation.

ScreenExplorer (arXiv 2505.19095) collects the trajectories of the RL-trained explorer, filters
them and fine-tunes the next model generation on them (its "-E1" checkpoints); the paper's code
does not hold that procedure, so the filter rule here is a design choice with options
(``task.distill``), not the paper's method.

**The stream** (``task.experience``): every env step of the rollouts is one JSON line of
``<run>/experience/steps.jsonl`` (rank r > 0: ``steps.rank<r>.jsonl``), the screenshot the policy saw
a PNG file beside it (``images/``)::

    {"train_step": int, "episode": "s<step>-r<rank>-e<i>", "seed": int, "rollout": int, "t": int,
     "instruction": str, "image": "images/<name>.png", "action": "click(0.44, 0.69)" | "noop()",
     "valid": bool, "units": [...], "unit_mask": [bool, ...], "logp": [float, ...],
     "reward": float, "components": {name: float}, "return": float, "success": bool,
     "episode_length": int}

``reward`` is the step's exploration reward (the weighted sum of ``components``, the unweighted
components), ``return`` its episode's sum of step rewards, ``units`` / ``logp`` the action units
taken and their log-probs under the sampling policy. The stream is bounded: at most
``task.experience.max_steps`` rows per rank (later steps are not recorded), every
``task.experience.every``-th training step. A resumed run first drops the rows of the steps it
replays (rows of ``train_step`` at or after the checkpoint's step), so the stream equals the
uninterrupted run's. ``pandas.read_json(path, lines=True)`` or ``datasets.load_dataset("json")``
read it.

**The distillation** (``task.distill``, :func:`distill_generation`): the stream's episodes of
``train_step >= from_step`` are filtered by ``select`` — ``top_fraction`` (the ``top_fraction`` of
episodes by return, at least one), ``success`` (episodes that solved their MiniWoB task) or
``min_return`` (return ``>= min_return``) — and their valid steps are behaviour-cloned (the
taken action units, mean negative log-likelihood, :func:`mmpo.sft.supervised_train`) into a
fresh copy of the start model (``model.path``), saved as a save_pretrained folder (+ its action
head) in ``<run>/distill/model`` with ``distill/metrics.json``. It runs after ``mmpo train``
when ``task.distill.enabled`` (``configs/screenexplorer_distill.yaml``), or on an existing run::

    python -m mmpo_tasks.gui_agent.experience configs/screenexplorer.yaml output_dir=runs/screenexplorer
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from mmpo.errors import ConfigError, DataError
from mmpo.sft import SFTConfig

EXPERIENCE_DIR = "experience"
IMAGES_DIR = "images"
DISTILL_DIR = "distill"


@dataclass
class ExperienceConfig:
    """The recorded experience stream (``<run>/experience``)."""

    enabled: bool = field(default=True, metadata={"help": "Record every rollout step to <run>/experience."})
    max_steps: int = field(
        default=20_000,
        metadata={"help": "At most this many env steps recorded per rank (bounds the disk use).", "min": 1},
    )
    every: int = field(default=1, metadata={"help": "Record the rollouts of every N-th training step.", "min": 1})


@dataclass
class DistillConfig(SFTConfig):
    """Experience-stream distillation into the next generation (a design choice, see the module docstring)."""

    enabled: bool = field(
        default=False, metadata={"help": "After training, distill the experience stream into <run>/distill/model."}
    )
    select: Literal["top_fraction", "success", "min_return"] = field(
        default="top_fraction",
        metadata={"help": "Episodes kept: the top fraction by return, the successful ones, or a return bound."},
    )
    top_fraction: float = field(
        default=0.25, metadata={"help": "select=top_fraction: the share of episodes kept.", "gt": 0.0, "max": 1.0}
    )
    min_return: float = field(default=0.0, metadata={"help": "select=min_return: keep episodes with return >= this."})
    from_step: int = field(
        default=0, metadata={"help": "Only episodes of training steps >= this (the later explorer).", "min": 0}
    )
    min_episodes: int = field(default=1, metadata={"help": "Refuse to distill when fewer episodes are kept.", "min": 1})


def check_experience_options(experience: ExperienceConfig, distill: DistillConfig) -> None:
    """Cross-option checks at config load (ConfigError naming the option and value)."""
    if distill.enabled and not experience.enabled:
        raise ConfigError(
            "task.distill.enabled=True needs the experience stream it distills: set task.experience.enabled=true"
        )


def stream_file(folder: Path, rank: int) -> Path:
    """The stream file of ``rank`` in ``folder``."""
    return folder / ("steps.jsonl" if rank == 0 else f"steps.rank{rank}.jsonl")


def _floats(x: torch.Tensor) -> list[Any]:
    return x.detach().cpu().reshape(-1).tolist()


class ExperienceWriter:
    """Appends the rollout steps of this rank to its stream file (see the module docstring)."""

    def __init__(self, folder: Path, cfg: ExperienceConfig, rank: int = 0) -> None:
        self.folder, self.cfg, self.rank = Path(folder), cfg, rank
        self.path = stream_file(self.folder, rank)
        self.rows: int | None = None  # counted at the first write, after dropping replayed steps

    def _open(self, step: int) -> None:
        """Keep the rows of training steps before ``step`` (a resumed run replays the others)."""
        kept: list[str] = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                if row["train_step"] < step:
                    kept.append(line)
                else:
                    (self.folder / row["image"]).unlink(missing_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self.rows = len(kept)

    def write(
        self,
        step: int,
        episodes: Sequence[Any],
        step_rewards: Sequence[torch.Tensor],
        components: Sequence[dict[str, torch.Tensor]],
        action_text: Any,
    ) -> int:
        """Record ``episodes`` (each with its observations) of training ``step``: their per-step
        ``step_rewards`` (``[T]`` each), unweighted ``components`` (name -> ``[T]``) and
        ``action_text(env_action) -> str``. Returns the rows written (0 beyond the bound)."""
        from PIL import Image

        if self.rows is None:
            self._open(step)
        assert self.rows is not None
        if step % self.cfg.every:
            return 0
        (self.folder / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (ep, rewards, comps) in enumerate(zip(episodes, step_rewards, components)):
            ret = float(rewards.sum())
            for t, s in enumerate(ep.steps):
                if self.rows + len(lines) >= self.cfg.max_steps:
                    break
                name = f"{IMAGES_DIR}/s{step:06d}_r{self.rank}_e{i:03d}_t{t:02d}.png"
                Image.fromarray(np.asarray(ep.observations[t].image, dtype=np.uint8)).save(self.folder / name)
                row = {
                    "train_step": step,
                    "episode": f"s{step}-r{self.rank}-e{i}",
                    "seed": int(ep.seed),
                    "rollout": int(ep.rollout),
                    "t": t,
                    "instruction": ep.instruction,
                    "image": name,
                    "action": action_text(s.env_action),
                    "valid": bool(s.valid),
                    "units": _floats(s.units),
                    "unit_mask": [bool(m) for m in _floats(s.mask)],
                    "logp": _floats(s.logp.float()),
                    "reward": float(rewards[t]),
                    "components": {k: float(v[t]) for k, v in comps.items()},
                    "return": ret,
                    "success": bool(ep.success),
                    "episode_length": ep.length,
                }
                lines.append(json.dumps(row))
        if lines:
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
        self.rows += len(lines)
        return len(lines)


# -- reading and selecting ------------------------------------------------------------------------
@dataclass
class StreamEpisode:
    """One recorded episode: its rows (sorted by ``t``) and their shared fields."""

    id: str
    train_step: int
    ret: float
    success: bool
    rows: list[dict[str, Any]]


def read_experience(folder: str | Path) -> list[StreamEpisode]:
    """Every episode of the stream in ``folder`` (all ranks' files), in file order; DataError
    when there is no stream. An episode cut by the bound keeps the rows recorded."""
    folder = Path(folder)
    files = sorted(folder.glob("steps*.jsonl"))
    if not files:
        raise DataError(f"{folder}: no experience stream (steps.jsonl); train with task.experience.enabled=true")
    episodes: dict[str, StreamEpisode] = {}
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
                ep = episodes.setdefault(
                    row["episode"],
                    StreamEpisode(
                        row["episode"], int(row["train_step"]), float(row["return"]), bool(row["success"]), []
                    ),
                )
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}: line {n}: not an experience row ({e})") from None
            ep.rows.append(row)
    for ep in episodes.values():
        ep.rows.sort(key=lambda r: r["t"])
    return list(episodes.values())


def select_episodes(episodes: list[StreamEpisode], cfg: DistillConfig) -> list[StreamEpisode]:
    """The episodes ``cfg.select`` keeps among those of ``train_step >= cfg.from_step`` (order kept).
    ``top_fraction``: the ``ceil(top_fraction * n)`` highest returns (ties: earlier episodes first)."""
    pool = [e for e in episodes if e.train_step >= cfg.from_step]
    if cfg.select == "success":
        return [e for e in pool if e.success]
    if cfg.select == "min_return":
        return [e for e in pool if e.ret >= cfg.min_return]
    k = math.ceil(cfg.top_fraction * len(pool))
    best = sorted(range(len(pool)), key=lambda i: (-pool[i].ret, i))[:k]
    return [pool[i] for i in sorted(best)]


# -- distillation -----------------------------------------------------------------------------------
def distill_examples(policy: Any, folder: Path, episodes: list[StreamEpisode]) -> list[Any]:
    """``(encoding, units [U], mask [U])`` of every valid step of ``episodes`` (a no-op cannot be imitated)."""
    from PIL import Image

    from mmpo.rollout.env_runner import Observation

    out = []
    for ep in episodes:
        for row in ep.rows:
            if not row["valid"]:
                continue
            with Image.open(folder / row["image"]) as im:
                image = np.asarray(im.convert("RGB"))
            units = torch.tensor(row["units"])
            mask = torch.tensor(row["unit_mask"], dtype=torch.bool)
            out.append((policy.encode(Observation(image, row["instruction"])), units, mask))
    return out


def load_start_policy(cfg: Any, tc: Any, path: str | None = None) -> tuple[Any, Any]:
    """``(policy, runner)``: the policy of ``path`` (default ``model.path``, the start model) as
    the environment trainer builds it (action tokens or head); close the runner when done."""
    from mmpo.models import load_model
    from mmpo.policies.vla_builder import build_vla_policy
    from mmpo.rollout.env_runner import EnvRunner

    path = path or cfg.model.path
    model, processor, info = load_model(
        path,
        seed=cfg.seed,
        tiny_overrides=cfg.model.tiny if path == cfg.model.path else None,
        attn_implementation=cfg.model.attn_implementation,
    )
    runner = EnvRunner(tc.env)
    local = None if path.startswith("tiny:") else path
    return build_vla_policy(model, processor, info, tc, runner, local), runner


def mean_logp(policy: Any, examples: Sequence[Any], batch_size: int = 16) -> float:
    """Mean log-prob per valid unit of the examples' units under ``policy`` (no grad)."""
    total, count = 0.0, 0.0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            b = examples[s : s + batch_size]
            units, mask = torch.stack([e[1] for e in b]), torch.stack([e[2] for e in b])
            logp = policy.log_probs([e[0] for e in b], units, mask, model=policy.module).float().cpu()
            total += float((logp * mask).sum())
            count += float(mask.sum())
    return total / max(count, 1.0)


def distill_generation(cfg: Any, run_dir: str | Path | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Filter the experience stream of ``run_dir`` (default ``cfg.output_dir``) by ``task.distill``
    and behaviour-clone it into a fresh copy of the start model; writes ``<run>/distill/model`` (a
    save_pretrained folder + action head, atomically) and ``<run>/distill/metrics.json``; returns
    the metrics (episode and step counts, the SFT losses, the kept units' mean log-prob before and after)."""
    from mmpo.checkpoint import atomic_folder, save_json
    from mmpo.core import aggregate
    from mmpo.sft import supervised_train
    from mmpo.trainers.loop import seed_everything
    from mmpo_tasks.gui_agent.screenexplorer_trainer import ScreenExplorerTrainer

    task, _ = ScreenExplorerTrainer.prepare(cfg)
    tc, dc = task.config, task.config.distill
    run = Path(run_dir or cfg.output_dir)
    folder = run / EXPERIENCE_DIR
    episodes = read_experience(folder)
    kept = select_episodes(episodes, dc)
    if len(kept) < dc.min_episodes:
        raise ConfigError(
            f"task.distill.select={dc.select!r} kept {len(kept)} of {len(episodes)} episodes, fewer than "
            f"task.distill.min_episodes={dc.min_episodes} (loosen the rule or lower min_episodes)"
        )
    t0 = time.perf_counter()
    seed_everything(cfg.seed)  # the fresh action head is drawn as the trainer draws it
    policy, runner = load_start_policy(cfg, tc)
    try:
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
        policy.module.to(device)
        examples = distill_examples(policy, folder, kept)

        def nll(batch: list[Any]) -> torch.Tensor:
            units, mask = torch.stack([b[1] for b in batch]), torch.stack([b[2] for b in batch])
            logp = policy.log_probs([b[0] for b in batch], units, mask, model=policy.module)
            return aggregate(-logp, mask.to(logp.device), "token-mean")

        before = mean_logp(policy, examples)
        result = supervised_train(
            policy.module, examples, nll, dc, seed=cfg.seed, desc="distill (experience)", progress=progress
        )
        after = mean_logp(policy, examples)
        with atomic_folder(run / DISTILL_DIR / "model") as tmp:
            policy.save(tmp)
    finally:
        runner.close()
    result.update(
        select=dc.select,
        episodes=len(episodes),
        kept_episodes=len(kept),
        kept_steps=len(examples),
        kept_return_mean=float(np.mean([e.ret for e in kept])),
        logp_before=before,
        logp_after=after,
        distill_s=time.perf_counter() - t0,
    )
    save_json(run / DISTILL_DIR / "metrics.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmpo_tasks.gui_agent.experience CONFIG [key=value ...]``: distill the run in
    ``output_dir`` (its ``experience/`` stream) into ``output_dir/distill/model``."""
    from mmpo.config import load_config

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(main.__doc__, file=sys.stderr)
        return 2
    cfg = load_config(args[0], args[1:])
    out = distill_generation(cfg)
    print(json.dumps({k: v for k, v in out.items() if k != "history"}, indent=1))
    return 0


__all__ = [
    "DISTILL_DIR",
    "EXPERIENCE_DIR",
    "DistillConfig",
    "ExperienceConfig",
    "ExperienceWriter",
    "StreamEpisode",
    "check_experience_options",
    "distill_generation",
    "distill_examples",
    "load_start_policy",
    "main",
    "mean_logp",
    "read_experience",
    "select_episodes",
]


if __name__ == "__main__":
    sys.exit(main())
