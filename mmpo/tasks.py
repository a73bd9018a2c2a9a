"""Task plugins: the base class and the registry.

A task turns its data into prompts (``Sample``), scores completions (``RewardOutput``) and
reports evaluation metrics. ``mmpo`` never imports a plugin by name: plugins are found through
the entry-point group ``mmpo.tasks`` (this project's own live in ``tasks/``, installed as
``mmpo_tasks``), so a third-party package can add tasks too.
"""

from __future__ import annotations

import abc
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from mmpo.core.registry import Registry


@dataclass
class Sample:
    """One prompt (context) of a group.

    ``messages`` are chat messages in the transformers / qwen-vl-utils layout, e.g.
    ``[{"role": "user", "content": [{"type": "image", "image": PIL.Image}, {"type": "text", "text": "..."}]}]``.
    """

    id: str
    messages: list[dict[str, Any]]
    answer: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardOutput:
    """Rewards of N completions: the total ``rewards [N]`` and each named component ``[N]``.

    ``row_info`` holds per-row tensors ``[N]`` that travel with the rows into the update (e.g.
    ARES's difficulty bucket, correctness and soft entropy cost, which scale the KL term), or
    ``[N, T]`` over the completion tokens (HiPO's ``segment_mask``).
    """

    rewards: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    row_info: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RolloutView:
    """What a reward may read of the sampled completions beyond their text.

    completion_ids [N, T], mask [N, T] bool, group_ids [N]; ``token_entropy [N, T]`` (entropy of
    the sampling distribution at each position, float32) and ``token_texts`` (the text of each
    sampled token, N lists of T strings) are filled when the task sets ``needs_token_entropy``.
    ``tokenizer``: the policy's tokenizer (``decode``), for rewards that map text spans of a
    completion to its token positions (HiPO's ``segment_mask``); None when the trainer gives none.
    """

    completion_ids: torch.Tensor
    mask: torch.Tensor
    group_ids: torch.Tensor
    token_entropy: torch.Tensor | None = None
    token_texts: list[list[str]] | None = None
    tokenizer: Any = None


