"""The training loop: rollout -> reward -> advantage -> filters -> clipped updates -> log/eval/save.

Read it top to bottom; one method per phase (CleanRL style). Models are adapted by a policy
(``mmpo.policies``); the objective is the core's registered tensor functions; who steps the
weights is the engine (plain torch or DeepSpeed ZeRO).
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmpo.config import RunConfig, check_options
from mmpo.core import GROUP_FILTERS, KL_ESTIMATORS, KL_SCHEDULES, aggregate
from mmpo.core import ares
from mmpo.core.ares import AresKLState
from mmpo.core.rollout_correction import rollout_is_weights
from mmpo.engine import Engine, EngineOptions
from mmpo.errors import ConfigError
from mmpo.loop import TrainerBase
from mmpo.evaluate import generate_greedy, run_agent
from mmpo.models import load_model, mark_checkpointed_layers
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout import ROLLOUT_ENGINES
from mmpo.rollout import filters
from mmpo.rollout.agent_loop import AgentLoop, AgentSettings, trajectory_tensors
from mmpo.rollout.batch import RolloutBatch
from mmpo.rollout.filters import check_filters, dynamic_options
from mmpo.rollout.engines.base import Generation, GenerationSettings
from mmpo.tasks import RolloutView, Sample

@dataclass
class StepClock:
    """Seconds spent in each phase of one step."""

    rollout: float = 0.0
    reward: float = 0.0
    update: float = 0.0


class Trainer(TrainerBase):
    """GRPO-family trainer for token policies (text LMs and VLMs)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path) -> None:
        # -- task and objective first: config mistakes fail before any model loads --------
        device, precision = self._setup(cfg, run_dir)
        a = cfg.algorithm
        self.kl_fn = KL_ESTIMATORS.get(a.kl_estimator)
        self.kl_schedule = KL_SCHEDULES.get(a.kl_schedule)
        check_options(self.kl_schedule, a.kl_options, "algorithm.kl_options", ("state", "kl"))
        check_filters(a.filters)
        # -- model, reference, engine -------------------------------------------------------
        # the model stays in eval mode: no dropout, so sampled and trained log-probs agree
        model, processor, info = load_model(
            cfg.model.path, seed=cfg.seed, tiny_overrides=cfg.model.tiny, attn_implementation=cfg.model.attn_implementation
        )
        if cfg.model.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        self.uses_kl = self._kl_can_be_on()
        self.ref_model: torch.nn.Module | None = None
        if cfg.model.lora is not None:  # adapters on the language model; vision tower per lora.vision
            from mmpo.lora import apply_lora

            model = apply_lora(model, cfg.model.lora, is_vlm=info.is_vlm)
        else:
            if cfg.model.freeze_vision:
                from mmpo.lora import freeze_vision_tower

                freeze_vision_tower(model, is_vlm=info.is_vlm)
            if self.uses_kl:
                self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        t = cfg.trainer
        self.engine = Engine.build(
            model,
            EngineOptions(
                lr=t.lr,
                weight_decay=t.weight_decay,
                adam_betas=tuple(t.adam_betas),
                max_grad_norm=t.max_grad_norm,
                lr_schedule=t.lr_schedule,
                warmup_steps=t.warmup_steps,
                total_steps=t.max_steps * self._optimizer_steps_per_step(),
                grad_accum_steps=self._grad_accum_steps(),
                micro_batch_size=self._micro_batch_size(),
                device=cfg.device,
                precision=precision,
                deepspeed_config=cfg.deepspeed,
            ),
        )
        self.device = self.engine.device
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        self.policy = CausalLMPolicy.from_info(
            self.engine.module, processor, info, logprob_chunk_size=cfg.rollout.logprob_chunk_size
        )
        self.rollout_engine = ROLLOUT_ENGINES.get(cfg.rollout.engine)(self.policy, cfg.rollout.engine_options)
        self.agent: AgentLoop | None = None
        tools = self.task.tools()
        if tools:  # multi-turn rollouts: generate -> tool call -> observation -> ...
            if self.task.needs_token_entropy:
                raise ConfigError(f"task {cfg.task.name!r}: token-entropy rewards are not available for multi-turn rollouts")
            r = cfg.rollout
            self.agent = AgentLoop(
                self.policy, self.rollout_engine, tools,
                AgentSettings(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, **self.task.agent_settings()),
            )
        self.task.all_gather = self.engine.all_gather_object
        self._make_sampler()

        self.states: dict[str, Any] = self.algorithm_states(advantage=self.advantage_fn, kl_schedule=self.kl_schedule)
        self._eval_samples: list[Sample] | None = None

        self.last_kl = 0.0
        self._start()

    # ------------------------------------------------------------------------------------------
    # sizes
    def _rows_per_step(self) -> int:
        return self.cfg.rollout.prompts_per_step * self.cfg.rollout.group_size

    def _minibatch_size(self) -> int:
        return self.cfg.trainer.minibatch_size or self._rows_per_step()

    def _micro_batch_size(self) -> int:
        return self.cfg.trainer.micro_batch_size or self._minibatch_size()

    def _grad_accum_steps(self) -> int:
        return math.ceil(self._minibatch_size() / self._micro_batch_size())

    def _optimizer_steps_per_step(self) -> int:
        return self.cfg.trainer.update_epochs * math.ceil(self._rows_per_step() / self._minibatch_size())

    def _kl_can_be_on(self) -> bool:
        opts = self.cfg.algorithm.kl_options
        if self.cfg.algorithm.kl_schedule == "constant":
            return float(opts.get("beta", 0.0)) > 0.0
        return True

    def _beta(self, step: int) -> float:
        if not self.uses_kl:
            return 0.0
        opts = dict(self.cfg.algorithm.kl_options)
        if "kl_schedule" in self.states:
            opts["state"] = self.states["kl_schedule"]
            opts["kl"] = self.last_kl
        return float(self.kl_schedule(step, self.cfg.trainer.max_steps, **opts))

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
        ctx = nullcontext() if self.rollout_engine.holds_weights else self.engine.gathered_params()
        with ctx:
            gen = self.rollout_engine.generate(self.engine.module, inputs, settings, device=self.device, num_samples=per_prompt)
        if gen.logprobs is None and self.cfg.rollout.is_correction != "none":
            raise ConfigError(
                f"rollout.is_correction={self.cfg.rollout.is_correction} needs sampling log-probs, but rollout "
                f"engine '{self.cfg.rollout.engine}' with options {self.cfg.rollout.engine_options} reports none"
            )
        return encodings, gen

    def _agent_rollout(self, prompts: list[Sample], rows: list[Sample], group_ids: torch.Tensor) -> tuple[RolloutBatch, list[Any]]:
        """G multi-turn trajectories of each prompt (the k-th from the task's k-th rollout prompt),
        as a batch of whole conversations (see ``RolloutBatch``)."""
        G = self.cfg.rollout.group_size
        encodings = [self.policy.encode(self.task.rollout_messages(p, k)) for p in prompts for k in range(G)]
        contexts = [self.task.tool_context(p) for p in prompts for _ in range(G)]
        assert self.agent is not None
        ctx = nullcontext() if self.rollout_engine.holds_weights else self.engine.gathered_params()
        with ctx:
            trajs = self.agent.run(self.engine.module, encodings, contexts, device=self.device)
        t = trajectory_tensors(trajs, self.policy.pad_token_id)
        batch = RolloutBatch(
            rows, [tr.encoding for tr in trajs], t["completion_ids"], t["mask"], torch.tensor([tr.truncated for tr in trajs]),
            torch.zeros(len(rows)), group_ids, texts=["".join(tr.turn_texts) for tr in trajs], logp_rollout=t["logprobs"],
            conversation_lengths=t["lengths"],
        )
        return batch, trajs

    def rollout(self, clock: StepClock) -> tuple[RolloutBatch, dict[str, float]]:
        """Sample G completions for each prompt and score them (with DAPO dynamic sampling if on)."""
        r, a = self.cfg.rollout, self.cfg.algorithm
        settings = GenerationSettings(r.max_new_tokens, r.temperature, r.top_p, r.top_k, min_new_tokens=r.min_new_tokens)
        kept: list[RolloutBatch] = []
        drawn_rewards: list[torch.Tensor] = []
        drawn_components: dict[str, list[torch.Tensor]] = {}
        n_groups, draws, seen_groups = 0, 0, 0
        while True:
            draws += 1
            t0 = time.perf_counter()
            with self.phase_hook("rollout"):
                prompts = [self.task.train_sample(i) for i in self.sampler.next(r.prompts_per_step)]
                rows = [s for s in prompts for _ in range(r.group_size)]
                group_ids = torch.arange(seen_groups, seen_groups + len(prompts)).repeat_interleave(r.group_size)
                seen_groups += len(prompts)
                if self.agent is not None:
                    batch, trajs = self._agent_rollout(prompts, rows, group_ids)
                else:
                    encodings, gen = self._generate(prompts, settings)
                    ids, mask = gen.completion_ids, gen.mask
                    texts = self.policy.decode(ids, mask)
                    batch = RolloutBatch(
                        rows, encodings, ids, mask, gen.truncated, torch.zeros(len(rows)), group_ids, texts=texts,
                        logp_rollout=gen.logprobs,
                    )
                    view = RolloutView(ids, mask, group_ids)
                    if self.task.needs_token_entropy:
                        # sampled under the current weights, so these log-probs are also pi_old's
                        batch.logp_old, view.token_entropy = self._score(batch, self.engine.module, with_entropy=True)
                        view.token_texts = [self.policy.tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
            t1 = time.perf_counter()
            with self.phase_hook("reward"):
                if self.agent is not None:
                    out = self.task.reward_trajectories(rows, trajs)
                else:
                    out = self.task.reward_with_rollout(rows, texts, view)
            clock.rollout += t1 - t0
            clock.reward += time.perf_counter() - t1
            batch.rewards, batch.components, batch.row_info = out.rewards.float(), out.components, out.row_info
            drawn_rewards.append(batch.rewards)
            for k, v in out.components.items():
                drawn_components.setdefault(k, []).append(v.float())
            if not a.dynamic_sampling:
                kept.append(batch)
                break
            keep = GROUP_FILTERS.get("dynamic")(batch.rewards, batch.group_ids, **dynamic_options(a.filters))
            if keep.any():
                kept.append(batch.select(torch.nonzero(keep).flatten()))
                n_groups += int(keep.sum()) // r.group_size
            done = n_groups >= r.prompts_per_step or draws >= a.max_draws
            # every rank draws equally often: generation under ZeRO-3 and some rewards are collectives
            if all(self.engine.all_gather_object(done)):
                break
        if a.dynamic_sampling and not kept:  # every group was uniform: train on the last draw (zero advantage)
            kept.append(batch)
        full = RolloutBatch.concat(kept, self.policy.pad_token_id)
        if a.dynamic_sampling and len(full) > self._rows_per_step():
            full = full.select(list(range(self._rows_per_step())))
        # rewards of everything sampled this step, before any filter
        stats = {"draws": float(draws), "groups_kept_frac": len(full) / (draws * self._rows_per_step())}
        stats["reward_mean"] = float(torch.cat(drawn_rewards).mean())
        stats.update({f"reward/{k}": float(torch.cat(v).mean()) for k, v in drawn_components.items()})
        return full, stats

    # ------------------------------------------------------------------------------------------
    # phase 2: advantages (and the reference/old log-probs they may need)
    def _score(self, batch: RolloutBatch, model: torch.nn.Module, with_entropy: bool = False):
        """``logp [N, T]`` of the batch's completions under ``model``, without gradient
        (and ``(logp, entropy [N, T])`` when ``with_entropy``)."""
        out, ents = [], []
        mb = self._micro_batch_size()
        width = batch.completion_ids.shape[1]
        with torch.no_grad(), self.engine.autocast():
            for s in range(0, len(batch), mb):
                part = batch.select(list(range(s, min(s + mb, len(batch)))))
                res = self._token_logprobs(part, model, with_entropy)
                out.append(torch.nn.functional.pad(res.logp.float().cpu(), (0, width - res.logp.shape[1])))
                if with_entropy:
                    ents.append(torch.nn.functional.pad(res.entropy.float().cpu(), (0, width - res.entropy.shape[1])))
        if with_entropy:
            return torch.cat(out), torch.cat(ents)
        return torch.cat(out)

    def _token_logprobs(self, part: RolloutBatch, model: torch.nn.Module | None, with_entropy: bool) -> Any:
        """Log-probs (and entropies) of ``part``'s completion tokens under ``model`` (None: the policy's)."""
        kw = dict(model=model, temperature=self.cfg.rollout.temperature, with_entropy=with_entropy, device=self.device)
        if part.conversation_lengths is not None:  # multi-turn: score the whole conversations
            return self.policy.score_conversations(part.encodings, part.conversation_lengths, part.completion_ids, part.mask, **kw)
        return self.policy.score(part.encodings, part.completion_ids, part.mask, share_prefix=self.cfg.rollout.prefix_sharing, **kw)

    def _reference_context(self):
        if self.ref_model is not None:
            return self.ref_model, nullcontext()
        return self.engine.module, self.engine.module.disable_adapter()

    def compute_advantages(self, batch: RolloutBatch, beta: float) -> RolloutBatch:
        """Advantages (after reward-side filters); returns the batch that will be trained on."""
        a = self.cfg.algorithm
        batch = filters.before_advantage(batch, a.filters, self.cfg.rollout.max_new_tokens)
        if beta > 0.0:
            ref, ctx = self._reference_context()
            with ctx:
                batch.logp_ref = self._score(batch, ref)
        rewards = batch.rewards
        if beta > 0.0 and a.kl_placement == "reward":
            from mmpo.core import kl_to_reward

            logp = self._score(batch, self.engine.module)
            kl = self.kl_fn(logp, batch.logp_ref)
            rewards = kl_to_reward(rewards, kl, batch.mask, beta)
        opts = dict(a.advantage_options)
        if "advantage" in self.states:
            opts["state"] = self.states["advantage"]
            if a.advantage == "dcpo_sas":
                opts.setdefault("prompt_keys", [s.id for s in batch.samples])
        batch.advantages = self.advantage_fn(rewards, batch.group_ids, **opts).float()
        batch = filters.after_advantage(batch, a.filters)
        if batch.logp_old is None and (self.cfg.trainer.update_epochs > 1 or self._minibatch_size() < len(batch)):
            batch.logp_old = self._score(batch, self.engine.module)
        return batch

    # ------------------------------------------------------------------------------------------
    # phase 3: clipped policy-gradient updates
    def _micro_weight(self, micro: RolloutBatch, minibatch: RolloutBatch) -> float:
        """Share of a micro batch in its minibatch, so accumulated losses equal the minibatch's."""
        if self.cfg.algorithm.loss_agg == "token-mean":
            return float(micro.mask.sum()) / max(1.0, float(minibatch.mask.sum()))
        if self.cfg.algorithm.loss_agg == "otm":
            return 1.0
        return len(micro) / len(minibatch)

    def update(self, batch: RolloutBatch, beta: float, step: int) -> dict[str, float]:
        """``update_epochs`` passes of clipped policy-gradient steps over the batch.

        The number of optimizer steps and of micro batches per step come from the config, not
        from the batch, so every rank makes the same collective calls even when filters left
        ranks with different row counts; the rows are spread over those slots.
        """
        t = self.cfg.trainer
        sums: dict[str, float] = {}
        counts = 0
        n = len(batch)
        n_minibatches = math.ceil(self._rows_per_step() / self._minibatch_size())
        n_micro = self._grad_accum_steps()
        shuffle = t.update_epochs > 1 or n_minibatches > 1
        for epoch in range(t.update_epochs):
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 101 + epoch)
            order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
            for mb_rows in _split(order, n_minibatches):
                minibatch = batch.select(mb_rows if len(mb_rows) else order[:1])
                for micro_rows in _split(torch.arange(len(minibatch)), n_micro):
                    if len(micro_rows) == 0 or len(mb_rows) == 0:  # keep collectives aligned
                        micro = minibatch.select([0])
                        loss, _ = self._micro_loss(micro, beta, padding=True)
                        self.engine.backward(loss * 0.0)
                        continue
                    micro = minibatch.select(micro_rows)
                    loss, metrics = self._micro_loss(micro, beta)
                    # a non-finite loss never reaches the weights: the engine skips the update
                    self.engine.backward(loss * self._micro_weight(micro, minibatch))
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + v
                    counts += 1
                grad_norm, skipped = self.optimizer_step(step)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
                if skipped:
                    sums["skipped_updates"] = sums.get("skipped_updates", 0.0) + 1
        out = {k: v / max(1, counts) for k, v in sums.items() if k not in ("grad_norm", "skipped_updates")}
        out["grad_norm"] = sums.get("grad_norm", 0.0) / (t.update_epochs * n_minibatches)
        out["skipped_updates"] = sums.get("skipped_updates", 0.0)
        return out

    def _micro_loss(self, micro: RolloutBatch, beta: float, padding: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro batch; ``padding`` marks a stand-in row whose loss is multiplied by 0
        (it keeps the collective calls aligned across ranks but must not feed any statistics)."""
        a = self.cfg.algorithm
        mask = micro.mask.to(self.device)
        with self.engine.autocast():
            out = self._token_logprobs(micro, None, with_entropy=True)
        logp = out.logp
        logp_old = micro.logp_old.to(self.device) if micro.logp_old is not None else logp.detach()
        adv = micro.advantages.to(self.device)
        loss_mat, lm = self.loss_fn(logp, logp_old, adv, mask, **a.loss_options)
        rollout_metrics: dict[str, float] = {}
        if micro.logp_rollout is not None:
            loss_mat, rollout_metrics = self._rollout_correction(loss_mat, logp_old, micro.logp_rollout.to(self.device), mask)
        max_len = self.cfg.rollout.max_new_tokens
        pg = aggregate(loss_mat, mask, a.loss_agg, max_len=max_len)
        loss = pg
        metrics = {"pg_loss": float(pg.detach())}
        metrics.update({k: float(v) for k, v in lm.items()})
        metrics.update(rollout_metrics)
        if micro.logp_ref is not None:
            kl = self.kl_fn(logp, micro.logp_ref.to(self.device))
            weights = self._row_kl_weights(micro, kl.detach(), mask, padding)
            if weights is not None:
                kl = kl * weights.to(kl)[:, None]
            kl_value = aggregate(kl, mask, a.loss_agg, max_len=max_len)
            if a.kl_placement == "loss":
                loss = loss + beta * kl_value
            metrics["kl"] = float(kl_value.detach())
        entropy = aggregate(out.entropy, mask, a.loss_agg, max_len=max_len)
        if a.entropy_coef:
            loss = loss - a.entropy_coef * entropy
        metrics["entropy"] = float(entropy.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def _rollout_correction(
        self, loss_mat: torch.Tensor, logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Compare the engine's sampling log-probs with the trainer's ``pi_old`` (all ``[n, T]``)
        and, with ``rollout.is_correction``, reweight the per-token loss by the rollout ratio."""
        r = self.cfg.rollout
        weights, metrics = rollout_is_weights(logp_old, logp_rollout, mask, r.is_correction, r.is_cap)
        if r.is_correction != "none":
            loss_mat = loss_mat * weights
        return loss_mat, metrics

    def _row_kl_weights(
        self, micro: RolloutBatch, kl: torch.Tensor, mask: torch.Tensor, padding: bool = False
    ) -> torch.Tensor | None:
        """Per-row KL multipliers ``[n]`` of a per-bucket KL controller (ARES ``ares_bucket``), else None.

        Each micro step first feeds the controller the batch's mean KL per difficulty bucket
        (summed over ranks, so every rank's controller moves alike), then reads the buckets' betas.
        """
        state = self.states.get("kl_schedule")
        if not isinstance(state, AresKLState):
            return None
        info = micro.row_info
        if "bucket" not in info:
            raise ConfigError(
                "algorithm.kl_schedule=ares_bucket needs a task that assigns difficulty buckets "
                "(vlm_reasoning with task.ares enabled)"
            )
        buckets = info["bucket"].long()
        seq_kl = ares.sequence_mean(kl, mask).cpu()
        sums = torch.zeros(len(ares.BUCKETS), 2, dtype=torch.float64)
        if not padding:  # a padding row still joins the gather, with nothing to add
            sums[:, 0].index_add_(0, buckets, seq_kl.double())
            sums[:, 1].index_add_(0, buckets, torch.ones_like(seq_kl, dtype=torch.float64))
        sums = torch.tensor(self.engine.all_gather_object(sums.tolist()), dtype=torch.float64).sum(0)
        ares.ares_bucket_observe(state, {b: float(sums[i, 0] / sums[i, 1]) for i, b in enumerate(ares.BUCKETS) if sums[i, 1] > 0})
        weights = ares.ares_bucket_betas(state, buckets)
        if "soft_cost" in info and "correct" in info:
            weights = weights * ares.second_chance_factor(buckets, info["correct"], info["soft_cost"])
        return weights

    # ------------------------------------------------------------------------------------------
    # evaluation
    def evaluate(self) -> dict[str, float]:
        """Greedy decoding on held-out samples; metrics as ``eval/<name>``."""
        e = self.cfg.eval
        if e.num_samples == 0:
            return {}
        if self._eval_samples is None:
            self._eval_samples = self.task.eval_samples(e.num_samples)
        samples = self._eval_samples
        rank, world = self.engine.rank, self.engine.world_size
        per_rank = math.ceil(len(samples) / world)
        mine = samples[rank * per_rank : (rank + 1) * per_rank]
        if self.agent is not None:
            with self.engine.gathered_params():
                trajs = run_agent(
                    self.policy, self.engine.module, self.task, mine or samples[:1],
                    max_new_tokens=e.max_new_tokens or self.cfg.rollout.max_new_tokens, batch_size=e.batch_size, device=self.device,
                )[: len(mine)]
            all_trajs = [t for chunk in self.engine.all_gather_object(trajs) for t in chunk]
            metrics = self.task.eval_trajectories(samples[: len(all_trajs)], all_trajs)
            return {f"eval/{k}": v for k, v in metrics.items()}
        state = torch.get_rng_state()
        with self.engine.gathered_params():
            texts = generate_greedy(
                self.policy, self.engine.module, mine or samples[:1],
                max_new_tokens=e.max_new_tokens or self.cfg.rollout.max_new_tokens,
                batch_size=e.batch_size, device=self.device,
            )[: len(mine)]
        torch.set_rng_state(state)
        all_texts = [t for chunk in self.engine.all_gather_object(texts) for t in chunk]
        metrics = self.task.eval_metrics(samples[: len(all_texts)], all_texts)
        return {f"eval/{k}": v for k, v in metrics.items()}

    # ------------------------------------------------------------------------------------------
    # checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {**super().trainer_state(), "last_kl": self.last_kl}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        super().load_trainer_state(state)
        self.last_kl = float(state["last_kl"])

    def save_final_model(self) -> None:
        """``model/``: a save_pretrained folder; with LoRA the adapter, plus ``model/merged/``."""
        if self.cfg.model.lora is not None:
            from mmpo.lora import save_lora

            merged, processor = self.cfg.model.lora.save_merged, self.policy.processor
            self.engine.save_pretrained(
                self.run_dir / "model",
                save_fn=lambda module, folder, state: save_lora(module, folder, processor, merged=merged, state_dict=state),
            )
        else:
            self.engine.save_pretrained(self.run_dir / "model")
            if self.engine.is_main:
                self.policy.processor.save_pretrained(self.run_dir / "model")

    # ------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        clock = StepClock()
        t0 = time.perf_counter()
        self.task.begin_step(step + 1, self.cfg.trainer.max_steps)
        beta = self._beta(step)
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
        if "kl" in metrics:
            self.last_kl = metrics["kl"]
        metrics.update(stats)
        metrics.update(
            {
                "reward_mean_trained": float(batch.rewards.mean()),
                "reward_std": float(batch.rewards.std()) if len(batch) > 1 else 0.0,
                "advantage_abs_mean": float(batch.advantages.abs().mean()),
                "response_length": float(batch.mask.sum(1).float().mean()),
                "truncated_frac": float(batch.truncated.float().mean()),
                "beta": beta,
                "lr": self.engine.lr(),
            }
        )
        kl_state = self.states.get("kl_schedule")
        if isinstance(kl_state, AresKLState):
            metrics.update({f"kl_beta/{b}": float(v) for b, v in kl_state.ensure_betas().items()})
        metrics.setdefault("kl", 0.0)  # KL to the reference; 0 when beta is 0 (no reference pass)
        metrics.update({"rollout_s": clock.rollout, "reward_s": clock.reward, "update_s": clock.update})
        metrics["step_time_s"] = time.perf_counter() - t0
        return self.reduce_metrics(metrics)

    def close(self) -> None:
        self.rollout_engine.close()


def _split(rows: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """``rows`` cut into ``parts`` contiguous, nearly equal chunks (some empty when rows < parts)."""
    sizes = [len(rows) // parts + (1 if i < len(rows) % parts else 0) for i in range(parts)]
    return list(torch.split(rows, sizes))
