"""The RIPT-VLA trainer: (SFT on demonstrations) -> rounds of K rollouts per context in the
environment -> leave-one-out advantages -> PPO epochs on the action units.

One step:
1. draw contexts (env seeds) from the training set; skip the ones solved in their latest K
   rollouts (``ript_skip``); run K rollouts of each in lockstep (``EnvRunner``);
2. discard contexts whose K rewards are all equal (dynamic sampling) and draw more, until
   ``rollout.prompts_per_step`` contexts are kept (or ``early_stop_fraction`` of them, or the
   draw budget is spent);
3. advantage of each episode = ``algorithm.advantage`` (``rloo``) over its context's K episodes,
   shared by every step of the episode;
4. ``trainer.update_epochs`` passes of the clipped surrogate (``algorithm.loss``) over all steps,
   ``trainer.minibatch_size`` steps per optimizer step, stored rollout log-probs as pi_old.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpo.checkpoint import atomic_folder, latest_checkpoint, save_json
from mmpo.config import RunConfig
from mmpo.core import aggregate
from mmpo.core.sampling import RiptSkipState
from mmpo.engine import Engine, EngineOptions
from mmpo.errors import ConfigError
from mmpo.loop import TrainerBase, seeded_generator
from mmpo.models import load_model
from mmpo.policies.action_codecs import BinnedActions, DiscreteActions, add_action_tokens
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.policies.vla import LaplaceActionHead, LaplaceHeadPolicy, TokenActionPolicy, VLAWithHead, load_action_head, observation_messages
from mmpo.rollout.context_rounds import collect_round
from mmpo.rollout.env_runner import EnvRunner, Episode, Observation, check_disjoint
from mmpo.sft import supervised_train
from mmpo.stats import wilson_interval
from mmpo_tasks.vla.task import RiptVlaConfig

SFT_DIR = "sft"


def _env_action_values(runner: EnvRunner, names: list[str]) -> list[Any]:
    """MiniGrid-style envs: the value of each action name in ``env.unwrapped.actions``."""
    env = runner._pool(1)[0]
    enum = getattr(env.unwrapped, "actions", None)
    if enum is None:
        raise ConfigError(f"task.policy.action_values must be given: {runner.spec.id!r} has no `actions` enum to look names up in")
    values = []
    for n in names:
        try:
            values.append(int(enum[n]))
        except KeyError:
            raise ConfigError(f"task.policy.actions: {n!r} is not an action of {runner.spec.id!r} ({[a.name for a in enum]})") from None
    return values


def _box_bounds(runner: EnvRunner, low: list[float], high: list[float]) -> tuple[list[float], list[float]]:
    if low and high:
        return list(low), list(high)
    space = runner._pool(1)[0].action_space
    if not hasattr(space, "low"):
        raise ConfigError(f"task.policy.low/high must be given: {runner.spec.id!r} has no Box action space")
    return [float(x) for x in np.asarray(space.low).reshape(-1)], [float(x) for x in np.asarray(space.high).reshape(-1)]


def build_vla_policy(model: torch.nn.Module, processor: Any, info: Any, tc: RiptVlaConfig, runner: EnvRunner, model_dir: str | None) -> Any:
    """The configured policy around a loaded VLM (action tokens added, or a Laplace head built/loaded)."""
    p = tc.policy
    if not info.is_vlm:
        raise ConfigError(f"model.path={info.path!r} is a text-only model; a VLA policy needs a VLM (e.g. tiny:qwen2_vl)")
    if p.action_space == "laplace":
        low, high = _box_bounds(runner, p.low, p.high)
        hidden = model.config.get_text_config().hidden_size
        sizes = dict(width=p.head_width, blocks=p.head_blocks, log_scale_init=p.log_scale_init)
        # a trained policy folder carries its head; a base VLM gets a fresh one
        head = load_action_head(model_dir, hidden, len(low), **sizes) if model_dir else LaplaceActionHead(hidden, len(low), **sizes)
        lm = CausalLMPolicy.from_info(model, processor, info)
        return LaplaceHeadPolicy(
            lm, VLAWithHead(model, head), low, high, scale_multiplier=p.scale_multiplier, reduce=p.logp_reduce, prompt_template=p.prompt_template
        )
    if p.action_space == "pointer":
        return build_pointer_policy(model, processor, info, tc, runner, model_dir)
    if p.action_space == "discrete":
        codec: Any = DiscreteActions(p.actions, p.action_values or _env_action_values(runner, p.actions))
    else:
        low, high = _box_bounds(runner, p.low, p.high)
        codec = BinnedActions(low, high, p.bins)
    info = add_action_tokens(model, processor, info, codec.token_strings())
    if p.action_vocab == "actions":
        allowed = set(getattr(processor, "tokenizer", processor).convert_tokens_to_ids(codec.token_strings()))
        info = dataclasses.replace(info, special_token_ids=[i for i in range(info.vocab_size) if i not in allowed])
    lm = CausalLMPolicy.from_info(model, processor, info)
    return TokenActionPolicy(lm, codec, temperature=p.temperature, prompt_template=p.prompt_template)


def build_pointer_policy(model: torch.nn.Module, processor: Any, info: Any, tc: RiptVlaConfig, runner: EnvRunner, model_dir: str | None) -> Any:
    """A pointer policy over the image-token grid of the environment's (fixed-size) observations."""
    from mmpo.policies.pointer import PointerPolicy, load_pointer_head

    p = tc.policy
    low, high = _box_bounds(runner, p.low, p.high)
    if len(low) != 2:
        raise ConfigError(f"task.policy.action_space=pointer points at 2-D positions; {runner.spec.id!r} has {len(low)}-D actions")
    if not runner.spec.image_size:
        raise ConfigError("task.policy.action_space=pointer needs a fixed observation size: set task.env.image_size (e.g. 224)")
    hidden = model.config.get_text_config().hidden_size
    head = load_pointer_head(model_dir, hidden, p.pointer_dim)
    lm = CausalLMPolicy.from_info(model, processor, info)
    probe = lm.encode(observation_messages(Observation(np.zeros((runner.spec.image_size,) * 2 + (3,), np.uint8), ""), p.prompt_template))
    merge = int(getattr(model.config.vision_config, "spatial_merge_size", 2))
    _, h, w = (int(v) for v in probe["image_grid_thw"][0])
    return PointerPolicy(lm, VLAWithHead(model, head), (h // merge, w // merge), low, high, temperature=p.temperature, prompt_template=p.prompt_template)


class RiptTrainer(TrainerBase):
    """See the module docstring. One process (the environments live in it)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path) -> None:
        device, precision = self._setup(cfg, run_dir)
        if cfg.deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("ript_vla runs in one process (its environments and dynamic sampling are per process); drop `deepspeed` / torchrun")
        if cfg.model.lora is not None:
            raise ConfigError("ript_vla trains the full VLM (new action-token rows need full embeddings); remove model.lora")
        a = cfg.algorithm
        if float(a.kl_options.get("beta", 0.0)) != 0.0 or a.kl_schedule != "constant":
            raise ConfigError("ript_vla applies no KL term (RIPT's optimizer has none); set algorithm.kl_options.beta: 0")
        if a.dynamic_sampling or a.filters:
            raise ConfigError("ript_vla's dynamic sampling is task.ript.dynamic_sampling / skip_solved; remove algorithm.dynamic_sampling / algorithm.filters")
        self.tc: RiptVlaConfig = self.task.config
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
        t = cfg.trainer
        self.engine = Engine.build(
            self.policy_module,
            EngineOptions(
                lr=t.lr, weight_decay=t.weight_decay, adam_betas=tuple(t.adam_betas), max_grad_norm=t.max_grad_norm,
                lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps, total_steps=t.max_steps * t.update_epochs * self.minibatches(),
                grad_accum_steps=1, micro_batch_size=t.micro_batch_size or 64, device=cfg.device, precision=precision,
                deepspeed_config=None,
            ),
        )
        self.device = self.engine.device
        self._make_sampler()
        self.states: dict[str, Any] = {"ript_skip": RiptSkipState()} if self.tc.ript.skip_solved else {}
        self._start()

    # -- supervised stage ---------------------------------------------------------------------
    def sft_examples(self) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
        """``(encoding, units [U], mask [U])`` of every demonstration step."""
        from mmpo_tasks.vla.data import load_demos

        steps, meta = load_demos(self.tc.sft.demos, self.tc.sft.max_episodes)
        env_id = meta.get("env", {}).get("id")
        if env_id != self.tc.env.id:
            raise ConfigError(f"task.sft.demos={self.tc.sft.demos!r} were recorded in {env_id!r}, the task runs {self.tc.env.id!r}")
        used = sorted({s.seed for s in steps})
        check_disjoint(used, self.task.eval_seeds, "eval_seeds", f"the seeds of the demonstrations in task.sft.demos={self.tc.sft.demos!r}")
        out = []
        for s in steps:
            units, mask = self.policy.demo_units(s.action)
            out.append((self.policy.encode(Observation(s.image, s.instruction)), units, mask))
        self._demo_info = {"demo_episodes": len({s.episode for s in steps}), "demo_steps": len(steps)}
        return out

    def demo_nll(self, batch: list[tuple[Any, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Mean negative log-likelihood of the demonstrated action units."""
        units = torch.stack([b[1] for b in batch])
        mask = torch.stack([b[2] for b in batch])
        logp = self.policy.log_probs([b[0] for b in batch], units, mask, model=self.policy_module)
        return aggregate(-logp, mask.to(logp.device), "token-mean")

    def _sft_stage(self, out_dir: Path) -> dict[str, Any]:
        """Behaviour cloning on the demonstrations; the result is saved to ``sft/model`` (atomically)."""
        examples = self.sft_examples()
        t0 = time.perf_counter()
        result = supervised_train(self.policy_module, examples, self.demo_nll, self.tc.sft, seed=self.cfg.seed, desc="sft (demonstrations)")
        result.update(self._demo_info, sft_s=time.perf_counter() - t0)
        with atomic_folder(out_dir) as tmp:
            self.policy.save(tmp)
        save_json(out_dir.parent / "metrics.json", result)
        return result

    # -- rollouts ------------------------------------------------------------------------------
    def episode_reward(self, ep: Episode) -> float:
        return float(ep.success) if self.tc.ript.reward == "success" else ep.env_return

    def run_episodes(self, seeds: list[int], generator: torch.Generator) -> list[Episode]:
        """K rollouts of each context seed (context-major)."""
        return self.runner.run(self.policy, seeds, self.cfg.rollout.group_size, generator=generator)

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
    def advantages(self, kept: list[list[Episode]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-episode rewards ``[C*K]`` and advantages ``[C*K]`` (context-major)."""
        rewards = torch.tensor([self.episode_reward(e) for g in kept for e in g], dtype=torch.float32)
        group_ids = torch.arange(len(kept)).repeat_interleave(self.cfg.rollout.group_size)
        adv = self.advantage_fn(rewards, group_ids, **self.cfg.algorithm.advantage_options).float()
        return rewards, adv

    def step_advantages(self, kept: list[list[Episode]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards ``[C*K]`` and the advantage of every env step ``[S]`` (episode-major): each step
        carries its episode's advantage."""
        rewards, adv = self.advantages(kept)
        episodes = [e for g in kept for e in g]
        return rewards, torch.cat([torch.full((ep.length,), float(A)) for ep, A in zip(episodes, adv.tolist())])

    def rows_per_step(self) -> int:
        """Episodes per step when every drawn context is kept (contexts x K)."""
        return self.cfg.rollout.prompts_per_step * self.cfg.rollout.group_size

    def minibatches(self) -> int:
        """Optimizer steps per PPO epoch: ``trainer.minibatch_size`` counts episodes (trajectories,
        as it counts completions for token tasks), so the count is fixed and the LR schedule exact."""
        rows = self.cfg.rollout.prompts_per_step * self.cfg.rollout.group_size
        return math.ceil(rows / (self.cfg.trainer.minibatch_size or rows))

    def update(self, kept: list[list[Episode]], step_adv: torch.Tensor, step: int) -> dict[str, float]:
        """PPO epochs: each epoch splits the kept episodes into ``minibatches()`` optimizer steps;
        every step of an episode is a row carrying its advantage (``step_adv [S]``, episode-major);
        rows are scored in micro batches of ``trainer.micro_batch_size`` env steps (0: the whole
        minibatch)."""
        t, a = self.cfg.trainer, self.cfg.algorithm
        episodes = [e for g in kept for e in g]
        first = [0]
        for ep in episodes:
            first.append(first[-1] + ep.length)
        records = [s for ep in episodes for s in ep.steps]
        units = torch.stack([s.units for s in records])
        mask = torch.stack([s.mask for s in records])
        logp_old = torch.stack([s.logp for s in records]).float()
        advs = step_adv.float()[:, None].expand_as(logp_old)
        sums: dict[str, float] = {}
        count = updates = 0
        for epoch in range(t.update_epochs):
            order = torch.randperm(len(episodes), generator=seeded_generator(self.cfg.seed * 7919 + step * 131 + epoch))
            for part in torch.tensor_split(order, self.minibatches()):
                rows = [r for e in part.tolist() for r in range(first[e], first[e + 1])]
                if not rows:
                    continue
                mb_units = float(mask[rows].sum())
                micro = t.micro_batch_size or len(rows)
                for m in range(0, len(rows), micro):
                    idx = rows[m : m + micro]
                    msk = mask[idx].to(self.device)
                    with self.engine.autocast():
                        logp = self.policy.log_probs([records[i].encoding for i in idx], units[idx], mask[idx], model=self.engine.forward_module())
                    loss_mat, lm = self.loss_fn(logp.float(), logp_old[idx].to(self.device), advs[idx].to(self.device), msk, **a.loss_options)
                    loss = aggregate(loss_mat, msk, a.loss_agg)
                    weight = float(msk.sum()) / max(1.0, mb_units) if a.loss_agg == "token-mean" else len(idx) / len(rows)
                    self.engine.backward(loss * weight)
                    for k, v in {"pg_loss": float(loss.detach()), **{k: float(v) for k, v in lm.items()}}.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                grad_norm, _ = self.optimizer_step(step)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
                updates += 1
        out = {k: v / max(1, count) for k, v in sums.items() if k != "grad_norm"}
        out["grad_norm"] = sums.get("grad_norm", 0.0) / max(1, updates)
        out["optimizer_steps"] = float(updates)
        out["train_units"] = float(mask.sum())
        return out

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        with self.phase_hook("rollout"):
            kept, metrics = self.collect(step)
        t1 = time.perf_counter()
        metrics["rollout_s"] = t1 - t0
        metrics["reward_s"] = 0.0  # rewards come from the environment during the rollout
        if kept:
            rewards, step_adv = self.step_advantages(kept)
            metrics["reward"] = float(rewards.mean())
            metrics["advantage_abs"] = float(step_adv.abs().mean())
            with self.phase_hook("update"):
                metrics.update(self.update(kept, step_adv, step))
        else:
            metrics["optimizer_steps"] = 0.0  # no context carried signal this step
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
                part = seeds[s : s + bs]
                out.extend(self.runner.run(self.policy, part, 1, generator=gen, greedy=self.tc.eval_greedy, record_frames=s < record))
        return out

    @staticmethod
    def summarize(episodes: list[Episode]) -> dict[str, float]:
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
            cfg, task=dataclasses.replace(cfg.task, options=options), trainer=dataclasses.replace(cfg.trainer, max_steps=1)
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
            {"seed": e.seed, "instruction": e.instruction, "success": bool(e.success), "return": e.env_return, "length": e.length, "invalid_actions": e.invalid_actions}
            for e in episodes
        ]
        tmp_path = out_dir / "episodes.jsonl.tmp"
        tmp_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp_path.replace(out_dir / "episodes.jsonl")
        metrics = cls.summarize(episodes)
        save_json(out_dir / "metrics.json", {"checkpoint": cfg.model.path, "eval_seeds": [e.seed for e in episodes], **metrics})
        return {"metrics": metrics, "predictions": str(out_dir / "episodes.jsonl"), "videos": saved}

    # -- saving --------------------------------------------------------------------------------
    def save_final_model(self) -> None:
        """``model/``: the VLM as a save_pretrained folder (+ processor with the action tokens;
        + ``action_head.safetensors`` for a Laplace head)."""
        self.engine.save_pretrained(self.run_dir / "model", save_fn=lambda module, folder, state: self.policy.save(folder, state))

    def close(self) -> None:
        self.runner.close()


__all__ = ["RiptTrainer", "build_vla_policy"]
