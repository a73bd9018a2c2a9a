"""The bench's model-FLOP accounting (mmpo.bench_shapes) against hand counts and real models."""

from __future__ import annotations

import json

import pytest
import torch

from mmpo.bench_shapes import SHAPES, ModelDims, matmul_peak_gflops, step_flops
from mmpo.models import ensure_tiny, load_model


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_dims_count_the_models_matmul_weights(kind):
    folder = ensure_tiny(kind)
    dims = ModelDims.from_config(json.loads((folder / "config.json").read_text()))
    model, _, _ = load_model(str(folder))
    names = dict(model.named_parameters())
    text = sum(p.numel() for n, p in names.items() if p.ndim == 2 and ".layers." in n and "visual" not in n)
    assert dims.layer_params * dims.layers == text
    assert dims.vocab == model.get_output_embeddings().weight.shape[0]
    if kind == "qwen2_vl":
        # every vision matmul weight once per patch; the merger's weights act once per 4 patches
        vis = {n: p.numel() for n, p in names.items() if "visual" in n and p.ndim >= 2}
        merger = sum(v for n, v in vis.items() if "merger" in n)
        assert dims.vision_params == sum(vis.values()) - merger + merger // 4
        assert dims.vision_attn == 2 * 64  # depth x width of the tiny tower


def test_step_flops_by_hand():
    dims = ModelDims(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10)
    # per layer: q, o 2*8*8 = 128; k, v 2*8*4 = 64; MLP 3*8*16 = 384 -> 576 weights
    assert dims.layer_params == 576
    out = step_flops(dims, rows=3, prompt_tokens=5, completion_tokens=2, reference=True)
    S = 7
    text = 2 * 576 * 2 * S + 2 * 8 * 10 * 2 + 2 * 2 * 2 * 2 * 4 * S * (S + 1) / 2
    assert out["sampling"] == pytest.approx(3 * text)
    assert out["reference"] == pytest.approx(3 * text)
    assert out["policy"] == pytest.approx(3 * 3 * text)  # forward + 2x backward
    assert out["total"] == pytest.approx(5 * 3 * text)
    lora = step_flops(dims, rows=3, prompt_tokens=5, completion_tokens=2, lora=True)
    assert lora["policy"] == pytest.approx(2 * 3 * text) and lora["reference"] == 0.0


def test_real_shapes_are_the_published_dimensions():
    half = SHAPES["text-0.5b"].sizes  # Qwen2.5-0.5B
    assert (half["hidden_size"], half["num_hidden_layers"], half["model_vocab_size"]) == (896, 24, 151936)
    two = SHAPES["vlm-2b-lora"]  # Qwen2-VL-2B
    assert (two.sizes["hidden_size"], two.sizes["num_hidden_layers"], two.sizes["vision_depth"]) == (1536, 28, 32)
    assert (two.lora_r, two.precision, two.image_size) == (16, "bf16", 448)
    assert SHAPES["text-0.5b"].max_new_tokens >= 64 and two.max_new_tokens >= 64


def test_matmul_peak_is_measured_and_restores_threads():
    before = torch.get_num_threads()
    assert matmul_peak_gflops(1, "fp32", n=256, repeats=2) > 0
    assert torch.get_num_threads() == before
