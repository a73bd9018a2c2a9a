"""The diffusion recipes end to end through ``mmpo train`` on tiny pipelines: run folders, saved
models that diffusers opens (full pipeline, LoRA adapter, merged pipeline, FIND's noise policy),
exact resume, and the config errors a user meets first."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers  # noqa: E402 (the diffusion extra is part of dev)
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmpo.captions import LINE_HEIGHT, MARGIN
from mmpo.cli import main  # noqa: E402
from mmpo.diffusion.pipeline import resolve_pipeline_folder  # noqa: E402
from mmpo.samples import read_samples

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TIMING = {"step_time_s", "rollout_s", "reward_s", "update_s", "eval_s"}
SMALL = {
    "chunk_grpo": [
        "task.sampling.num_steps=4",
        "task.sampling.eval_num_steps=2",
        "task.chunks.sizes=[1,3]",
        "rollout.group_size=2",
        "rollout.prompts_per_step=1",
        "eval.num_samples=2",
        "eval.batch_size=2",
    ],
    "flow_grpo": [
        "task.sampling.num_steps=3",
        "task.sampling.eval_num_steps=2",
        "task.sampling.height=16",
        "task.sampling.width=16",
        "rollout.group_size=2",
        "rollout.prompts_per_step=1",
        "eval.num_samples=2",
        "eval.batch_size=2",
    ],
    "find": [
        "task.sampling.num_steps=2",
        "task.sampling.eval_num_steps=2",
        "task.sampling.height=16",
        "task.sampling.width=16",
        "rollout.group_size=2",
        "rollout.prompts_per_step=2",
        "eval.num_samples=2",
        "eval.batch_size=2",
    ],
}
LORA = "model.lora={r: 4, alpha: 8, target_modules: [to_q, to_k, to_v, to_out.0]}"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes name their prompt files relative to the repository


def _train(recipe: str, run: Path, *extra: str) -> list[dict]:
    assert main(["train", str(CONFIGS / f"{recipe}.yaml"), f"output_dir={run}", *SMALL[recipe], *extra]) == 0
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _check_run_folder(run: Path, lines: list[dict], steps: int, n_eval: int, side: int) -> None:
    assert [l["step"] for l in lines] == list(range(steps + 1))
    assert "eval/reward" in lines[0]  # the baseline evaluation
    for line in lines[1:]:
        for key in ("reward_mean", "rollout_s", "update_s", "loss", "grad_norm"):
            assert key in line, key
    assert "eval/reward" in lines[-1]
    from PIL import Image

    for step in (0, steps):
        png = run / "images" / f"eval_step{step:06d}.png"
        assert png.read_bytes()[:8] == PNG
        # nrow = ceil(sqrt(n)), 2 px padding around and between the cells; a cell is the image
        # upscaled by k = ceil(128 / side) over a caption band of 3 lines (prompt x2, reward)
        nrow = int(torch.tensor(float(n_eval)).sqrt().ceil())
        rows = -(-n_eval // nrow)
        cell_w, cell_h = side * -(-128 // side), side * -(-128 // side) + 3 * LINE_HEIGHT + 2 * MARGIN
        assert Image.open(png).size == (nrow * cell_w + (nrow + 1) * 2, rows * cell_h + (rows + 1) * 2)
    assert (run / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").exists()
    assert (run / "config.yaml").exists()
    # logged rollouts (trainer.log_samples 8 by default): every image (2 or 4) of every step, as a PNG
    samples = read_samples(run)
    counts = [sum(r["step"] == s for r in samples) for s in range(1, steps + 1)]
    assert len(samples) == sum(counts) and counts[0] in (2, 4) and len(set(counts)) == 1
    assert all(Image.open(run / "samples" / r["media"][0]).size == (side, side) for r in samples)


def _check_eval(recipe: str, run: Path, out: Path, final_eval: float, *extra: str, tol: float = 1e-5) -> None:
    """`mmpo eval` of the finished run: the same deterministic images from the same fixed noise as
    the run's final evaluation, so the same reward; writes a grid, predictions and metrics."""
    args = [f"output_dir={out}", *SMALL[recipe], *extra, f"checkpoint={run}"]
    assert main(["eval", str(CONFIGS / f"{recipe}.yaml"), *args]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["reward"] == pytest.approx(final_eval, abs=tol)
    rows = [json.loads(l) for l in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and sum(r["reward"] for r in rows) / 2 == pytest.approx(metrics["reward"], abs=1e-6)
    assert (out / "eval" / "images.png").read_bytes()[:8] == PNG
    # the one layout: the sample id, the prompt, the image's place in the grid, the prompt's target
    assert [r["id"] for r in rows] == ["eval-0", "eval-1"]
    assert [r["prediction"] for r in rows] == ["images.png#0", "images.png#1"]
    assert all(isinstance(r["input"], str) and r["input"] and "answer" in r for r in rows)
    assert str(run) in metrics["checkpoint"]


def _engine_weights(run: Path, steps: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{steps:08d}" / "engine" / "model.safetensors"))


def _base_pipeline(kind: str):
    folder = resolve_pipeline_folder(f"tiny:{kind}")
    return diffusers.DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, kind, side", [("chunk_grpo", "flux", 32), ("flow_grpo", "sd3", 16)])
def test_full_fine_tuning_recipe_saves_a_pipeline_with_the_trained_weights(tmp_path, recipe, kind, side):
    run = tmp_path / "run"
    lines = _train(recipe, run, "trainer.max_steps=2")
    _check_run_folder(run, lines, 2, 2, side)
    assert lines[-1]["chunks_trained"] == 2.0  # chunk_grpo: chunks [1, 3]; flow_grpo: int(3 * 0.99) = 2 steps
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(run / "model"), local_files_only=True)
    assert type(pipe).__name__ == {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}[kind]
    saved = pipe.transformer.state_dict()
    trained = _engine_weights(run, 2)
    assert saved.keys() == trained.keys()
    for k in saved:
        assert torch.equal(saved[k].float(), trained[k].float()), k
    base_pipe = _base_pipeline(kind)
    base = base_pipe.transformer.state_dict()
    assert any(not torch.equal(base[k], trained[k]) for k in base)  # it trained
    # the frozen parts are the base pipeline's
    base_vae = base_pipe.vae.state_dict()
    assert all(torch.equal(v, base_vae[k]) for k, v in pipe.vae.state_dict().items())
    _check_eval(recipe, run, tmp_path / "eval", lines[-1]["eval/reward"])


def _denoiser_output(kind: str, denoiser: torch.nn.Module) -> torch.Tensor:
    """The denoiser on a fixed input (16 px image: latents 4x4; text width 64 for sd3, 32 for sd)."""
    g = torch.Generator().manual_seed(0)
    channels, width = (16, 64) if kind == "sd3" else (4, 32)
    x = torch.randn(1, channels, 4, 4, generator=g)
    text = torch.randn(1, 7, width, generator=g)
    with torch.no_grad():
        if kind == "sd3":
            pooled = torch.randn(1, 64, generator=g)
            return denoiser(
                hidden_states=x,
                timestep=torch.tensor([500.0]),
                encoder_hidden_states=text,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        return denoiser(x, torch.tensor([500]), encoder_hidden_states=text, return_dict=False)[0]


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd3", "sd"])
def test_lora_recipe_saves_an_adapter_diffusers_loads_and_a_merged_pipeline(tmp_path, kind):
    """alpha = 2 r: the saved adapter must carry its scale (alpha / r = 2), or diffusers loads it at 1."""
    from peft import LoraConfig
    from safetensors.torch import load_model

    run = tmp_path / "lora"
    lines = _train("flow_grpo", run, LORA, f"model.path=tiny:{kind}", "trainer.max_steps=2", "trainer.lr=0.01")
    _check_run_folder(run, lines, 2, 2, 16)
    assert (run / "model" / "pytorch_lora_weights.safetensors").exists()
    # the trained denoiser: the base with the same adapter, weights from the last checkpoint
    trained = _denoiser(_base_pipeline(kind))
    trained.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian")
    )
    engine_file = run / "checkpoints" / "step_00000002" / "engine" / "model.safetensors"
    missing, unexpected = load_model(trained, str(engine_file))
    assert not missing and not unexpected
    expected = _denoiser_output(kind, trained)
    base_out = _denoiser_output(kind, _denoiser(_base_pipeline(kind)))
    assert (expected - base_out).abs().max() > 1e-3  # the adapter changed the output
    # diffusers' own loader on the base pipeline
    pipe = _base_pipeline(kind)
    pipe.load_lora_weights(str(run / "model"))
    torch.testing.assert_close(_denoiser_output(kind, _denoiser(pipe)), expected, rtol=1e-4, atol=1e-5)
    # the merged pipeline is a plain one (no peft layers) with the same output
    merged = diffusers.DiffusionPipeline.from_pretrained(str(run / "model" / "merged"), local_files_only=True)
    assert not any("lora" in k for k in _denoiser(merged).state_dict())
    torch.testing.assert_close(_denoiser_output(kind, _denoiser(merged)), expected, rtol=1e-4, atol=1e-5)
    _check_eval("flow_grpo", run, tmp_path / "eval", lines[-1]["eval/reward"], f"model.path=tiny:{kind}", tol=1e-4)


@pytest.mark.slow
def test_find_recipe_saves_the_noise_policy(tmp_path):
    run = tmp_path / "find"
    lines = _train("find", run, "trainer.max_steps=2")
    _check_run_folder(run, lines, 2, 2, 16)
    assert {"value_loss", "sigma_mean", "reg"} <= set(lines[-1])
    path = run / "model" / "noise_policy.safetensors"
    policy = load_file(str(path))
    assert set(policy) == {"mu", "sigma"}
    assert policy["mu"].shape == policy["sigma"].shape == (4, 4 * 4 * 4)  # 4 prompts x latent [4, 4, 4]
    trained = _engine_weights(run, 2)
    assert all(torch.equal(policy[k], trained[k]) for k in policy)
    _check_eval("find", run, tmp_path / "eval", lines[-1]["eval/reward"])
    # two steps of 2 prompts: those prompts' rows moved away from N(0, I)
    moved = (policy["mu"].abs().sum(1) > 0) | ((policy["sigma"] - 1).abs().sum(1) > 0)
    assert 1 <= int(moved.sum()) <= 4
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["mode"] == "per_prompt" and meta["shape"] == "4,4,4"
    assert meta["prompts"].splitlines()[0] == "a white square on the left"
    assert (run / "checkpoints" / "step_00000002" / "value.safetensors").exists()


@pytest.mark.slow
def test_chunk_grpo_resume_equals_a_straight_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["trainer.save_every=1", "trainer.keep_last=0"]
    a = _train("chunk_grpo", straight, "trainer.max_steps=2", *common)
    _train("chunk_grpo", split, "trainer.max_steps=1", *common)
    assert (split / "checkpoints" / "step_00000001" / "COMPLETE").exists()
    b = _train("chunk_grpo", split, "trainer.max_steps=2", *common)  # resumes from step 1
    wa, wb = _engine_weights(straight, 2), _engine_weights(split, 2)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)
    w1 = _engine_weights(straight, 1)
    assert any(not torch.equal(w1[k], wa[k]) for k in wa)  # step 2 changed the weights
    state = json.loads((split / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["chunk_sizes"] == [1, 3]
    la = {k: v for k, v in [l for l in a if l["step"] == 2][0].items() if k not in TIMING}
    lb = {k: v for k, v in [l for l in b if l["step"] == 2][0].items() if k not in TIMING}
    assert la.keys() == lb.keys()
    for k in la:
        assert lb[k] == pytest.approx(la[k], abs=1e-6), k


# -- config errors --------------------------------------------------------------------------------
def _error(capsys, recipe: str, tmp_path: Path, *extra: str) -> str:
    code = main(["train", str(CONFIGS / f"{recipe}.yaml"), f"output_dir={tmp_path / 'run'}", *SMALL[recipe], *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_unknown_reward_name(tmp_path, capsys):
    err = _error(capsys, "flow_grpo", tmp_path, "task.rewards=[{name: prettiness}]")
    assert "task.rewards[0].name" in err and "prettiness" in err and "target_color" in err


def test_lora_target_modules_matching_nothing(tmp_path, capsys):
    # q_proj is a suffix of add_q_proj (SD3's joint attention) but names no module: peft rejects it
    err = _error(capsys, "flow_grpo", tmp_path, "model.lora={r: 4, alpha: 8, target_modules: [q_proj]}")
    assert "model.lora.target_modules" in err and "to_q" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_model_path_without_model_index(tmp_path, capsys):
    folder = tmp_path / "not_a_pipeline"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    err = _error(capsys, "flow_grpo", tmp_path, f"model.path={folder}")
    assert "model.path" in err and "model_index.json" in err


def test_flow_grpo_rejects_chunks(tmp_path, capsys):
    err = _error(capsys, "flow_grpo", tmp_path, "task.chunks.size=2")
    assert "flow_grpo" in err and "chunk_grpo" in err and "task.chunks" in err


def test_chunk_sizes_not_summing_to_the_steps(tmp_path, capsys):
    err = _error(capsys, "chunk_grpo", tmp_path, "task.chunks.sizes=[1,2]")
    assert "task.chunks.sizes" in err and "[1, 2]" in err and "4" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # found before any sampling


def test_missing_prompts_file(tmp_path, capsys):
    err = _error(capsys, "chunk_grpo", tmp_path, f"task.prompts={tmp_path / 'nowhere.jsonl'}")
    assert "task.prompts" in err and "nowhere.jsonl" in err and "does not exist" in err


@pytest.mark.slow
def test_flow_grpo_with_clip_score_and_a_colour_reward_logs_both_and_their_weighted_sum(tmp_path):
    """CLIP score (open_clip, local weights) and a verifiable reward in one run: each component is
    logged, and the reward is their weighted sum (checked on the evaluation images)."""
    from mmpo.rewards.clip_score import build_tiny_clip

    config, weights = build_tiny_clip(tmp_path / "clip")
    rewards = (
        f"task.rewards=[{{name: clip_score, model: {config}, weights: {weights}, weight: 0.5}}, "
        "{name: target_color, meta_key: color, weight: 2.0}]"
    )
    lines = _train("flow_grpo", tmp_path / "run", rewards, "trainer.max_steps=1")
    for line in (lines[0], lines[-1]):
        weighted = 0.5 * line["eval/clip_score"] + 2.0 * line["eval/target_color"]
        assert line["eval/reward"] == pytest.approx(weighted, abs=1e-5)
        assert -1.0 <= line["eval/clip_score"] <= 1.0
    assert {"reward/clip_score", "reward/target_color"} <= set(lines[-1])
    weighted = 0.5 * lines[-1]["reward/clip_score"] + 2.0 * lines[-1]["reward/target_color"]
    assert lines[-1]["reward_mean"] == pytest.approx(weighted, abs=1e-5)


@pytest.mark.slow
def test_micro_batch_size_changes_neither_the_samples_nor_the_update(tmp_path):
    """Rollout noise is drawn for the whole batch up front and the loss of a micro batch is weighted
    by its share, so 1 micro batch of 4 rows and 4 of 1 row give the same step."""
    a = _train("flow_grpo", tmp_path / "a", "trainer.max_steps=1", "rollout.group_size=4", "trainer.micro_batch_size=4")
    b = _train("flow_grpo", tmp_path / "b", "trainer.max_steps=1", "rollout.group_size=4", "trainer.micro_batch_size=1")
    assert a[-1]["reward_mean"] == b[-1]["reward_mean"]
    for key in ("grad_norm", "kl"):
        assert a[-1][key] == pytest.approx(b[-1][key], rel=1e-4, abs=1e-9), key
    # at ratio 1, pg_loss = -mean(A) = 0 exactly in math: what is left is float32 rounding of O(1)
    # advantages summed in another order (the 2-epoch test in test_diffusion_objective.py compares
    # a non-zero pg_loss at rel 1e-4)
    assert a[-1]["pg_loss"] == pytest.approx(b[-1]["pg_loss"], abs=1e-6)
