"""Branching rollouts in the token trainer (``rollout.tree``): the recipes run as written, tree rows
carry their nodes into the update, each shared token is decoded once, and what a tree cannot do is
refused at load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpo.cli import main
from mmpo.config import load_config
from mmpo.errors import ConfigError
from mmpo.trainers import trainer_class_for

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "rollout.prompts_per_step=2",
    "eval.num_samples=4",
    "eval.batch_size=4",
    "trainer.max_steps=1",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "trainer.log_samples=0",
]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _step(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["step"] == 1)


@pytest.mark.slow
def test_treepo_recipe_decodes_shared_tokens_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "configs/treepo.yaml", f"output_dir={run}", *SMALL, "algorithm.dynamic_sampling=false"]) == 0
    m = _step(run)
    # 2 prompts x 16 leaves of up to 8 tokens: the leaves hold more tokens than were decoded
    assert 0 < m["decoded_tokens"] < m["tree/leaf_tokens"] <= 2 * 16 * 8
    assert m["loss"] == m["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["latr", "arpo", "aepo_agent"])
def test_the_other_tree_recipes_run_a_step(tmp_path: Path, recipe: str) -> None:
    run = tmp_path / "run"
    assert main(["train", f"configs/{recipe}.yaml", f"output_dir={run}", *SMALL]) == 0
    m = _step(run)
    assert m["decoded_tokens"] > 0 and m["loss"] == m["loss"]


@pytest.mark.slow
def test_credit_once_trains_exactly_as_the_replicated_rows(tmp_path: Path) -> None:
    """Two steps of TreePO with and without ``algorithm.credit_once``: the same losses and gradient
    norms (the merged weights reproduce the replicated loss and its gradient), so the same run."""
    lines = {}
    for name, extra in (("replicated", []), ("once", ["algorithm.credit_once=true"])):
        run = tmp_path / name
        argv = ["train", "configs/treepo.yaml", f"output_dir={run}", *SMALL, "trainer.max_steps=2", *extra]
        assert main([*argv, "algorithm.dynamic_sampling=false"]) == 0
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        lines[name] = [r for r in rows if r["step"] > 0]
    for a, b in zip(lines["replicated"], lines["once"]):
        for key in ("loss", "pg_loss", "grad_norm", "reward_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def _prepare(recipe: str, *overrides: str) -> None:
    cfg = load_config(f"configs/{recipe}.yaml", list(overrides))
    trainer_class_for(cfg.task.name).prepare(cfg)


@pytest.mark.parametrize(
    "recipe, overrides, named",
    [
        ("treepo", ["rollout.tree.n=8"], "rollout.tree.n=8"),
        ("treepo", ["rollout.is_correction=token_tis"], "rollout.is_correction='token_tis'"),
        ("treepo", ["rollout.tree.w=0"], "rollout.tree.w"),
        ("tool_rl", ["rollout.tree={method: treepo}"], "rollout.tree.method='treepo'"),
        ("treepo", ["rollout.tree={method: arpo}"], "rollout.tree.method='arpo'"),
        ("arpo", ["rollout.tree.beta=2.0"], "beta"),
        ("arpo", ["rollout.tree.nonsense=1"], "nonsense"),
        ("quickstart", ["algorithm.advantage=tree_subgroup"], "rollout.tree"),
        ("treepo", ["rollout.adaptive_temperature={tau: 0.05}"], "rollout.adaptive_temperature"),
        ("quickstart", ["algorithm.credit_once=true"], "algorithm.credit_once=True"),
        ("treepo", ["algorithm.credit_once=true", "algorithm.loss=gspo"], "algorithm.loss='gspo'"),
    ],
)
def test_what_a_tree_cannot_do_is_refused_at_load(recipe: str, overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        _prepare(recipe, *overrides)
    assert named in str(err.value), str(err.value)
