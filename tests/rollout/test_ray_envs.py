"""Environments and reward scorers in Ray actors, on a real local Ray instance of 2 CPUs
(``rollout.env_workers: ray``, ``workers: ray`` of an image reward; docs/distributed.md).

Each env worker reserves one of the 2 CPUs, so the env-runner class's 2 workers are ended (class
fixture) before the training run starts its own; the reward scorers' actors reserve none.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("minigrid")
pytest.importorskip("ray")

from mmpo.cli import main
from mmpo.config import load_config
from mmpo.errors import ConfigError
from mmpo.ray_session import acquire_ray, release_ray
from mmpo.rewards.image import build_image_rewards
from mmpo.rewards.ray_scorer import RayScorer
from mmpo.rollout.env_runner import ActionBatch, EnvRunner, EnvSpec
from mmpo.rollout.ray_envs import EnvWorkerError, RayEnvRunner
from mmpo.trainers import trainer_class_for
from mmpo.trainers.loop import TIMING_KEYS

ROOT = Path(__file__).resolve().parents[2]
# 4 environments per wave (9 episodes: waves of 4, 4, 1 over 2 workers), invalid outputs step a no-op
BABYAI = EnvSpec(id="BabyAI-GoToRedBallNoDists-v0", tile_size=8, max_steps=6, max_envs=4, noop_action=6)


class RandomPolicy:
    """Draws one of 3 actions per observation from ``generator``; every 3rd call's actions are invalid (None)."""

    def __init__(self) -> None:
        self.calls = 0

    def act(self, observations: list[Any], *, generator: torch.Generator, greedy: bool = False) -> ActionBatch:
        self.calls += 1
        a = torch.randint(0, 3, (len(observations), 1), generator=generator)
        actions: list[Any] = [int(x) for x in a[:, 0]] if self.calls % 3 else [None] * len(observations)
        logp = torch.full((len(observations), 1), -float(np.log(3)))
        return ActionBatch(actions, a, logp, torch.ones_like(a, dtype=torch.bool), [None] * len(observations))


def _steps(episodes: list[Any]) -> list[Any]:
    """Per episode: seed, rollout, success, return, and per step the action, reward and info."""
    return [
        (e.seed, e.rollout, e.success, e.env_return, [(s.env_action, s.reward, s.info) for s in e.steps])
        for e in episodes
    ]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance of 2 CPUs for the module (the runners below join it)."""
    acquire_ray(None, 2)
    yield
    release_ray()


@pytest.mark.slow  # a local Ray instance starts in ~5 s, each pair of actors in ~5-15 s
class TestRayEnvRunner:
    @pytest.fixture(scope="class")
    def runner(self, local_ray: None) -> Iterator[RayEnvRunner]:
        runner = RayEnvRunner(BABYAI, num_workers=2)
        yield runner
        runner.close()

    @pytest.mark.parametrize("per_episode", [False, True])
    def test_episodes_equal_local_stepping(self, runner: RayEnvRunner, per_episode: bool) -> None:
        """Same seeds, same policy draws -> the same actions, rewards, infos, observations and frames per step."""
        kw = dict(keep_observations=True, record_frames=True)

        def gen() -> Any:
            if per_episode:  # one generator per episode: the policy acts on one observation at a time
                return [torch.Generator().manual_seed(100 + i) for i in range(9)]
            return torch.Generator().manual_seed(7)

        local = EnvRunner(BABYAI).run(RandomPolicy(), [3, 4, 5], 3, generator=gen(), **kw)
        remote = runner.run(RandomPolicy(), [3, 4, 5], 3, generator=gen(), **kw)
        assert _steps(remote) == _steps(local)
        assert [e.length for e in local] == [e.length for e in remote] and sum(e.length for e in local) > 9
        assert any(e.invalid_actions for e in local) and any(s.env_action is None for e in local for s in e.steps)
        for a, b in zip(local, remote):
            assert a.instruction == b.instruction == "go to the red ball"
            assert len(a.observations) == len(b.observations) == a.length + 1
            assert all(np.array_equal(x.image, y.image) for x, y in zip(a.observations, b.observations))
            assert len(a.frames) == len(b.frames) == a.length + 1
            assert all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames))
            assert all(o.image.flags.writeable for o in b.observations)
        # the K rollouts of a context start from the same state and then differ
        assert np.array_equal(remote[0].observations[0].image, remote[1].observations[0].image)
        assert len({tuple(map(str, (s.env_action for s in e.steps))) for e in remote[:3]}) > 1

    def test_workers_are_two_processes(self, runner: RayEnvRunner) -> None:
        pids = runner.worker_pids()
        assert len(pids) == 2 and len(set(pids)) == 2 and os.getpid() not in pids
        for pid in pids:
            os.kill(pid, 0)  # alive (raises if there is no such process)

    def test_a_dead_worker_is_named_with_its_seeds(self, runner: RayEnvRunner) -> None:
        """Last in the class: kills worker 1 (as a browser crash taking its process down would)."""
        os.kill(runner.worker_pids()[1], signal.SIGKILL)
        with pytest.raises(EnvWorkerError) as info:
            runner.run(RandomPolicy(), [20, 21], 1, generator=torch.Generator().manual_seed(0))
        text = str(info.value)
        assert "Ray env worker 1" in text and "[21]" in text and str(runner.worker_pids()[1]) in text


def _metrics(run: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS and not k.endswith("_s")} for line in lines]


@pytest.mark.slow
def test_training_step_with_ray_workers_equals_local(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One RIPT-VLA step on BabyAI (real tiny VLM policy): the rollouts, the update and the
    held-out evaluation through 2 Ray workers give the same metrics and weights as local stepping
    (the policy samples in this process either way; only timings differ)."""
    monkeypatch.chdir(ROOT)
    small = [
        "train",
        "configs/ript_vla_babyai.yaml",
        "task.sft.demos=''",
        "task.env.max_steps=4",
        "task.ript.dynamic_sampling=false",
        "task.ript.skip_solved=false",
        "rollout.group_size=2",
        "rollout.prompts_per_step=2",
        "trainer.max_steps=1",
        "trainer.update_epochs=1",
        "trainer.minibatch_size=4",
        "trainer.eval_every=1",
        "trainer.save_every=1",
        "eval.num_samples=2",
        "eval.batch_size=2",
    ]
    assert main([*small, f"output_dir={tmp_path / 'local'}"]) == 0
    assert main([*small, f"output_dir={tmp_path / 'ray'}", "rollout.env_workers=ray"]) == 0
    local, remote = _metrics(tmp_path / "local"), _metrics(tmp_path / "ray")
    assert [m["step"] for m in remote] == [0, 1]
    assert remote == local
    assert remote[1]["optimizer_steps"] == 1 and "eval/success_rate" in remote[1]
    from safetensors.torch import load_file

    wl = load_file(str(tmp_path / "local" / "model" / "model.safetensors"))
    wr = load_file(str(tmp_path / "ray" / "model" / "model.safetensors"))
    assert wl.keys() == wr.keys() and all(torch.equal(wl[k], wr[k]) for k in wl)
    import ray

    assert ray.is_initialized()  # the trainer joined the module's instance and left it running


