"""The gymnasium env runner on real MiniGrid / Pendulum: K rollouts from the same initial state,
determinism for a seed, invalid actions as no-ops, success rules, and seed-set checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmpo.errors import ConfigError
from mmpo.rollout.env_runner import ActionBatch, EnvRunner, EnvSpec, Observation, SeedRange, check_disjoint, make_env

BABYAI = EnvSpec(id="BabyAI-GoToRedBallNoDists-v0", observation="minigrid_partial", tile_size=8, max_steps=8)


class RandomPolicy:
    """Samples env actions from a generator (so runs are reproducible); ``invalid_every`` makes
    every n-th call's actions invalid (None). Units are the action ids, logp log(1/n)."""

    def __init__(self, n: int = 3, invalid_every: int = 0) -> None:
        self.n, self.invalid_every, self.calls = n, invalid_every, 0
        self.seen: list[list[Observation]] = []

    def act(self, observations, *, generator, greedy=False):
        self.calls += 1
        self.seen.append(observations)
        a = torch.randint(0, self.n, (len(observations), 1), generator=generator)
        actions = [int(x) for x in a[:, 0]]
        if self.invalid_every and self.calls % self.invalid_every == 0:
            actions = [None] * len(actions)
        logp = torch.full((len(observations), 1), -float(np.log(self.n)))
        return ActionBatch(actions, a, logp, torch.ones_like(a, dtype=torch.bool), [None] * len(observations))


def _trace(episodes):
    return [
        (e.seed, e.rollout, e.length, e.success, round(e.env_return, 6), [int(s.units[0]) for s in e.steps])
        for e in episodes
    ]


def test_rollouts_of_a_context_start_from_the_same_state():
    runner = EnvRunner(BABYAI)
    policy = RandomPolicy()
    episodes = runner.run(policy, [5, 6], 3, generator=torch.Generator().manual_seed(0))
    first = policy.seen[0]
    assert len(first) == 6 and [e.seed for e in episodes] == [5, 5, 5, 6, 6, 6]
    assert [e.rollout for e in episodes] == [0, 1, 2, 0, 1, 2]
    for k in (1, 2):
        assert np.array_equal(first[k].image, first[0].image)
    assert not np.array_equal(first[3].image, first[0].image)  # another seed, another room
    assert first[0].image.shape == (56, 56, 3) and first[0].image.dtype == np.uint8
    assert first[0].instruction == "go to the red ball"
    env = make_env(BABYAI)
    obs, _ = env.reset(seed=5)
    assert np.array_equal(runner.observe(env, obs).image, first[0].image)
    runner.close()


def test_runner_is_deterministic_for_a_seed_and_generator():
    a = EnvRunner(BABYAI).run(RandomPolicy(), [11, 12], 4, generator=torch.Generator().manual_seed(3))
    b = EnvRunner(BABYAI).run(RandomPolicy(), [11, 12], 4, generator=torch.Generator().manual_seed(3))
    c = EnvRunner(BABYAI).run(RandomPolicy(), [11, 12], 4, generator=torch.Generator().manual_seed(4))
    assert _trace(a) == _trace(b)
    assert _trace(a) != _trace(c)
    # the K rollouts of one context differ when the policy samples differently
    assert len({tuple(t[5]) for t in _trace(a)[:4]}) > 1


def test_episode_bookkeeping_matches_a_replay():
    """Replaying an episode's actions in a fresh env reproduces its return and success."""
    runner = EnvRunner(BABYAI)
    episodes = runner.run(RandomPolicy(), list(range(20)), 1, generator=torch.Generator().manual_seed(1))
    assert any(e.success for e in episodes) and not all(e.success for e in episodes)
    env = make_env(BABYAI)
    for ep in episodes:
        env.reset(seed=ep.seed)
        total, done = 0.0, False
        for s in ep.steps:
            assert not done
            _, r, term, trunc, _ = env.step(int(s.units[0]))
            total += r
            done = term or trunc
        assert total == pytest.approx(ep.env_return)
        assert ep.success == (done and total > 0)
        assert ep.length <= BABYAI.max_steps
        assert ep.length == BABYAI.max_steps or done  # an episode ends only at the cap or the env's end


