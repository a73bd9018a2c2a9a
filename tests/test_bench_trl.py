"""`mmpo bench --against trl`: a real (tiny) side-by-side run of mmpo and TRL's GRPOTrainer."""

from __future__ import annotations

import json
import math

import pytest
import trl  # noqa: F401 (the bench extra, part of dev: a missing install fails here, not skips)

from mmpo.cli import main

KEYS = {"setting", "mmpo_s_per_step", "trl_s_per_step", "ratio", "mmpo_peak_rss_mb", "trl_peak_rss_mb"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_against_trl_text_and_vlm(capsys):
    code = main(
        [
            "bench",
            "--against",
            "trl",
            "--settings",
            "text,vlm",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--prompts-per-step",
            "1",
            "--group-size",
            "4",
            "--max-new-tokens",
            "4",
            "--image-size",
            "56",
            "--wait-quiet",
            "0",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["setting"] for r in rows] == ["text", "vlm"]
    for r in rows:
        assert KEYS <= set(r)
        assert r["mmpo_s_per_step"] > 0 and r["trl_s_per_step"] > 0
        assert r["ratio"] == pytest.approx(r["mmpo_s_per_step"] / r["trl_s_per_step"], rel=0.01, abs=1e-3)
        assert r["mmpo_peak_rss_mb"] > 0 and r["trl_peak_rss_mb"] > 0
        # the same batch on both sides: equal prompt lengths, completions exactly max_new_tokens long
        assert r["prompt_tokens"]["mmpo"] == r["prompt_tokens"]["trl"]
        assert r["completion_tokens"] == {"mmpo": 4.0, "trl": 4.0}
        assert (r["G"], r["prompts_per_step"], r["steps"]) == (4, 1, 1)
        # both sides trained: finite losses and moved weights
        assert r["loss_finite"] == {"mmpo": True, "trl": True}
        assert r["weight_delta"]["mmpo"] > 0 and r["weight_delta"]["trl"] > 0
        assert all(math.isfinite(v) for v in r["kl_last"].values())
    assert rows[1]["prompt_tokens"]["mmpo"] > rows[0]["prompt_tokens"]["mmpo"]  # the image's tokens


def test_bench_against_rejects_a_config(capsys):
    assert main(["bench", "configs/quickstart.yaml", "--against", "trl"]) == 2
    assert "--against trl" in capsys.readouterr().err


def test_bench_without_config_or_against(capsys):
    assert main(["bench"]) == 2
    assert "CONFIG" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_lora_bf16_in_blocks_reports_mfu_and_profile(capsys):
    """The real-shape recipe of vlm-2b-lora (LoRA r 16 on the language model, bf16 frozen weights,
    one worker alive at a time) on the tiny VLM."""
    code = main(
        ["bench", "--against", "trl", "--settings", "vlm-lora", "--steps", "1", "--warmup", "1", "--threads", "1"]
        + ["--prompts-per-step", "1", "--group-size", "4", "--max-new-tokens", "4", "--image-size", "56"]
        + ["--wait-quiet", "0", "--memory-mode", "blocks"]
    )
    assert code == 0
    (r,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert (r["precision"], r["lora_r"]) == ("bf16", 16)
    assert r["memory_mode"].startswith("blocks")  # one side at a time, as the real shapes run
    assert r["weight_delta"]["mmpo"] > 0 and r["weight_delta"]["trl"] > 0  # the adapters trained on both sides
    assert r["loss_finite"] == {"mmpo": True, "trl": True}
    for side in ("mmpo", "trl"):  # MFU = model FLOPs / seconds / measured matmul peak
        want = r["model_gflop_per_step"] / r[f"{side}_s_per_step"] / r["matmul_peak_gflops"]
        assert r["mfu"][side] == pytest.approx(want, rel=0.05, abs=2e-3)
    assert set(r["profile_s"]["mmpo"]) == {"rollout", "reward", "update"}
    assert set(r["profile_s"]["trl"]) == {"generate_score", "policy_pass", "other"}
