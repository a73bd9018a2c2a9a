"""BabyAI bot demonstrations: generated with real MiniGrid, replayable, read back exactly, bad folders refused."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from mmpo.errors import ConfigError, DataError
from mmpo.rollout.env_runner import EnvRunner, EnvSpec, make_env
from mmpo_tasks.vla.data import DemoStep, demo_seeds, load_demos

pytest.importorskip("minigrid")

SCRIPT = Path(__file__).resolve().parents[2] / "data_prep" / "babyai_demos.py"
SPEC = EnvSpec(id="BabyAI-GoToRedBallNoDists-v0", observation="minigrid_partial", tile_size=8, max_steps=64)
EPISODES = 3


def _script() -> dict[str, Any]:
    return runpy.run_path(str(SCRIPT))


@pytest.fixture(scope="module")
def generate() -> Callable[..., dict[str, Any]]:
    return _script()["generate_demos"]


@pytest.fixture(scope="module")
def demos(
    tmp_path_factory: pytest.TempPathFactory, generate: Callable[..., dict[str, Any]]
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("demos") / "goto"
    meta = generate(SPEC, EPISODES, 0, out)
    return out, meta


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "demos.jsonl").read_text().splitlines()]


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def test_layout_and_meta(demos: tuple[Path, dict[str, Any]]) -> None:
    out, meta = demos
    assert (out / "demos.jsonl").is_file() and (out / "meta.json").is_file()
    assert json.loads((out / "meta.json").read_text()) == meta
    assert not list(out.parent.glob("goto.tmp-*"))  # the temp folder was renamed into place
    rows = _rows(out)
    lengths = [sum(1 for r in rows if r["episode"] == e) for e in range(EPISODES)]
    assert meta["episodes"] == EPISODES and all(n > 0 for n in lengths)
    assert meta["steps"] == len(rows) == sum(lengths)
    assert meta["mean_length"] == pytest.approx(sum(lengths) / EPISODES)
    assert meta["env"]["id"] == SPEC.id and meta["env"]["tile_size"] == 8 and meta["env"]["max_steps"] == 64
    assert meta["generator"] == "minigrid.utils.baby_ai_bot.BabyAIBot"
    assert len(meta["seeds"]) == EPISODES and meta["seeds"][0] == 0
    assert sorted(meta["seeds"] + meta["skipped_seeds"]) == list(range(meta["seeds"][-1] + 1))
    for r in rows:
        assert r["image"] == f"frames/ep{r['episode']:05d}_t{r['t']:03d}.png"
        assert (out / r["image"]).is_file()
        assert r["seed"] == meta["seeds"][r["episode"]]
        assert "red ball" in r["instruction"]
    for e in range(EPISODES):
        assert [r["t"] for r in rows if r["episode"] == e] == list(range(lengths[e]))
    assert len(list((out / "frames").glob("*.png"))) == len(rows)


def test_every_episode_replays_to_success(demos: tuple[Path, dict[str, Any]]) -> None:
    from minigrid.core.actions import Actions

    out, meta = demos
    rows = _rows(out)
    runner = EnvRunner(SPEC)
    for e, seed in enumerate(meta["seeds"]):
        actions = [r for r in rows if r["episode"] == e]
        env = make_env(SPEC)  # a fresh env: the episode depends on the seed only
        obs = runner._reset(env, seed)
        for i, r in enumerate(actions):
            assert Actions(r["action"]).name == r["action_name"]
            obs, reward, terminated, truncated, _ = env.step(r["action"])
            if i < len(actions) - 1:
                assert not (terminated or truncated)
        assert terminated and reward > 0
        env.close()


def test_first_frame_is_what_the_policy_sees(demos: tuple[Path, dict[str, Any]]) -> None:
    out, meta = demos
    runner = EnvRunner(SPEC)
    env = make_env(SPEC)
    for e, seed in enumerate(meta["seeds"]):
        seen = runner.observe(env, runner._reset(env, seed))
        png = np.asarray(Image.open(out / f"frames/ep{e:05d}_t000.png").convert("RGB"))
        assert png.dtype == np.uint8 and png.shape == seen.image.shape == (56, 56, 3)
        np.testing.assert_array_equal(png, seen.image)
        assert next(r for r in _rows(out) if r["episode"] == e)["instruction"] == seen.instruction
    env.close()


def test_loader_round_trip_and_max_episodes(demos: tuple[Path, dict[str, Any]]) -> None:
    out, meta = demos
    rows = _rows(out)
    steps, loaded_meta = load_demos(out)
    assert loaded_meta == meta and demo_seeds(loaded_meta) == meta["seeds"]
    assert all(isinstance(s, DemoStep) for s in steps)
    assert [s.action for s in steps] == [r["action"] for r in rows]
    assert [s.action_name for s in steps] == [r["action_name"] for r in rows]
    assert [s.instruction for s in steps] == [r["instruction"] for r in rows]
    assert [(s.episode, s.seed, s.t) for s in steps] == [(r["episode"], r["seed"], r["t"]) for r in rows]
    for s, r in zip(steps, rows):
        assert s.image.dtype == np.uint8 and s.image.shape == (56, 56, 3)
        np.testing.assert_array_equal(s.image, np.asarray(Image.open(out / r["image"])))
    first_two, _ = load_demos(str(out), max_episodes=2)
    assert {s.episode for s in first_two} == {0, 1}
    assert len(first_two) == sum(1 for r in rows if r["episode"] < 2)
    assert [s.action for s in first_two] == [s.action for s in steps[: len(first_two)]]


@pytest.mark.parametrize("entry", ["../outside.png", "frames/../../outside.png", "/etc/passwd", "C:\\x.png"])
def test_escaping_image_paths_are_refused(demos: tuple[Path, dict[str, Any]], tmp_path: Path, entry: str) -> None:
    folder = _copy(demos[0], tmp_path / "d")
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(tmp_path / "outside.png")  # exists, must not be read
    rows = _rows(folder)
    rows[1]["image"] = entry
    (folder / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"demos\.jsonl: line 2: key 'image'"):
        load_demos(folder)


def test_symlink_out_of_the_folder_is_refused(demos: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    folder = _copy(demos[0], tmp_path / "d")
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(outside)
    (folder / "frames" / "ep00000_t000.png").unlink()
    (folder / "frames" / "ep00000_t000.png").symlink_to(outside)
    with pytest.raises(DataError, match="resolves outside"):
        load_demos(folder)


def test_bad_files_are_named(demos: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    folder = _copy(demos[0], tmp_path / "d")
    lines = (folder / "demos.jsonl").read_text().splitlines()
    good = "\n".join(lines) + "\n"

    (folder / "demos.jsonl").write_text("\n".join(lines[:2] + ['{"episode": 0, "seed"'] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=r"demos\.jsonl: line 3: not valid JSON"):
        load_demos(folder)

    row = json.loads(lines[0])
    del row["action"]
    (folder / "demos.jsonl").write_text(json.dumps(row) + "\n" + good)
    with pytest.raises(DataError, match=r"demos\.jsonl: line 1: missing key 'action'"):
        load_demos(folder)

    (folder / "demos.jsonl").write_text(good)
    (folder / "frames" / "ep00001_t000.png").unlink()
    with pytest.raises(DataError, match=r"ep00001_t000\.png not found"):
        load_demos(folder)

    (folder / "frames" / "ep00001_t000.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*ep00001_t000\.png"):
        load_demos(folder)

    (folder / "meta.json").unlink()
    with pytest.raises(DataError, match=r"meta\.json: not found"):
        load_demos(folder)

    with pytest.raises(DataError, match=r"seeds"):
        demo_seeds({"episodes": 3})


def test_failed_seeds_are_skipped_and_generation_gives_up(
    generate: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    # with 3 steps the bot fails on most seeds (the ball is further away): those are skipped
    short = EnvSpec(id=SPEC.id, max_steps=3)
    meta = generate(short, 2, 0, tmp_path / "short")
    assert meta["episodes"] == 2 and meta["skipped_seeds"]
    assert sorted(meta["seeds"] + meta["skipped_seeds"]) == list(range(meta["seeds"][-1] + 1))
    steps, _ = load_demos(tmp_path / "short")
    assert {s.seed for s in steps} == set(meta["seeds"]) and max(s.t for s in steps) < 3
    # one step is too few on seeds 0..9: after 10 x episodes seeds it stops, writing nothing
    with pytest.raises(DataError, match=r"succeeded in only 0 of 10 seeds \(0\.\.9\)"):
        generate(EnvSpec(id=SPEC.id, max_steps=1), 1, 0, tmp_path / "never")
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob("never*"))


def test_missing_folder_says_how_to_generate(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found.*python data_prep/babyai_demos\.py --out .*nowhere"):
        load_demos(tmp_path / "nowhere")


def test_existing_folder_is_not_overwritten(
    demos: tuple[Path, dict[str, Any]], generate: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        generate(SPEC, 1, 5, out)
    assert (out / "keep.txt").read_text() == "mine" and not (out / "demos.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp folder left behind

    meta = generate(SPEC, 1, 5, out, overwrite=True)
    assert not (out / "keep.txt").exists() and meta["seeds"][0] >= 5
    assert len(load_demos(out)[0]) == meta["steps"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate(SPEC, 1, 0, empty)["episodes"] == 1  # an empty folder is fine without --overwrite


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = _script()["main"]
    out = tmp_path / "cli"
    assert main(["--episodes", "2", "--seed-start", "10", "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1 and "2 episode(s)" in summary
    meta = json.loads((out / "meta.json").read_text())
    assert meta["episodes"] == 2 and meta["seeds"][0] == 10 and meta["env"]["id"] == "BabyAI-GoToRedBallNoDists-v0"
    steps, _ = load_demos(out)
    assert len(steps) == meta["steps"] and {s.seed for s in steps} == set(meta["seeds"])
    assert main(["--episodes", "1", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--episodes", "0", "--out", str(tmp_path / "zero")]) == 2
    assert "--episodes must be at least 1" in capsys.readouterr().err
