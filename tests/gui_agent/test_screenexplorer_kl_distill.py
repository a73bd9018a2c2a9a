"""ScreenExplorer's k3 KL to the start policy (beta 0.04) in the environment trainer, its experience
stream and the distillation of the stream into the next generation (live MiniWoB++ in headless
Chromium with a tiny Qwen2-VL; Pendulum for the continuous head)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmpo.cli import main
from mmpo.config import load_config
from mmpo.errors import ConfigError
from mmpo.rollout.env_runner import Episode, Observation, StepRecord
from mmpo.trainers.algorithm import build_algorithm
from mmpo.trainers.kinds import ENVIRONMENT
from mmpo.trainers.update import UnitTerms, compose_loss
from mmpo_tasks.gui_agent.experience import (
    DistillConfig,
    ExperienceConfig,
    ExperienceWriter,
    distill_examples,
    distill_generation,
    load_start_policy,
    mean_logp,
    read_experience,
    select_episodes,
)
from mmpo_tasks.gui_agent.exploration import COMPONENTS

ROOT = Path(__file__).resolve().parents[2]
SE = str(ROOT / "configs" / "screenexplorer.yaml")
SMALL = [
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "task.env.max_envs=4",
    "task.env.max_steps=2",
    "task.env.image_size=56",
    "eval.num_samples=2",
    "eval.batch_size=2",
    "task.eval_videos=0",
    "trainer.eval_every=0",
    "trainer.minibatch_size=4",
    "task.env.kwargs.tasks=[click-test]",
    "task.actor_warmup_steps=1",
]


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _need_browser() -> None:
    pytest.importorskip("miniwob")
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.fail("chromium and chromedriver must be installed (apt-get install chromium chromium-driver)")


# -- the objective ----------------------------------------------------------------------------------
def test_recipe_builds_k3_kl_in_the_loss_and_refuses_what_the_trainer_cannot_do() -> None:
    algo = build_algorithm(load_config(SE), ENVIRONMENT)
    assert algo.uses_kl and algo.kl_estimator == "k3" and algo.config.kl_options["beta"] == 0.04
    assert algo.beta(0, 10, None) == pytest.approx(0.04)
    with pytest.raises(ConfigError, match=r"algorithm.kl_placement='reward'.*environment trainer"):
        build_algorithm(load_config(SE, ["algorithm.kl_placement=reward"]), ENVIRONMENT)
    with pytest.raises(ConfigError, match=r"algorithm.kl_estimator='gaussian'.*environment trainer"):
        build_algorithm(load_config(SE, ["algorithm.kl_estimator=gaussian"]), ENVIRONMENT)


def test_compose_loss_is_the_clipped_surrogate_plus_beta_k3() -> None:
    """Two env steps, 2 units each, one masked: ratios inside the clip range, so the loss per unit
    is -A r; k3 = exp(ref - logp) - (ref - logp) - 1; token-mean over the 3 valid units."""
    algo = build_algorithm(load_config(SE), ENVIRONMENT)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    logp_old = torch.tensor([[-1.1, -1.9], [-0.5, 0.0]])
    ref = torch.tensor([[-1.2, -2.0], [-0.1, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True], [True, False]])
    loss, m = compose_loss(UnitTerms(logp, logp_old, adv, mask, logp_ref=ref), algo, 0.04)
    r = [math.exp(0.1), math.exp(-0.1), 1.0]  # all within [0.8, 1.28]
    pg = (-1.0 * r[0] - 1.0 * r[1] + 2.0 * r[2]) / 3
    d = [-0.2, 0.0, 0.4]
    kl = sum(math.exp(x) - x - 1 for x in d) / 3
    assert m["pg_loss"] == pytest.approx(pg, rel=1e-6) and m["kl"] == pytest.approx(kl, rel=1e-6)
    assert float(loss) == pytest.approx(pg + 0.04 * kl, rel=1e-6)
    # the reference equal to the policy: KL 0 and the loss is the surrogate alone
    loss0, m0 = compose_loss(UnitTerms(logp, logp_old, adv, mask, logp_ref=logp.clone()), algo, 0.04)
    assert m0["kl"] == 0.0 and float(loss0) == pytest.approx(pg, rel=1e-6)


def test_continuous_head_trains_with_k3_on_log_density_differences(tmp_path: Path) -> None:
    """Decision: sample estimators are valid on log-density differences (E_pi[ref/pi] = 1 for
    densities), so the Laplace-head recipe runs with beta > 0: KL 0 at the first update (policy ==
    reference), then positive once the policy moved."""
    pytest.importorskip("gymnasium")
    run = tmp_path / "cont"
    args = [
        "train",
        str(ROOT / "configs" / "ript_vla_continuous.yaml"),
        f"output_dir={run}",
        "algorithm.kl_options.beta=0.04",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "task.env.max_steps=3",
        "task.ript.dynamic_sampling=false",
        "task.ript.skip_solved=false",
        "trainer.max_steps=2",
        "trainer.minibatch_size=4",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "eval.num_samples=2",
        "eval.batch_size=2",
        "task.eval_videos=0",
    ]
    assert main(args) == 0
    lines = _lines(run)
    first, second = lines[1], lines[2]
    assert first["optimizer_steps"] == 1.0 and abs(first["kl"]) < 1e-7
    assert second["kl"] > 0.0
    assert second["loss"] == pytest.approx(second["pg_loss"] + 0.04 * second["kl"], rel=1e-5, abs=1e-7)


# -- the experience writer (no browser) ----------------------------------------------------------------
def _episode(seed: int, n: int, value: int) -> Episode:
    obs = [Observation(np.full((8, 8, 3), value + t, np.uint8), "Click the button.") for t in range(n + 1)]
    steps = [
        StepRecord(None, torch.tensor([t]), torch.tensor([-1.0 - t]), torch.tensor([True]), True, np.array([0.5, 0.25]))
        for t in range(n)
    ]
    return Episode(
        seed=seed, rollout=0, steps=steps, success=seed == 1, instruction="Click the button.", observations=obs
    )


def test_writer_records_rows_bounds_them_and_drops_replayed_steps(tmp_path: Path) -> None:
    folder = tmp_path / "experience"
    text = lambda a: f"click({a[0]:.2f}, {a[1]:.2f})"  # noqa: E731
    eps = [_episode(0, 2, 10), _episode(1, 3, 50)]
    rewards = [torch.tensor([0.5, 1.0]), torch.tensor([0.0, 2.0, 0.25])]
    comps = [{"intent": r * 2} for r in rewards]
    w = ExperienceWriter(folder, ExperienceConfig(max_steps=100))
    assert w.write(0, eps, rewards, comps, text) == 5 and w.write(1, eps[:1], rewards[:1], comps[:1], text) == 2
    rows = [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()]
    assert [(r["train_step"], r["episode"], r["t"]) for r in rows] == [
        (0, "s0-r0-e0", 0), (0, "s0-r0-e0", 1), (0, "s0-r0-e1", 0), (0, "s0-r0-e1", 1), (0, "s0-r0-e1", 2),
        (1, "s1-r0-e0", 0), (1, "s1-r0-e0", 1),
    ]  # fmt: skip
    r = rows[3]
    assert r["reward"] == 2.0 and r["return"] == 2.25 and r["components"] == {"intent": 4.0} and r["success"]
    assert r["action"] == "click(0.50, 0.25)" and r["units"] == [1] and r["logp"] == [-2.0] and r["unit_mask"] == [True]
    from PIL import Image

    with Image.open(folder / r["image"]) as im:
        assert np.asarray(im).shape == (8, 8, 3) and int(np.asarray(im)[0, 0, 0]) == 51  # the screen before step 1
    # a resumed run at step 1 replays step 1: its rows and images go, step 0's stay
    w2 = ExperienceWriter(folder, ExperienceConfig(max_steps=6))
    assert w2.write(1, eps[1:], rewards[1:], comps[1:], text) == 1  # 5 kept + 1 = the bound
    rows = [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in rows] == ["s0-r0-e0"] * 2 + ["s0-r0-e1"] * 3 + ["s1-r0-e0"]
    assert len(list((folder / "images").iterdir())) == 6
    assert w2.write(2, eps, rewards, comps, text) == 0  # the bound holds
    # every-th step and the reader / selection
    assert ExperienceWriter(tmp_path / "x", ExperienceConfig(every=2)).write(1, eps, rewards, comps, text) == 0
    got = read_experience(folder)
    assert [(e.id, e.ret, len(e.rows)) for e in got] == [
        ("s0-r0-e0", 1.5, 2),
        ("s0-r0-e1", 2.25, 3),
        ("s1-r0-e0", 2.25, 1),
    ]
    top = select_episodes(got, DistillConfig(top_fraction=0.5))  # ceil(1.5) = 2: the two 2.25 returns
    assert [e.id for e in top] == ["s0-r0-e1", "s1-r0-e0"]
    assert [e.id for e in select_episodes(got, DistillConfig(select="success"))] == ["s0-r0-e1", "s1-r0-e0"]
    assert [e.id for e in select_episodes(got, DistillConfig(select="min_return", min_return=2.0))] == [
        "s0-r0-e1",
        "s1-r0-e0",
    ]
    assert [e.id for e in select_episodes(got, DistillConfig(top_fraction=0.01, from_step=1))] == ["s1-r0-e0"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("task.distill.top_fraction=1.5", "top_fraction"),
        ("task.distill.top_fraction=0", "top_fraction"),
        ("task.distill.select=best", "select"),
        ("task.experience.max_steps=0", "max_steps"),
    ],
)
def test_bad_distill_options_are_refused_at_load(override: str, key: str) -> None:
    from mmpo_tasks.gui_agent.screenexplorer_trainer import ScreenExplorerTrainer

    with pytest.raises(ConfigError, match=key):
        ScreenExplorerTrainer.prepare(load_config(SE, [override]))


def test_distill_without_a_stream_is_refused_at_load() -> None:
    from mmpo_tasks.gui_agent.screenexplorer_trainer import ScreenExplorerTrainer

    cfg = load_config(SE, ["task.distill.enabled=true", "task.experience.enabled=false"])
    with pytest.raises(ConfigError, match=r"task.distill.enabled=True.*task.experience.enabled"):
        ScreenExplorerTrainer.prepare(cfg)


# -- live: KL, the stream, the distillation -----------------------------------------------------------
@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need_browser()
    run = tmp_path_factory.mktemp("se") / "run"
    assert main(["train", SE, f"output_dir={run}", "trainer.max_steps=3", "trainer.save_every=0", *SMALL]) == 0
    return run


def test_kl_is_logged_zero_at_the_first_update_and_in_the_loss(live_run: Path, no_leftover_browser: None) -> None:
    lines = _lines(live_run)
    warm, first, second = lines[1], lines[2], lines[3]
    assert warm["optimizer_steps"] == 0.0 and "kl" not in warm  # world model only
    assert first["optimizer_steps"] == 1.0 and abs(first["kl"]) < 1e-7  # the policy is still the reference
    assert second["kl"] > 0.0
    for line in (first, second):
        assert line["loss"] == pytest.approx(line["pg_loss"] + 0.04 * line["kl"], rel=1e-5, abs=1e-7)


def test_experience_stream_holds_every_step(live_run: Path, no_leftover_browser: None) -> None:
    from PIL import Image

    from mmpo.tasks import build_task_from

    ex = build_task_from(load_config(SE, SMALL)).config.exploration
    w = {k: float(getattr(ex, k)) for k in (*COMPONENTS, "task_reward")}
    lines = _lines(live_run)
    rows = [json.loads(line) for line in (live_run / "experience" / "steps.jsonl").read_text().splitlines()]
    for step, line in enumerate(lines[1:]):
        mine = [r for r in rows if r["train_step"] == step]
        assert len(mine) == round(line["rollout/episode_length"] * 4) == line["experience/rows"]
    episodes: dict[str, list[dict]] = {}
    for r in rows:
        episodes.setdefault(r["episode"], []).append(r)
        assert set(r["components"]) == {*COMPONENTS, "task"}
        want = sum(w[k] * r["components"][k] for k in COMPONENTS) + w["task_reward"] * r["components"]["task"]
        assert r["reward"] == pytest.approx(want if r["valid"] else 0.0, abs=1e-5)
        assert r["action"].startswith("click(") and len(r["units"]) == 1 and r["logp"][0] <= 0.0
        with Image.open(live_run / "experience" / r["image"]) as im:
            assert im.size == (56, 56)
    assert len(episodes) == 12  # 3 steps x 2 contexts x 2 rollouts
    for ep in episodes.values():
        assert [r["t"] for r in ep] == list(range(len(ep))) == list(range(ep[0]["episode_length"]))
        assert ep[0]["return"] == pytest.approx(sum(r["reward"] for r in ep), abs=1e-5)


def test_distillation_trains_the_next_generation_on_the_kept_actions(
    live_run: Path, tmp_path: Path, no_leftover_browser: None
) -> None:
    over = [*SMALL, f"output_dir={live_run}", "task.distill.top_fraction=0.5", "task.distill.epochs=8"]
    over += ["task.distill.batch_size=4", "task.distill.lr=5e-3"]
    cfg = load_config(SE, over)
    out = distill_generation(cfg, progress=False)
    assert out["episodes"] == 12 and out["kept_episodes"] == 6
    assert out["loss_last_epoch"] < out["loss_first_epoch"] and out["logp_after"] > out["logp_before"]
    model_dir = live_run / "distill" / "model"
    assert (model_dir / "config.json").is_file() and json.loads((live_run / "distill" / "metrics.json").read_text())
    # independently: the kept episodes are the best half by return, and the saved model (reloaded)
    # gives their actions a higher log-prob than a fresh start model
    from mmpo.tasks import build_task_from

    tc = build_task_from(cfg).config
    episodes = read_experience(live_run / "experience")
    kept = select_episodes(episodes, tc.distill)
    assert min(e.ret for e in kept) >= max(e.ret for e in episodes if e not in kept)
    start, r1 = load_start_policy(cfg, tc)
    gen1, r2 = load_start_policy(cfg, tc, str(model_dir))
    r1.close()
    r2.close()
    examples = distill_examples(start, live_run / "experience", kept)
    assert len(examples) == out["kept_steps"] > 0
    before, after = mean_logp(start, examples), mean_logp(gen1, examples)
    assert after > before  # conflicting kept clicks on similar screens bound the gain
    assert after == pytest.approx(out["logp_after"], abs=1e-4)
    # a rule that keeps too few episodes is refused before any model loads
    bad = load_config(SE, [*over, "task.distill.select=min_return", "task.distill.min_return=1e9"])
    with pytest.raises(ConfigError, match=r"task.distill.select='min_return' kept 0 of 12"):
        distill_generation(bad, progress=False)


def test_mean_logp_counts_valid_units_only() -> None:
    class Fixed:
        module = None

        def log_probs(self, encs, units, mask, model=None):  # noqa: ANN001, ANN201
            return torch.tensor([[-1.0, -5.0], [-3.0, -7.0]])[: len(encs)]

    ex = [(0, torch.tensor([0, 0]), torch.tensor([True, False])), (1, torch.tensor([0, 0]), torch.tensor([True, True]))]
    assert mean_logp(Fixed(), ex) == pytest.approx((-1.0 - 3.0 - 7.0) / 3)
