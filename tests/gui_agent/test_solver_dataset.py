"""The scripted MiniWoB++ oracle (tasks/gui_agent/solver.py) solves live episodes in headless
Chromium with pixel clicks, and data_prep/miniwob_episodes.py records them as a GUI episode
dataset that load_episodes reads back and the GUI rewards score as perfect."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("miniwob")
if not shutil.which("chromium") or not shutil.which("chromedriver"):
    pytest.fail(
        "chromium and chromedriver must be installed (apt-get install chromium chromium-driver; .ci/run does it)"
    )

from PIL import Image  # noqa: E402

from mmpo.errors import ConfigError  # noqa: E402
from mmpo_tasks.gui_agent.actions import Action, parse_action  # noqa: E402
from mmpo_tasks.gui_agent.episodes import load_episodes  # noqa: E402
from mmpo_tasks.gui_agent.miniwob_env import GuiObservation, MiniWobEnv  # noqa: E402
from mmpo_tasks.gui_agent.rewards import GuiRewardConfig, episode_success, step_rewards  # noqa: E402
from mmpo_tasks.gui_agent.solver import SOLVABLE_TASKS, ScriptedSolver, SolverError, solve_step  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "data_prep" / "miniwob_episodes.py"
OCCLUDED_SEED = 6  # click-test-2 seed 6: button TWO covers the centre of button ONE


@pytest.fixture(scope="module")
def script() -> dict[str, Any]:
    return runpy.run_path(str(SCRIPT))


def _inside(action: Action, box) -> bool:
    x0, y0, x1, y1 = box
    return x0 <= action.x <= x1 and y0 <= action.y <= y1


# -- live solver -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task, seeds",
    [
        ("click-test-2", [0, 1, 2, 3, OCCLUDED_SEED]),
        ("click-color", [0, 1, 2, 3, 4]),
        ("enter-text", [0, 1, 2, 3, 4]),  # click the field, type, click Submit
    ],
)
def test_solver_earns_the_reward_with_pixel_clicks(task: str, seeds: list[int], no_leftover_browser) -> None:
    env, solver = MiniWobEnv(task), ScriptedSolver(task)
    successes = 0
    try:
        for seed in seeds:
            obs = env.reset(seed=seed)
            solver.reset()
            reward, done, kinds = 0.0, False, []
            while not done and len(kinds) < 8:
                step = solver.act(obs)
                assert step is not None, f"{task} seed {seed}: solver gave up"
                assert step.action.kind in ("click", "type")  # never click_element
                if step.action.kind == "click":
                    assert _inside(step.action, step.target_box)
                    # DOM coordinates are screenshot pixels (scale 1): the box is the element's rect / screen
                    el = next(e for e in obs.dom if int(e["ref"]) == step.ref)
                    w, h = obs.screen_size
                    assert step.target_box[0] == pytest.approx(max(float(el["left"][0]), 0) / w)
                    assert step.target_box[1] == pytest.approx(max(float(el["top"][0]), 0) / h)
                    if task == "click-test-2" and seed == OCCLUDED_SEED:  # not the covered centre
                        cx, cy = (
                            (step.target_box[0] + step.target_box[2]) / 2,
                            (step.target_box[1] + step.target_box[3]) / 2,
                        )
                        assert (step.action.x, step.action.y) != pytest.approx((cx, cy))
                kinds.append(step.action.kind)
                obs, reward, done, info = env.step(step.action, obs.screen_size)
                assert "env_error" not in info
            successes += done and reward > 0
            if task == "enter-text":
                assert kinds == ["click", "type", "click"]
    finally:
        env.close()
    assert successes == len(seeds)  # measured: 50/50 seeds for every task in SOLVABLE_TASKS


def _obs(dom: list[dict[str, Any]], instruction: str) -> GuiObservation:
    return GuiObservation(np.zeros((210, 160, 3), np.uint8), instruction, dom)


def _el(
    ref: int, parent: int, tag: str, text: str, rect: tuple[float, float, float, float], **kw: Any
) -> dict[str, Any]:
    return {
        "ref": ref,
        "parent": parent,
        "tag": tag,
        "text": text,
        "value": "",
        "id": kw.get("id", ""),
        "classes": "",
        "left": [rect[0]],
        "top": [rect[1]],
        "width": [rect[2]],
        "height": [rect[3]],
        "bg_color": [1.0, 1.0, 1.0, 1.0],
        "fg_color": [0.0, 0.0, 0.0, 1.0],
        "flags": [0, 0, 0, 1],
    }


def test_solve_step_is_stateless_and_avoids_covered_points() -> None:
    dom = [
        _el(1, 0, "body", "", (0, 0, 160, 210)),
        _el(4, 1, "button", "ONE", (40, 60, 40, 40)),
        _el(5, 1, "button", "TWO", (50, 70, 40, 40)),
    ]  # TWO (painted later) covers ONE's centre
    obs = _obs(dom, "Click button ONE.")
    a = solve_step("click-test-2", obs)
    assert a is not None and a.kind == "click"
    x, y = a.x * 160, a.y * 210
    assert 40 <= x <= 80 and 60 <= y <= 100 and not (50 <= x <= 90 and 70 <= y <= 110)
    assert solve_step("click-test-2", _obs(dom, "Click button THREE.")) is None  # no such button
    fully = dom[:2] + [_el(5, 1, "button", "TWO", (30, 50, 60, 60))]
    assert solve_step("click-test-2", _obs(fully, "Click button ONE.")) is None  # nothing visible
    with pytest.raises(SolverError, match="memory.*ScriptedSolver"):
        solve_step("click-button-sequence", obs)
    with pytest.raises(SolverError, match=r"'click-nope'.*solvable tasks: .*click-test-2"):
        ScriptedSolver("click-nope")


# -- dataset CLI -------------------------------------------------------------------------------
def test_cli_writes_a_dataset_that_loads_and_scores_perfect(
    script: dict[str, Any], tmp_path: Path, no_leftover_browser
) -> None:
    out = tmp_path / "miniwob"
    rc = script["main"](["--out", str(out), "--tasks", "click-test-2", "login-user", "--seeds", "0:3", "--no-progress"])
    assert rc == 0
    assert not list(tmp_path.glob("miniwob.tmp-*"))
    episodes, skipped = load_episodes(out / "episodes.jsonl")
    assert skipped == [] and len(episodes) == 6
    by_task = {t: [ep for ep in episodes if ep.meta["task"] == t] for t in ("click-test-2", "login-user")}
    assert [ep.meta["seed"] for ep in by_task["click-test-2"]] == [0, 1, 2]
    assert all(len(ep.steps) == 1 for ep in by_task["click-test-2"])
    # click username, type, click password, type, click Login
    assert all(
        [s.action.kind for s in ep.steps] == ["click", "type", "click", "type", "click"] for ep in by_task["login-user"]
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["episodes"] == 6 and meta["steps"] == 3 + 3 * 5 and meta["dropped"] == []
    assert meta["per_task"]["login-user"]["success_rate"] == 1.0

    cfg = GuiRewardConfig()
    for ep in episodes:
        assert ep.meta["success"] is True and ep.meta["reward"] > 0 and ep.id == f"{ep.meta['task']}-s{ep.meta['seed']}"
        for s in ep.steps:
            with Image.open(s.screenshot) as im:
                assert im.size == s.screen_size == (160, 210)
            assert s.target_box is not None
            if s.action.kind == "click":
                assert _inside(s.action, s.target_box)
        golds = [s.action for s in ep.steps]
        # the solver's actions as a model would write them (3 decimals) score as perfect
        preds = [parse_action(f"<action>{a.to_text()}</action>") for a in golds]
        reward, parts = step_rewards(preds, golds, [s.target_box for s in ep.steps], cfg)
        assert reward.tolist() == pytest.approx([1.0] * len(golds))
        assert episode_success(parts["step_success"].tolist()) == 1.0
    # a step's screenshot is the screen before its action: the username field is empty before
    # the type step and holds the text on the next step's screenshot
    ep = by_task["login-user"][0]
    x0, y0, x1, y1 = ep.steps[1].target_box
    w, h = ep.steps[1].screen_size

    def ink(shot: str) -> int:
        im = np.asarray(Image.open(shot).convert("L"), dtype=np.int32)
        inner = im[int(y0 * h) + 4 : int(y1 * h) - 4, int(x0 * w) + 4 : int(x1 * w) - 4]  # inside the (focus) border
        return int((inner < 128).sum())

    assert ep.steps[1].action.kind == "type" and ink(ep.steps[2].screenshot) > ink(ep.steps[1].screenshot) + 20


def test_only_success_drops_failed_episodes_and_their_screenshots(
    script: dict[str, Any], tmp_path: Path, no_leftover_browser
) -> None:
    out = tmp_path / "ds"
    # login-user needs 5 steps: with 2 it fails and is dropped
    meta = script["record_episodes"](
        ["click-test-2", "login-user"], [0], out, only_success=True, max_steps=2, progress=False
    )
    assert meta["episodes"] == 1 and meta["per_task"]["login-user"]["successes"] == 0
    assert meta["dropped"] == [{"task": "login-user", "seed": 0, "reason": meta["dropped"][0]["reason"]}]
    assert meta["dropped"][0]["reason"].startswith("failed")
    assert not list((out / "screenshots" / "login-user").glob("*.png"))
    episodes, _ = load_episodes(out / "episodes.jsonl")
    assert [ep.id for ep in episodes] == ["click-test-2-s0"]


def test_cli_errors_are_clear(script: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x"
    assert script["main"](["--out", str(out), "--tasks", "click-test", "click-nope", "--seeds", "0:2"]) == 2
    err = capsys.readouterr().err
    assert "'click-nope'" in err and all(t in err for t in SOLVABLE_TASKS)
    assert not out.exists()
    for bad in ("5:2", "a:b", "-1"):
        with pytest.raises(ConfigError, match="--seeds"):
            script["parse_seeds"]([bad])
    assert script["parse_seeds"](["0:3", "2", "7"]) == [0, 1, 2, 7]
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        script["record_episodes"](["click-test"], [0], out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
