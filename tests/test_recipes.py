"""Every recipe runs as written: each configs/*.yaml goes through what ``mmpo train`` does before
any model loads (config, task with its data, objective, trainer requirements) and either passes or
stops only with its documented hint; the data a recipe builds on first use is built once,
atomically, in the cache ($MMPO_CACHE here: a temporary folder)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmpo.cache import BUILT_FILE, build_once, cache_root, data_folder, settings_digest
from mmpo.config import load_config
from mmpo.errors import ConfigError, MMPOError
from mmpo.rollout.engines.vllm import VLLMEngine
from mmpo.rollout.env_runner import EnvSpec
from mmpo.trainers import trainer_class_for

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
#: the hiconagent recipe records 90 MiniWoB++ episodes on first use; here 2 (the same code path)
SMALL = {"hiconagent.yaml": ["task.record.tasks=[click-test-2]", "task.record.seeds.count=2"]}


def _vllm_env_present() -> bool:
    python = os.environ.get("MMPO_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    return Path(python).exists()


#: recipe -> (when it may stop, the hint it must then give)
HINTS = {
    "patho_r1_dapo.yaml": (
        lambda: not (ROOT / "runs" / "patho_r1_grpo" / "model").exists(),
        "run that stage first: `mmpo train configs/patho_r1_grpo.yaml`",
    ),
    "vllm_text_demo.yaml": (lambda: not _vllm_env_present(), "make vllm-env"),
}


@pytest.fixture(scope="module")
def recipe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mmpo_cache")


@pytest.mark.parametrize(
    "recipe",
    [pytest.param(r, marks=pytest.mark.slow) if r in SMALL else r for r in RECIPES],
)
def test_recipe_loads_as_written_or_names_the_command(recipe: str, recipe_cache: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # recipes name files relative to the repository, as the README runs them
    monkeypatch.setenv("MMPO_CACHE", str(recipe_cache))
    path = f"configs/{recipe}"
    try:
        cfg = load_config(path, SMALL.get(recipe, []))
        task, algo = trainer_class_for(cfg.task.name).prepare(cfg)
    except MMPOError as e:
        may_stop, hint = HINTS.get(recipe, (lambda: False, None))
        assert may_stop() and hint is not None, f"{recipe} fails to load: {e}"
        assert hint in str(e)
        return
    assert recipe not in HINTS or not HINTS[recipe][0]()  # it loads only when its requirement is met
    assert task.name == cfg.task.name and algo.advantage_fn is not None


# -- the cache --------------------------------------------------------------------------------
def test_cache_root_honours_mmpo_cache_then_xdg(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MMPO_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("MMPO_CACHE")
    assert cache_root() == tmp_path / "x" / "mmpo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "mmpo"


def test_the_folder_name_is_the_hash_of_the_settings(monkeypatch, tmp_path: Path) -> None:
    import hashlib

    monkeypatch.setenv("MMPO_CACHE", str(tmp_path))
    settings = {"b": 2, "a": [1, "x"]}
    digest = hashlib.sha256(b'{"a":[1,"x"],"b":2}').hexdigest()[:12]
    assert settings_digest(settings) == digest
    assert data_folder("demo", settings) == tmp_path / "data" / f"demo-{digest}"
    assert settings_digest({"a": [1, "x"], "b": 3}) != digest


def _writer(calls: list[Path], text: str = "rows"):
    def build(out: Path) -> None:
        calls.append(out)
        out.mkdir()
        (out / "data.txt").write_text(text)

    return build


def test_build_once_builds_then_reuses(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("MMPO_CACHE", str(tmp_path))
    calls: list[Path] = []
    first = build_once("demo", {"n": 1}, _writer(calls), "demo rows (1)")
    err = capsys.readouterr().err
    assert err.count("building demo rows (1) into") == 1 and str(first) in err and "once; cached" in err
    assert (first / "data.txt").read_text() == "rows" and len(calls) == 1
    assert json.loads((first / BUILT_FILE).read_text())["settings"] == {"n": 1}
    assert calls[0] != first and not calls[0].exists()  # built elsewhere, renamed into place
    again = build_once("demo", {"n": 1}, _writer(calls), "demo rows (1)")
    assert again == first and len(calls) == 1 and capsys.readouterr().err == ""
    other = build_once("demo", {"n": 2}, _writer(calls), "demo rows (2)")
    assert other != first and len(calls) == 2


def test_an_interrupted_build_leaves_nothing_that_passes_as_built(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MMPO_CACHE", str(tmp_path))

    def half(out: Path) -> None:
        out.mkdir()
        (out / "data.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once("demo", {"n": 1}, half, "demo rows")
    final = data_folder("demo", {"n": 1})
    assert not final.exists() and list((tmp_path / "data").iterdir()) == []
    # a folder there without built.json (copied by hand, or written by an older version) is rebuilt
    final.mkdir(parents=True)
    (final / "data.txt").write_text("stale")
    calls: list[Path] = []
    assert build_once("demo", {"n": 1}, _writer(calls), "demo rows") == final
    assert (final / "data.txt").read_text() == "rows" and len(calls) == 1


def test_of_two_builds_at_once_the_first_to_finish_is_kept(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MMPO_CACHE", str(tmp_path))
    final = data_folder("demo", {"n": 1})

    def racing(out: Path) -> None:  # another process finishes while this one builds
        _writer([], "theirs")(final)
        (final / BUILT_FILE).write_text("{}")
        _writer([], "ours")(out)

    assert build_once("demo", {"n": 1}, racing, "demo rows") == final
    assert (final / "data.txt").read_text() == "theirs"
    assert [p.name for p in (tmp_path / "data").iterdir()] == [final.name]  # our copy is gone


# -- ript_vla: BabyAI-bot demonstrations on first use ------------------------------------------------
def test_babyai_demos_are_built_once_and_read_back(monkeypatch, tmp_path: Path, capsys) -> None:
    pytest.importorskip("minigrid")
    from mmpo_tasks.vla.data import load_demos
    from mmpo_tasks.vla.demos import cached_demos

    monkeypatch.setenv("MMPO_CACHE", str(tmp_path))
    spec = EnvSpec(id="BabyAI-GoToRedBallNoDists-v0", observation="minigrid_partial", tile_size=8, max_steps=16)
    folder = cached_demos(spec, 2)
    assert folder.parent == tmp_path / "data" and folder.name.startswith("babyai-demos-")
    steps, meta = load_demos(folder)
    assert meta["episodes"] == 2 and len({s.episode for s in steps}) == 2 and meta["env"]["max_steps"] == 16
    assert all(s.image.shape == (56, 56, 3) for s in steps)  # 7x7 tiles of 8 px: what the policy sees
    assert capsys.readouterr().err.count("building BabyAI demonstrations (2 bot episodes") == 1
    assert cached_demos(spec, 2) == folder and "building" not in capsys.readouterr().err
    assert cached_demos(spec, 3) != folder  # other settings, another folder


def test_demos_auto_is_refused_where_no_bot_can_build_them() -> None:
    pytest.importorskip("minigrid")
    cls = trainer_class_for("ript_vla")
    with pytest.raises(ConfigError, match=r"task.sft.max_episodes: with task.sft.demos: auto"):
        cls.prepare(load_config(ROOT / "configs/ript_vla_babyai.yaml", ["task.sft.max_episodes=0"]))
    with pytest.raises(ConfigError, match=r"task.sft.demos: auto builds BabyAI-bot demonstrations.*Pendulum-v1"):
        cls.prepare(load_config(ROOT / "configs/ript_vla_continuous.yaml", ["task.sft.demos=auto"]))
    miniwob = trainer_class_for("miniwob_grpo")
    with pytest.raises(ConfigError, match=r"task.sft.demos: miniwob_grpo builds no demonstrations itself"):
        miniwob.prepare(load_config(ROOT / "configs/miniwob_grpo.yaml", ["task.sft.demos=auto"]))


# -- hiconagent: MiniWoB++ episodes on first use -----------------------------------------------------
needs_chromium = pytest.mark.skipif(
    shutil.which("chromedriver") is None, reason="needs chromium + chromium-driver (MiniWoB++)"
)


@needs_chromium
@pytest.mark.slow
def test_hicon_records_its_episodes_once_when_no_file_is_given(monkeypatch, tmp_path: Path, capsys) -> None:
    from mmpo.tasks import build_task

    monkeypatch.setenv("MMPO_CACHE", str(tmp_path))
    options = {"record": {"tasks": ["click-test-2"], "seeds": {"start": 0, "count": 3}}, "eval_fraction": 0.0}
    task = build_task("hiconagent", options)
    data = Path(task.config.data)
    assert data.name == "episodes.jsonl" and data.parent.parent == tmp_path / "data"
    assert data.parent.name.startswith("miniwob-episodes-") and (data.parent / BUILT_FILE).is_file()
    assert [e.id for e in task.train_episodes] == ["click-test-2-s0", "click-test-2-s1", "click-test-2-s2"]
    assert task.num_train() == 3  # click-test-2: one click per episode
    assert capsys.readouterr().err.count("building MiniWoB++ episodes (1 task(s) x 3 seed(s)") == 1
    again = build_task("hiconagent", options)  # no browser this time: the cached file
    assert again.config.data == task.config.data and "building" not in capsys.readouterr().err


def test_hicon_record_names_the_key_of_an_unknown_task(monkeypatch, tmp_path: Path) -> None:
    from mmpo.tasks import build_task

    monkeypatch.setenv("MMPO_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=r"task.record.tasks: no scripted solver for MiniWoB task 'click-tset'"):
        build_task("hiconagent", {"record": {"tasks": ["click-tset"]}})
    assert not (tmp_path / "data").exists()  # refused before any browser started


# -- patho_r1_dapo and vllm_text_demo: the command to run first ------------------------------------
def test_a_later_stage_names_the_recipe_that_writes_its_model(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    stage_a = (ROOT / "configs/patho_r1_grpo.yaml").read_text().replace("runs/patho_r1_grpo", "runs/stage_a")
    (tmp_path / "configs" / "stage_a.yaml").write_text(stage_a)
    stage_b = (
        (ROOT / "configs/patho_r1_dapo.yaml").read_text().replace("runs/patho_r1_grpo/model", "runs/stage_a/model")
    )
    (tmp_path / "configs" / "stage_b.yaml").write_text(stage_b)
    with pytest.raises(ConfigError) as e:
        load_config("configs/stage_b.yaml")
    assert "'runs/stage_a/model'" in str(e.value) and "run that stage first: `mmpo train configs/stage_a.yaml`" in str(
        e.value
    )


def test_vllm_recipe_without_its_environment_says_make_vllm_env_before_any_model_loads(tmp_path: Path) -> None:
    missing = tmp_path / "no-venv" / "bin" / "python"
    with pytest.raises(ConfigError, match="make vllm-env"):
        VLLMEngine.check_environment({"python": str(missing)})
    VLLMEngine.check_environment({"python": sys.executable})  # present: passes
    cfg = load_config(
        ROOT / "configs/vllm_text_demo.yaml",
        [f"rollout.engine_options.python={missing}", f"task.train_file={ROOT / 'configs/vllm_text_demo.jsonl'}"],
    )
    with pytest.raises(ConfigError, match=r"no vLLM interpreter at .*no-venv.*make vllm-env"):
        trainer_class_for(cfg.task.name).prepare(cfg)


@needs_chromium
@pytest.mark.slow
def test_hicon_recipe_runs_as_written_and_a_relaunch_reuses_data_and_warm_start(tmp_path: Path) -> None:
    """`mmpo train configs/hiconagent.yaml` on a fresh machine (sizes cut): the episodes are recorded
    into the cache, stage 1 fits the tiny model and saves sft/model, HCPO runs; launched again, the
    run reuses both and resumes."""
    env = {**os.environ, "MMPO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    small = [
        f"output_dir={run}",
        "task.record.tasks=[click-test-2,focus-text]",
        "task.record.seeds.count=3",
        "task.warm_start.epochs=1",
        "task.eval_fraction=0.5",  # 4 of these 6 episodes are held out (a stable split by id)
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "eval.num_samples=2",
        "trainer.eval_every=0",
        "trainer.save_every=1",
        "resume.allow_changes=[trainer.max_steps]",  # the relaunch grows it: DCS reads max_steps
    ]

    def train(steps: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "mmpo", "train", "configs/hiconagent.yaml", *small, f"trainer.max_steps={steps}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    first = train(1)
    assert first.stderr.count("building MiniWoB++ episodes (2 task(s) x 3 seed(s)") == 1
    assert re.search(r"^warm start \(GUI steps\): \d+ examples, 1 epoch\(s\)", first.stdout, re.M)
    assert (run / "sft" / "model" / "config.json").is_file() and (run / "sft" / "model" / "warm_start.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "sft/loss_last_epoch" in records[0] and "eval/reward" in records[0]
    for noise in ("XDG_RUNTIME_DIR", "Setting accelerator", "Writing model shards"):
        assert noise not in first.stderr + first.stdout
    second = train(2)
    assert "building" not in second.stderr and "warm start (GUI steps)" not in second.stdout
    assert "resuming from" in second.stdout and "final evaluation (step 2)" in second.stdout
