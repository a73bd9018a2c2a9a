"""The RIPT-VLA recipes end to end through ``mmpo train`` / ``mmpo eval``: real BabyAI (MiniGrid) and
gymnasium Pendulum, a tiny Qwen2-VL built offline, BabyAI-bot demonstrations; the SFT stage, RIPT
steps, saved models that transformers opens, deterministic evaluation with GIFs, resume, and the
config errors a user meets first."""

from __future__ import annotations

import json
import math
import runpy
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("minigrid")
pytest.importorskip("gymnasium")

from mmpo.cli import main
from mmpo.rollout.env_runner import EnvSpec

ROOT = Path(__file__).resolve().parents[2]
BABYAI = str(ROOT / "configs" / "ript_vla_babyai.yaml")
CONTINUOUS = str(ROOT / "configs" / "ript_vla_continuous.yaml")
ENV_ID = "BabyAI-GoToRedBallNoDists-v0"
MAX_STEPS = 6  # env steps per episode, in the demonstrations and the runs alike
DEMO_EPISODES = 3
TRAIN_STEPS = 2
EVAL_N = 5
ACTIONS = ("left", "right", "forward")
# the recipe, made small: 2 contexts x 4 rollouts, <= 4 drawn per step, 5 eval seeds
BABYAI_SMALL = [
    f"task.env.max_steps={MAX_STEPS}",
    "rollout.group_size=4",
    "rollout.prompts_per_step=2",
    "task.ript.max_draws=2",
    "trainer.minibatch_size=4",
    "trainer.update_epochs=1",
    f"eval.num_samples={EVAL_N}",
    f"eval.batch_size={EVAL_N}",
    "task.eval_videos=2",
    # contexts whose red ball is 1-5 bot steps away (seeds 36 and 39: one 'forward'): a 6-step
    # episode of the barely trained policy sometimes succeeds, so mixed groups are kept and trained on
    "task.train_seeds.start=33",
    "task.train_seeds.count=7",
]
BABYAI_SFT = ["task.sft.epochs=2", "task.sft.batch_size=2", "task.sft.lr=1.0e-2"]
CONTINUOUS_SMALL = [
    "task.env.max_steps=4",
    "rollout.group_size=2",
    "rollout.prompts_per_step=2",
    "task.ript.max_draws=2",
    "trainer.minibatch_size=4",
    "eval.num_samples=4",
    "eval.batch_size=4",
    "task.policy.head_width=32",
    "task.ript.reward=env_return",  # every group's returns differ: each context is kept and trained on
]
SCALAR_KEYS = (
    "success_rate",
    "success_ci_low",
    "success_ci_high",
    "episodes",
    "return",
    "episode_length",
    "invalid_action_rate",
)


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _episodes(out: Path) -> list[dict[str, Any]]:
    """The rows of ``mmpo eval``'s predictions.jsonl (one episode per held-out seed)."""
    return [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]


def _check_row(row: dict[str, Any], seed: int, max_steps: int) -> None:
    """The one evaluator's row layout for an episode: id, instruction, the actions taken, scores."""
    assert set(row) == {"id", "input", "prediction", "answer", "success", "return", "length", "invalid_actions"}
    assert row["id"] == f"seed{seed}" and row["answer"] is None and row["success"] in (0.0, 1.0)
    assert 1 <= row["length"] <= max_steps and row["length"] == int(row["length"])
    assert len(row["prediction"].split()) == row["length"] and 0 <= row["invalid_actions"] <= row["length"]


