"""Chunk-GRPO's chunk ratio inside the trainer: a chunk's ratio is the geometric mean of its steps'
ratios, ``exp(mean_t (logp_new_t - logp_old_t))``, fed to the clipped surrogate; chunk size 1
(flow_grpo) is the per-step ratio. Trainers built from the recipes with tiny overrides; the
per-step log-probs are recomputed here with ``policy.step``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpo.config import load_config
from mmpo.core.kl import gaussian_kl
from mmpo.trainers.denoising import ChunkGRPOTrainer

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    f"task.prompts={ROOT / 'configs/prompts/colors.jsonl'}",
    f"task.eval_prompts={ROOT / 'configs/prompts/colors_eval.jsonl'}",
]
SMALL = ["rollout.group_size=3", "rollout.prompts_per_step=1", "eval.num_samples=1", "task.sampling.eval_num_steps=2"]


def _trainer(recipe: str, run: Path, *extra: str) -> ChunkGRPOTrainer:
    cfg = load_config(ROOT / "configs" / recipe, [*PROMPTS, *SMALL, *extra])
    trainer = ChunkGRPOTrainer(cfg, run)
    trainer.tracker.close()
    return trainer


def _perturb(module: torch.nn.Module, scale: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _step_logps(trainer, batch, start: int, end: int) -> torch.Tensor:
    """logp_new of the stored transitions ``[N, end - start]`` under the current weights (with grad)."""
    lat = batch.traj.latents
    return torch.stack(
        [
            trainer.policy.step(
                trainer.engine.module, lat[:, i], trainer.schedule, i, batch.cond, prev_sample=lat[:, i + 1]
            ).log_prob
            for i in range(start, end)
        ],
        1,
    )


def _ppo_clip(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high)).mean()


@pytest.fixture(scope="module")
def chunk(tmp_path_factory):
    """chunk_grpo (tiny Flux) over 5 steps in chunks [2, 3]; one rollout, then perturbed weights."""
    trainer = _trainer(
        "chunk_grpo.yaml", tmp_path_factory.mktemp("chunk"), "task.sampling.num_steps=5", "task.chunks.sizes=[2,3]"
    )
    batch, _ = trainer.rollout()
    _perturb(trainer.engine.module, 0.05)
    return trainer, batch


def test_chunk_grpo_recipe_partition_and_trained_chunks(chunk):
    trainer, batch = chunk
    assert trainer.model.family == "flux"
    assert trainer.partition() == [2, 3]
    assert trainer._trained_chunks(0) == [(0, 2), (2, 5)]
    assert batch.traj.log_probs.shape == (3, 5)


@pytest.mark.parametrize("start, end", [(0, 2), (2, 5)])
def test_chunk_ratio_is_the_geometric_mean_of_the_step_ratios(chunk, start, end):
    trainer, batch = chunk
    rows = torch.arange(len(batch.rows))
    with torch.no_grad():
        loss, metrics = trainer._chunk_loss(batch, rows, start, end)
        log_r = _step_logps(trainer, batch, start, end) - batch.traj.log_probs[:, start:end]
    r_chunk = log_r.mean(1).exp()
    opts = trainer.cfg.algorithm.loss_options
    expected = _ppo_clip(r_chunk, batch.advantages, opts["eps_low"], opts["eps_high"])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert metrics["ratio_mean"] == pytest.approx(float(r_chunk.mean()), abs=1e-6)
    assert metrics["ppo_kl"] == pytest.approx(float(-log_r.mean(1).mean()), abs=1e-6)
    # the perturbation moved the step ratios by more than the clip range: a product of the step
    # ratios would not match; in the long chunk the steps' ratios differ enough that their
    # arithmetic mean would not match either
    assert log_r.abs().max() > 1e-3
    assert abs(float(log_r.sum(1).exp().mean()) - metrics["ratio_mean"]) > 1e-3
    if end - start == 3:
        assert abs(float(log_r.exp().mean(1).mean()) - metrics["ratio_mean"]) > 1e-4


def test_chunk_loss_gradient_is_the_geometric_mean_ratios_gradient(chunk):
    """With a clip range no ratio reaches, the loss is -mean(A r_chunk): its gradient must be that of
    the geometric-mean ratio built here from per-step log-probs."""
    trainer, batch = chunk
    module = trainer.engine.module
    rows = torch.arange(len(batch.rows))
    opts = trainer.cfg.algorithm.loss_options
    saved = dict(opts)
    opts.update(eps_low=0.9, eps_high=10.0)
    try:
        module.zero_grad(set_to_none=True)
        loss, metrics = trainer._chunk_loss(batch, rows, 2, 5)
        loss.backward()
        ours = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        module.zero_grad(set_to_none=True)
        log_r = _step_logps(trainer, batch, 2, 5) - batch.traj.log_probs[:, 2:5]
        mine = -(batch.advantages * log_r.mean(1).exp()).mean()
        mine.backward()
        theirs = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    finally:
        opts.clear()
        opts.update(saved)
        module.zero_grad(set_to_none=True)
    assert metrics["clip_frac"] == 0.0
    torch.testing.assert_close(loss.detach(), mine.detach(), rtol=1e-5, atol=1e-7)
    assert ours.keys() == theirs.keys() and len(ours) > 10
    total = sum(float(g.abs().sum()) for g in theirs.values())
    assert total > 0
    for n, grad in ours.items():
        torch.testing.assert_close(grad, theirs[n], rtol=1e-4, atol=1e-7, msg=n)


def test_flow_grpo_chunk_size_one_gives_per_step_ratios_and_the_kl(tmp_path):
    """flow_grpo (tiny SD3, CFG, beta 0.04): every step is its own unit with ratio
    exp(logp_new - logp_old), timestep_fraction 0.99 leaves the last step out, and the KL term is
    |mu - mu_ref|^2 / (2 sigma_t^2) against the frozen copy."""
    trainer = _trainer(
        "flow_grpo.yaml", tmp_path, "task.sampling.num_steps=3", "task.sampling.height=16", "task.sampling.width=16"
    )
    assert trainer.model.family == "sd3" and trainer.ref is not None and trainer.beta(0) == pytest.approx(0.04)
    assert trainer.partition() == [1, 1, 1]
    assert trainer._trained_chunks(0) == [(0, 1), (1, 2)]  # int(3 * 0.99) = 2 trained steps
    batch, _ = trainer.rollout()
    _perturb(trainer.engine.module, 0.05, seed=1)
    rows = torch.arange(len(batch.rows))
    opts = trainer.cfg.algorithm.loss_options
    lat = batch.traj.latents
    for i in (0, 1):
        with torch.no_grad():
            loss, metrics = trainer._chunk_loss(batch, rows, i, i + 1)
            step = (lat[:, i], trainer.schedule, i, batch.cond)
            out = trainer.policy.step(trainer.engine.module, *step, prev_sample=lat[:, i + 1])
            ref = trainer.policy.step(trainer.ref, *step, prev_sample=lat[:, i + 1])
        r = (out.log_prob - batch.traj.log_probs[:, i]).exp()
        kl = ((out.mean - ref.mean) ** 2).flatten(1).mean(1) / (2 * out.kl_sigma**2)
        torch.testing.assert_close(kl, gaussian_kl(out.mean[:, None], ref.mean[:, None], out.kl_sigma)[:, 0])
        assert float(kl.mean()) > 0
        pg = _ppo_clip(r, batch.advantages, opts["eps_low"], opts["eps_high"])
        assert metrics["ratio_mean"] == pytest.approx(float(r.mean()), abs=1e-6)
        assert metrics["pg_loss"] == pytest.approx(float(pg), rel=1e-5, abs=1e-8)
        assert metrics["kl"] == pytest.approx(float(kl.mean()), rel=1e-5)
        torch.testing.assert_close(loss, pg + 0.04 * kl.mean(), rtol=1e-5, atol=1e-8)
