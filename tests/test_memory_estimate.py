"""The memory estimate before the run (mmpo.memory_estimate, mmpo.memory_fit, `mmpo bench --estimate`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpo.cli import main
from mmpo.config import LoraConfig, load_config
from mmpo.memory_estimate import GiB, act_per_token_layer, estimate_memory
from mmpo.memory_fit import first_fit, format_table, train_warning
from mmpo.memory_shapes import _tiny_shape

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
PATHO = str(ROOT / "configs" / "patho_r1_grpo.yaml")
#: the Qwen2.5-VL-3B shape of tests/gpu/patho_r1_realistic.sh
SIZES_3B = (
    "{hidden_size: 2048, intermediate_size: 11008, num_hidden_layers: 36, num_attention_heads: 16,"
    " num_key_value_heads: 2, model_vocab_size: 151936, tie_word_embeddings: true, mrope_section: [16, 24, 24],"
    " vision_depth: 32, vision_embed_dim: 1280, vision_num_heads: 16, vision_intermediate_size: 3420,"
    " max_pixels: 12845056}"
)
PATHO_3B = [
    f"model.tiny={SIZES_3B}",
    "precision=bf16",
    "task.min_pixels=200704",
    "task.max_pixels=200704",
    "rollout.max_new_tokens=128",
    "eval.num_samples=0",
]


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("qwen2", {}),
        ("qwen3", {"head_dim": 48}),
        ("qwen2_vl", {"tie_word_embeddings": True}),
        ("qwen2_5_vl", {"hidden_size": 128, "vision_depth": 3}),
    ],
)
def test_param_count_from_shapes_equals_built_model(kind, overrides):
    from mmpo.tiny import build_tiny

    model, _ = build_tiny(kind, **overrides)
    shape = _tiny_shape(kind, overrides)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    if shape.is_vlm:
        assert shape.vision_params() == sum(p.numel() for p in model.model.visual.parameters())


def test_optimizer_gradients_and_zero_division():
    cfg = load_config(QUICK, ["algorithm.kl_options.beta=0.0"])
    est = estimate_memory(cfg, device="cpu", world_size=1)
    n = est.settings["params"]
    upd = {p.name: p for p in est.phases}["update"].components
    assert upd["optimizer states (AdamW)"] == 8 * n  # exp_avg + exp_avg_sq in fp32
    assert upd["gradients"] == 4 * n and upd["weights"] == 4 * n
    assert "reference model copy" not in upd  # beta 0: no reference
    zero2 = load_config(QUICK, [f"deepspeed={ROOT / 'configs/deepspeed/zero2.json'}", "precision=bf16"])
    z = {p.name: p for p in estimate_memory(zero2, device="cuda", world_size=4).phases}["update"].components
    assert z["weights"] == 2 * n  # the bf16 module, whole on every rank below stage 3
    assert z["optimizer states (AdamW + fp32 master)"] == 12 * n // 4
    assert z["gradients"] == 2 * n // 4 + 4 * n // 4  # bf16 partition + its fp32 copy
    zero3 = load_config(QUICK, [f"deepspeed={ROOT / 'configs/deepspeed/zero3.json'}", "precision=bf16"])
    z3 = {p.name: p for p in estimate_memory(zero3, device="cuda", world_size=4).phases}["update"].components
    assert z3["weights"] == 2 * n // 4


def test_lora_trainable_count_matches_peft():
    from mmpo.lora import apply_lora
    from mmpo.tiny import build_tiny

    targets = ["q_proj", "v_proj", "down_proj"]
    cfg = load_config(QUICK, [f"model.lora={{r: 4, target_modules: {targets}, vision: lora}}"])
    est = estimate_memory(cfg, device="cpu")
    model, _ = build_tiny("qwen2_vl", initializer_range=0.1, head_init_std=0.01)
    wrapped = apply_lora(model, LoraConfig(r=4, target_modules=targets, vision="lora"), is_vlm=True)
    assert est.settings["trainable_params"] == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def test_activation_bytes_per_token_formula():
    # h=1024, i=5504, kv=128: measured with saved_tensors_hooks on a Qwen2 layer (fp32 121,896 B/token)
    assert abs(act_per_token_layer(1024, 5504, 128, "fp32") - 121_896) / 121_896 < 0.01
    assert abs(act_per_token_layer(1024, 5504, 128, "autocast") - 75_304) / 75_304 < 0.01


def test_patho_3b_default_micro_batch_is_flagged_and_a_fit_is_named():
    cfg = load_config(PATHO, PATHO_3B)
    capacity = 139 * GiB
    est = estimate_memory(cfg, device="cuda", world_size=1)
    assert est.settings["micro_batch_size"] == 64 and est.peak > capacity
    assert est.peak_phase == "update"
    fit = first_fit(cfg, capacity, device="cuda", world_size=1)
    assert fit is not None and fit[1].peak <= capacity
    assert any(o.startswith("trainer.micro_batch_size=") for o in fit[0])
    # the setting of tests/gpu/patho_r1_realistic.sh (micro batch 8, checkpointing) fits
    ok = load_config(PATHO, PATHO_3B + ["trainer.micro_batch_size=8", "model.gradient_checkpointing=true"])
    assert estimate_memory(ok, device="cuda", world_size=1).peak < capacity
    assert "does not fit" in format_table(est, capacity, fit)


def test_cli_estimate_json(capsys):
    assert main(["bench", "--estimate", QUICK, "--json", "--device-memory", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "cuda" and out["fits"] is (out["peak_bytes"] <= 0.5 * GiB)
    assert set(out["phases"]) >= {"rollout", "update"}


def test_train_warning_says_no_estimate_for_other_kinds():
    cfg = load_config(str(ROOT / "configs" / "diffusion_demo.yaml"))
    text = train_warning(cfg)
    assert text is not None and text.startswith("warning: no memory estimate (")


def _measured_peak(over: list[str]) -> float:
    """Peak RSS (bytes, highest phase) of `mmpo bench` in a fresh process: a test worker's RSS
    carries what earlier tests left."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mmpo", "bench", QUICK, *over, "--steps", "1", "--warmup", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    row = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    return max(row["peak_mb"].values()) * 2**20


