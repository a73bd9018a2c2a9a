"""``model.frozen_dtype: bf16``: frozen weights (LoRA's base, the reference copy) held in bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpo.config import load_config
from mmpo.errors import ConfigError
from mmpo.trainers import trainer_class_for

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
SMALL = [
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "algorithm.dynamic_sampling=false",
    "trainer.update_epochs=1",
    "trainer.eval_at_start=false",
    "eval.num_samples=0",
    "precision=bf16",
    "model.frozen_dtype=bf16",
]


def _trainer(tmp_path: Path, *extra: str):
    cfg = load_config(QUICK, [*SMALL, f"output_dir={tmp_path / 'run'}", *extra])
    return trainer_class_for(cfg.task.name)(cfg, tmp_path / "run")


def test_needs_bf16_precision_and_no_deepspeed():
    with pytest.raises(ConfigError, match=r"model\.frozen_dtype.*precision: bf16"):
        load_config(QUICK, ["model.frozen_dtype=bf16", "precision=fp32"])
    with pytest.raises(ConfigError, match=r"model\.frozen_dtype.*precision: bf16"):
        load_config(QUICK, ["model.frozen_dtype=bf16"])  # auto is fp32 on a CPU
    with pytest.raises(ConfigError, match=r"model\.frozen_dtype.*deepspeed"):
        load_config(QUICK, ["model.frozen_dtype=bf16", "precision=bf16", "deepspeed=configs/deepspeed/zero2.json"])


def test_refused_by_trainers_that_do_not_cast(tmp_path):
    cfg = load_config(
        str(ROOT / "configs" / "diffusion_demo.yaml"),
        ["precision=bf16", "model.frozen_dtype=bf16", f"output_dir={tmp_path}"],
    )
    with pytest.raises(ConfigError, match=r"model\.frozen_dtype"):
        trainer_class_for(cfg.task.name)(cfg, tmp_path)


def test_lora_base_in_bf16_adapters_fp32_and_a_step_trains(tmp_path):
    trainer = _trainer(tmp_path, "model.lora={r: 4, alpha: 8}")
    params = dict(trainer.engine.module.named_parameters())
    frozen = {n: p.dtype for n, p in params.items() if not p.requires_grad and p.is_floating_point()}
    trained = {n: p.dtype for n, p in params.items() if p.requires_grad}
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    assert trained and set(trained.values()) == {torch.float32}
    watched = [p for p in params.values() if p.requires_grad][-1]
    before = watched.detach().clone()
    metrics = trainer.train_step(0)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert (watched.detach() - before).abs().max() > 0
    # sampling runs under the same bf16 autocast as the log-prob pass: their log-probs stay close
    assert metrics["rollout/logprob_abs_diff"] < 0.05


def test_full_finetuning_keeps_trained_weights_fp32_and_the_reference_bf16(tmp_path):
    trainer = _trainer(tmp_path, "algorithm.kl_options={beta: 0.04}")
    assert all(p.dtype == torch.float32 for p in trainer.engine.module.parameters())
    assert trainer.ref_model is not None
    assert {p.dtype for p in trainer.ref_model.parameters()} == {torch.bfloat16}
    metrics = trainer.train_step(0)
    assert torch.isfinite(torch.tensor(metrics["kl"]))
