"""mmpo.engine in one process: LR schedule, non-finite skips, exact resume, grad accumulation."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mmpo.engine import (
    Engine,
    EngineOptions,
    TorchEngine,
    build_deepspeed_config,
    lr_factor,
    resolve_device,
    resolve_precision,
)
from mmpo.errors import ConfigError, UnknownNameError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def batch(step: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(rows, 4, generator=g)
    return x, x.sum(-1, keepdim=True).sin()


def mse(engine: Engine, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((engine.forward_module()(x) - y) ** 2).mean()


def opts(**kw) -> EngineOptions:
    base = dict(lr=1e-2, weight_decay=0.1, total_steps=10, device="cpu", precision="fp32")
    return EngineOptions(**{**base, **kw})


def one_step(engine: Engine, step: int) -> None:
    engine.backward(mse(engine, *batch(step)))
    engine.step()


def params_of(engine: Engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def optimizer_state(engine: TorchEngine) -> dict:
    return copy.deepcopy(engine.optimizer.state_dict())


def assert_same_state(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for idx in a["state"]:
        for key, value in a["state"][idx].items():
            assert torch.equal(value, b["state"][idx][key]), (idx, key)
    assert a["param_groups"] == b["param_groups"]


# ---------------------------------------------------------------- LR schedule


def test_lr_factor_by_hand() -> None:
    # warmup 2, total 6: warmup (k+1)/2, then p = (k-2)/4
    assert [lr_factor(k, "linear", 2, 6) for k in range(8)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert [lr_factor(k, "constant", 2, 6) for k in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(k, "cosine", 2, 6) for k in (2, 3, 4, 6)]
    assert cos == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.0])
    assert lr_factor(0, "cosine", 0, 4) == 1.0


def test_engine_lr_follows_schedule_and_skips_do_not_advance_it() -> None:
    o = opts(lr=0.1, lr_schedule="linear", warmup_steps=2, total_steps=6)
    engine = TorchEngine(tiny_model(), o)
    used = []
    for step in range(3):
        engine.backward(mse(engine, *batch(step)))
        used.append(engine.step().lr)
    engine.backward(mse(engine, *batch(3)) * float("nan"))
    skipped = engine.step()
    assert skipped.skipped and skipped.lr == pytest.approx(0.075)
    for step in range(4, 7):
        engine.backward(mse(engine, *batch(step)))
        used.append(engine.step().lr)
    assert used == pytest.approx([0.05, 0.1, 0.1, 0.075, 0.05, 0.025])
    assert engine.lr() == 0.0
    assert (engine.applied_steps, engine.skipped_steps) == (6, 1)


# ---------------------------------------------------------------- non-finite steps


@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "nan_grad"])
def test_non_finite_step_changes_nothing(kind: str) -> None:
    engine = TorchEngine(tiny_model(), opts())
    one_step(engine, 0)  # so that AdamW has moments to protect
    before_params, before_opt, before_lr = params_of(engine), optimizer_state(engine), engine.lr()

    x, y = batch(1)
    loss = mse(engine, x, y)
    if kind == "nan_loss":
        loss = loss * float("nan")
    elif kind == "inf_loss":
        loss = loss + float("inf")
    else:  # finite loss, NaN gradient on the first layer's weight
        engine.module[0].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    assert engine.check_loss(loss) == (kind == "nan_grad")
    engine.backward(loss)
    result = engine.step()

    assert result.skipped and not math.isfinite(result.grad_norm)
    for name, value in params_of(engine).items():
        assert torch.equal(value, before_params[name]), name
    assert_same_state(optimizer_state(engine), before_opt)
    assert engine.lr() == before_lr
    assert all(p.grad is None for p in engine.module.parameters())


def test_skipped_step_is_a_no_op_for_later_steps() -> None:
    """0, bad, 1, 2 gives exactly the parameters of 0, 1, 2."""
    a = TorchEngine(tiny_model(), opts(lr_schedule="cosine", warmup_steps=1, total_steps=5))
    b = TorchEngine(tiny_model(), opts(lr_schedule="cosine", warmup_steps=1, total_steps=5))
    for step in range(3):
        one_step(a, step)
    one_step(b, 0)
    b.backward(mse(b, *batch(9)) * float("nan"))
    assert b.step().skipped
    for step in (1, 2):
        one_step(b, step)
    for name, value in params_of(a).items():
        assert torch.equal(value, params_of(b)[name]), name


def test_step_without_backward_is_an_error() -> None:
    engine = TorchEngine(tiny_model(), opts())
    with pytest.raises(RuntimeError, match="without a backward"):
        engine.step()


# ---------------------------------------------------------------- grad norm, accumulation


def test_grad_norm_is_the_pre_clip_global_norm() -> None:
    model = tiny_model()
    reference = copy.deepcopy(model)
    x, y = batch(0)
    ((reference(x) - y) ** 2).mean().backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()]).norm().item()

    engine = TorchEngine(model, opts(max_grad_norm=1e-3))
    engine.backward(mse(engine, x, y))
    result = engine.step()
    assert not result.skipped
    assert result.grad_norm == pytest.approx(expected, rel=1e-6)
    assert expected > 1e-3  # the clip was active


def test_two_micro_batches_equal_one_double_batch() -> None:
    whole = TorchEngine(tiny_model(), opts())
    accum = TorchEngine(tiny_model(), opts(grad_accum_steps=2))
    for step in range(3):
        x, y = batch(step, rows=8)
        whole.backward(mse(whole, x, y))
        r_whole = whole.step()
        for half in (slice(0, 4), slice(4, 8)):
            accum.backward(mse(accum, x[half], y[half]) / 2)
        r_accum = accum.step()
        assert r_accum.grad_norm == pytest.approx(r_whole.grad_norm, rel=1e-6)
    for name, value in params_of(whole).items():
        torch.testing.assert_close(params_of(accum)[name], value, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- save / load


def test_save_load_resumes_exactly(tmp_path: Path) -> None:
    o = opts(lr_schedule="linear", warmup_steps=1, total_steps=6)
    straight = TorchEngine(tiny_model(), o)
    for step in range(4):
        one_step(straight, step)

    first = TorchEngine(tiny_model(), o)
    for step in range(2):
        one_step(first, step)
    first.save(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "engine.json").read_text())["applied_steps"] == 2

    resumed = TorchEngine(tiny_model(seed=123), o)  # other init: everything must come from disk
    resumed.load(tmp_path / "ckpt")
    assert resumed.lr() == first.lr()
    for step in (2, 3):
        one_step(resumed, step)

    for name, value in params_of(straight).items():
        assert torch.equal(params_of(resumed)[name], value), name
    assert_same_state(optimizer_state(resumed), optimizer_state(straight))
    assert resumed.lr() == straight.lr() and resumed.applied_steps == 4


def test_load_rejects_a_foreign_folder(tmp_path: Path) -> None:
    engine = TorchEngine(tiny_model(), opts())
    with pytest.raises(ConfigError, match="engine.json"):
        engine.load(tmp_path)
    (tmp_path / "engine.json").write_text(json.dumps({"format": "mmpo.engine.deepspeed/1"}))
    with pytest.raises(ConfigError, match="deepspeed"):
        engine.load(tmp_path)


def test_save_pretrained_writes_full_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    engine = TorchEngine(tiny_model(), opts())
    one_step(engine, 0)
    engine.save_pretrained(tmp_path / "plain")
    loaded = load_file(str(tmp_path / "plain" / "model.safetensors"))
    for name, value in engine.module.state_dict().items():
        assert torch.equal(loaded[name], value), name

    seen = {}
    engine.save_pretrained(tmp_path / "custom", save_fn=lambda m, f, sd: seen.update(m=m, f=f, sd=sd))
    assert seen["m"] is engine.module and seen["f"] == tmp_path / "custom"
    assert set(seen["sd"]) == set(engine.module.state_dict())


# ---------------------------------------------------------------- small pieces


def test_single_process_collectives_are_identities() -> None:
    engine = Engine.build(tiny_model(), opts())
    assert isinstance(engine, TorchEngine)
    assert (engine.rank, engine.world_size, engine.is_main) == (0, 1, True)
    assert engine.all_reduce_mean(2.5) == 2.5
    assert engine.all_gather_object({"a": 1}) == [{"a": 1}]
    engine.barrier()
    with engine.gathered_params():
        assert engine.module[0].weight.shape == (8, 4)


def test_device_precision_and_autocast() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="cuda"):
            resolve_device("cuda")
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    x = torch.randn(2, 4)
    fp32 = TorchEngine(tiny_model(), opts())
    with fp32.autocast():
        assert fp32.module(x).dtype == torch.float32
    bf16 = TorchEngine(tiny_model(), opts(precision="bf16"))
    with bf16.autocast():
        assert bf16.module(x).dtype == torch.bfloat16
    assert bf16.module[0].weight.dtype == torch.float32  # master weights stay fp32


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(lr_schedule="cosin"), "cosine"),
        (dict(device="tpu"), "device"),
        (dict(precision="fp16"), "precision"),
        (dict(total_steps=0), "total_steps"),
        (dict(adam_betas=(0.9, 1.0)), "adam_betas"),
    ],
)
def test_bad_options_raise_config_error(bad: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TorchEngine(tiny_model(), opts(**bad))


def test_unknown_schedule_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="constant, cosine, linear"):
        opts(lr_schedule="step").validate()


def test_no_trainable_parameters_is_a_config_error() -> None:
    model = tiny_model().requires_grad_(False)
    with pytest.raises(ConfigError, match="trainable"):
        TorchEngine(model, opts())


# ---------------------------------------------------------------- DeepSpeed config filling


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_deepspeed_configs_fill_from_options(stage: int) -> None:
    o = opts(max_grad_norm=0.5, grad_accum_steps=4, micro_batch_size=3)
    cfg = build_deepspeed_config(CONFIGS / f"zero{stage}.json", o, "bf16", 2, "cpu")
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 3 * 4 * 2
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert cfg["zero_optimization"]["overlap_comm"] is False  # CPU
    assert cfg["managed_gradient_accumulation"] is False
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert "auto" not in json.dumps(cfg)
    if stage == 3:
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] <= 1000
        on_gpu = build_deepspeed_config(CONFIGS / "zero3.json", o, "fp32", 8, "cuda")
        assert on_gpu["zero_optimization"]["overlap_comm"] is True
        assert on_gpu["bf16"]["enabled"] is False


@pytest.mark.parametrize(
    "content, match",
    [
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, "optimizer"),
        ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, "scheduler"),
        ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "fp16"),
        ({"zero_optimization": {"stage": 0}}, "stage"),
        ({}, "stage"),
    ],
)
def test_deepspeed_config_errors(tmp_path: Path, content: dict, match: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=match):
        build_deepspeed_config(path, opts(), "fp32", 1, "cpu")


def test_deepspeed_config_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_deepspeed_config(tmp_path / "missing.json", opts(), "fp32", 1, "cpu")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_deepspeed_config(tmp_path / "bad.json", opts(), "fp32", 1, "cpu")
