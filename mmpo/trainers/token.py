"""The token trainer: rollout -> reward -> advantage -> filters -> clipped updates -> log/eval/save.

Text LMs, VLMs and multi-turn agents; the action unit is a generated token. Read it top to bottom;
one method per phase (CleanRL style). Models are adapted by a policy
(``mmpo.policies``); the objective is the core's registered tensor functions; who steps the
weights is the engine (plain torch or DeepSpeed ZeRO).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmpo.config import RunConfig
from mmpo.core import ares
from mmpo.core.ares import AresKLState
from mmpo.core.rollout_correction import rollout_is_weights
from mmpo.errors import ConfigError
from mmpo.lora import prepare_trainable
from mmpo.models import load_model, mark_checkpointed_layers
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout import ROLLOUT_ENGINES, filters
from mmpo.rollout.agent_loop import AgentLoop, task_agent
from mmpo.rollout.batch import RolloutBatch
from mmpo.rollout.engines.base import Generation, GenerationSettings
from mmpo.tasks import Sample, TokenTask
from mmpo.trainers.kinds import TOKEN
from mmpo.trainers.loop import TrainerBase
from mmpo.trainers.token_draws import draw_batch
from mmpo.trainers.token_eval import TokenEvaluator, eval_sizes
from mmpo.trainers.token_inputs import row_advantages, score_rows
from mmpo.trainers.token_methods import TokenMethods, check_token_methods
from mmpo.trainers.token_samples import sample_rows
from mmpo.trainers.update import RowSizes, UnitTerms, update_shape


@dataclass
class StepClock:
    """Seconds spent in each phase of one step."""

    rollout: float = 0.0
    reward: float = 0.0
    update: float = 0.0


class Trainer(TrainerBase):
    """GRPO-family trainer for token policies (text LMs and VLMs)."""

    kind = TOKEN

    def __init__(self, cfg: RunConfig, run_dir: str | Path) -> None:
        # -- task and objective first: config mistakes fail before any model loads --------
        device, precision = self._setup(cfg, run_dir)
        if not isinstance(self.task, TokenTask):
            raise ConfigError(
                f"task {cfg.task.name!r} ({type(self.task).__name__}) is not a TokenTask; "
                "the token trainer cannot run it"
            )
        # -- model, reference, engine -------------------------------------------------------
        # the model stays in eval mode: no dropout, so sampled and trained log-probs agree
        model, processor, info = self.load_start_model()
        self.uses_kl = self.algo.uses_kl
        self.shape = update_shape(cfg, self.rows_per_step())
        model, self.ref_model = prepare_trainable(model, cfg.model, is_vlm=info.is_vlm, reference=self.uses_kl)
        self.engine = self.build_engine(model, precision)
        self.device = self.engine.device
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        self.policy = CausalLMPolicy.from_info(
            self.engine.module,
            processor,
            info,
            logprob_chunk_size=cfg.rollout.logprob_chunk_size,
            padding_free=cfg.rollout.padding_free,
        )
        self.rollout_engine = ROLLOUT_ENGINES.get(cfg.rollout.engine)(self.policy, cfg.rollout.engine_options)
        # a task with tools: multi-turn rollouts (generate -> tool call -> observation -> ...)
        self.agent: AgentLoop | None = task_agent(self.policy, self.rollout_engine, self.task, cfg.rollout)
        self.task.all_gather = self.engine.all_gather_object
        self._make_sampler()

        self.states: dict[str, Any] = dict(self.algo.states)
        self.methods = TokenMethods(self)  # what the objective reads beyond rewards (its states join self.states)
        self._stand_in: RolloutBatch | None = None  # a row that empty slots run (set each step)
        self.step_stats: dict[str, float] = {}  # this step's rollout metrics (see rollout)
        self._start()

    @classmethod
    def check_requirements(cls, cfg: RunConfig, task: Any) -> None:
        """The rollout engine's environment (e.g. ``make vllm-env`` for ``rollout.engine: vllm``) and
        the method settings this task's rollouts can honour (:func:`check_token_methods`)."""
        ROLLOUT_ENGINES.get(cfg.rollout.engine).check_environment(cfg.rollout.engine_options)
        check_token_methods(cfg, task)

    def load_start_model(self) -> tuple[torch.nn.Module, Any, Any]:
        """``(model, processor, info)`` that RL starts from: ``model.path``. A plugin with a stage of
        its own before RL (e.g. a supervised warm start) overrides this."""
        cfg = self.cfg
        return load_model(
            cfg.model.path,
            seed=cfg.seed,
            tiny_overrides=cfg.model.tiny,
            attn_implementation=cfg.model.attn_implementation,
        )

    # ------------------------------------------------------------------------------------------
    # phase 1: rollout and reward
    def _generate(self, prompts: list[Sample], settings: GenerationSettings) -> tuple[list[dict], Generation]:
        """G completions of each prompt; each prompt is encoded once and its encoding shared by
        its G rows (the log-prob passes recognise a group's shared prefix by that identity).
        A task with ``rollout_prompts_differ`` gives each rollout its own prompt
        (``rollout_messages(sample, k)``)."""
        G = self.cfg.rollout.group_size
        if self.task.rollout_prompts_differ:  # e.g. HiconAgent's DCS: each rollout sees its own history
            encodings = [self.policy.encode(self.task.rollout_messages(p, k)) for p in prompts for k in range(G)]
            inputs, per_prompt = self.policy.collate(encodings), 1
        else:
            unique = [self.policy.encode(s.messages) for s in prompts]
            encodings = [enc for enc in unique for _ in range(G)]
            inputs, per_prompt = self.policy.collate(unique), G
        ctx = nullcontext() if self.rollout_engine.holds_weights else self.engine.sampling()
        with ctx:
            gen = self.rollout_engine.generate(
                self.engine.module, inputs, settings, device=self.device, num_samples=per_prompt
            )
        if gen.logprobs is None and self.cfg.rollout.is_correction != "none":
            raise ConfigError(
                f"rollout.is_correction={self.cfg.rollout.is_correction} needs sampling log-probs, but rollout "
                f"engine '{self.cfg.rollout.engine}' with options {self.cfg.rollout.engine_options} reports none"
            )
        return encodings, gen

    def _agent_rollout(
        self, prompts: list[Sample], rows: list[Sample], group_ids: torch.Tensor
    ) -> tuple[RolloutBatch, list[Any]]:
        """G multi-turn trajectories of each prompt (the k-th from the task's k-th rollout prompt),
        as a batch of whole conversations (see ``RolloutBatch``)."""
        G = self.cfg.rollout.group_size
        encodings = [self.policy.encode(self.task.rollout_messages(p, k)) for p in prompts for k in range(G)]
        contexts = [self.task.tool_context(p) for p in prompts for _ in range(G)]
        assert self.agent is not None
        ctx = nullcontext() if self.rollout_engine.holds_weights else self.engine.sampling()
        with ctx:
            trajs = self.agent.run(self.engine.module, encodings, contexts, device=self.device)
        batch = RolloutBatch.from_trajectories(rows, trajs, group_ids, self.policy.pad_token_id)
        return batch, trajs

    def rollout(self, clock: StepClock) -> tuple[RolloutBatch, dict[str, float]]:
        """Sample G completions for each prompt and score them, drawing more prompts while DAPO dynamic
        sampling or a filter with ``refill`` leaves the batch short (:mod:`mmpo.trainers.token_draws`).
        The metrics dict is kept as ``step_stats``: filters after the advantage add theirs to it."""
        batch, self.step_stats = draw_batch(self, clock)
        return batch, self.step_stats

    # ------------------------------------------------------------------------------------------
    # phase 2: advantages (and the reference/old log-probs they may need)
    def _score(self, batch: RolloutBatch, model: torch.nn.Module, with_entropy: bool = False):
        """``logp [N, T]`` of the batch's completions under ``model``, without gradient (and
        ``(logp, entropy [N, T])`` when ``with_entropy``); see :func:`score_rows`."""
        out = score_rows(self, batch, model, entropy=with_entropy)
        return (out.logp, out.entropy) if with_entropy else out.logp

    def token_logprobs(
        self, part: RolloutBatch, model: torch.nn.Module | None, with_entropy: bool, **extras: Any
    ) -> Any:
        """Log-probs ``logp [n, T]`` (and ``entropy [n, T]``, and the ``extras`` a method reads:
        ``topk``, ``curvature``) of ``part``'s completion tokens under ``model`` (None: the policy's).
        A hook: a task's trainer may score another way (HCPO's compressed branch)."""
        kw = dict(model=model, temperature=self.cfg.rollout.temperature, with_entropy=with_entropy, device=self.device)
        kw.update(extras)
        if part.conversation_lengths is not None:  # multi-turn: score the whole conversations
            return self.policy.score_conversations(
                part.encodings, part.conversation_lengths, part.completion_ids, part.mask, **kw
            )
        return self.policy.score(
            part.encodings, part.completion_ids, part.mask, share_prefix=self.cfg.rollout.prefix_sharing, **kw
        )

    def reference_context(self) -> tuple[torch.nn.Module, Any]:
        """``(model, context)`` under which ``token_logprobs`` gives the reference's log-probs: the
        frozen copy, or the policy with its LoRA adapters disabled. A hook (HCPO scores the
        reference with the full, uncompressed prompt)."""
        if self.ref_model is not None:
            return self.ref_model, nullcontext()
        return self.engine.module, self.engine.module.disable_adapter()

    def compute_advantages(self, batch: RolloutBatch, beta: float) -> RolloutBatch:
        """Advantages (after reward-side filters); returns the batch that will be trained on."""
        a = self.cfg.algorithm
        self._stand_in = batch.select([0])  # what an update runs when filters leave this rank no row
        batch = filters.before_advantage(batch, a.filters, self.cfg.rollout.max_new_tokens)
        batch = self.methods.add_demonstrations(batch)  # SRFT: each prompt's demonstration joins its group
        many = self.cfg.trainer.update_epochs > 1 or self.shape.minibatch_size < len(batch)
        self.methods.old_pass(batch, needs_logp=many)  # pi_old's log-probs and what the objective reads of them
        if beta > 0.0:
            ref, ctx = self.reference_context()
            with ctx:
                batch.logp_ref = self._score(batch, ref)
        rewards = batch.rewards
        if beta > 0.0 and a.kl_placement == "reward":
            from mmpo.core import kl_to_reward

            logp = batch.logp_old if batch.logp_old is not None else self._score(batch, self.engine.module)
            kl = self.algo.kl(logp, batch.logp_ref)
            rewards = kl_to_reward(rewards, kl, batch.mask, beta)
        keys, inputs = [s.id for s in batch.samples], self.methods.advantage_inputs(batch)
        batch.advantages = self.advantages(rewards, batch.group_ids, keys, inputs)
        progress = self.step / self.cfg.trainer.max_steps
        batch = filters.after_advantage(batch, a.filters, progress=progress, stats=self.step_stats)
        batch = self.methods.curvature_mask(batch)  # CAPO: tokens whose predicted policy shift is too large
        if batch.logp_old is None and (self.cfg.trainer.update_epochs > 1 or self.shape.minibatch_size < len(batch)):
            batch.logp_old = self._score(batch, self.engine.module)
        return batch

    # ------------------------------------------------------------------------------------------
    # phase 3: clipped policy-gradient updates
    def update(self, batch: RolloutBatch, beta: float, step: int) -> dict[str, float]:
        """``update_epochs`` passes of clipped policy-gradient steps over the batch, through the one
        update routine (:func:`mmpo.trainers.update.run_update`)."""
        rows = torch.arange(len(batch))
        if len(batch) == 0:  # filters left this rank nothing: stand-in slots keep collectives aligned
            batch, rows = self._stand_in, torch.arange(0)
            batch.advantages = torch.zeros(len(batch))
            if self.uses_kl:  # the same calls as a real row (ARES gathers per-bucket KL)
                batch.logp_ref = torch.zeros(batch.mask.shape)

        def terms(idx: torch.Tensor, padding: bool) -> list[UnitTerms]:
            return [self.unit_terms(batch.select(idx.tolist()), beta, padding)]

        return self.update_policy(
            self.shape, rows, RowSizes.from_mask(batch.mask), terms, beta, step, max_len=self.cfg.rollout.max_new_tokens
        )

    def unit_terms(self, micro: RolloutBatch, beta: float, padding: bool = False) -> UnitTerms:
        """The action units of one micro batch for the objective (``padding``: a stand-in row whose
        loss is multiplied by 0; it keeps collectives aligned and feeds no statistic). A hook: a
        task's trainer may compose its own per-unit loss (HCPO's two branches)."""
        mask = micro.mask.to(self.device)
        with self.engine.autocast():
            out = self.token_logprobs(micro, None, with_entropy=True, **self.methods.score_extras())
        logp = out.logp
        logp_old = micro.logp_old.to(self.device) if micro.logp_old is not None else logp.detach()
        weights, metrics, r = None, {}, self.cfg.rollout
        if micro.logp_rollout is not None:  # the engine's sampling log-probs against the trainer's pi_old
            weights, metrics = rollout_is_weights(
                logp_old, micro.logp_rollout.to(self.device), mask, r.is_correction, r.is_cap
            )
            weights = weights if r.is_correction != "none" else None
        logp_ref = micro.logp_ref.to(self.device) if micro.logp_ref is not None else None
        row_weights = None
        if logp_ref is not None and isinstance(self.states.get("kl_schedule"), AresKLState):
            row_weights = self._ares_kl_weights(micro, self.algo.kl(logp, logp_ref).detach(), mask, padding)
        return UnitTerms(
            logp,
            logp_old,
            micro.advantages.to(self.device),
            mask,
            entropy=out.entropy,
            logp_ref=logp_ref,
            loss_weights=weights,
            kl_row_weights=row_weights,
            inputs=self.methods.loss_inputs(micro, out),
            metrics=metrics,
        )

    def _ares_kl_weights(
        self, micro: RolloutBatch, kl: torch.Tensor, mask: torch.Tensor, padding: bool = False
    ) -> torch.Tensor:
        """Per-row KL multipliers ``[n]`` of ARES's per-bucket KL controller (``ares_bucket``; the
        task's rows carry their difficulty bucket, checked at load).

        Each micro step first feeds the controller the batch's mean KL per difficulty bucket
        (summed over ranks, so every rank's controller moves alike), then reads the buckets' betas.
        """
        info = micro.row_info
        buckets = info["bucket"].long()
        local = ares.bucket_kl_sums(buckets, ares.sequence_mean(kl, mask).cpu())
        local = local * 0 if padding else local  # a padding row still joins the gather, with nothing to add
        sums = torch.tensor(self.engine.all_gather_object(local.tolist()), dtype=torch.float64).sum(0)
        return ares.bucket_kl_weights(
            self.states["kl_schedule"], sums, buckets, info.get("correct"), info.get("soft_cost")
        )

    # ------------------------------------------------------------------------------------------
    # evaluation
    def live_evaluator(self) -> TokenEvaluator:
        """Greedy decoding of held-out samples with the live module (parameters gathered under ZeRO-3)."""
        e = self.engine
        return TokenEvaluator(
            self.policy, e.module, self.task, **eval_sizes(self.cfg), device=self.device, params=e.sampling
        )

    @classmethod
    def checkpoint_evaluator(cls, cfg: RunConfig, checkpoint: str | None) -> tuple[TokenEvaluator, str]:
        """``mmpo eval``: the evaluator of ``checkpoint``'s policy, without optimizer or engine."""
        return TokenEvaluator.from_checkpoint(cfg, checkpoint)

    def save_final_model(self, folder: Path) -> None:
        """``model/``: a save_pretrained folder; with LoRA the adapter, plus ``model/merged/``."""
        if self.cfg.model.lora is not None:
            from mmpo.lora import save_lora

            merged, processor = self.cfg.model.lora.save_merged, self.policy.processor
            self.engine.save_pretrained(
                folder,
                save_fn=lambda module, folder, state: save_lora(
                    module, folder, processor, merged=merged, state_dict=state
                ),
            )
        else:
            self.engine.save_pretrained(folder)
            if self.engine.is_main:
                self.policy.processor.save_pretrained(folder)

    # ------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        clock = StepClock()
        t0 = time.perf_counter()
        self.task.begin_step(step + 1, self.cfg.trainer.max_steps)
        beta = self.beta(step)
        batch, stats = self.rollout(clock)
        t1 = time.perf_counter()
        with self.phase_hook("update"):
            if self.cfg.model.gradient_checkpointing:
                mark_checkpointed_layers(self.engine.module)
            batch = self.compute_advantages(batch, beta)
            metrics = self.update(batch, beta, step)
            if self.rollout_engine.holds_weights:  # the next rollout must sample from the new weights
                ts = time.perf_counter()
                with self.engine.gathered_params():
                    self.rollout_engine.sync_weights(self.engine.module)
                metrics["weight_sync_s"] = time.perf_counter() - ts
        clock.update = time.perf_counter() - t1
        metrics.update(stats)
        self.step_samples = sample_rows(self, batch)  # the logged rollouts (whole groups first)
        n = len(batch)
        metrics.update(
            {
                "reward_mean_trained": float(batch.rewards.mean()) if n else 0.0,
                "reward_std": float(batch.rewards.std()) if n > 1 else 0.0,
                "advantage_abs_mean": float(row_advantages(batch).abs().mean()) if n else 0.0,
                "response_length": float(batch.mask.sum(1).float().mean()) if n else 0.0,
                "truncated_frac": float(batch.truncated.float().mean()) if n else 0.0,
                "beta": beta,
                "lr": self.engine.lr(),
            }
        )
        kl_state = self.states.get("kl_schedule")
        if isinstance(kl_state, AresKLState):
            metrics.update({f"kl_beta/{b}": float(v) for b, v in kl_state.ensure_betas().items()})
        metrics.setdefault("kl", 0.0)  # KL to the reference; 0 when beta is 0 (no reference pass)
        metrics.update(self.methods.step_metrics(batch))
        metrics.update({"rollout_s": clock.rollout, "reward_s": clock.reward, "update_s": clock.update})
        metrics["step_time_s"] = time.perf_counter() - t0
        return self.reduce_metrics(metrics)

    def close(self) -> None:
        self.rollout_engine.close()