@pytest.mark.slow
def test_reward_scorer_through_ray_equals_local(local_ray: None) -> None:
    specs = [
        {"name": "target_color", "meta_key": "color", "rgb": "red"},
        {"name": "shape_at", "weight": 0.5, "box": [0.25, 0.25, 0.75, 0.75], "rgb": "blue"},
    ]
    local = build_image_rewards(specs)
    remote = build_image_rewards([{**s, "workers": "ray", "ray_workers": 2} for s in specs])
    assert all(isinstance(c, RayScorer) for c in remote.components.values())
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = [f"p{i}" for i in range(5)]
    metas = [{"color": c} for c in ("red", "blue", "green", "red", "white")]
    a, b = local(images, prompts, metas), remote(images, prompts, metas)
    assert torch.equal(a.rewards, b.rewards) and a.components.keys() == b.components.keys()
    assert all(torch.equal(a.components[k], b.components[k]) for k in a.components)
    scorer = remote.components["target_color"]
    pids = scorer.worker_pids()
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert scorer.meta_keys() == frozenset({"color"})
    for comp in remote.components.values():
        comp.close()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("rollout.ray.num_workers=0", "rollout.ray.num_workers"),
        ("rollout.ray.address=not an address", "rollout.ray.address"),
        ("rollout.env_workers=dask", "rollout.env_workers"),
    ],
)
def test_bad_ray_options_are_refused_at_load(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(str(ROOT / "configs" / "ript_vla_babyai.yaml"), ["rollout.env_workers=ray", override])


def test_ray_workers_are_refused_for_a_trainer_without_environments() -> None:
    cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"), ["rollout.env_workers=ray"])
    with pytest.raises(ConfigError, match=r"rollout\.env_workers='ray' is not supported by the token trainer"):
        trainer_class_for(cfg.task.name).prepare(cfg)
    ok = load_config(str(ROOT / "configs" / "ript_vla_babyai.yaml"), ["rollout.env_workers=ray", "task.sft.demos=''"])
    trainer_class_for(ok.task.name).prepare(ok)  # the environment trainer takes it


def test_bad_reward_worker_options_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"task\.rewards\[0\]\.workers"):
        build_image_rewards([{"name": "brightness", "workers": "dask"}])
    with pytest.raises(ConfigError, match=r"task\.rewards\[0\]\.ray_workers"):
        build_image_rewards([{"name": "brightness", "workers": "ray", "ray_workers": 0}])
    with pytest.raises(ConfigError, match=r"task\.rewards\[0\]\.ray_workers"):
        build_image_rewards([{"name": "brightness", "ray_workers": 2}])
