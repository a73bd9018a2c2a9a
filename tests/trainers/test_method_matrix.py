"""The GRPO-family methods table (:mod:`mmpo.methods`, shown in docs/algorithms.md) is true: each
method loads in a recipe of every trainer kind it lists and runs one step there, and every other
kind's recipe refuses it at config load with a ConfigError naming the setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.airquality import SMALL as SERIES_SMALL

from mmpo.cli import main
from mmpo.config import load_config
from mmpo.errors import ConfigError
from mmpo.methods import ALL_KINDS, KIND_RECIPES, METHODS, Method, kind_settings
from mmpo.trainers import trainer_class_for

ROOT = Path(__file__).resolve().parents[2]

#: overrides that make each kind's recipe run one step in seconds
SMALL: dict[str, list[str]] = {
    "token": [
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "eval.num_samples=4",
        "eval.batch_size=4",
        "task.num_train=64",
        "algorithm.max_draws=2",
    ],
    # two prompts: COPO's global advantage compares prompts (one prompt alone gets A = 0)
    "denoising": ["rollout.prompts_per_step=2", "rollout.group_size=2", "eval.num_samples=1"],
    "noise": ["rollout.prompts_per_step=2", "rollout.group_size=2", "eval.num_samples=1"],
    "environment": [
        "task.env.max_steps=3",
        "task.sft.epochs=1",
        "task.eval_videos=0",
        "task.ript.dynamic_sampling=false",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "trainer.minibatch_size=4",
        "eval.num_samples=1",
        "eval.batch_size=1",
    ],
    "series": [o for o in SERIES_SMALL if not o.startswith("trainer.eval_every")],
}
SMALL_RECIPE = {
    "configs/pathology_demo.yaml": ["rollout.prompts_per_step=2", "rollout.group_size=4", "eval.num_samples=4"],
}
COMMON = ["trainer.max_steps=1", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_samples=0"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _overrides(kind: str, *settings: str) -> list[str]:
    return [*kind_settings(kind), *settings]


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_each_method_loads_where_it_runs_and_is_refused_elsewhere(method: Method, kind: str) -> None:
    def prepare() -> None:
        cfg = load_config(method.recipe(kind), _overrides(kind, *method.settings))
        trainer_class_for(cfg.task.name).prepare(cfg)

    if kind in method.kinds:
        prepare()
        return
    with pytest.raises(ConfigError) as err:
        prepare()
    keys = {s.split("=", 1)[0] for s in method.settings}
    assert any(k.split(".")[0] in str(err.value) for k in keys), str(err.value)


def _one_step(tmp_path: Path, kind: str, settings: list[str], recipe: str | None = None) -> dict:
    run = tmp_path / "run"
    small = SMALL[kind] if recipe is None else SMALL_RECIPE[recipe]
    argv = ["train", recipe or KIND_RECIPES[kind], f"output_dir={run}", *small, *COMMON, *_overrides(kind, *settings)]
    assert main(argv) == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    step = [l for l in lines if l["step"] == 1]
    assert step and all(isinstance(v, (int, float)) for v in step[0].values())
    return step[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if "token" in m.kinds], ids=lambda m: m.name)
def test_each_token_method_runs_a_step(tmp_path: Path, method: Method) -> None:
    metrics = _one_step(tmp_path, "token", list(method.settings), method.token_recipe)
    assert metrics["loss"] == metrics["loss"]  # finite (not NaN)


#: FIND's reward (shape_at) may be negative: BNPO's rescaling range must hold it
RANGE = {"noise": ["algorithm.advantage_options={decompose: true, min_value: -1.0, max_value: 1.0}"]}
#: the other kinds: one run per distinct advantage (COPO and VADE together)
OTHER_RUNS = [
    (kind, [*next(m for m in METHODS if m.name == "copo").settings, "rollout.prompt_sampler=vade"])
    for kind in ("denoising", "noise", "environment", "series")
] + [
    (kind, list(next(m for m in METHODS if m.name == name).settings) + RANGE.get(kind, []))
    for name in ("bnpo decompose", "hapo_tlga")
    for kind in next(m for m in METHODS if m.name == name).kinds
    if kind != "token"
]


@pytest.mark.slow
@pytest.mark.parametrize("kind,settings", OTHER_RUNS, ids=[f"{k}-{s[0].split('=')[-1]}" for k, s in OTHER_RUNS])
def test_the_other_kinds_run_their_methods_a_step(tmp_path: Path, kind: str, settings: list[str]) -> None:
    metrics = _one_step(tmp_path, kind, settings)
    assert metrics["loss"] == metrics["loss"]
