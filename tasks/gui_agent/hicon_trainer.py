"""HCPO's trainer: the token trainer with two branches of one policy (HiconAgent, arXiv 2512.01763).

It overrides the token trainer's public hooks only: ``token_logprobs`` (which branch scores),
``reference_context`` (the reference scores the full prompt) and ``unit_terms`` (the two-branch
loss matrix); the update routine is the shared one.

- The rollout samples with the normal model (each rollout with its DCS prompt, see the task).
- The *compressed* branch scores the completions with the history screenshots' hidden states
  dropped at decoder layer ``task.ahc.drop_layer`` (``mmpo.policies.history_compression``); its
  log-probs at sampling time are pi_old, as in HiconAgent.
- The *uncompressed* branch is the normal model; the reference is the unmodified model (full
  prompt, no compression).
- Loss per token (``mmpo.core.hcpo``): PG_clip(pi_c) + PG(pi_u, ratio 1) + beta [KL(pi_c||ref) +
  KL(pi_u||ref) + alignment_coef KL(pi_c||sg(pi_u))], beta = ``algorithm.kl_options.beta``
  (HiconAgent: 0.01), aggregated by ``algorithm.loss_agg``.

Metrics add the forward time of the compressed and the full scoring pass inside the update
(``ahc/compressed_s``, ``ahc/full_s``, ``ahc/time_ratio``); ``mmpo bench ahc`` measures FLOPs and
time of both branches on a fixed prompt.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from mmpo.config import RunConfig
from mmpo.core import POLICY_LOSSES
from mmpo.core.hcpo import hcpo_loss
from mmpo.errors import ConfigError
from mmpo.rollout.batch import RolloutBatch
from mmpo.trainers.method_inputs import required_inputs
from mmpo.trainers.token import Trainer
from mmpo.trainers.update import UnitTerms


class HiconTrainer(Trainer):
    """See the module docstring."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path) -> None:
        super().__init__(cfg, run_dir)
        self.ahc = self.task.config.ahc
        if self.ahc.enabled:
            if not self.policy.is_vlm:
                raise ConfigError(
                    "task.ahc.enabled: history compression drops screenshot tokens; "
                    f"model.path={cfg.model.path!r} is text-only"
                )
            layers = self.engine.module.config.get_text_config().num_hidden_layers
            if not 0 <= self.ahc.drop_layer < layers:
                raise ConfigError(
                    f"task.ahc.drop_layer={self.ahc.drop_layer} must be below the model's {layers} decoder layers"
                )
        self._branch = "compressed" if self.ahc.enabled else "full"
        self._timing = {"compressed": 0.0, "full": 0.0}

    @classmethod
    def check_requirements(cls, cfg: RunConfig, task: Any) -> None:
        """As the token trainer's; HCPO composes both branches' losses itself from the policy loss, so
        a loss that reads more than log-probs and advantages (SimKO, HAPO, SRFT) is refused."""
        super().check_requirements(cfg, task)
        loss = cfg.algorithm.loss
        needs = required_inputs(POLICY_LOSSES.get(loss), cfg.algorithm.loss_options)
        if task.config.ahc.enabled and needs:
            raise ConfigError(
                f"algorithm.loss={loss!r} reads {', '.join(needs)}, which HCPO's two-branch loss "
                "(task.ahc.enabled) does not compute; use ppo_clip, gspo, dcpo or another log-prob loss"
            )

    def load_start_model(self) -> tuple[torch.nn.Module, Any, Any]:
        """``model.path``, after stage 1 when ``task.warm_start.enabled``: the supervised warm start
        (:func:`mmpo_tasks.gui_agent.warm_start.fit_reference_actions`), saved to ``<run>/sft/model``
        by rank 0 (every rank fits alike: same seed, data and order) and loaded from there when
        the run is launched again; its results are logged with the first evaluation as ``sft/*``."""
        from mmpo.checkpoint import latest_checkpoint
        from mmpo.models import load_model
        from mmpo.sft import SFT_DIR, save_warm_start
        from mmpo_tasks.gui_agent.warm_start import fit_reference_actions

        ws, cfg = self.task.config.warm_start, self.cfg
        if not ws.enabled:
            return super().load_start_model()
        out = self.run_dir / SFT_DIR / "model"
        if (out / "config.json").is_file():  # an earlier launch of this run finished stage 1
            return load_model(str(out), seed=cfg.seed, attn_implementation=cfg.model.attn_implementation)
        model, processor, info = super().load_start_model()
        if latest_checkpoint(self.run_dir) is not None:  # the checkpoint holds the trained weights
            return model, processor, info
        from mmpo.policies.causal_lm import CausalLMPolicy

        self.show_phase("stage 1 · warm start")
        policy = CausalLMPolicy.from_info(model, processor, info)
        t0 = time.perf_counter()
        self.sft_metrics = fit_reference_actions(self.task, policy, model, ws, cfg.seed)
        self.sft_metrics["sft_s"] = time.perf_counter() - t0
        if int(os.environ.get("RANK", "0")) == 0:
            save_warm_start(model, processor, str(out), self.sft_metrics)
        return model, processor, info

    @contextmanager
    def branch(self, name: str) -> Iterator[None]:
        """Score with the ``compressed`` or the ``full`` branch inside the block."""
        before, self._branch = self._branch, name
        try:
            yield
        finally:
            self._branch = before

    def token_logprobs(self, part: RolloutBatch, model: torch.nn.Module | None, with_entropy: bool) -> Any:
        if self._branch != "compressed":
            return super().token_logprobs(part, model, with_entropy)
        return self.policy.score(
            part.encodings,
            part.completion_ids,
            part.mask,
            share_prefix=False,
            model=model,
            temperature=self.cfg.rollout.temperature,
            with_entropy=with_entropy,
            device=self.device,
            compress_layer=self.ahc.drop_layer,
        )

    def reference_context(self) -> tuple[torch.nn.Module, Any]:
        model, ctx = super().reference_context()
        stack = ExitStack()
        stack.enter_context(ctx)
        stack.enter_context(self.branch("full"))  # the reference is the unmodified model
        return model, stack

    def unit_terms(self, micro: RolloutBatch, beta: float, padding: bool = False) -> UnitTerms:
        """HCPO's per-token loss of both branches (``mmpo.core.hcpo``) as the loss matrix; the
        update routine aggregates it and adds the entropy bonus of the sampling branch."""
        if not self.ahc.enabled:
            return super().unit_terms(micro, beta, padding)
        a = self.cfg.algorithm
        mask = micro.mask.to(self.device)
        with self.engine.autocast():
            t0 = time.perf_counter()
            comp = self.token_logprobs(micro, None, with_entropy=True)
            t1 = time.perf_counter()
            with self.branch("full"):
                full = self.token_logprobs(micro, None, with_entropy=False)
        self._timing["compressed"] += t1 - t0
        self._timing["full"] += time.perf_counter() - t1
        logp_old = micro.logp_old.to(self.device) if micro.logp_old is not None else comp.logp.detach()
        logp_ref = micro.logp_ref.to(self.device) if micro.logp_ref is not None else None
        advantages = micro.advantages.to(self.device)
        loss_mat, lm = hcpo_loss(
            comp.logp,
            full.logp,
            logp_old,
            advantages,
            mask,
            beta=beta,
            alignment_coef=self.ahc.alignment_coef,
            logp_ref=logp_ref,
            loss=self.algo.loss_fn,
            loss_options=a.loss_options,
            kl_estimator=self.algo.kl_estimator,
        )
        metrics = {k: float(v) for k, v in lm.items()}
        if "kl_c" in lm:
            metrics["kl"] = lm["kl_c"]  # KL of the sampling (compressed) branch to the reference
        return UnitTerms(
            comp.logp, logp_old, advantages, mask, entropy=comp.entropy, loss_matrix=loss_mat, metrics=metrics
        )

    def train_step(self, step: int) -> dict[str, float]:
        self._timing = {"compressed": 0.0, "full": 0.0}
        metrics = super().train_step(step)
        if self.ahc.enabled:
            metrics["ahc/compressed_s"] = self._timing["compressed"]
            metrics["ahc/full_s"] = self._timing["full"]
            if self._timing["full"] > 0:
                metrics["ahc/time_ratio"] = self._timing["compressed"] / self._timing["full"]
        return metrics


__all__ = ["HiconTrainer"]