class Task(abc.ABC):
    """Base class of a task plugin, whatever its kind of action unit. Subclasses set ``name``
    and ``Config`` and implement the hooks of their kind: :class:`TokenTask` here for generated
    tokens; the other kinds' hooks are the Protocols of their trainers (``mmpo.trainers``)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: names of the per-row tensors this task's rewards attach (``RewardOutput.row_info``);
    #: checked at load against what the objective reads (e.g. ``kl_schedule: ares_bucket``)
    row_info_keys: tuple[str, ...] = ()
    #: whether its action units' log-probs are densities (None: the trainer kind's default)
    unit_densities: bool | None = None
    #: what the task's data loaders do with a row key they do not read (``task.unknown_keys``:
    #: error, warn or ignore; see :mod:`mmpo.data_rows`); :func:`build_task` sets it before
    #: ``__init__`` runs, since tasks load their data there
    unknown_keys: str = "error"

    @dataclass
    class Config:
        pass

    @classmethod
    def trainer_class(cls) -> type | None:
        """The trainer that runs this task; None (the default) means the token trainer
        (:class:`mmpo.trainers.token.Trainer`). A plugin whose action units are not tokens
        returns the trainer of its kind (``mmpo.trainers``), or its own subclass of one."""
        return None

    def __init__(self, config: Any, *, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        #: gathers a picklable object from every rank (set by the trainer under torchrun), so
        #: that batch statistics behind a task's state agree across ranks
        self.all_gather: Callable[[Any], list[Any]] = lambda obj: [obj]

    @abc.abstractmethod
    def num_train(self) -> int:
        """Number of distinct training items (prompts, contexts, start times); the resumable
        sampler cycles through them."""

    # -- state kept across steps (saved in checkpoints) -----------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state of the task's stateful reward pieces (e.g. EMA thresholds)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"task {self.name!r} keeps no state, but the checkpoint has {sorted(state)}")


class TokenTask(Task):
    """A task whose action units are generated tokens (text, VLM and agent tasks): prompts in,
    completions scored. Run by :class:`mmpo.trainers.token.Trainer`."""

    #: set (on the class or the instance) when ``reward_with_rollout`` reads token entropies
    needs_token_entropy: bool = False
    #: set when ``rollout_messages`` gives the rollouts of one group different prompts; the token
    #: trainer then encodes each rollout's prompt (single-turn tasks; agent tasks always do)
    rollout_prompts_differ: bool = False
    #: whether :meth:`demonstration` gives correct completions (SRFT arXiv 2506.19767 trains on
    #: them; DR-IRL arXiv 2503.18991 anchors its data hardness on them)
    gives_demonstrations: bool = False
    #: the ``algorithm.advantage`` this task's rewards are made for, or None (any); e.g.
    #: vlm_reasoning with ``task.hipo.enabled`` needs ``hipo``, which reads its per-row mode
    required_advantage: str | None = None

    # -- data ---------------------------------------------------------------------------
    @abc.abstractmethod
    def train_sample(self, index: int) -> Sample:
        """The training sample at ``index`` (deterministic)."""

    @abc.abstractmethod
    def eval_samples(self, n: int) -> list[Sample]:
        """``n`` held-out samples, disjoint from the training samples."""

    # -- rewards and evaluation ----------------------------------------------------------
    @abc.abstractmethod
    def reward(self, samples: list[Sample], completions: list[str]) -> RewardOutput:
        """Score ``completions[i]`` of ``samples[i]`` (N each; a group repeats its sample G times)."""

    def reward_with_rollout(self, samples: list[Sample], completions: list[str], rollout: RolloutView) -> RewardOutput:
        """Rewards of a training rollout; override to use token-level information (default: ``reward``)."""
        return self.reward(samples, completions)

    def demonstration(self, sample: Sample) -> str | None:
        """The text of one correct completion for ``sample``'s prompt, written in the task's output
        format (its ``reward`` is the task's maximum), or None when there is none (the default;
        a task that gives them sets ``gives_demonstrations``)."""
        return None

    # -- multi-turn agent tasks -----------------------------------------------------------
    def tools(self) -> list[Any]:
        """Tools the model may call (``mmpo.rollout.tools.Tool``). A task with tools is rolled
        out by the multi-turn agent loop (``mmpo.rollout.agent_loop``)."""
        return []

    def agent_settings(self) -> dict[str, Any]:
        """Keyword arguments of ``AgentSettings`` (max_turns, tool_timeout_s, max_concurrency, ...)."""
        return {}

    def begin_step(self, step: int, total_steps: int) -> None:
        """Called by the token trainer before each training step's rollout (step counted from 1);
        for schedules that depend on training progress (HiconAgent's DCS)."""

    def rollout_messages(self, sample: Sample, k: int) -> list[dict[str, Any]]:
        """The prompt of the k-th rollout of ``sample``'s group (default: the same for all;
        FrameMind's DRFS starts each rollout from a different frame sampling)."""
        return sample.messages

    def tool_context(self, sample: Sample) -> dict[str, Any]:
        """What ``sample``'s tools may read (e.g. its own video); never taken from the model."""
        return {}

    def reward_trajectories(self, samples: list[Sample], trajectories: list[Any]) -> RewardOutput:
        """Rewards of multi-turn trajectories (``AgentTrajectory``; default: ``reward`` of the
        last turn's text)."""
        return self.reward(samples, [t.turn_texts[-1] if t.turn_texts else "" for t in trajectories])

    def eval_trajectories(self, samples: list[Sample], trajectories: list[Any]) -> dict[str, float]:
        """Metrics of greedy multi-turn trajectories on held-out samples (``eval/<name>``)."""
        out = self.reward_trajectories(samples, trajectories)
        metrics = {"reward": float(out.rewards.float().mean())}
        metrics.update({k: float(v.float().mean()) for k, v in out.components.items()})
        return metrics

    def parse_prediction(self, sample: Sample, completion: str) -> Any:
        """The answer ``completion`` gives (``prediction`` in ``predictions.jsonl``, beside the
        whole ``completion``); default: the completion itself."""
        return completion

    def eval_metrics(self, samples: list[Sample], completions: list[str]) -> dict[str, float]:
        """Metrics of greedy completions on held-out samples (logged as ``eval/<name>``)."""
        out = self.reward(samples, completions)
        metrics = {"reward": float(out.rewards.float().mean())}
        metrics.update({k: float(v.float().mean()) for k, v in out.components.items()})
        return metrics


class _TaskRegistry(Registry):
    """A registry that first loads the plugins of the ``mmpo.tasks`` entry-point group."""

    _loaded = False

    def load_plugins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in importlib.metadata.entry_points(group="mmpo.tasks"):
            if ep.name not in self._items:
                self._items[ep.name] = ep.load()

    def get(self, name: str):  # type: ignore[override]
        self.load_plugins()
        return super().get(name)

    def names(self) -> list[str]:
        self.load_plugins()
        return super().names()

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return super().__contains__(name)


TASKS: Registry[type[Task]] = _TaskRegistry("task")


def load_plugins() -> None:
    """Register every task found through the ``mmpo.tasks`` entry-point group (once)."""
    TASKS.load_plugins()  # type: ignore[attr-defined]


def get_task_class(name: str) -> type[Task]:
    return TASKS.get(name)


def build_task(name: str, options: dict[str, Any], *, seed: int = 0, unknown_keys: str = "error") -> Task:
    """Instantiate task ``name`` with its options validated against the task's ``Config``;
    ``unknown_keys`` (error | warn | ignore) is what its loaders do with a row key they do not read."""
    from mmpo.config import from_dict
    from mmpo.data_rows import KeyCheck

    cls = get_task_class(name)
    cfg = from_dict(cls.Config, dict(options), where="task")
    KeyCheck(unknown_keys)  # a bad mode is a ConfigError before any data is read
    task = cls.__new__(cls)
    task.unknown_keys = unknown_keys  # before __init__, which loads the data
    task.__init__(cfg, seed=seed)
    return task


def build_task_from(cfg: Any) -> Task:
    """The task of a run config (``mmpo.config.RunConfig``): ``cfg.task`` (name, options,
    unknown_keys) seeded with ``cfg.seed``."""
    return build_task(cfg.task.name, cfg.task.options, seed=cfg.seed, unknown_keys=cfg.task.unknown_keys)


__all__ = [
    "Sample",
    "RewardOutput",
    "RolloutView",
    "Task",
    "TokenTask",
    "TASKS",
    "load_plugins",
    "get_task_class",
    "build_task",
    "build_task_from",
]