def test_invalid_actions_are_no_ops_that_count_as_steps():
    runner = EnvRunner(BABYAI)
    policy = RandomPolicy(invalid_every=2)
    episodes = runner.run(policy, [3], 2, generator=torch.Generator().manual_seed(0))
    for ep in episodes:
        invalid = [s for s in ep.steps if not s.valid]
        assert ep.invalid_actions == len(invalid) > 0
    # without a noop_action the env is not stepped: the observation after an invalid step is unchanged
    second, third = policy.seen[1], policy.seen[2]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(second, third))


def test_frames_are_recorded_per_step():
    runner = EnvRunner(BABYAI)
    gen = torch.Generator().manual_seed(0)
    ep = runner.run(RandomPolicy(invalid_every=3), [2], 1, generator=gen, record_frames=True)[0]
    assert len(ep.frames) == ep.length + 1 and ep.invalid_actions > 0
    assert ep.frames[0].ndim == 3 and ep.frames[0].shape[-1] == 3
    for t, s in enumerate(ep.steps):  # a no-op that did not step the env repeats the frame
        assert s.valid or np.array_equal(ep.frames[t + 1], ep.frames[t])


def test_pendulum_rendered_with_an_instruction_and_return_success_rule():
    spec = EnvSpec(
        id="Pendulum-v1",
        observation="render",
        image_size=32,
        instruction="hold it upright",
        max_steps=5,
        success="return_above",
        success_threshold=-10.0,
        noop_action=[0.0],
    )

    class Torque:
        def act(self, observations, *, generator, greedy=False):
            n = len(observations)
            a = torch.zeros(n, 1)
            mask = torch.ones(n, 1, dtype=torch.bool)
            return ActionBatch([np.zeros(1, np.float32)] * n, a, torch.zeros(n, 1), mask, [None] * n)

    runner = EnvRunner(spec)
    episodes = runner.run(Torque(), [0, 1, 2, 3], 1, generator=torch.Generator())
    for ep in episodes:
        assert ep.length == 5 and ep.instruction == "hold it upright"
        assert ep.success == (ep.env_return >= -10.0)
    env = make_env(spec)
    obs, _ = env.reset(seed=0)
    o = runner.observe(env, obs)
    assert o.image.shape == (32, 32, 3)


def test_seed_ranges_must_not_overlap():
    check_disjoint(SeedRange(0, 100).seeds(), SeedRange(100, 10).seeds())
    expected = r"task.eval_seeds overlap the training seeds \(task.train_seeds\) in 5 seed\(s\) \(95, 96, 97, 98, 99\)"
    with pytest.raises(ConfigError, match=expected):
        check_disjoint(SeedRange(0, 100).seeds(), SeedRange(95, 10).seeds())


def test_bad_env_specs_fail_clearly():
    with pytest.raises(ConfigError, match="task.env.id='NoSuchEnv-v0'"):
        EnvRunner(EnvSpec(id="NoSuchEnv-v0"))
    with pytest.raises(ConfigError, match="needs a MiniGrid environment"):
        EnvRunner(EnvSpec(id="Pendulum-v1", observation="minigrid_partial"))


def test_one_generator_per_episode_makes_each_episode_independent_of_its_batch():
    """With a generator per episode, an episode's actions depend on its own generator only: the
    same seed and generator seed give the same episode alone, in a batch, or in waves."""

    def gens(seeds):
        return [torch.Generator().manual_seed(100 + s) for s in seeds]

    batch = EnvRunner(BABYAI).run(RandomPolicy(), [11, 12, 13], 1, generator=gens([11, 12, 13]))
    alone = [EnvRunner(BABYAI).run(RandomPolicy(), [s], 1, generator=gens([s]))[0] for s in (11, 12, 13)]
    waves = EnvRunner(EnvSpec(**{**BABYAI.__dict__, "max_envs": 2})).run(
        RandomPolicy(), [11, 12, 13], 1, generator=gens([11, 12, 13])
    )
    assert _trace(batch) == _trace(alone) == _trace(waves)
    with pytest.raises(ValueError, match="2 generators for 3 episodes"):
        EnvRunner(BABYAI).run(RandomPolicy(), [11, 12, 13], 1, generator=gens([11, 12]))
