"""Prompt samplers: which training samples (prompts, env seeds, series starts) a step rolls out.

Registry ``PROMPT_SAMPLERS`` (chosen by ``rollout.prompt_sampler``, options in
``rollout.prompt_sampler_options``). An entry is a factory
``fn(num_samples, *, seed, rank, world_size, group_size, **options) -> PromptSamplerBase``; the
trainer passes the four keywords (:data:`SAMPLER_RESERVED`), the config the options.

- ``uniform``: a seeded permutation per epoch, ranks taking interleaved slices
  (:class:`PromptSampler`, also importable as ``mmpo.data.PromptSampler``).
- ``vade``: Thompson sampling on per-sample Beta difficulty estimates (VADE, arXiv 2511.18902;
  :mod:`mmpo.core.vade`), fed back the rewards of each rollout.

Every sampler answers :meth:`~PromptSamplerBase.next`, :meth:`~PromptSamplerBase.observe`,
:meth:`~PromptSamplerBase.begin_step` and ``state_dict`` / ``load_state_dict`` (plain JSON: the
trainers checkpoint every rank's state, :func:`gather_states` / :func:`resume_sampler`).
"""

from __future__ import annotations

import base64
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mmpo.core import vade as vade_math
from mmpo.core.registry import Registry
from mmpo.errors import ConfigError

#: the keywords the trainer passes to a sampler factory (not settable in ``prompt_sampler_options``)
SAMPLER_RESERVED = ("seed", "rank", "world_size", "group_size")
#: the config key of the options (named in error messages)
OPTIONS_KEY = "rollout.prompt_sampler_options"

PROMPT_SAMPLERS: Registry[Callable[..., "PromptSamplerBase"]] = Registry("prompt sampler")