@pytest.mark.slow
def test_estimate_within_20_percent_of_measured_cpu_peak():
    """What the estimate models (weights, optimizer, activations, logits, caches) against what a run
    adds: two sizes of the same recipe, so the process baseline (imports, allocator; it differs
    between installs) cancels."""
    common = [
        "rollout.group_size=4",
        "rollout.prompts_per_step=2",
        "rollout.max_new_tokens=16",
        "algorithm.dynamic_sampling=false",
        "eval.num_samples=0",
        "device=cpu",
    ]
    sizes = {
        "small": "{hidden_size: 256, intermediate_size: 512, num_hidden_layers: 2, num_attention_heads: 4,"
        " num_key_value_heads: 2, initializer_range: 0.1, head_init_std: 0.01}",
        "large": "{hidden_size: 768, intermediate_size: 2048, num_hidden_layers: 6, num_attention_heads: 12,"
        " num_key_value_heads: 2, initializer_range: 0.1, head_init_std: 0.01}",
    }
    est, measured = {}, {}
    for name, tiny in sizes.items():
        over = [f"model.tiny={tiny}", *common]
        est[name] = estimate_memory(load_config(QUICK, over), device="cpu", prompt_tokens=60).peak
        measured[name] = _measured_peak(over)
    grown_est, grown = est["large"] - est["small"], measured["large"] - measured["small"]
    assert grown > 0.3 * GiB  # the larger model really costs more
    assert abs(grown_est - grown) / grown < 0.20, (grown_est / GiB, grown / GiB)
