"""The token trainer's side of the GRPO-family methods that need more than rewards
(see ``docs/algorithms.md``): one object per run that knows what the configured objective reads
and computes exactly that.

- the old-policy pass: pi_old's log-probs, entropies (GTPO, GRPO-S, D3S, HAPO's sampler
  statistics), top-K log-probs (SimKO) and CAPO's curvature statistics, in one forward;
- the advantage inputs (:func:`advantage_inputs`), the loss inputs (:func:`loss_inputs`);
- the demonstration rows (SRFT) and the demonstration reward and data hardness (DR-IRL);
- Spectral PO's judge, asked only about the rows of all-negative groups;
- CAPO's curvature mask, after the advantage;
- HAPO's adaptive temperature: the sampler's per-row temperature from the last step's statistics.

Stateful pieces (HAPO's statistics, the hardness cache) live in ``trainer.states``, so checkpoints
keep them and a resumed run continues exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mmpo.core import GROUP_FILTERS
from mmpo.core.entropy import token_entropy
from mmpo.policies.packing import check_padding_free
from mmpo.rollout.batch import RolloutBatch
from mmpo.rollout.engines.base import GenerationSettings
from mmpo.trainers.token_inputs import (
    cluster_ids,
    components_matrix,
    demonstration_rows,
    per_row,
    prompt_text,
    score_rows,
)
from mmpo.trainers.token_tree import check_tree, tree_method

if TYPE_CHECKING:
    from mmpo.policies.causal_lm import TokenLogProbs


def _filter(cfg: Any, name: str) -> dict[str, Any] | None:
    for item in cfg.algorithm.filters:
        if item["name"] == name:
            return {k: v for k, v in item.items() if k != "name"}
    return None


def check_token_methods(cfg: Any, task: Any) -> None:
    """Refuse at load the method settings the token trainer cannot honour with this task/rollout."""
    from mmpo.core import ADVANTAGES, POLICY_LOSSES
    from mmpo.errors import ConfigError
    from mmpo.trainers.method_inputs import FROM_DEMONSTRATIONS, required_inputs

    a = cfg.algorithm
    needs = set(required_inputs(ADVANTAGES.get(a.advantage), a.advantage_options))
    needs |= set(required_inputs(POLICY_LOSSES.get(a.loss), a.loss_options))
    multi_turn = bool(task.tools())
    if needs & set(FROM_DEMONSTRATIONS) and multi_turn:
        raise ConfigError(
            f"algorithm.advantage={a.advantage!r} / algorithm.loss={a.loss!r} read demonstrations, which the "
            f"token trainer writes as single-turn completions; task {task.name!r} runs multi-turn tool rollouts"
        )
    if "demo" in needs and cfg.rollout.is_correction != "none":
        raise ConfigError(
            f"rollout.is_correction={cfg.rollout.is_correction!r} with algorithm.loss={a.loss!r}: demonstration "
            "rows were not sampled, so they have no sampling log-probs to correct against (set is_correction: none)"
        )
    check_tree(cfg, task)
    check_padding_free(cfg, multi_turn)
    if cfg.rollout.adaptive_temperature is not None and (multi_turn or tree_method(cfg) is not None):
        raise ConfigError(
            f"rollout.adaptive_temperature: task {task.name!r} runs multi-turn tool rollouts or rollout.tree is set; "
            "their loops sample at rollout.temperature (adaptive temperature is for plain single-turn rollouts)"
        )


class TokenMethods:
    """What the configured objective reads, built once per run (judge, encoder, statistics)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        cfg, algo = trainer.cfg, trainer.algo
        self.cfg, self.algo, self.task = cfg, algo, trainer.task
        self.adv_names = set(algo.advantage_inputs)
        self.loss_names = set(algo.loss_inputs)
        self.topk = algo.topk
        self.capo = _filter(cfg, "capo")
        self.d3s = _filter(cfg, "d3s") is not None
        self.srft = "demo" in self.loss_names
        self.rejected_frac: float | None = None  # CAPO's share of rejected tokens this step
        self.judge = None
        if "judge_scores" in self.adv_names:
            from mmpo.rewards.judge import build_judge

            self.judge = build_judge(cfg.algorithm.advantage_options.get("judge"), self.task)
        if "data_hardness" in self.adv_names:
            from mmpo.rewards.hardness import HardnessCache

            trainer.states["hardness"] = HardnessCache(cfg.algorithm.advantage_options.get("encoder", "hashed"))
        self.adaptive = cfg.rollout.adaptive_temperature
        if self.adaptive is not None:
            from mmpo.core.hapo import HapoEntropyStats

            trainer.states["adaptive_temperature"] = HapoEntropyStats()

    # -- sampling --------------------------------------------------------------------------------
    def settings(self, settings: GenerationSettings) -> GenerationSettings:
        """``settings`` with HAPO's per-row temperature once statistics exist (the first step
        samples at ``rollout.temperature``)."""
        if self.adaptive is None:
            return settings
        from mmpo.core.hapo import adaptive_temperature, apply_hapo_stats

        stats = self.trainer.states["adaptive_temperature"]
        if not stats.ready:
            return settings
        tau, sign = float(self.adaptive.get("tau", 0.05)), self.adaptive.get("sign_mode", "intended")
        t0 = settings.temperature

        def temperature(logits: torch.Tensor) -> torch.Tensor:
            h_hat = apply_hapo_stats(token_entropy(logits), stats, sign_mode=sign)
            return adaptive_temperature(h_hat, t0, tau)

        settings.temperature_fn = temperature
        return settings

    # -- before the advantage --------------------------------------------------------------------
    def add_demonstrations(self, batch: RolloutBatch) -> RolloutBatch:
        """SRFT: the demonstration of each group's prompt joins the group (``row_info['demo']``)."""
        if not self.srft or len(batch) == 0:
            return batch
        demos = demonstration_rows(self.trainer, batch)
        if demos is None:
            return batch
        batch.row_info["demo"] = torch.zeros(len(batch), dtype=torch.bool)
        for k, v in demos.row_info.items():
            if k != "demo" and k not in batch.row_info:
                raise ValueError(f"demonstration rows carry row info {k!r} that the rollouts lack")
        demos.row_info = {k: demos.row_info[k] for k in batch.row_info}
        demos.rollout_index.fill_(self.cfg.rollout.group_size)
        batch.logp_rollout = None  # demonstrations were not sampled (is_correction is refused with srft)
        return RolloutBatch.concat([batch, demos], self.trainer.policy.pad_token_id)

    def old_pass(self, batch: RolloutBatch, needs_logp: bool) -> None:
        """pi_old's log-probs and what the objective reads of them, in one forward, when anything
        needs it (``needs_logp``: several epochs or minibatches)."""
        entropy = "entropy" in self.adv_names or self.d3s or self.adaptive is not None
        topk = self.topk
        curvature = self.capo is not None
        if not (needs_logp or entropy or curvature or "seq_logp" in self.adv_names):
            return
        out = score_rows(
            self.trainer, batch, self.trainer.engine.module, entropy=entropy, topk=topk, curvature=curvature
        )
        batch.logp_old = out.logp
        if entropy:
            batch.entropy_old = out.entropy
        if topk:
            batch.row_info["old_topk_logp"] = out.topk_logp
        if curvature:
            batch.row_info["curvature"] = out.curvature
        if self.adaptive is not None and len(batch):
            from mmpo.core.hapo import hapo_normalize

            _, stats = hapo_normalize(
                out.entropy,
                batch.mask,
                pivot=float(self.adaptive.get("pivot", 0.8)),
                sign_mode=self.adaptive.get("sign_mode", "intended"),
            )
            self.trainer.states["adaptive_temperature"].load_state_dict(stats.state_dict())

    def advantage_inputs(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """The tensors ``algorithm.advantage`` declares, for this rank's rows."""
        mask = batch.mask.bool()
        out: dict[str, torch.Tensor] = {}
        for name in self.adv_names:
            if name == "mask":
                out[name] = mask
            elif name == "lengths":
                out[name] = mask.sum(1).float()
            elif name == "entropy":
                out[name] = batch.entropy_old
            elif name == "seq_logp":
                out[name] = torch.where(mask, batch.logp_old, torch.zeros_like(batch.logp_old)).sum(1)
            elif name == "cluster_ids":
                out[name] = cluster_ids(self.task, batch)
            elif name == "components":
                out[name] = components_matrix(batch)
            elif name == "judge_scores":
                out[name] = self._judge_scores(batch)
            elif name in ("demo_reward", "data_hardness"):
                out.update(self._demonstration_inputs(batch))
            else:
                out[name] = batch.row_info[name]
        return out

    def _judge_scores(self, batch: RolloutBatch) -> torch.Tensor:
        """Spectral PO: the judge's partial credit ``[N]`` of the rows of all-negative groups (NaN
        elsewhere, and where the judge failed)."""
        from mmpo.core.shaped_advantages import all_negative_groups

        r_thr = float(self.cfg.algorithm.advantage_options.get("r_thr", 0.0))
        scores = torch.full((len(batch),), float("nan"))
        rows = torch.nonzero(all_negative_groups(batch.rewards, batch.group_ids, r_thr)).flatten().tolist()
        if rows and self.judge is not None:
            got = self.judge.score(
                [prompt_text(batch.samples[i]) for i in rows],
                [batch.texts[i] for i in rows],
                [None if batch.samples[i].answer is None else str(batch.samples[i].answer) for i in rows],
                samples=[batch.samples[i] for i in rows],
            )
            scores[rows] = got.float()
        return scores

    def _demonstration_inputs(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """DR-IRL: each row's ``demo_reward`` (the task's reward of its prompt's demonstration) and
        ``data_hardness`` (the encoder's distance between prompt and demonstration, cached by
        sample id); NaN and 0 for a prompt without a demonstration."""
        demos = demonstration_rows(self.trainer, batch)
        n = len(batch)
        if demos is None:
            return {"demo_reward": torch.full((n,), float("nan")), "data_hardness": torch.zeros(n)}
        cache = self.trainer.states["hardness"]  # by sample id: computed once per prompt, checkpointed
        ids = [str(s.id) for s in demos.samples]
        hardness = cache(ids, [prompt_text(s) for s in demos.samples], demos.texts).float()
        return {
            "demo_reward": per_row(demos.rewards, demos.group_ids, batch.group_ids, float("nan")),
            "data_hardness": per_row(hardness, demos.group_ids, batch.group_ids, 0.0),
        }

    # -- after the advantage ---------------------------------------------------------------------
    def curvature_mask(self, batch: RolloutBatch) -> RolloutBatch:
        """CAPO: tokens (or rows) whose predicted policy shift is too large leave the mask."""
        if self.capo is None or len(batch) == 0:
            return batch
        from mmpo.core.capo import curvature_kl

        opts = dict(self.capo)
        lr = float(opts.pop("lr", self.trainer.engine.lr()))
        stats = batch.row_info.pop("curvature")
        kl_hat = curvature_kl(stats[..., 0], stats[..., 1], stats[..., 2], stats[..., 3], batch.advantages, None, lr)
        keep = GROUP_FILTERS.get("capo")(kl_hat, batch.mask, **opts)
        before = batch.mask.bool()
        batch.mask = before & keep
        self.rejected_frac = float((~keep & before).sum()) / max(1, int(before.sum()))
        return batch

    def step_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        """What the methods measured this step: CAPO's rejected share, SRFT's demonstration rows,
        HAPO's sampler statistics."""
        out: dict[str, float] = {}
        if self.rejected_frac is not None:
            out["capo/rejected_frac"] = self.rejected_frac
        if self.srft:
            demo = batch.row_info.get("demo")
            out["srft/demo_rows"] = float(demo.sum()) if demo is not None else 0.0
        if self.adaptive is not None:
            stats = self.trainer.states["adaptive_temperature"]
            out["hapo/entropy_pivot"] = float(stats.mu) if stats.ready else 0.0
        return out

    # -- the update --------------------------------------------------------------------------------
    def score_extras(self) -> dict[str, Any]:
        """Extra outputs the training forward must give (``token_logprobs`` keywords)."""
        return {"topk": self.topk} if self.topk else {}

    def loss_inputs(self, micro: RolloutBatch, out: TokenLogProbs) -> dict[str, torch.Tensor]:
        """The tensors ``algorithm.loss`` declares, for one micro batch (on the trainer's device)."""
        device = out.logp.device
        given: dict[str, torch.Tensor] = {}
        if self.cfg.algorithm.credit_once:  # the update merges the rows' shared tokens by their nodes
            given["token_node"] = micro.row_info["token_node"].to(device)
        for name in self.loss_names:
            if name == "entropy":
                given[name] = out.entropy.detach()
            elif name == "topk_logp":
                given[name] = out.topk_logp
            elif name == "old_topk_logp":
                old = micro.row_info.get("old_topk_logp")
                given[name] = out.topk_logp.detach() if old is None else old.to(device)
            elif name == "is_top1":
                given[name] = out.is_top1
            elif name == "rewards":
                given[name] = micro.rewards.to(device)
            elif name == "demo":
                demo = micro.row_info.get("demo")
                given[name] = (torch.zeros(len(micro), dtype=torch.bool) if demo is None else demo).to(device)
        return given


__all__ = ["TokenMethods", "check_token_methods"]
