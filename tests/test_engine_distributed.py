"""mmpo.engine with 2 CPU processes under torchrun: plain torch, DeepSpeed ZeRO 1, 2 and 3.

Each setup runs tests/helpers/toy_engine_script.py for 6 steps (2 micro batches a step, each
rank its own rows; a NaN gradient on rank 1 at step 1 and a NaN loss on rank 0 at step 2, both
must be skipped on both ranks), saving after step 3; a second launch resumes from that save.
Wall time on 2 shared CPU cores: about 80-110 s with a warm DeepSpeed op cache, +50-60 s cold
(the shm comm op compiles once into TORCH_EXTENSIONS_DIR).
Checks: ranks agree exactly; weights moved; a one-process torch run over the same global
batches gives the same weights (tolerance); the resumed run ends bit-identical; rank 0's
save_pretrained holds the gathered weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.dist import run_torchrun
from helpers.toy_engine_script import make_model, train

from mmpo.engine import EngineOptions, TorchEngine

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "helpers" / "toy_engine_script.py"
STEPS, ACCUM, MICRO, SAVE_AT, WORLD = 6, 2, 2, 3, 2
FAULTS = ["--poison-grad", "1:1", "--nan-loss", "2:0"]
SETUPS = {
    "torch": [],
    "zero1": ["--deepspeed", str(ROOT / "configs/deepspeed/zero1.json")],
    "zero2": ["--deepspeed", str(ROOT / "configs/deepspeed/zero2.json")],
    "zero3": ["--deepspeed", str(ROOT / "configs/deepspeed/zero3.json")],
}


def launch(out: Path, extra: list[str]) -> list[dict]:
    files = [out / f"rank{r}.json" for r in range(WORLD)]
    run_torchrun(
        [SCRIPT, "--out", out, "--steps", STEPS, "--accum", ACCUM, "--micro", MICRO, *extra],
        nproc=WORLD,
        timeout=600,
        retries=1,
        done=lambda: all(f.is_file() for f in files),
    )
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, plain torch, each step one backward over the whole global batch."""
    opts = EngineOptions(
        lr=1e-2,
        lr_schedule="linear",
        warmup_steps=1,
        total_steps=STEPS,
        max_grad_norm=1.0,
        weight_decay=0.01,
        device="cpu",
        precision="fp32",
    )
    engine = TorchEngine(make_model(), opts)
    results = train(
        engine,
        0,
        STEPS,
        accum=1,
        micro=WORLD * ACCUM * MICRO,
        poison_grad=(1, -1),
        nan_loss=(2, -1),
    )
    return {
        "results": [[r.grad_norm, r.skipped, r.lr] for r in results],
        "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
    }


@pytest.fixture(scope="module", params=list(SETUPS))
def runs(request, tmp_path_factory) -> dict:
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    ckpt = tmp / "ckpt"
    full = launch(tmp / "full", [*SETUPS[name], *FAULTS, "--save-at", SAVE_AT, "--ckpt", ckpt])
    resumed = launch(tmp / "resumed", [*SETUPS[name], "--save-at", SAVE_AT, "--resume", ckpt])
    return {"name": name, "full": full, "resumed": resumed, "dir": tmp}


def tensors(params: dict[str, list]) -> dict[str, torch.Tensor]:
    return {n: torch.tensor(v, dtype=torch.float32) for n, v in params.items()}


def test_ranks_agree_and_skip_together(runs: dict) -> None:
    r0, r1 = runs["full"]
    assert (r0["world_size"], r1["world_size"]) == (WORLD, WORLD)
    assert r0["params"] == r1["params"]  # exact
    assert [s for _, s, _ in r0["results"]] == [False, True, True, False, False, False]
    assert [s for _, s, _ in r1["results"]] == [False, True, True, False, False, False]
    moved = [(tensors(r0["params"])[n] - t).abs().max().item() for n, t in tensors(r0["init"]).items()]
    assert min(moved) > 1e-4


def test_collectives_agree(runs: dict) -> None:
    for r in runs["full"]:
        assert r["collectives"] == {
            "mean_of_rank": 0.5,
            "gathered": [{"rank": 0}, {"rank": 1}],
            "finite_everywhere": True,
            "nan_on_rank0": False,
        }


def test_matches_one_process_on_the_global_batch(runs: dict, reference: dict) -> None:
    r0 = runs["full"][0]
    pairs = zip(r0["results"], reference["results"])
    for (norm, skipped, lr), (ref_norm, ref_skipped, ref_lr) in pairs:
        assert skipped == ref_skipped and lr == pytest.approx(ref_lr, rel=1e-12)
        if not skipped:
            assert norm == pytest.approx(ref_norm, rel=1e-5)
    for name, value in tensors(r0["params"]).items():
        torch.testing.assert_close(value, reference["params"][name], atol=2e-6, rtol=0)


def test_resume_is_exact(runs: dict) -> None:
    full, resumed = runs["full"], runs["resumed"]
    assert [r[1] for r in resumed[0]["results"]] == [False] * (STEPS - SAVE_AT)
    assert resumed[0]["results"] == full[0]["results"][SAVE_AT:]
    assert resumed[0]["params"] == full[0]["params"]
    assert resumed[1]["params"] == full[1]["params"]


def test_save_pretrained_holds_the_gathered_weights(runs: dict) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(runs["dir"] / "full" / "pretrained" / "model.safetensors"))
    params = tensors(runs["full"][0]["params"])
    assert set(params) <= set(saved)
    for name, value in params.items():
        assert torch.equal(saved[name], value), name
