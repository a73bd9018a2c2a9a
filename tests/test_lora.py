"""LoRA on the tiny VLMs: adapter placement per model.lora.vision, saving (adapter + merged), loading, eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmpo.cli import main
from mmpo.config import LoraConfig, load_config
from mmpo.errors import ConfigError
from mmpo.lora import apply_lora, freeze_vision_tower, save_lora, vision_tower_prefix
from mmpo.models import load_model
from mmpo.policies.causal_lm import CausalLMPolicy

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _image_inputs(model, processor, info) -> dict[str, torch.Tensor]:
    """One chat prompt with a 56x56 image: input_ids [1, P], pixel_values [patches, dim], ..."""
    pol = CausalLMPolicy.from_info(model, processor, info)
    img = Image.new("RGB", (56, 56), (200, 30, 30))
    return pol.encode(
        [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Colour?"}]}]
    )


def _lora_modules(model) -> set[str]:
    """Names (relative to the base model) of modules that carry a LoRA adapter."""
    return {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }


def _backward(model, inputs) -> None:
    model.zero_grad(set_to_none=True)
    out = model(**inputs).logits  # [1, P, V]
    out.float().pow(2).mean().backward()


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_tower_frozen_by_default_adapters_only_in_language_model(kind):
    model, proc, info = load_model(f"tiny:{kind}")
    prefix = vision_tower_prefix(model)
    assert prefix == "model.visual"
    # the expected adapter set: every module named like a target, outside the vision tower
    # (Qwen2.5-VL's vision MLP also has gate/up/down_proj: those must stay without adapters)
    expected = {
        n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ALL_PROJ and not n.startswith(prefix + ".")
    }
    vision_named = {
        n for n, _ in model.named_modules() if n.startswith(prefix + ".") and n.rsplit(".", 1)[-1] in ALL_PROJ
    }
    assert all(n.startswith("model.language_model.") for n in expected)
    assert (kind == "qwen2_5_vl") == bool(vision_named)
    pm = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=ALL_PROJ), is_vlm=True)
    assert pm.peft_config["default"].lora_alpha == 8
    assert _lora_modules(pm) == expected
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(expected)
    _backward(pm, _image_inputs(pm, proc, info))
    for n, p in pm.named_parameters():
        if ".visual." in n:
            assert not p.requires_grad and p.grad is None, n
    # lora_B starts at zero, so d/dB is A x, which is non-zero: the adapters are in the forward path
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if ".lora_B." in n)


def test_vision_lora_puts_adapters_in_the_vision_blocks_too():
    model, proc, info = load_model("tiny:qwen2_5_vl")
    depth = model.config.vision_config.depth
    cfg = LoraConfig(r=4, alpha=8, vision="lora")  # default vision_target_modules: attn.qkv, attn.proj
    pm = apply_lora(model, cfg, is_vlm=True)
    got = _lora_modules(pm)
    vision = {f"model.visual.blocks.{i}.attn.{m}" for i in range(depth) for m in ("qkv", "proj")}
    assert {n for n in got if n.startswith("model.visual.")} == vision
    assert {n.rsplit(".", 1)[-1] for n in got - vision} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all(n.startswith("model.language_model.") for n in got - vision)
    _backward(pm, _image_inputs(pm, proc, info))
    for n, p in pm.named_parameters():
        if ".visual." in n and ".lora_" not in n:
            assert not p.requires_grad, n  # base vision weights stay frozen
        if ".visual." in n and ".lora_B." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_vision_full_trains_a_saved_copy_and_keeps_the_reference(tmp_path):
    model, proc, info = load_model("tiny:qwen2_vl")
    base_vision = {n: p.detach().clone() for n, p in model.model.visual.named_parameters()}
    inputs = _image_inputs(model, proc, info)
    with torch.no_grad():
        base_logits = model(**inputs).logits
    pm = apply_lora(model, LoraConfig(r=4, alpha=8, vision="full"), is_vlm=True)
    copy_prefix = "base_model.model.model.visual.modules_to_save.default."
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert {n.removeprefix(copy_prefix) for n in trainable if n.startswith(copy_prefix)} == set(base_vision)
    assert all(n.startswith(copy_prefix) or ".lora_" in n for n in trainable)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: move every trainable weight
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        trained = pm(**inputs).logits
        with pm.disable_adapter():  # the KL reference: the original, untouched tower
            assert torch.allclose(pm(**inputs).logits, base_logits, atol=1e-6)
    assert (trained - base_logits).abs().max() > 1e-3

    out = save_lora(pm, tmp_path / "model", proc, merged=True)
    saved = load_file(str(out / "adapter_model.safetensors"))
    for n in base_vision:  # the trained tower is in the adapter file
        assert f"base_model.model.model.visual.{n}" in saved, n
    merged = dict(load_model(str(out / "merged"))[0].model.visual.named_parameters())
    for n, p in pm.get_base_model().model.visual.modules_to_save["default"].named_parameters():
        assert torch.equal(merged[n], p.detach()), n
    # load_model: from merged/, and (merged/ removed) base + adapter; both give the trained logits
    for drop_merged in (False, True):
        if drop_merged:
            shutil.rmtree(out / "merged")
        again, _, info2 = load_model(str(out))
        assert info2.is_vlm
        with torch.no_grad():
            torch.testing.assert_close(again(**inputs).logits, trained, atol=1e-5, rtol=0)


def test_freeze_vision_for_full_finetuning():
    model, _, _ = load_model("tiny:qwen2_vl")
    n_vision = len(list(model.model.visual.parameters()))
    assert freeze_vision_tower(model, is_vlm=True) == n_vision
    for n, p in model.named_parameters():
        assert p.requires_grad == (not n.startswith("model.visual.")), n


def test_config_and_model_mistakes_are_clear_errors(tmp_path):
    text, _, _ = load_model("tiny:qwen2")
    with pytest.raises(ConfigError, match="model.lora.vision='lora' needs a VLM"):
        apply_lora(text, LoraConfig(vision="lora"), is_vlm=False)
    with pytest.raises(ConfigError, match="model.freeze_vision=True needs a VLM"):
        freeze_vision_tower(text, is_vlm=False)
    vlm, _, _ = load_model("tiny:qwen2_vl")
    with pytest.raises(
        ConfigError, match=r"model.lora.target_modules=\['qkv'\] matches no module in the language model"
    ):
        apply_lora(vlm, LoraConfig(target_modules=["qkv"]), is_vlm=True)  # qkv exists only in the vision tower
    with pytest.raises(ConfigError, match="model.lora.vision_target_modules=.*'fc1', 'fc2', 'proj', 'qkv'"):
        apply_lora(vlm, LoraConfig(vision="lora", vision_target_modules=["q_proj"]), is_vlm=True)
    with pytest.raises(ConfigError, match="model.freeze_vision"):
        load_config(QUICK, ["model.freeze_vision=true", "model.lora={vision: full}"])
    cfg = load_config(QUICK, ["model.lora={r: 4, vision: lora, vision_target_modules: [attn.qkv]}"])
    assert cfg.model.lora.vision == "lora" and cfg.model.lora.vision_target_modules == ["attn.qkv"]
    # an adapter whose base folder is gone: the error names it
    adapter = tmp_path / "adapter"
    save_lora(apply_lora(vlm, LoraConfig(r=2), is_vlm=True), adapter, None, merged=False)
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(acfg["base_model_name_or_path"]).is_absolute() and not (adapter / "merged").exists()
    acfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(acfg))
    with pytest.raises(ConfigError, match=f"base model '{tmp_path / 'gone'}'"):
        load_model(str(adapter))


@pytest.mark.slow
def test_lora_run_saves_adapter_and_merged_that_reload_exactly_and_eval_works(tmp_path, tiny_overrides):
    from transformers import AutoModelForImageTextToText

    from mmpo.trainers.token import Trainer

    run = tmp_path / "lora"
    overrides = [
        *tiny_overrides,
        f"output_dir={run}",
        "trainer.max_steps=2",
        "trainer.eval_at_start=false",
        "eval.num_samples=4",
        "eval.batch_size=4",
        "algorithm.dynamic_sampling=false",
        "trainer.update_epochs=1",
        "trainer.lr=1e-2",
        "model.lora={r: 4, alpha: 8}",
    ]
    cfg = load_config(QUICK, overrides)
    trainer = Trainer(cfg, run)
    trainer.train()
    policy = trainer.engine.module
    inputs = trainer.policy.encode(trainer.task.eval_samples(1)[0].messages)
    with torch.no_grad():
        want = policy(**inputs).logits  # [1, P, V]
        with policy.disable_adapter():
            base_logits = policy(**inputs).logits
    assert (want - base_logits).abs().max() > 1e-4  # the adapter trained

    model_dir = run / "model"
    assert (model_dir / "adapter_config.json").is_file() and (model_dir / "adapter_model.safetensors").is_file()
    assert not (model_dir / "config.json").exists()
    # (a) merged weights load in plain transformers
    merged = AutoModelForImageTextToText.from_pretrained(str(model_dir / "merged"), local_files_only=True).eval()
    # (b) the adapter loads with peft onto the base it names
    base_path = json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForImageTextToText.from_pretrained(base_path, local_files_only=True)
    adapted = peft.PeftModel.from_pretrained(base, str(model_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapted(**inputs).logits, want, atol=1e-5, rtol=0)
    # merged q_proj = W + (alpha / r) B A; the vision tower (frozen) is the base's
    sd, ad = merged.state_dict(), load_file(str(model_dir / "adapter_model.safetensors"))
    name = "model.language_model.layers.0.self_attn.q_proj"
    a, b = ad[f"base_model.model.{name}.lora_A.weight"], ad[f"base_model.model.{name}.lora_B.weight"]
    base_sd = base.state_dict()  # peft injected the adapter into `base` in place: W is base_layer.weight
    w0 = base_sd[f"{name}.base_layer.weight"]
    torch.testing.assert_close(sd[f"{name}.weight"], w0 + (8 / 4) * b @ a, atol=1e-6, rtol=0)
    assert b.abs().sum() > 0
    for k, v in base_sd.items():
        if k.startswith("model.visual."):
            assert torch.equal(sd[k], v), k

    assert (
        main(
            [
                "eval",
                QUICK,
                f"checkpoint={run}",
                f"output_dir={tmp_path / 'ev'}",
                "eval.num_samples=4",
                "eval.batch_size=4",
                "rollout.max_new_tokens=3",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "ev" / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(model_dir) and 0.0 <= metrics["accuracy"] <= 1.0
