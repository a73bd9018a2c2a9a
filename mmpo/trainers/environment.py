"""The environment trainer: a VLM policy acting in gymnasium environments (RIPT-VLA, MiniWoB
GRPO, ScreenExplorer). (SFT on demonstrations) -> rounds of K rollouts per context -> advantages
-> PPO epochs on the action units, through the one update routine.

One step:
1. draw contexts (env seeds) from the training set (``rollout.prompt_sampler``, told the K rewards
   of every context run); skip the ones solved in their latest K rollouts (``ript_skip``); run K
   rollouts of each in lockstep (``EnvRunner``);
2. discard contexts whose K rewards are all equal (dynamic sampling) and draw more, until
   ``rollout.prompts_per_step`` contexts are kept (or ``early_stop_fraction`` of them, or the
   draw budget is spent) (:func:`mmpo.rollout.context_rounds.collect_round`);
3. advantage of each episode = ``algorithm.advantage`` over its context's K episodes (stateful
   estimators keep their state across steps and in checkpoints), shared by every step of the episode;
4. ``trainer.update_epochs`` passes of ``algorithm.loss`` through
   :meth:`~mmpo.trainers.loop.TrainerBase.update_policy`: a row is an episode; minibatches and
   micro batches count episodes; a micro batch flattens to its env steps, one loss row each. With a
   KL term, a frozen copy of the start policy scores the taken units (:mod:`mmpo.trainers.env_reference`).
   A step in which no rank kept a context makes no update (``optimizer_steps: 0``).

Several processes (torchrun, optionally DeepSpeed ZeRO stage 1 or 2; stage 3 is refused, its
forwards being collective while ranks act unequally often): each rank runs its own environments on
its share of the contexts (the sampler is sharded) and its own rounds of dynamic sampling. Every
rank makes the same collective calls: when any rank kept a context, all update, a rank that kept
none running its slots on a stand-in episode with weight 0. State moves alike on every rank: the skip
state replays every rank's round (:func:`~mmpo.rollout.context_rounds.replay_skip_log`), stateful
advantages are estimated on the rows of all ranks; each rank's sampler state is checkpointed (by the loop).
Evaluation is the one evaluator (:class:`mmpo.rollout.env_eval.EnvEvaluator`), held-out seeds
sharded over ranks; ``mmpo eval`` builds it from a checkpoint without an optimizer or an engine.

A plugin's trainer subclasses :class:`EnvironmentTrainer` in its own folder and overrides its
public hooks: :meth:`sft_examples` (its demonstrations), :meth:`episode_reward`,
:meth:`run_episodes`, :meth:`step_advantages` (per-step rewards), :meth:`trains_policy`,
:meth:`build_extra_state` with :meth:`save_extra` / :meth:`load_extra` (state beside the engine's),
and ``evaluator_class`` (its evaluator, e.g. with per-task metrics); for the logged rollouts
(``trainer.log_samples``, one row per episode with a GIF of it, see :meth:`log_episodes`),
:meth:`action_label`, :meth:`action_point` and :meth:`episode_components`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from mmpo.checkpoint import atomic_folder, latest_checkpoint, save_json
from mmpo.config import RunConfig
from mmpo.core import aggregate
from mmpo.core.sampling import RiptSkipState
from mmpo.errors import ConfigError
from mmpo.models import load_model
from mmpo.policies.vla_builder import build_vla_policy
from mmpo.rollout.context_rounds import collect_round, replay_skip_log
from mmpo.rollout.env_config import EnvTaskConfig
from mmpo.rollout.env_eval import EnvEvaluator, action_names, action_text
from mmpo.rollout.env_runner import Episode
from mmpo.rollout.episode_samples import episode_row
from mmpo.rollout.ray_envs import build_env_runner
from mmpo.sft import supervised_train
from mmpo.trainers.env_reference import frozen_reference, reference_logp, zero_stage
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
    """See the module docstring. Each process runs its own environments."""

    kind = ENVIRONMENT
    task: EnvironmentTask  # type: ignore[assignment]
    #: the held-out evaluation (in training and for ``mmpo eval``); a plugin may extend it
    evaluator_class: ClassVar[type[EnvEvaluator]] = EnvEvaluator

    def __init__(self, cfg: RunConfig, run_dir: str | Path) -> None:
        device, precision = self._setup(cfg, run_dir)
        if cfg.model.lora is not None:
            raise ConfigError(
                f"{cfg.task.name} trains the full VLM (new action-token rows need full embeddings); remove model.lora"
            )
        if cfg.deepspeed and zero_stage(cfg.deepspeed) == 3:
            raise ConfigError(
                f"deepspeed={cfg.deepspeed!r} is ZeRO stage 3, which the {cfg.task.name} trainer does not run: its "
                "ranks act a different number of times (episode lengths, dynamic sampling, evaluation shards) and a "
                "ZeRO-3 forward is collective; use ZeRO stage 1 or 2 (configs/deepspeed/zero2.json)"
            )
        self.tc: EnvTaskConfig = self.task.config
        self.runner = build_env_runner(self.tc.env, cfg.rollout)  # rollout.env_workers: local or ray
        # -- model: the SFT result when a previous launch of this run finished that stage ------
        sft_model = self.run_dir / SFT_DIR / "model"
        do_sft = bool(self.tc.sft.demos) and not (sft_model / "config.json").is_file()
        path = str(sft_model) if self.tc.sft.demos and not do_sft else cfg.model.path
        model, processor, info = load_model(
            path,
            seed=cfg.seed,
            tiny_overrides=None if path != cfg.model.path else cfg.model.tiny,
            attn_implementation=cfg.model.attn_implementation,
        )
        if cfg.model.freeze_vision:
            from mmpo.lora import freeze_vision_tower

            freeze_vision_tower(model, is_vlm=info.is_vlm)
        local = path if not path.startswith("tiny:") else None
        self.policy = build_vla_policy(model, processor, info, self.tc, self.runner, local)
        self.policy_module = self.policy.module
        self.policy_module.to(device)
        if do_sft and latest_checkpoint(self.run_dir) is None:
            self.show_phase("stage 1 · sft")
            self.sft_metrics = self._sft_stage(sft_model)
        self.shape = update_shape(cfg, self.rows_per_step())
        self.engine = self.build_engine(self.policy_module, precision)
        self.device = self.engine.device
        self.ref_module = frozen_reference(self.engine.module, self.algo.uses_kl)  # the start policy
        self._make_sampler()
        self.states: dict[str, Any] = dict(self.algo.states)
        if self.tc.ript.skip_solved:
            self.states["ript_skip"] = RiptSkipState()
        #: an episode this rank ran (the first of its latest round): a rank that kept no context runs
        #: its update slots on it with weight 0
        self.stand_in: Episode | None = None
        #: every episode of this rank's latest round, kept or not (context-major, K per context)
        self.round_episodes: list[Episode] = []
        self._names = action_names(self.policy)
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
        """K (``rollout.group_size``) rollouts of each context seed, context-major (with their
        observations when rollouts are logged: the GIFs are drawn from them)."""
        keep = self.samples_wanted() > 0
        return self.runner.run(self.policy, seeds, self.cfg.rollout.group_size, generator=generator, keep_images=keep)

    def step_advantages(self, kept: list[list[Episode]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards ``[C*K]`` and the advantage of every env step ``[S]`` (episode-major): each step
        carries its episode's advantage (:meth:`episode_advantages`). Called on every rank when
        any rank kept a context (``kept`` may be empty here). A plugin with per-step rewards
        overrides this (estimating with :meth:`advantages`)."""
        rewards, adv = self.episode_advantages(kept)
        episodes = [e for g in kept for e in g]
        steps = [torch.full((ep.length,), float(a)) for ep, a in zip(episodes, adv.tolist())]
        return rewards, torch.cat(steps) if steps else torch.zeros(0)

    def trains_policy(self, step: int) -> bool:
        """Whether ``step`` updates the policy (False: roll out and compute advantages only)."""
        return True

    def action_label(self, env_action: Any) -> str:
        """An env action as text in logged rollouts: its name (``task.policy.actions``), ``(x,y,...)``
        for a vector, ``invalid`` for a no-op."""
        return action_text(env_action, self._names)

    def action_point(self, env_action: Any) -> tuple[float, float] | None:
        """Where to mark the action on its frame, normalised to [0, 1]^2 (a GUI click); None: no mark."""
        return None

    def episode_components(self, kept: list[list[Episode]]) -> list[dict[str, float]]:
        """The reward components of each kept episode (context-major), after :meth:`step_advantages`:
        here success (0/1) and the env's return."""
        return [{"success": float(e.success), "return": float(e.env_return)} for g in kept for e in g]

    # -- supervised stage ---------------------------------------------------------------------
    def demo_nll(self, batch: list[DemoExample]) -> torch.Tensor:
        """Mean negative log-likelihood of the demonstrated action units (``units [B, U]``)."""
        units = torch.stack([b[1] for b in batch])
        mask = torch.stack([b[2] for b in batch])
        logp = self.policy.log_probs([b[0] for b in batch], units, mask, model=self.policy_module)
        return aggregate(-logp, mask.to(logp.device), "token-mean")

    def _sft_stage(self, out_dir: Path) -> dict[str, Any]:
        """Behaviour cloning on the demonstrations (before the engine exists; the engine
        broadcasts rank 0's weights); the result is saved to ``sft/model`` (atomically)."""
        examples, info = self.sft_examples()
        t0 = time.perf_counter()
        result = supervised_train(
            self.policy_module, examples, self.demo_nll, self.tc.sft, seed=self.cfg.seed, desc="sft (demonstrations)"
        )
        result.update(info, sft_s=time.perf_counter() - t0)
        if int(os.environ.get("RANK", "0")) == 0:  # every rank trains alike (same seed, data, order); rank 0 saves
            with atomic_folder(out_dir) as tmp:
                self.policy.save(tmp)
            save_json(out_dir.parent / "metrics.json", result)
        return result

    # -- rollouts ------------------------------------------------------------------------------
    def collect(self, step: int) -> tuple[list[list[Episode]], dict[str, float]]:
        """This rank's kept contexts, each a list of K episodes, and rollout statistics
        (``collect_round``; sampling seeded by step and rank). The skip state then replays every
        rank's round (collective), so all ranks hold the same."""
        r, rc = self.cfg.rollout, self.tc.ript
        gen = seeded_generator(self.cfg.seed * 1_000_003 + step + self.engine.rank * 7_919_000_017)
        skip = self.states.get("ript_skip")
        before = skip.state_dict() if skip is not None else None
        drawn: list[int] = []  # the latest draw's indices into task.train_seeds

        def draw(n: int) -> list[int]:
            drawn[:] = self.sampler.next(n)
            return [self.task.train_seeds[i] for i in drawn]

        def run(seeds: list[int]) -> list[Episode]:
            """K episodes of each seed; each context's K rewards go to the sampler, kept or not."""
            episodes, it = self.run_episodes(seeds, gen), iter(drawn)
            idx = [next(i for i in it if self.task.train_seeds[i] == s) for s in seeds]  # ran: not skipped
            if len(episodes) == len(seeds) * r.group_size:  # else collect_round reports the mismatch
                rewards = torch.tensor([self.episode_reward(e) for e in episodes], dtype=torch.float32)
                self.sampler.observe(idx, rewards.view(len(seeds), r.group_size))
            return episodes

        res = collect_round(
            draw,
            run,
            self.episode_reward,
            lambda e: e.success,
            target=r.prompts_per_step,
            group_size=r.group_size,
            max_draws=rc.max_draws,
            early_stop_fraction=rc.early_stop_fraction,
            dynamic_sampling=rc.dynamic_sampling,
            skip_state=skip,
            skip_threshold=rc.skip_threshold,
        )
        self.round_episodes = res.episodes
        if res.episodes:  # what this rank's update runs on if it keeps no context (weight 0)
            self.stand_in = res.episodes[0]
        elif self.stand_in is None:  # every context drawn was skipped as solved, and none ran before
            self.stand_in = self.runner.run(self.policy, [self.task.train_seeds[0]], 1, generator=gen)[0]
        if skip is not None and before is not None and self.engine.world_size > 1:
            logs = self.engine.all_gather_object(res.skip_log)
            skip.load_state_dict(before)
            for log in logs:
                replay_skip_log(skip, log, group_size=r.group_size, skip_threshold=rc.skip_threshold)
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
        group_ids = torch.arange(len(kept)).repeat_interleave(torch.tensor([len(g) for g in kept], dtype=torch.long))
        lengths = {"lengths": torch.tensor([float(e.length) for e in episodes])}  # steps (HAPO's TLGA)
        inputs = lengths if "lengths" in self.algo.advantage_inputs else {}
        return rewards, self.advantages(rewards, group_ids, [str(e.seed) for e in episodes], inputs)

    def update(self, kept: list[list[Episode]], step_adv: torch.Tensor, step: int) -> dict[str, float]:
        """PPO epochs over the kept episodes (rows) through the one update routine; a micro batch
        of episodes flattens to its env steps: ``UnitTerms(logp [S, U], logp_old [S, U],
        advantages [S], mask [S, U])`` with ``step_adv [S]`` (episode-major) the steps' advantages.
        Without a kept episode every slot runs the stand-in (a drawn episode) with weight 0."""
        episodes = [e for g in kept for e in g]
        n_rows = len(episodes)
        if not episodes:
            if self.stand_in is None:
                raise RuntimeError("update without a kept context before any rollout (collect() sets the stand-in)")
            episodes, step_adv = [self.stand_in], torch.zeros(self.stand_in.length)
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
            msk, encs = mask[rows].to(self.device), [records[r].encoding for r in rows]
            with self.engine.autocast():
                logp = self.policy.log_probs(encs, units[rows], mask[rows], model=self.engine.forward_module())
            ref = reference_logp(
                self.policy, self.ref_module, encs, units[rows], mask[rows], self.engine.autocast(), self.device
            )
            adv = advantages[rows].to(self.device)
            return [UnitTerms(logp.float(), logp_old[rows].to(self.device), adv, msk, logp_ref=ref)]

        out = self.update_policy(self.shape, torch.arange(n_rows), sizes, terms, self.beta(step), step)
        out["train_units"] = float(mask.sum()) if n_rows else 0.0
        return out

    def train_step(self, step: int) -> dict[str, float]:
        """One rollout round, its advantages and (when any rank kept a context and
        :meth:`trains_policy`) the policy update on every rank; ``optimizer_steps`` is 0 for a step
        without update. Metrics are averaged over the ranks that report them."""
        t0 = time.perf_counter()
        with self.phase_hook("rollout"):
            kept, metrics = self.collect(step)
        t1 = time.perf_counter()
        metrics["rollout_s"] = t1 - t0
        metrics["reward_s"] = 0.0  # rewards come from the environment during the rollout
        metrics["optimizer_steps"] = 0.0  # no context carried signal, or a step without policy update
        rewards, step_adv = torch.zeros(0), torch.zeros(0)
        if self.engine.all_reduce_mean(float(len(kept))) > 0:  # every rank takes the same branch
            rewards, step_adv = self.step_advantages(kept)
            if kept:
                metrics["reward"] = float(rewards.mean())
                metrics["advantage_abs"] = float(step_adv.abs().mean())
            if self.trains_policy(step):
                with self.phase_hook("update"):
                    metrics.update(self.update(kept, step_adv, step))
        self.log_episodes(kept, rewards, step_adv)
        metrics["update_s"] = time.perf_counter() - t1
        metrics["step_time_s"] = time.perf_counter() - t0
        metrics["lr"] = self.engine.lr()
        return self.reduce_metrics(metrics)

    # -- logged rollouts -----------------------------------------------------------------------
    def log_episodes(self, kept: list[list[Episode]], rewards: torch.Tensor, step_adv: torch.Tensor) -> None:
        """Put up to :meth:`samples_wanted` episodes of this step in ``self.step_samples``, whole
        groups first: the kept contexts with their ``rewards [C*K]`` and the mean of their steps'
        advantages ``step_adv [S]`` (both episode-major, as :meth:`step_advantages` returns them;
        empty when no rank kept a context), then contexts the round ran but did not keep (advantage
        0: they are not trained; components success and return). A row: the instruction, env and
        seed; the actions taken; the reward components (:meth:`episode_components`); a GIF of the
        episode (:func:`~mmpo.rollout.episode_samples.episode_row`)."""
        if not self.samples_wanted():
            return
        episodes = [e for g in kept for e in g]
        if len(rewards) != len(episodes):
            raise RuntimeError(f"step_advantages gave {len(rewards)} rewards for {len(episodes)} kept episodes")
        in_kept = {id(e) for e in episodes}
        dropped = [e for e in self.round_episodes if id(e) not in in_kept]
        bounds = torch.tensor([0] + [e.length for e in episodes]).cumsum(0).tolist()
        advantages = [float(step_adv[a:b].mean()) if b > a else 0.0 for a, b in zip(bounds, bounds[1:])]
        advantages += [0.0] * len(dropped)
        totals = rewards.tolist() + [self.episode_reward(e) for e in dropped]
        # a plugin's components come from step_advantages (kept contexts); the others get the base ones
        comps = (self.episode_components(kept) if kept else []) + EnvironmentTrainer.episode_components(self, [dropped])
        K = self.cfg.rollout.group_size
        groups = [g for g, group in enumerate(kept) for _ in group] + [len(kept) + j // K for j in range(len(dropped))]
        every = episodes + dropped
        for i in self.sample_indices(groups):
            prompt = self.evaluator_class.episode_input(self.runner, every[i])
            row = episode_row(
                every[i],
                prompt=prompt,
                group=groups[i],
                reward=totals[i],
                advantage=advantages[i],
                components=comps[i],
                label=self.action_label,
                point=self.action_point,
                trained=i < len(episodes),
            )
            self.step_samples.append(row)
        self.round_episodes = []  # their observations are no longer needed

    # -- evaluation ----------------------------------------------------------------------------
    def live_evaluator(self) -> EnvEvaluator:
        """The first ``eval.num_samples`` held-out seeds with the live policy."""
        return self.evaluator_class(
            self.policy,
            self.runner,
            self.task.eval_seeds[: self.cfg.eval.num_samples],
            self.tc,
            batch_size=self.cfg.eval.batch_size,
            params=self.engine.gathered_params,
        )

    @classmethod
    def checkpoint_evaluator(cls, cfg: RunConfig, checkpoint: str | None) -> tuple[EnvEvaluator, str]:
        """``mmpo eval``: the evaluator of ``checkpoint``'s policy (a run folder -> its ``model/``,
        or any model folder such as a run's ``sft/model``; default: the config's model.path),
        without optimizer or engine; with ``task.eval_videos`` GIFs."""
        return cls.evaluator_class.from_checkpoint(cfg, checkpoint)

    # -- saving --------------------------------------------------------------------------------
    def save_final_model(self, folder: Path) -> None:
        """``model/``: the VLM as a save_pretrained folder (+ processor with the action tokens;
        + ``action_head.safetensors`` for a Laplace head)."""
        self.engine.save_pretrained(folder, save_fn=lambda module, f, state: self.policy.save(f, state))

    def close(self) -> None:
        self.runner.close()


__all__ = ["SFT_DIR", "DemoExample", "EnvironmentTask", "EnvironmentTrainer"]
