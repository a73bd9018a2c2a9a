"""The environment trainer (``mmpo.trainers.environment``) on the ript_vla task, small and on the CPU:
stateful advantages keep their state across steps and in checkpoints, a resumed run is the
uninterrupted run (metrics, states, weights), micro batches of episodes accumulate to the
minibatch's gradient in every aggregation mode, and objective options the environment kind
cannot honour are refused at load, before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("gymnasium")

from mmpo.cli import main
from mmpo.config import load_config
from mmpo.errors import ConfigError
from mmpo.trainers import trainer_class_for
from mmpo.trainers.loop import TIMING_KEYS
from mmpo.trainers.update import UpdateShape

ROOT = Path(__file__).resolve().parents[2]
CONTINUOUS = str(ROOT / "configs" / "ript_vla_continuous.yaml")
# Pendulum, 4 env steps an episode, 2 contexts x 2 rollouts a step (env_return: every context is
# kept); 2 PPO epochs of 2 minibatches of 2 episodes, 1 episode per micro batch: shuffles and
# accumulation are exercised; an evaluation and a checkpoint after every step
SMALL = [
    "task.env.max_steps=4",
    "rollout.group_size=2",
    "rollout.prompts_per_step=2",
    "task.ript.max_draws=2",
    "task.ript.reward=env_return",
    "task.policy.head_width=32",
    "trainer.update_epochs=2",
    "trainer.minibatch_size=2",
    "trainer.micro_batch_size=1",
    "eval.num_samples=2",
    "eval.batch_size=2",
    "trainer.eval_every=1",
    "trainer.save_every=1",
    "trainer.keep_last=0",
]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def _state(run: Path, step: int) -> dict[str, Any]:
    return json.loads((_checkpoint(run, step) / "trainer_state.json").read_text())


def _lines(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the wall-clock timings."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(_checkpoint(run, step) / "engine" / "model.safetensors"))


# -- stateful advantages and exact resume ----------------------------------------------------------
@pytest.mark.parametrize("advantage", ["rank_ema", "dcpo_sas"])
def test_stateful_advantage_is_kept_checkpointed_and_resumed_exactly(advantage: str, tmp_path: Path) -> None:
    full, split = tmp_path / "full", tmp_path / "split"
    args = ["train", CONTINUOUS, *SMALL, f"algorithm.advantage={advantage}"]
    assert main([*args, f"output_dir={full}", "trainer.max_steps=3"]) == 0
    assert main([*args, f"output_dir={split}", "trainer.max_steps=2"]) == 0
    assert main([*args, f"output_dir={split}", "trainer.max_steps=3"]) == 0  # resumes from step 2

    states = [_state(full, s)["states"] for s in (1, 2, 3)]
    assert all(set(st) == {"advantage", "ript_skip"} for st in states)
    lines = _lines(full)
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    assert all(line["rollout/contexts_kept"] == 2 and line["optimizer_steps"] == 4 for line in lines[1:])
    if advantage == "rank_ema":
        # one update of the reward EMA per step, carried from step to step (not restarted)
        adv = [st["advantage"] for st in states]
        assert [a["steps"] for a in adv] == [1, 2, 3]
        assert adv[0]["mean"] != adv[1]["mean"] != adv[2]["mean"]
    else:
        # per-context reward statistics keyed by the env seed; every step adds its 2 new contexts
        stats = [st["advantage"]["stats"] for st in states]
        assert [len(s) for s in stats] == [2, 4, 6]
        assert set(stats[0]) < set(stats[1]) < set(stats[2])
        assert set(stats[2]) == set(states[2]["ript_skip"]["stats"])  # the same keys: the env seeds
        assert all(v["n"] == 2 and v["visits"] == 1 for v in stats[2].values())

    # the resumed run is the uninterrupted one: metrics, every piece of state, the weights
    assert _lines(split) == lines
    for step in (1, 2, 3):
        assert _state(split, step) == _state(full, step), step
    a, b = _weights(full, 3), _weights(split, 3)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# -- micro batches of episodes -------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    run = tmp_path_factory.mktemp("micro") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        cfg = load_config(
            CONTINUOUS, [*SMALL, f"output_dir={run}", "trainer.max_steps=1", "rollout.prompts_per_step=3"]
        )
    t = trainer_class_for("ript_vla")(cfg, run)
    yield t
    t.close()


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "otm"]
)
def test_micro_batches_of_episodes_accumulate_to_the_minibatch_gradient(trainer: Any, mode: str) -> None:
    kept, _ = trainer.collect(0)
    episodes = [e for g in kept for e in g]
    assert len(episodes) == 6
    # episodes of different lengths, and steps without a valid unit: rows (env steps), steps with
    # a valid unit and valid units all differ between episodes
    episodes[0].steps = episodes[0].steps[:1]
    episodes[3].steps = episodes[3].steps[:2]
    for ep, t in ((episodes[1], 0), (episodes[4], 1), (episodes[4], 3)):
        ep.steps[t].mask = torch.zeros_like(ep.steps[t].mask)
    n_steps = sum(e.length for e in episodes)
    step_adv = torch.randn(n_steps, generator=torch.Generator().manual_seed(0))
    trainer.algo.loss_agg = mode
    params = [p for p in trainer.engine.module.parameters() if p.requires_grad]
    grads: dict[int, list[torch.Tensor]] = {}
    for micro in (1, 2, 3, 6):
        captured: list[list[torch.Tensor]] = []

        def capture(step: int, captured: list[list[torch.Tensor]] = captured) -> tuple[float, bool]:
            captured.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params])
            for p in params:
                p.grad = None
            return 0.0, False

        trainer.optimizer_step = capture
        trainer.shape = UpdateShape(epochs=1, minibatches=1, micro_batches=micro)
        out = trainer.update(kept, step_adv, 0)
        assert len(captured) == 1 and out["optimizer_steps"] == 1.0
        grads[micro] = captured[0]
    assert sum(float(g.norm()) for g in grads[6]) > 0.0
    for micro in (2, 3, 6):  # one micro batch (the whole minibatch) is the reference
        for ref, got in zip(grads[1], grads[micro]):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_a_rank_without_a_kept_context_updates_on_the_stand_in_with_weight_zero(trainer: Any) -> None:
    """The same backward and optimizer calls as a rank with rows (every slot runs the stand-in
    episode, a drawn one), and no gradient: the collectives stay aligned, the weights unmoved."""
    trainer.collect(0)
    assert trainer.stand_in is not None and trainer.stand_in.length >= 1
    params = [p for p in trainer.engine.module.parameters() if p.requires_grad]
    backwards, steps = [], []
    real_backward = trainer.engine.backward

    def backward(loss: torch.Tensor) -> None:
        backwards.append(float(loss.detach()))
        real_backward(loss)

    def capture(step: int) -> tuple[float, bool]:
        steps.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params])
        for p in params:
            p.grad = None
        return 0.0, False

    trainer.optimizer_step, trainer.engine.backward = capture, backward
    try:
        trainer.shape = UpdateShape(epochs=2, minibatches=2, micro_batches=2)
        out = trainer.update([], torch.zeros(0), 0)
    finally:
        del trainer.engine.backward
    assert len(backwards) == 8 and all(b == 0.0 for b in backwards) and len(steps) == 4
    assert all(float(g.abs().sum()) == 0.0 for grads in steps for g in grads)
    assert out["optimizer_steps"] == 4.0 and out["train_units"] == 0.0 and "pg_loss" not in out


def test_each_rank_resumes_its_own_sampler_position(trainer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    state = trainer.trainer_state()
    assert "rank_samplers" not in state  # one process: the checkpoint is as before
    ranks = [{"epoch": 0, "pos": 1}, {"epoch": 3, "pos": 5}]
    monkeypatch.setattr(trainer.engine, "rank", 1)
    monkeypatch.setattr(trainer.engine, "world_size", 2)
    trainer.load_trainer_state({**state, "rank_samplers": ranks})
    assert trainer.sampler.state_dict() == ranks[1]
    monkeypatch.setattr(trainer.engine, "world_size", 3)  # written by another number of ranks: rank 0's position
    trainer.load_trainer_state({**state, "rank_samplers": ranks})
    assert trainer.sampler.state_dict() == state["sampler"]


# -- options the environment kind refuses ----------------------------------------------------------
@pytest.mark.parametrize(
    "override, key, value",
    [
        # the KL to the frozen start policy goes in the loss only
        (("algorithm.kl_options.beta=0.1", "algorithm.kl_placement=reward"), "algorithm.kl_placement", "reward"),
        (("algorithm.entropy_coef=0.01",), "algorithm.entropy_coef", 0.01),
    ],
)
def test_kl_in_reward_and_entropy_are_refused_at_load(
    override: tuple[str, ...], key: str, value: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmpo.trainers import environment

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the objective was checked")

    monkeypatch.setattr(environment, "load_model", no_model)
    cfg = load_config(CONTINUOUS, [*SMALL, f"output_dir={tmp_path / 'run'}", *override])
    with pytest.raises(ConfigError) as err:
        trainer_class_for("ript_vla")(cfg, tmp_path / "run")
    message = str(err.value)
    assert f"{key}={value!r}" in message and "environment trainer" in message, message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("space, refused", [("laplace", True), ("binned", False)])
def test_a_laplace_head_gives_densities(space: str, refused: bool, tmp_path: Path) -> None:
    """DCPO's bounds come from the old action's probability: refused for a Laplace head's
    log-densities, accepted for action tokens (checked by the algorithm builder alone)."""
    from mmpo.tasks import build_task
    from mmpo.trainers.algorithm import build_algorithm
    from mmpo.trainers.kinds import ENVIRONMENT

    overrides = [*SMALL, f"output_dir={tmp_path}", f"task.policy.action_space={space}", "algorithm.loss=dcpo"]
    cfg = load_config(CONTINUOUS, overrides)
    task = build_task(cfg.task.name, cfg.task.options)
    assert task.unit_densities is refused
    if refused:
        with pytest.raises(ConfigError, match=r"algorithm\.loss='dcpo' is not supported by the environment trainer"):
            build_algorithm(cfg, ENVIRONMENT, task)
    else:
        assert build_algorithm(cfg, ENVIRONMENT, task).loss_fn.__name__ == "dcpo"