def _check_ci(m: dict[str, Any], prefix: str = "") -> None:
    lo, rate, hi = m[f"{prefix}success_ci_low"], m[f"{prefix}success_rate"], m[f"{prefix}success_ci_high"]
    assert 0.0 <= lo <= rate <= hi <= 1.0
    assert hi - lo > 0.0  # a handful of episodes: the interval is wide, never a point


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 successful BabyAI-bot episodes of the recipe's env, at the runs' step limit."""
    generate = runpy.run_path(str(ROOT / "data_prep" / "babyai_demos.py"))["generate_demos"]
    out = tmp_path_factory.mktemp("demos") / "goto"
    spec = EnvSpec(id=ENV_ID, observation="minigrid_partial", tile_size=8, max_steps=MAX_STEPS)
    meta = generate(spec, DEMO_EPISODES, 0, out)
    assert meta["episodes"] == DEMO_EPISODES and meta["env"]["max_steps"] == MAX_STEPS
    return out


@pytest.fixture(scope="module")
def babyai_run(tmp_path_factory: pytest.TempPathFactory, demos: Path) -> Path:
    """The BabyAI recipe: SFT (2 epochs) on the demonstrations, then 2 RIPT steps, a checkpoint each step."""
    run = tmp_path_factory.mktemp("babyai") / "run"
    args = [
        "train",
        BABYAI,
        f"output_dir={run}",
        f"task.sft.demos={demos}",
        *BABYAI_SMALL,
        *BABYAI_SFT,
        f"trainer.max_steps={TRAIN_STEPS}",
        "trainer.eval_every=1",
        "trainer.save_every=1",
        "trainer.keep_last=0",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        assert main(args) == 0
    return run


# -- 1. the BabyAI recipe through the CLI ------------------------------------------------------
def test_babyai_recipe_sft_then_ript(babyai_run: Path) -> None:
    run = babyai_run
    # the SFT stage: a model folder and its metrics
    assert (run / "sft" / "model" / "config.json").is_file()
    sft = json.loads((run / "sft" / "metrics.json").read_text())
    assert sft["demo_episodes"] == DEMO_EPISODES and sft["demo_steps"] > DEMO_EPISODES
    assert len(sft["history"]) == 2 and sft["loss_last_epoch"] < sft["loss_first_epoch"]
    assert all(math.isfinite(v) for v in sft["history"])

    lines = _metrics(run)
    assert [line["step"] for line in lines] == list(range(TRAIN_STEPS + 1))
    assert lines[0]["sft/demo_episodes"] == DEMO_EPISODES  # the SFT summary is logged with the baseline
    for line in lines:
        _check_ci(line, "eval/")
        assert line["eval/episodes"] == EVAL_N
        assert 1 <= line["eval/episode_length"] <= MAX_STEPS
    kept = 0.0
    for line in lines[1:]:
        for key in (
            "rollout/contexts_drawn",
            "rollout/contexts_run",
            "rollout/contexts_kept",
            "rollout/skipped_solved",
            "rollout/discarded_all_equal",
            "rollout/success_rate",
            "rollout/return",
            "rollout/episode_length",
            "rollout/invalid_action_rate",
            "optimizer_steps",
            "rollout_s",
            "lr",
        ):
            assert key in line, key
        r = {k.split("/", 1)[1]: v for k, v in line.items() if k.startswith("rollout/")}
        assert r["contexts_run"] + r["skipped_solved"] == r["contexts_drawn"] <= 2 * 2  # max_draws x prompts_per_step
        assert r["contexts_kept"] + r["discarded_all_equal"] <= r["contexts_run"]
        assert r["contexts_kept"] <= 2 and 0.0 <= r["success_rate"] <= 1.0
        assert 1 <= r["episode_length"] <= MAX_STEPS
        if r["contexts_kept"]:
            assert line["optimizer_steps"] >= 1 and math.isfinite(line["pg_loss"])
        kept += r["contexts_kept"]
    assert kept >= 1, "no context carried a learning signal: the RIPT update never ran"
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == [f"step_{s:08d}" for s in range(1, TRAIN_STEPS + 1)]

    # the final model opens with plain transformers and knows the action tokens
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(run / "model")
    processor = AutoProcessor.from_pretrained(run / "model")
    vocab = processor.tokenizer.get_vocab()
    ids = [vocab.get(f"<|act_{a}|>") for a in ACTIONS]
    assert None not in ids and len(set(ids)) == 3
    assert model.get_input_embeddings().weight.shape[0] > max(ids)
    assert [processor.tokenizer.decode([i]) for i in ids] == [f"<|act_{a}|>" for a in ACTIONS]  # never split


# -- 2. mmpo eval: run folder and SFT model, CIs, episodes, GIFs, determinism --------------------
def _eval(checkpoint: Path, out: Path, *extra: str) -> dict[str, Any]:
    assert main(["eval", BABYAI, f"checkpoint={checkpoint}", f"output_dir={out}", *BABYAI_SMALL, *extra]) == 0
    return json.loads((out / "eval" / "metrics.json").read_text())


def _check_gif(path: Path, episode: dict[str, Any]) -> bool:
    """The runner records one frame before any action and one per step (an invalid output without
    a task.env.noop_action leaves the env as it was: its frame repeats the last). Pillow folds a
    frame equal to the previous one (e.g. 'forward' into a wall) into that frame's duration, so
    n_frames can be smaller than the number of recorded frames while the total duration counts
    every one of them. Returns whether the GIF is animated."""
    from PIL import Image

    recorded = episode["length"] + 1
    with Image.open(path) as im:
        assert im.format == "GIF"
        frames, total = im.n_frames, 0
        for k in range(frames):
            im.seek(k)
            total += im.info["duration"]
            # MiniGrid's full top view (square, not the 7x7 egocentric one), with the step's caption below it
            assert im.size[1] > im.size[0] > 56
        animated = bool(getattr(im, "is_animated", False))
    assert 1 <= frames <= recorded and animated == (frames > 1)
    assert total == recorded * 250  # fps 4: 250 ms a frame
    return animated


def test_eval_cli_run_and_sft_model(babyai_run: Path, tmp_path: Path) -> None:
    eval_seeds = list(range(100_000, 100_000 + EVAL_N))
    final = _metrics(babyai_run)[-1]
    outs = {}
    for name, ckpt in (
        ("run", babyai_run),
        ("run_again", babyai_run),
        ("sft", babyai_run / "sft" / "model"),
        ("model", babyai_run / "model"),
    ):
        outs[name] = tmp_path / name
        m = _eval(ckpt, outs[name])
        _check_ci(m)
        assert m["episodes"] == EVAL_N
        rows = _episodes(outs[name])
        assert [r["id"] for r in rows] == [f"seed{s}" for s in eval_seeds]  # the held-out seeds, in order
        for r, s in zip(rows, eval_seeds):
            _check_row(r, s, MAX_STEPS)
            assert set(r["prediction"].split()) <= {*ACTIONS, "invalid"}  # the actions by name
        assert sum(r["success"] for r in rows) / EVAL_N == pytest.approx(m["success_rate"])
        assert all("red ball" in r["input"] for r in rows)
        gifs = sorted((outs[name] / "eval" / "videos").iterdir())
        assert [g.name for g in gifs] == [f"seed{s}.gif" for s in eval_seeds[:2]]  # task.eval_videos=2
        animated = [_check_gif(g, r) for g, r in zip(gifs, rows)]  # every GIF is checked
        assert any(animated)
        if name != "sft":
            assert m["checkpoint"] == str(babyai_run / "model")
            # the same fixed sampling seed as the run's final evaluation: the same episodes
            for k in SCALAR_KEYS:
                assert m[k] == pytest.approx(final[f"eval/{k}"], abs=1e-9), k
        else:
            assert m["checkpoint"] == str(babyai_run / "sft" / "model")
    # evaluating a checkpoint twice gives the same episodes and the same videos
    pred = {name: (out / "eval" / "predictions.jsonl").read_bytes() for name, out in outs.items()}
    assert pred["run"] == pred["run_again"] == pred["model"]
    for g in (outs["run"] / "eval" / "videos").iterdir():
        assert g.read_bytes() == (outs["run_again"] / "eval" / "videos" / g.name).read_bytes()


# -- 3. the SFT stage fits the demonstrations ---------------------------------------------------
def test_sft_fits_the_demonstrations(demos: Path, tmp_path: Path) -> None:
    from mmpo.config import load_config
    from mmpo.models import load_model
    from mmpo.policies.vla_builder import build_vla_policy
    from mmpo.rollout.env_runner import EnvRunner, Observation
    from mmpo_tasks.vla.data import load_demos
    from mmpo_tasks.vla.trainer import RiptTrainer

    run = tmp_path / "fit"
    cfg = load_config(
        BABYAI,
        [
            f"output_dir={run}",
            f"task.sft.demos={demos}",
            *BABYAI_SMALL,
            "trainer.max_steps=1",
            "task.sft.epochs=30",
            "task.sft.batch_size=4",
            "task.sft.lr=5.0e-3",
        ],
    )
    trainer = RiptTrainer(cfg, run)  # the SFT stage runs in the constructor
    try:
        steps, _ = load_demos(demos)
        obs = [Observation(s.image, s.instruction) for s in steps]
        target = [s.action for s in steps]
        sft = trainer.sft_metrics
        assert sft["demo_steps"] == len(steps) and sft["steps"] == 30 * math.ceil(len(steps) / 4)
        # better than a uniform guess among the 3 actions, by far better than the fresh model
        assert sft["loss_last_epoch"] < math.log(3) < sft["loss_first_epoch"]
        acted = trainer.policy.act(obs, generator=torch.Generator().manual_seed(0), greedy=True).actions
    finally:
        trainer.close()
    assert None not in acted  # only action tokens
    match = sum(a == t for a, t in zip(acted, target)) / len(target)
    # chance is 1/3; the demonstrations hold near-identical frames with different actions (the bot
    # turns on what the 7x7 view does not show), so a tiny model does not reach 100%
    assert match >= 0.6 and len(set(acted)) >= 2, (acted, target)

    # the saved SFT model acts the same (tokenizer with the action tokens, weights)
    folder = run / "sft" / "model"
    model, processor, info = load_model(str(folder))
    runner = EnvRunner(trainer.tc.env)
    try:
        policy = build_vla_policy(model, processor, info, trainer.tc, runner, str(folder))
        rows = trainer.policy_module.get_input_embeddings().weight.shape[0]
        assert model.get_input_embeddings().weight.shape[0] == rows
        again = policy.act(obs, generator=torch.Generator().manual_seed(0), greedy=True).actions
    finally:
        runner.close()
    assert again == acted


# -- 4. continuous actions on Pendulum ------------------------------------------------------------
@pytest.mark.parametrize("space", ["laplace", "binned"])
def test_continuous_recipe(space: str, tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "eval"
    extra = [f"task.policy.action_space={space}", *CONTINUOUS_SMALL]
    assert main(["train", CONTINUOUS, f"output_dir={run}", "trainer.max_steps=2", "trainer.eval_every=0", *extra]) == 0
    lines = _metrics(run)
    assert [line["step"] for line in lines] == [0, 1, 2]
    for line in lines[1:]:
        assert line["rollout/contexts_kept"] == 2 and line["optimizer_steps"] >= 1
        assert math.isfinite(line["pg_loss"]) and math.isfinite(line["grad_norm"])
        assert line["rollout/episode_length"] == 4
    _check_ci(lines[-1], "eval/")
    assert (run / "model" / "config.json").is_file() and (run / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    assert (run / "config.yaml").is_file()
    from transformers import AutoProcessor

    vocab = AutoProcessor.from_pretrained(run / "model").tokenizer.get_vocab()
    head = run / "model" / "action_head.safetensors"
    if space == "laplace":
        assert head.is_file() and "<|bin_0|>" not in vocab
        assert lines[-1]["eval/invalid_action_rate"] == 0.0
        # the saved head is the trained one (the engine checkpoint of the last step holds it)
        from safetensors.torch import load_file

        saved = load_file(str(head))
        engine = load_file(str(run / "checkpoints" / "step_00000002" / "engine" / "model.safetensors"))
        heads = {k.split("head.", 1)[1]: v for k, v in engine.items() if k.startswith("head.") or ".head." in k}
        assert set(saved) == set(heads) and all(torch.equal(saved[k], heads[k]) for k in saved)
        # greedy evaluation (the Laplace mean) of the saved model = the run's final evaluation
        assert main(["eval", CONTINUOUS, f"checkpoint={run}", f"output_dir={out}", *extra]) == 0
        m = json.loads((out / "eval" / "metrics.json").read_text())
        for k in SCALAR_KEYS:
            assert m[k] == pytest.approx(lines[-1][f"eval/{k}"], rel=1e-6, abs=1e-6), k
        rows = _episodes(out)
        assert [r["id"] for r in rows] == [f"seed{s}" for s in range(100_000, 100_004)]
        for r, s in zip(rows, range(100_000, 100_004)):
            _check_row(r, s, 4)
            assert r["length"] == 4 and r["invalid_actions"] == 0.0
            # each action a 1-D torque vector, "(x)"
            assert all(a.startswith("(") and a.endswith(")") for a in r["prediction"].split())
        # task.eval_videos=2 in the recipe: GIFs of the first two episodes
        assert sorted(g.name for g in (out / "eval" / "videos").iterdir()) == ["seed100000.gif", "seed100001.gif"]
    else:
        assert not head.exists()
        assert all(f"<|bin_{k}|>" in vocab for k in range(32)) and "<|bin_32|>" not in vocab


# -- 5. resume ---------------------------------------------------------------------------------
def test_resume_skips_the_sft_stage(
    babyai_run: Path, demos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(babyai_run, run)  # 2 steps, a checkpoint after each
    shutil.rmtree(run / "model")
    sft_metrics = run / "sft" / "metrics.json"
    before = (sft_metrics.stat().st_mtime_ns, sft_metrics.read_bytes())
    sft_weights = (run / "sft" / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    args = [
        "train",
        BABYAI,
        f"output_dir={run}",
        f"task.sft.demos={demos}",
        *BABYAI_SMALL,
        *BABYAI_SFT,
        "trainer.max_steps=3",
        "trainer.eval_every=1",
        "trainer.save_every=1",
        "trainer.keep_last=0",
    ]
    assert main(args) == 0
    out = capsys.readouterr()
    assert f"resuming from {run / 'checkpoints' / 'step_00000002'}" in out.out
    assert "sft (demonstrations)" not in out.err  # no SFT progress bar: the stage did not run again
    assert (sft_metrics.stat().st_mtime_ns, sft_metrics.read_bytes()) == before
    assert (run / "sft" / "model" / "model.safetensors").read_bytes() == sft_weights
    lines = _metrics(run)
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    assert lines[:3] == _metrics(babyai_run)  # the first steps are kept as they were
    assert "rollout/contexts_drawn" in lines[3] and "sft/demo_episodes" not in lines[3]
    assert (run / "model" / "config.json").is_file() and (run / "checkpoints" / "step_00000003" / "COMPLETE").exists()


# -- 6. config errors a user meets ----------------------------------------------------------------
def _fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 2
    return " ".join(capsys.readouterr().err.split())  # the message is wrapped at 100 columns


def test_config_errors(demos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = [
        "train",
        BABYAI,
        f"output_dir={tmp_path / 'run'}",
        *BABYAI_SMALL,
        "trainer.max_steps=1",
        "task.sft.demos=''",
    ]

    # evaluation contexts that are also training contexts (train: 33..39)
    err = _fails(capsys, *base, "task.eval_seeds.start=35", "task.eval_seeds.count=10")
    assert "task.eval_seeds overlap the training seeds (task.train_seeds) in 5 seed(s) (35, 36, 37, 38, 39)" in err
    assert "task.eval_seeds.start >= 40" in err

    # evaluation contexts the demonstrations were recorded on (seeds 1, 4, 5)
    err = _fails(capsys, *base, f"task.sft.demos={demos}", "task.eval_seeds.start=0", "task.eval_seeds.count=10")
    assert "task.eval_seeds" in err and "demonstrations" in err and "(1, 4, 5)" in err

    # demonstrations recorded in another level
    err = _fails(capsys, *base, f"task.sft.demos={demos}", "task.env.id=BabyAI-GoToRedBall-v0")
    assert f"task.sft.demos={str(demos)!r}" in err and f"recorded in '{ENV_ID}'" in err
    assert "'BabyAI-GoToRedBall-v0'" in err

    missing = tmp_path / "no_demos"
    err = _fails(capsys, *base, f"task.sft.demos={missing}")
    assert str(missing) in err and "python data_prep/babyai_demos.py --out" in err

    # ZeRO-3 forwards are collective and ranks act unequally often (ZeRO-2: test_environment_distributed.py)
    err = _fails(capsys, *base, "deepspeed=configs/deepspeed/zero3.json")
    assert "ZeRO stage 3" in err and "configs/deepspeed/zero2.json" in err

    # the KL to the frozen start policy goes in the loss only
    err = _fails(capsys, *base, "algorithm.kl_options.beta=0.1", "algorithm.kl_placement=reward")
    assert "algorithm.kl_placement" in err and "environment trainer" in err

    err = _fails(capsys, *base, "task.policy.actions=[left,jump,forward]")
    assert "task.policy.actions" in err and "'jump'" in err and ENV_ID in err

    assert not (tmp_path / "run" / "model").exists()