class PromptSamplerBase:
    """What every prompt sampler does. ``last_indices``: the indices the :meth:`next` calls gave
    since the last :meth:`observe` / :meth:`begin_step` (what a trainer reports back)."""

    last_indices: list[int]

    def next(self, n: int) -> list[int]:
        """The next ``n`` sample indices for this rank (appended to ``last_indices``)."""
        raise NotImplementedError

    def observe(self, indices: Sequence[int], rewards: Tensor) -> None:
        """The rewards ``[len(indices), G]`` of the G rollouts of each of ``indices`` (this rank's,
        in the order drawn). Clears ``last_indices``. Here: nothing else."""
        self.last_indices = []

    def begin_step(self, step: int) -> None:
        """Called by the loop before each training step ``step`` (0-based). Clears ``last_indices``."""
        self.last_indices = []

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class PromptSampler(PromptSamplerBase):
    """Yields sample indices in a seeded random order, epoch after epoch, sharded by rank.

    The order of epoch ``e`` is a permutation drawn from ``seed + e``, so the position
    (``epoch``, ``pos``) is all the state needed for an exact resume. ``group_size`` is unused
    (every sampler takes the same keywords).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        group_size: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ValueError("PromptSampler needs at least one sample")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.pos = 0
        self.last_indices = []

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def next(self, n: int) -> list[int]:
        """The next ``n`` indices for this rank (ranks take disjoint, interleaved slices)."""
        out: list[int] = []
        order = self._order()
        while len(out) < n:
            if self.pos >= self.num_samples:
                self.epoch += 1
                self.pos = 0
                order = self._order()
            if self.pos % self.world_size == self.rank:
                out.append(order[self.pos])
            self.pos += 1
        self.last_indices = self.last_indices + out
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])


def _option_error(name: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(f"{OPTIONS_KEY}.{name}={value!r}: {rule}")


class VadeSampler(PromptSamplerBase):
    """VADE prompt selection (arXiv 2511.18902; the formulas in :mod:`mmpo.core.vade`).

    This rank's candidates are its shard of the samples (``i % world_size == rank``; every
    sample when there are fewer samples than ranks), or ``pool`` of them drawn at random per
    :meth:`next` call. Each candidate's Beta posterior is decayed to the current step, a success
    probability drawn from it, and the best ``score`` are taken, ties by index, never twice in a
    step (once every candidate was taken this step, all become available again). The generator
    of those draws is seeded by ``seed`` and ``rank`` and kept in :meth:`state_dict` with the
    posteriors, so a resumed run draws the same indices. Each rank's posteriors hold what it
    observed (its own shard).

    Options (all [UNVERIFIED] constants; the defaults are design choices, docs/algorithms.md):
    ``a0``, ``b0``: the Beta prior (> 0); ``gamma_f``: the decay toward the prior at each
    observation, in (0, 1]; ``gamma_s``: the decay per training step since a sample's last
    update, in (0, 1]; ``score``: ``variance`` (theta (1 - theta)) or ``nondegenerate`` (the
    probability that the group is not unanimous); ``pool``: candidates per draw, 0 = the whole
    shard (a pool smaller than the draw grows to the draw's size); ``reward_min`` /
    ``reward_max``: rewards map affinely from this range to [0, 1] and are clamped there, a
    group's successes being the sum of its mapped rewards (binary rewards in {0, 1}: the count
    of successes); a non-finite reward is not counted; ``thompson``: False scores the posterior
    means instead of draws (deterministic).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        group_size: int = 0,
        a0: float = 1.0,
        b0: float = 1.0,
        gamma_f: float = 0.9,
        gamma_s: float = 0.99,
        score: str = "variance",
        pool: int = 0,
        reward_min: float = 0.0,
        reward_max: float = 1.0,
        thompson: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError("VadeSampler needs at least one sample")
        for name, value in (("a0", a0), ("b0", b0)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise _option_error(name, value, "the Beta prior must be a number > 0")
        for name, value in (("gamma_f", gamma_f), ("gamma_s", gamma_s)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1):
                raise _option_error(name, value, "a decay factor must lie in (0, 1]")
        if score not in vade_math.SCORES:
            raise _option_error("score", score, f"use one of {', '.join(vade_math.SCORES)}")
        if score == "nondegenerate" and group_size < 1:
            raise _option_error("score", score, f"needs rollout.group_size >= 1, got {group_size}")
        if not (isinstance(pool, int) and not isinstance(pool, bool) and pool >= 0):
            raise _option_error("pool", pool, "must be an integer >= 0 (0 = every sample of the rank's shard)")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (reward_min, reward_max)):
            raise _option_error("reward_min", (reward_min, reward_max), "reward_min and reward_max must be numbers")
        if not reward_max > reward_min:
            raise _option_error("reward_max", reward_max, f"must be greater than reward_min={reward_min!r}")
        if not isinstance(thompson, bool):
            raise _option_error("thompson", thompson, "must be true or false")
        self.num_samples = num_samples
        self.seed, self.rank, self.world_size, self.group_size = seed, rank, world_size, group_size
        self.gamma_f, self.gamma_s, self.score, self.pool = float(gamma_f), float(gamma_s), score, pool
        self.reward_min, self.reward_max, self.thompson = float(reward_min), float(reward_max), thompson
        self.posteriors = vade_math.BetaPosteriors(num_samples, a0=float(a0), b0=float(b0))
        own = rank < num_samples  # else fewer samples than ranks: this rank draws from all
        self.shard = torch.arange(rank, num_samples, max(1, world_size)) if own else torch.arange(num_samples)
        self.generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + 7_919 * int(rank)) % 2**63)
        self.step = 0
        self.picked = torch.zeros(num_samples, dtype=torch.bool)  # taken this step
        self.last_indices = []

    def _scores(self, cand: Tensor) -> Tensor:
        """Scores ``[len(cand)]`` of candidates ``cand`` at ``self.step`` (posteriors decayed on a copy)."""
        p = self.posteriors
        dt = (self.step - p.t[cand]).clamp(min=0)
        a, b = vade_math.slow_decay(p.a[cand], p.b[cand], dt, self.gamma_s, p.a0, p.b0)
        return vade_math.thompson_scores(a, b, self.generator, self.score, self.group_size, self.thompson)

    def next(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            avail = self.shard[~self.picked[self.shard]]
            if not len(avail):
                self.picked[self.shard] = False
                continue
            need = n - len(out)
            cand = avail
            size = max(self.pool, need)
            if self.pool and size < len(avail):
                cand = avail[torch.randperm(len(avail), generator=self.generator)[:size]]
            chosen = vade_math.select_top(self._scores(cand), need, cand)
            self.picked[chosen] = True
            out += chosen.tolist()
        self.last_indices = self.last_indices + out
        return out

    def observe(self, indices: Sequence[int], rewards: Tensor) -> None:
        """Update the posteriors of ``indices`` with ``rewards [len(indices), G]`` (mapped to
        [0, 1], see the class docstring) at the current step; clears ``last_indices``."""
        r = torch.as_tensor(rewards).detach().to("cpu", torch.float64)
        if r.dim() != 2 or r.shape[0] != len(indices):
            raise ValueError(f"observe needs rewards [len(indices)={len(indices)}, G], got {tuple(r.shape)}")
        finite = torch.isfinite(r)
        scaled = ((r - self.reward_min) / (self.reward_max - self.reward_min)).clamp(0.0, 1.0)
        counts = finite.sum(1).to(torch.float64)
        k = torch.minimum(torch.where(finite, scaled, torch.zeros_like(scaled)).sum(1), counts)
        vade_math.observe(self.posteriors, list(indices), k, counts, self.step, self.gamma_f, self.gamma_s)
        self.last_indices = []

    def begin_step(self, step: int) -> None:
        """Step ``step`` starts: the decay clock moves there, every candidate is available again."""
        self.step = int(step)
        self.picked.zero_()
        self.last_indices = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "step": self.step,
            "posteriors": self.posteriors.state_dict(),
            "generator": base64.b64encode(self.generator.get_state().numpy().tobytes()).decode("ascii"),
            "picked": torch.nonzero(self.picked).flatten().tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "posteriors" not in state:
            raise ConfigError(
                "the checkpoint's prompt sampler state is not a vade sampler's: resume with the "
                "rollout.prompt_sampler it was written with"
            )
        if int(state["num_samples"]) != self.num_samples:
            raise ConfigError(
                f"the checkpoint's vade prompt sampler covers {state.get('num_samples')} samples, "
                f"the task has {self.num_samples}: resume with the same training data"
            )
        self.step = int(state["step"])
        self.posteriors.load_state_dict(state["posteriors"])
        raw = bytearray(base64.b64decode(state["generator"]))
        self.generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
        self.picked.zero_()
        self.picked[torch.tensor(state["picked"], dtype=torch.long)] = True
        self.last_indices = []

    def merge_posteriors(self, states: Sequence[dict[str, Any]]) -> None:
        """Take, for each sample, the posterior most recently updated in any of ``states`` (the
        state of each rank of a run resumed on another number of ranks)."""
        for s in states:
            p = s["posteriors"]
            idx = torch.tensor(p["index"], dtype=torch.long)
            t = torch.tensor(p["t"], dtype=torch.long)
            newer = ~self.posteriors.seen[idx] | (t > self.posteriors.t[idx])
            idx, t = idx[newer], t[newer]
            self.posteriors.a[idx] = torch.tensor(p["a"], dtype=torch.float64)[newer]
            self.posteriors.b[idx] = torch.tensor(p["b"], dtype=torch.float64)[newer]
            self.posteriors.t[idx] = t
            self.posteriors.seen[idx] = True


@PROMPT_SAMPLERS.register("uniform")
def uniform(
    num_samples: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, group_size: int = 0, shuffle: bool = True
) -> PromptSampler:
    """Every sample once per epoch, in a seeded random order (``shuffle: false``: in file order),
    ranks taking interleaved slices; rewards are not used.

    Args:
        shuffle: draw each epoch's order from ``seed + epoch`` (False: indices in order).
    """
    return PromptSampler(num_samples, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle)


@PROMPT_SAMPLERS.register("vade")
def vade(
    num_samples: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    group_size: int = 0,
    a0: float = 1.0,
    b0: float = 1.0,
    gamma_f: float = 0.9,
    gamma_s: float = 0.99,
    score: str = "variance",
    pool: int = 0,
    reward_min: float = 0.0,
    reward_max: float = 1.0,
    thompson: bool = True,
) -> VadeSampler:
    """VADE (arXiv 2511.18902): Thompson sampling on per-sample Beta estimates of the success
    probability, preferring samples whose G rollouts are likely to disagree. The formulas and
    every default are [UNVERIFIED] design choices (the paper gives the structure only).

    Args:
        a0: Beta prior a (pseudo-successes), > 0.
        b0: Beta prior b (pseudo-failures), > 0.
        gamma_f: decay toward the prior at each observation of a sample, in (0, 1].
        gamma_s: decay toward the prior per training step since a sample's last update, in (0, 1].
        score: 'variance' (theta (1 - theta)) or 'nondegenerate' (1 - theta^G - (1 - theta)^G).
        pool: random candidates scored per draw; 0 = every sample of this rank's shard.
        reward_min: the reward mapped to 0 (rewards are mapped to [0, 1] and clamped, k = their sum).
        reward_max: the reward mapped to 1.
        thompson: draw theta from the posterior (False: use its mean; deterministic).
    """
    return VadeSampler(
        num_samples,
        seed=seed,
        rank=rank,
        world_size=world_size,
        group_size=group_size,
        a0=a0,
        b0=b0,
        gamma_f=gamma_f,
        gamma_s=gamma_s,
        score=score,
        pool=pool,
        reward_min=reward_min,
        reward_max=reward_max,
        thompson=thompson,
    )


def build_prompt_sampler(
    name: str,
    options: dict[str, Any],
    num_samples: int,
    *,
    seed: int,
    rank: int,
    world_size: int,
    group_size: int,
) -> PromptSamplerBase:
    """The sampler ``name`` of :data:`PROMPT_SAMPLERS` with ``options`` (checked: ConfigError)."""
    check_sampler_options(name, options, group_size)
    return PROMPT_SAMPLERS.get(name)(
        num_samples, seed=seed, rank=rank, world_size=world_size, group_size=group_size, **options
    )


def check_sampler_options(name: str, options: dict[str, Any], group_size: int) -> None:
    """Refuse (ConfigError naming the option and its value) an option sampler ``name`` does not
    take, or a bad value: a sampler of one sample is built with ``options``."""
    from mmpo.config import check_options

    factory = PROMPT_SAMPLERS.get(name)
    check_options(factory, options, OPTIONS_KEY, SAMPLER_RESERVED)
    factory(1, seed=0, rank=0, world_size=1, group_size=group_size, **options)


def gather_states(sampler: PromptSamplerBase, engine: Any) -> list[dict[str, Any]] | None:
    """Every rank's sampler state in rank order (collective; None with one process)."""
    return engine.all_gather_object(sampler.state_dict()) if engine.world_size > 1 else None


def sampler_checkpoint(sampler: PromptSamplerBase, ranks: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The trainer-state entries of the sampler: ``sampler`` (this rank's, rank 0's when the main
    rank writes) and, with several processes, ``rank_samplers`` (every rank's, :func:`gather_states`)."""
    return {"sampler": sampler.state_dict(), **({"rank_samplers": ranks} if ranks is not None else {})}


def resume_sampler(sampler: PromptSamplerBase, state: dict[str, Any], rank: int, world_size: int) -> None:
    """Load this rank's sampler state from a trainer state (:func:`sampler_checkpoint`): its own
    when the checkpoint was written by as many ranks, else rank 0's (a VADE sampler also takes
    the newest posterior of each sample from every rank's)."""
    ranks = state.get("rank_samplers")
    if ranks is not None and len(ranks) == world_size:
        sampler.load_state_dict(ranks[rank])
        return
    sampler.load_state_dict(state["sampler"])
    if ranks and isinstance(sampler, VadeSampler):
        sampler.merge_posteriors(ranks)


__all__ = [
    "OPTIONS_KEY",
    "PROMPT_SAMPLERS",
    "SAMPLER_RESERVED",
    "PromptSampler",
    "PromptSamplerBase",
    "VadeSampler",
    "build_prompt_sampler",
    "check_sampler_options",
    "gather_states",
    "resume_sampler",
    "sampler_checkpoint",
]
