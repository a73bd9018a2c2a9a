"""The environment trainer: a VLM policy acting in gymnasium environments (RIPT-VLA, MiniWoB
GRPO, ScreenExplorer). (SFT on demonstrations) -> rounds of K rollouts per context -> advantages
-> PPO epochs on the action units, through the one update routine.

One step:
1. draw contexts (env seeds) from the training set; skip the ones solved in their latest K
   rollouts (``ript_skip``); run K rollouts of each in lockstep (``EnvRunner``);
2. discard contexts whose K rewards are all equal (dynamic sampling) and draw more, until
   ``rollout.prompts_per_step`` contexts are kept (or ``early_stop_fraction`` of them, or the
   draw budget is spent) (:func:`mmpo.rollout.context_rounds.collect_round`);
3. advantage of each episode = ``algorithm.advantage`` over its context's K episodes (stateful
   estimators keep their state across steps and in checkpoints), shared by every step of the episode;
4. ``trainer.update_epochs`` passes of ``algorithm.loss`` through
   :meth:`~mmpo.trainers.loop.TrainerBase.update_policy`: a row is an episode; minibatches and
   micro batches count episodes; a micro batch flattens to its env steps, one loss row each.
   A step that kept no context makes no update (``optimizer_steps: 0``).

A plugin's trainer subclasses :class:`EnvironmentTrainer` in its own folder and overrides its
public hooks: :meth:`sft_examples` (its demonstrations), :meth:`episode_reward`,
:meth:`run_episodes`, :meth:`step_advantages` (per-step rewards), :meth:`trains_policy`,
:meth:`build_extra_state` with :meth:`save_extra` / :meth:`load_extra` (state beside the engine's).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from mmpo.checkpoint import atomic_folder, latest_checkpoint, save_json
from mmpo.config import RunConfig
from mmpo.core import aggregate
from mmpo.core.sampling import RiptSkipState
from mmpo.errors import ConfigError
from mmpo.models import load_model
from mmpo.policies.vla_builder import build_vla_policy
from mmpo.rollout.context_rounds import collect_round
from mmpo.rollout.env_config import EnvTaskConfig
from mmpo.rollout.env_runner import EnvRunner, Episode
from mmpo.sft import supervised_train
from mmpo.stats import wilson_interval
from mmpo.trainers.kinds import ENVIRONMENT
from mmpo.trainers.loop import TrainerBase, seeded_generator
from mmpo.trainers.update import RowSizes, UnitTerms, update_shape

SFT_DIR = "sft"
#: one demonstration step for the supervised stage: ``(encoding, units [U], mask [U])``
DemoExample = tuple[Any, torch.Tensor, torch.Tensor]


class EnvironmentTask(Protocol):
    """What :class:`EnvironmentTrainer` needs of its task (:class:`mmpo.rollout.env_task.EnvSeedTask` is one)."""

    name: str
    #: env, policy, ript, sft, eval_greedy, eval_seed, eval_videos (the shape of :class:`EnvTaskConfig`)
    config: EnvTaskConfig
    #: training contexts (env seeds); the sampler draws indices into this list
    train_seeds: list[int]
    #: held-out contexts, disjoint from ``train_seeds``
    eval_seeds: list[int]

    def num_train(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EnvironmentTrainer(TrainerBase):
    """See the module docstring. One process (the environments live in it)."""

    kind = ENVIRONMENT
    task: EnvironmentTask  # type: ignore[assignment]

    def __init__(self, cfg: RunConfig, run_dir: str | Path) -> None:
        device, precision = self._setup(cfg, run_dir)
        name = cfg.task.name
        if cfg.deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                f"{name} runs in one process (its environments and dynamic sampling are per process); "
                "drop `deepspeed` / torchrun"
            )
        if cfg.model.lora is not None:
            raise ConfigError(
                f"{name} trains the full VLM (new action-token rows need full embeddings); remove model.lora"
            )
        self.tc: EnvTaskConfig = self.task.config
        self.runner = EnvRunner(self.tc.env)
        # -- model: the SFT result when a previous launch of this run finished that stage ------
        sft_model = self.run_dir / SFT_DIR / "model"
        do_sft = bool(self.tc.sft.demos) and not (sft_model / "config.json").is_file()
        path = str(sft_model) if self.tc.sft.demos and not do_sft else cfg.model.path
        model, processor, info = load_model(
            path, seed=cfg.seed, tiny_overrides=None if path != cfg.model.path else cfg.model.tiny,
            attn_implementation=cfg.model.attn_implementation,
        )
        if cfg.model.freeze_vision:
            from mmpo.lora import freeze_vision_tower

            freeze_vision_tower(model, is_vlm=info.is_vlm)
        local = path if not path.startswith("tiny:") else None
        self.policy = build_vla_policy(model, processor, info, self.tc, self.runner, local)
        self.policy_module = self.policy.module
        self.policy_module.to(device)
        self.sft_metrics: dict[str, Any] = {}
        if do_sft and latest_checkpoint(self.run_dir) is None:
            self.sft_metrics = self._sft_stage(sft_model)
        self.shape = update_shape(cfg, self.rows_per_step())
        self.engine = self.build_engine(self.policy_module, precision)
        self.device = self.engine.device
        self._make_sampler()
        self.states: dict[str, Any] = dict(self.algo.states)
        if self.tc.ript.skip_solved:
            self.states["ript_skip"] = RiptSkipState()
        self.build_extra_state()
        self._start()

    # -- hooks ----------------------------------------------------------------------------------
    def build_extra_state(self) -> None:
        """Build what a plugin keeps beside the policy (e.g. a world model); runs once, before the
        newest checkpoint is loaded, so :meth:`load_extra` finds it."""

    def sft_examples(self) -> tuple[list[DemoExample], dict[str, Any]]:
        """The demonstration steps of ``task.sft.demos`` (``(encoding, units [U], mask [U])`` each)
        and counts to report (``demo_episodes``, ``demo_steps``, ...). A plugin that reads
        demonstrations overrides this."""
        raise ConfigError(
            f"task.sft.demos={self.tc.sft.demos!r}: the {self.cfg.task.name} trainer reads no demonstrations"
        )

    def episode_reward(self, ep: Episode) -> float:
        """The reward of a whole episode: binary success (``task.ript.reward: success``) or the env's return."""
        return float(ep.success) if self.tc.ript.reward == "success" else ep.env_return

    def run_episodes(self, seeds: list[int], generator: torch.Generator) -> list[Episode]:
        """K (``rollout.group_size``) rollouts of each context seed, context-major."""
        return self.runner.run(self.policy, seeds, self.cfg.rollout.group_size, generator=generator)

    def step_advantages(self, kept: list[list[Episode]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards ``[C*K]`` and the advantage of every env step ``[S]`` (episode-major): each step
        carries its episode's advantage (:meth:`episode_advantages`). A plugin with per-step
        rewards overrides this."""
        rewards, adv = self.episode_advantages(kept)
        episodes = [e for g in kept for e in g]
        return rewards, torch.cat([torch.full((ep.length,), float(a)) for ep, a in zip(episodes, adv.tolist())])

    def trains_policy(self, step: int) -> bool:
        """Whether ``step`` updates the policy (False: roll out and compute advantages only)."""
        return True

    # -- supervised stage ---------------------------------------------------------------------
    def demo_nll(self, batch: list[DemoExample]) -> torch.Tensor:
        """Mean negative log-likelihood of the demonstrated action units (``units [B, U]``)."""
        units = torch.stack([b[1] for b in batch])
        mask = torch.stack([b[2] for b in batch])
        logp = self.policy.log_probs([b[0] for b in batch], units, mask, model=self.policy_module)
        return aggregate(-logp, mask.to(logp.device), "token-mean")

    def _sft_stage(self, out_dir: Path) -> dict[str, Any]:
        """Behaviour cloning on the demonstrations; the result is saved to ``sft/model`` (atomically)."""
        examples, info = self.sft_examples()
        t0 = time.perf_counter()
        result = supervised_train(
            self.policy_module, examples, self.demo_nll, self.tc.sft, seed=self.cfg.seed, desc="sft (demonstrations)"
        )
        result.update(info, sft_s=time.perf_counter() - t0)
        with atomic_folder(out_dir) as tmp:
            self.policy.save(tmp)
        save_json(out_dir.parent / "metrics.json", result)
        return result

    # -- rollouts ------------------------------------------------------------------------------
    def collect(self, step: int) -> tuple[list[list[Episode]], dict[str, float]]:
        """Kept contexts, each a list of K episodes, and rollout statistics (``collect_round``)."""
        r, rc = self.cfg.rollout, self.tc.ript
        gen = seeded_generator(self.cfg.seed * 1_000_003 + step)
        res = collect_round(
            lambda n: [self.task.train_seeds[i] for i in self.sampler.next(n)],
            lambda seeds: self.run_episodes(seeds, gen),
            self.episode_reward,
            lambda e: e.success,
            target=r.prompts_per_step, group_size=r.group_size, max_draws=rc.max_draws,
            early_stop_fraction=rc.early_stop_fraction, dynamic_sampling=rc.dynamic_sampling,
            skip_state=self.states.get("ript_skip"), skip_threshold=rc.skip_threshold,
        )
        eps = res.episodes
        n = max(1, len(eps))
        steps = sum(e.length for e in eps)
        stats = {
            "rollout/contexts_drawn": float(res.drawn),
            "rollout/contexts_run": float(res.run),
            "rollout/contexts_kept": float(len(res.kept)),
            "rollout/skipped_solved": float(res.skipped_solved),
            "rollout/discarded_all_equal": float(res.discarded_all_equal),
            "rollout/success_rate": sum(e.success for e in eps) / n,
            "rollout/return": sum(e.env_return for e in eps) / n,
            "rollout/episode_length": steps / n,
            "rollout/invalid_action_rate": sum(e.invalid_actions for e in eps) / max(1, steps),
        }
        return res.kept, stats

    # -- update --------------------------------------------------------------------------------
    def episode_advantages(self, kept: list[list[Episode]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-episode rewards ``[C*K]`` and advantages ``[C*K]`` (context-major): the built
        objective's advantage over each context's K episodes, its prompt key the env seed."""
        episodes = [e for g in kept for e in g]
        rewards = torch.tensor([self.episode_reward(e) for e in episodes], dtype=torch.float32)
        group_ids = torch.arange(len(kept)).repeat_interleave(torch.tensor([len(g) for g in kept]))
        return rewards, self.algo.advantages(rewards, group_ids, prompt_keys=[str(e.seed) for e in episodes])

    def update(self, kept: list[list[Episode]], step_adv: torch.Tensor, step: int) -> dict[str, float]:
        """PPO epochs over the kept episodes (rows) through the one update routine; a micro batch
        of episodes flattens to its env steps: ``UnitTerms(logp [S, U], logp_old [S, U],
        advantages [S], mask [S, U])`` with ``step_adv [S]`` (episode-major) the steps' advantages."""
        episodes = [e for g in kept for e in g]
        lengths = torch.tensor([e.length for e in episodes])
        first = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).tolist()
        records = [s for ep in episodes for s in ep.steps]
        units = torch.stack([s.units for s in records])
        mask = torch.stack([s.mask for s in records])
        logp_old = torch.stack([s.logp for s in records]).float()
        advantages = step_adv.float()
        if len(advantages) != len(records):
            raise RuntimeError(f"step_advantages gave {len(advantages)} advantages for {len(records)} env steps")
        episode_of = torch.arange(len(episodes)).repeat_interleave(lengths)
        valid_units = mask.float().sum(1)
        sizes = RowSizes(
            rows=lengths.float(),
            nonempty=torch.zeros(len(episodes)).index_add_(0, episode_of, (valid_units > 0).float()),
            units=torch.zeros(len(episodes)).index_add_(0, episode_of, valid_units),
        )

        def terms(idx: torch.Tensor, padding: bool) -> list[UnitTerms]:
            rows = [r for e in idx.tolist() for r in range(first[e], first[e + 1])]
            msk = mask[rows].to(self.device)
            with self.engine.autocast():
                logp = self.policy.log_probs(
                    [records[r].encoding for r in rows], units[rows], mask[rows], model=self.engine.forward_module()
                )
            return [UnitTerms(logp.float(), logp_old[rows].to(self.device), advantages[rows].to(self.device), msk)]

        out = self.update_policy(self.shape, torch.arange(len(episodes)), sizes, terms, self.beta(step), step)
        out["train_units"] = float(mask.sum())
        return out

    def train_step(self, step: int) -> dict[str, float]:
        """One rollout round, its advantages and (when a context was kept and :meth:`trains_policy`)
        the policy update; ``optimizer_steps`` is 0 for a step without update."""
        t0 = time.perf_counter()
        with self.phase_hook("rollout"):
            kept, metrics = self.collect(step)
        t1 = time.perf_counter()
        metrics["rollout_s"] = t1 - t0
        metrics["reward_s"] = 0.0  # rewards come from the environment during the rollout
        metrics["optimizer_steps"] = 0.0  # no context carried signal, or a step without policy update
        if kept:
            rewards, step_adv = self.step_advantages(kept)
            metrics["reward"] = float(rewards.mean())
            metrics["advantage_abs"] = float(step_adv.abs().mean())
            if self.trains_policy(step):
                with self.phase_hook("update"):
                    metrics.update(self.update(kept, step_adv, step))
        metrics["update_s"] = time.perf_counter() - t1
        metrics["step_time_s"] = time.perf_counter() - t0
        metrics["lr"] = self.engine.lr()
        return metrics

    # -- evaluation ----------------------------------------------------------------------------
    def eval_episodes(self, n: int, record: int = 0) -> list[Episode]:
        """One episode from each of the first ``n`` held-out seeds (fixed sampling seed; global RNG untouched)."""
        seeds = self.task.eval_seeds[: n or None]
        gen = seeded_generator(self.tc.eval_seed)
        out: list[Episode] = []
        bs = self.cfg.eval.batch_size
        with torch.no_grad():
            for s in range(0, len(seeds), bs):
                out.extend(self.runner.run(
                    self.policy, seeds[s : s + bs], 1, generator=gen, greedy=self.tc.eval_greedy,
                    record_frames=s < record,
                ))
        return out

    @staticmethod
    def summarize(episodes: list[Episode]) -> dict[str, float]:
        """Success rate with its 95% Wilson interval, mean return, length and invalid-action rate."""
        n = len(episodes)
        k = sum(e.success for e in episodes)
        lo, hi = wilson_interval(k, n)
        steps = sum(e.length for e in episodes)
        return {
            "success_rate": k / max(1, n), "success_ci_low": lo, "success_ci_high": hi, "episodes": float(n),
            "return": sum(e.env_return for e in episodes) / max(1, n), "episode_length": steps / max(1, n),
            "invalid_action_rate": sum(e.invalid_actions for e in episodes) / max(1, steps),
        }

    def evaluate(self) -> dict[str, float]:
        if self.cfg.eval.num_samples == 0:
            return {}
        metrics = {f"eval/{k}": v for k, v in self.summarize(self.eval_episodes(self.cfg.eval.num_samples)).items()}
        if self.step == 0 and self.sft_metrics:
            metrics.update({f"sft/{k}": float(v) for k, v in self.sft_metrics.items() if isinstance(v, (int, float))})
        return metrics

    @classmethod
    def evaluate_checkpoint(cls, cfg: RunConfig, checkpoint: str | None, run_dir: Path) -> dict[str, Any]:
        """``mmpo eval``: success rate over the held-out seeds with a 95% Wilson interval, from the
        trained model of ``checkpoint`` (a run folder -> its ``model/``, or any model folder such as
        a run's ``sft/model``; default: the config's model.path). Writes ``<run_dir>/eval/``:
        ``metrics.json``, ``episodes.jsonl`` and ``videos/seed<S>.gif`` for ``task.eval_videos`` episodes."""
        from mmpo.rollout.recording import save_episode_video

        if checkpoint:
            path = Path(checkpoint)
            model_dir = path / "model" if (path / "model" / "config.json").is_file() else path
            if not (model_dir / "config.json").is_file():
                raise ConfigError(f"checkpoint='{checkpoint}' is neither a run folder (with model/) nor a model folder")
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(model_dir), tiny={}))
        options = dict(cfg.task.options)
        options["sft"] = {**dict(options.get("sft", {}) or {}), "demos": ""}
        cfg = dataclasses.replace(
            cfg, task=dataclasses.replace(cfg.task, options=options),
            trainer=dataclasses.replace(cfg.trainer, max_steps=1),
        )
        with tempfile.TemporaryDirectory(prefix="mmpo-eval-") as tmp:
            trainer = type(cls.__name__, (cls,), {"track": False})(cfg, Path(tmp))
            videos = trainer.tc.eval_videos
            episodes = trainer.eval_episodes(cfg.eval.num_samples, record=videos)
            trainer.runner.close()
        out_dir = Path(run_dir) / "eval"
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = []
        for ep in episodes[:videos]:
            if ep.frames:
                saved.append(str(save_episode_video(ep.frames, out_dir / "videos" / f"seed{ep.seed}.gif")))
        rows = [
            {"seed": e.seed, "instruction": e.instruction, "success": bool(e.success), "return": e.env_return,
             "length": e.length, "invalid_actions": e.invalid_actions}
            for e in episodes
        ]
        tmp_path = out_dir / "episodes.jsonl.tmp"
        tmp_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp_path.replace(out_dir / "episodes.jsonl")
        metrics = cls.summarize(episodes)
        seeds = [e.seed for e in episodes]
        save_json(out_dir / "metrics.json", {"checkpoint": cfg.model.path, "eval_seeds": seeds, **metrics})
        return {"metrics": metrics, "predictions": str(out_dir / "episodes.jsonl"), "videos": saved}

    # -- saving --------------------------------------------------------------------------------
    def save_final_model(self) -> None:
        """``model/``: the VLM as a save_pretrained folder (+ processor with the action tokens;
        + ``action_head.safetensors`` for a Laplace head)."""
        self.engine.save_pretrained(
            self.run_dir / "model", save_fn=lambda module, folder, state: self.policy.save(folder, state)
        )

    def close(self) -> None:
        self.runner.close()


__all__ = ["SFT_DIR", "DemoExample", "EnvironmentTask", "EnvironmentTrainer"]
