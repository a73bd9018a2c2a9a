"""The environment kind's evaluator (see :mod:`mmpo.evaluate`): one episode from each held-out
environment seed, during training (the live policy) and for ``mmpo eval`` (a checkpoint's policy
loaded without an optimizer or a training engine).

Each episode's sampling has its own generator, seeded by ``task.eval_seed`` and the seed's index
among the held-out seeds, so an evaluation sharded over ranks runs the episodes one process runs.
A sampled (not greedy) evaluation therefore acts on one observation at a time; a greedy one acts
on ``eval.batch_size`` environments at once.

Rows: ``id`` ``seed<S>``, ``input`` the instruction with the environment and the seed
(:meth:`EnvEvaluator.episode_input`, also the prompt of logged training rollouts), ``prediction``
the actions taken (text), ``answer`` null, scores ``success``, ``return``, ``length``,
``invalid_actions``. Pictures: a GIF ``videos/seed<S>.gif`` of each of the first
``task.eval_videos`` episodes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmpo.evaluate import resolve_model_folder
from mmpo.rollout.env_config import EnvTaskConfig
from mmpo.rollout.env_runner import EnvRunner, Episode
from mmpo.stats import wilson_interval

#: the seed of the evaluation generators, per held-out seed index: ``eval_seed * STRIDE + index``
STRIDE = 1_000_003


def action_names(policy: Any) -> dict[Any, str]:
    """``{env action: name}`` of a policy with named discrete actions (``task.policy.actions``); else empty."""
    codec = getattr(policy, "codec", None)
    names, values = getattr(codec, "names", None), getattr(codec, "env_actions", None)
    if not names or values is None:
        return {}
    return {v: n for v, n in zip(values, names) if isinstance(v, (int, str))}


def action_text(action: Any, names: dict[Any, str]) -> str:
    """One env action as text: its name, ``(x,y,...)`` for a vector, ``invalid`` for a no-op."""
    if action is None:
        return "invalid"
    if isinstance(action, (str, int, np.integer)):
        return names.get(int(action) if isinstance(action, np.integer) else action, str(action))
    values = np.asarray(action, dtype=np.float64).reshape(-1)
    return "(" + ",".join(f"{v:.3g}" for v in values) + ")"


class EnvEvaluator:
    """One episode of each seed in ``seeds`` with ``policy`` acting in ``runner``'s environments.

    ``params`` wraps acting (ZeRO-3 gathers the sharded parameters there); ``videos``: record the
    first N episodes (by index among ``seeds``); ``close_runner``: close the environments after
    predicting (a runner built for ``mmpo eval`` alone, e.g. browsers).
    """

    def __init__(
        self,
        policy: Any,
        runner: EnvRunner,
        seeds: list[int],
        tc: EnvTaskConfig,
        *,
        batch_size: int,
        videos: int = 0,
        params: Callable[[], AbstractContextManager] = nullcontext,
        close_runner: bool = False,
    ) -> None:
        self.policy, self.runner, self.seeds = policy, runner, list(seeds)
        self.greedy, self.eval_seed = tc.eval_greedy, tc.eval_seed
        self.batch_size, self.videos, self.params, self.close_runner = max(1, batch_size), videos, params, close_runner
        self.names = action_names(policy)

    @classmethod
    def from_checkpoint(cls, cfg: Any, checkpoint: str | None) -> tuple[EnvEvaluator, str]:
        """The policy of ``checkpoint`` (a run folder -> its ``model/``, or any model folder such as
        a run's ``sft/model``, or ``tiny:<kind>``; default: the config's model.path) in the task's environments, all
        ``eval.num_samples`` held-out seeds (0: every one), ``task.eval_videos`` GIFs; loaded
        without an optimizer or a training engine. Returns ``(evaluator, what was loaded)``."""
        from mmpo.engine import resolve_device
        from mmpo.models import load_model
        from mmpo.policies.vla_builder import build_vla_policy
        from mmpo.tasks import build_task_from

        task = build_task_from(cfg)
        tc: EnvTaskConfig = task.config
        if not checkpoint or checkpoint.startswith("tiny:"):
            path = checkpoint or cfg.model.path
        else:
            path = str(resolve_model_folder(checkpoint, ("config.json",)))
        model, processor, info = load_model(
            path,
            seed=cfg.seed,
            tiny_overrides=cfg.model.tiny if path.startswith("tiny:") else None,
            attn_implementation=cfg.model.attn_implementation,
        )
        runner = EnvRunner(tc.env)
        local = None if path.startswith("tiny:") else path
        policy = build_vla_policy(model, processor, info, tc, runner, local)
        policy.module.to(resolve_device(cfg.device)).eval()
        n = cfg.eval.num_samples
        seeds = task.eval_seeds[: n or None]
        evaluator = cls(
            policy, runner, seeds, tc, batch_size=cfg.eval.batch_size, videos=tc.eval_videos, close_runner=True
        )
        return evaluator, path

    @classmethod
    def episode_input(cls, runner: EnvRunner, ep: Episode) -> str:
        """What an episode was asked: its instruction, the environment id and the context seed."""
        return f"{ep.instruction} ({runner.spec.id}, seed {ep.seed})"

    # -- the Evaluator protocol ----------------------------------------------------------------
    def items(self) -> list[int]:
        return self.seeds

    def generator(self, index: int) -> torch.Generator:
        """The sampling generator of the episode of held-out seed number ``index``."""
        return torch.Generator().manual_seed((self.eval_seed * STRIDE + index) % 2**63)

    def predict(self, items: list[int], offset: int) -> list[dict[str, Any]]:
        """One episode per seed, in chunks of ``batch_size`` environments; the global RNG is left as it was."""
        rows: list[dict[str, Any]] = []
        state = torch.get_rng_state()
        try:
            with torch.no_grad(), self.params():
                for s in range(0, len(items), self.batch_size):
                    chunk = items[s : s + self.batch_size]
                    gens = [self.generator(offset + s + i) for i in range(len(chunk))]
                    record = offset + s < self.videos
                    episodes = self.runner.run(
                        self.policy, chunk, 1, generator=gens, greedy=self.greedy, record_frames=record
                    )
                    rows += [self.row(ep, offset + s + i) for i, ep in enumerate(episodes)]
        finally:
            torch.set_rng_state(state)
            if self.close_runner:
                self.runner.close()
        return rows

    def row(self, ep: Episode, index: int) -> dict[str, Any]:
        """The row of one episode (frames under ``_frames`` for the first ``videos`` episodes, not written)."""
        return {
            "id": f"seed{ep.seed}",
            "input": self.episode_input(self.runner, ep),
            "prediction": " ".join(action_text(s.env_action, self.names) for s in ep.steps),
            "answer": None,
            "success": float(ep.success),
            "return": float(ep.env_return),
            "length": float(ep.length),
            "invalid_actions": float(ep.invalid_actions),
            "_seed": ep.seed,
            "_frames": ep.frames if index < self.videos else [],
            "_captions": self.frame_captions(ep) if index < self.videos else [],
        }

    def frame_captions(self, ep: Episode) -> list[list[str]]:
        """Caption lines of each recorded frame: the instruction, then ``step t/T: <action>`` (frame
        ``t`` is the view the action was taken on) and, on the last frame, the outcome."""
        T = ep.length
        outcome = f"end: {'success' if ep.success else 'failure'}, return {ep.env_return:.3g}"
        steps = [f"step {t + 1}/{T}: {action_text(s.env_action, self.names)}" for t, s in enumerate(ep.steps)]
        return [[ep.instruction, line] for line in steps + [outcome]]

    def summarize(self, items: list[int], rows: list[dict[str, Any]]) -> dict[str, float]:
        """Success rate with its 95% Wilson interval, mean return, length and invalid-action rate."""
        n = len(rows)
        k = int(sum(r["success"] for r in rows))
        lo, hi = wilson_interval(k, n)
        steps = sum(r["length"] for r in rows)
        return {
            "success_rate": k / max(1, n),
            "success_ci_low": lo,
            "success_ci_high": hi,
            "episodes": float(n),
            "return": sum(r["return"] for r in rows) / max(1, n),
            "episode_length": steps / max(1, n),
            "invalid_action_rate": sum(r["invalid_actions"] for r in rows) / max(1.0, steps),
        }

    def write_artifacts(self, out_dir: Path, items: list[int], rows: list[dict[str, Any]]) -> dict[str, str]:
        """``videos/seed<S>.gif`` of the recorded episodes, each frame captioned with the action taken
        on it (:func:`mmpo.rollout.episode_samples.caption_frames`); ``{"video_seed<S>": path}``."""
        from mmpo.rollout.episode_samples import caption_frames
        from mmpo.rollout.recording import save_episode_video

        out = {}
        for r in rows:
            if r["_frames"]:
                frames, captions = r["_frames"], r.get("_captions") or []
                if len(captions) == len(frames):  # one view per step plus the last: caption each
                    frames = [np.asarray(f) for f in caption_frames(frames, captions, max_frames=len(frames))]
                path = save_episode_video(frames, Path(out_dir) / "videos" / f"seed{r['_seed']}.gif")
                out[f"video_seed{r['_seed']}"] = str(path)
        return out


__all__ = ["EnvEvaluator", "action_names", "action_text"]
