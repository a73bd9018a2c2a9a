"""``hiconagent``: HiconAgent (HCPO) on GUI episode data (arXiv 2512.01763).

A training sample is one step of an episode: the instruction, the history of earlier steps
(screenshot + action text each, at most ``max_history``), the current screenshot, and the
reference action with its target box. The model answers ``<think>...</think><action>...</action>``;
the reward is format + action type + value/grounding (``rewards.py``) against the reference.

- **Dynamic Context Sampling**: each rollout of a group keeps its own last k history steps, k drawn
  from ``P(k) ∝ exp(s·w·k)`` with ``w`` rising over training (``history.py``); the token trainer
  encodes each rollout's prompt (``rollout_prompts_differ``).
- **Anchor-guided History Compression** and the two-branch loss live in the trainer
  (``hicon_trainer.py``): the compressed branch drops the history screenshots' hidden states at
  decoder layer ``ahc.drop_layer``; the action texts of the history stay as anchors.

Held-out episodes (``eval_data``, or a stable ``eval_fraction`` of the episodes by id) give the
step success rate, action-type accuracy and episode success (every step of an episode right).
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmpo.data_rows import KeyCheck, LoadSummary
from mmpo.errors import ConfigError
from mmpo.rollout.env_runner import SeedRange
from mmpo.sft import SFTConfig
from mmpo.tasks import RewardOutput, Sample, TokenTask
from mmpo_tasks.gui_agent.actions import parse_action
from mmpo_tasks.gui_agent.episodes import GuiEpisode, GuiStep, load_episodes
from mmpo_tasks.gui_agent.history import keep_recent, sample_history_length
from mmpo_tasks.gui_agent.rewards import GuiRewardConfig, episode_success, step_rewards

IMAGE_CACHE = 4096  # resized screenshots kept in memory (a prompt reuses its episode's earlier screens)

SYSTEM_PROMPT = (
    "You operate a GUI. Given the task, the previous steps and the current screen, reply with "
    "<think>...</think><action>...</action>, where the action is one of: click(x, y) with x, y in "
    '[0, 1] of the screen, type("text"), scroll(up|down|left|right), back(), home(), enter(), finished().'
)


@dataclass
class AhcConfig:
    """Anchor-guided History Compression (the trainer's compressed branch)."""

    enabled: bool = field(
        default=True, metadata={"help": "Train with HCPO's two branches; off: plain GRPO on the full prompt."}
    )
    drop_layer: int = field(
        default=6,
        metadata={"help": "Decoder layer k at which history screenshot tokens are dropped (HiconAgent: 6).", "min": 0},
    )
    alignment_coef: float = field(
        default=10.0,
        metadata={"help": "Weight of KL(pi_c || sg(pi_u)) inside the beta bracket (HiconAgent: 10).", "min": 0.0},
    )


@dataclass
class RecordConfig:
    """The episodes recorded when ``task.data`` is empty: the scripted MiniWoB++ solver in headless
    Chromium (:func:`mmpo_tasks.gui_agent.recording.cached_episodes`), built once into the cache."""

    tasks: list[str] = field(
        default_factory=lambda: ["enter-text", "click-test-2", "focus-text"],
        metadata={"help": "MiniWoB++ tasks the solver plays (mmpo_tasks.gui_agent.solver.SOLVABLE_TASKS)."},
    )
    seeds: SeedRange = field(
        default_factory=lambda: SeedRange(0, 30), metadata={"help": "Seeds of each task (one episode each)."}
    )
    only_success: bool = field(default=True, metadata={"help": "Keep only the episodes that earned a reward."})
    max_steps: int = field(default=16, metadata={"help": "Step limit of an episode.", "min": 1})


@dataclass
class WarmStartConfig(SFTConfig):
    """Stage 1 before HCPO: a supervised fit of the model to the reference action of every training
    step (:func:`mmpo_tasks.gui_agent.warm_start.fit_reference_actions`), saved to ``<run>/sft/model``
    and reused when the run is launched again. A random tiny VLM never writes an action by chance."""

    enabled: bool = field(default=False, metadata={"help": "Run the warm start before HCPO."})
    epochs: int = field(default=20, metadata={"help": "Passes over the training steps.", "min": 1})
    batch_size: int = field(default=16, metadata={"help": "Steps per optimizer step.", "min": 1})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate (tiny models ~3e-3).", "gt": 0.0})


@dataclass
class HiconConfig:
    data: str = field(
        default="",
        metadata={
            "help": "GUI episodes JSONL (layout: tasks/gui_agent/episodes.py; e.g. from "
            "data_prep/miniwob_episodes.py or data_prep/gui_to_jsonl.py). Empty: the solver's MiniWoB++ "
            "episodes of task.record, recorded on first use into the cache ($MMPO_CACHE/data)."
        },
    )
    record: RecordConfig = field(
        default_factory=RecordConfig, metadata={"help": "What to record when task.data is empty."}
    )
    warm_start: WarmStartConfig = field(
        default_factory=WarmStartConfig, metadata={"help": "Supervised stage 1 before HCPO (off by default)."}
    )
    eval_data: str = field(
        default="", metadata={"help": "Held-out episodes JSONL; empty: hold out eval_fraction of `data` by episode id."}
    )
    eval_fraction: float = field(
        default=0.2,
        metadata={"help": "Share of `data` episodes held out when eval_data is empty.", "min": 0.0, "max": 0.9},
    )
    max_history: int = field(
        default=2,
        metadata={
            "help": "History steps (screenshot + action) a prompt holds at most "
            "(HiconAgent: <= 3 images with the current one).",
            "min": 0,
        },
    )
    image_size: int = field(
        default=112, metadata={"help": "Screenshots are resized so their longer side is this many pixels.", "min": 28}
    )
    dcs: bool = field(
        default=True, metadata={"help": "Dynamic Context Sampling: each rollout keeps its own history length."}
    )
    dcs_s: float = field(
        default=2.0, metadata={"help": "DCS sharpness s in P(k) ∝ exp(s·w·k) (HiconAgent: 2).", "min": 0.0}
    )
    dcs_total_steps: int = field(
        default=0, metadata={"help": "S of the DCS schedule; 0 = trainer.max_steps (HiconAgent: 414).", "min": 0}
    )
    reward: GuiRewardConfig = field(default_factory=GuiRewardConfig, metadata={"help": "Step reward weights."})
    ahc: AhcConfig = field(default_factory=AhcConfig, metadata={"help": "History compression (HCPO)."})
    system_prompt: str = field(default=SYSTEM_PROMPT, metadata={"help": "System message (the action space)."})


def recorded_episodes(record: RecordConfig) -> str:
    """The episodes file of ``task.record``, recorded into the cache on first use."""
    from mmpo_tasks.gui_agent.recording import cached_episodes
    from mmpo_tasks.gui_agent.solver import check_task

    if not record.tasks:
        raise ConfigError("task.record.tasks: name at least one MiniWoB++ task (or give task.data)")
    for name in record.tasks:
        try:
            check_task(name)
        except ConfigError as e:
            raise ConfigError(f"task.record.tasks: {e}") from None
    path = cached_episodes(
        record.tasks, record.seeds.seeds(), only_success=record.only_success, max_steps=record.max_steps
    )
    return str(path)


def _held_out(episode_id: str, fraction: float) -> bool:
    """A stable split by id (crc32), so adding episodes never moves old ones across it."""
    return (zlib.crc32(episode_id.encode()) % 10_000) < fraction * 10_000


class HiconAgentTask(TokenTask):
    name = "hiconagent"
    description = (
        "HiconAgent: GUI agent GRPO on episode data with Dynamic Context Sampling and "
        "Anchor-guided History Compression (HCPO)"
    )
    Config = HiconConfig
    rollout_prompts_differ = True

    @classmethod
    def trainer_class(cls) -> type:
        from mmpo_tasks.gui_agent.hicon_trainer import HiconTrainer

        return HiconTrainer

    def __init__(self, config: HiconConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        if not config.data:  # the recipe as written: record the solver's episodes once
            config.data = recorded_episodes(config.record)
        keys = KeyCheck(self.unknown_keys)
        summary = self.data_summary = LoadSummary(self.name, unit="episodes")
        episodes, self.skipped = load_episodes(config.data, unknown_keys=keys)
        if config.eval_data:
            self.train_episodes = episodes
            self.eval_episodes, skipped = load_episodes(config.eval_data, unknown_keys=keys)
            self.skipped += skipped
            summary.held_out_why = "evaluation reads task.eval_data"
            both = sorted({e.id for e in episodes} & {e.id for e in self.eval_episodes})
            if both:
                raise ConfigError(
                    f"task.eval_data shares {len(both)} episode id(s) with task.data (e.g. {both[:3]}); "
                    "held-out episodes must be new"
                )
        else:
            self.train_episodes = [e for e in episodes if not _held_out(e.id, config.eval_fraction)]
            self.eval_episodes = [e for e in episodes if _held_out(e.id, config.eval_fraction)]
            summary.held_out = len(self.eval_episodes)
            summary.held_out_why = f"eval_fraction={config.eval_fraction:g} of task.data (by episode id)"
        if not self.train_episodes:
            raise ConfigError(
                f"task.data={config.data!r}: no training episodes left "
                f"after holding out task.eval_fraction={config.eval_fraction}"
            )
        self.train_index = [(i, t) for i, e in enumerate(self.train_episodes) for t in range(len(e.steps))]
        self.eval_index = [(i, t) for i, e in enumerate(self.eval_episodes) for t in range(len(e.steps))]
        summary.splits = {"train": len(self.train_episodes), "eval": len(self.eval_episodes)}
        summary.notes.append(f"steps: train {len(self.train_index)}, eval {len(self.eval_index)}")
        for bad in self.skipped:
            summary.skip(bad["reason"])
        summary.print()
        self.step = 1
        self.total_steps = config.dcs_total_steps or 1
        self._images: OrderedDict[str, Any] = OrderedDict()

    # -- prompts ---------------------------------------------------------------------------------
    def _image(self, path: str) -> Any:
        """The screenshot at ``path``, resized; the most recent ``IMAGE_CACHE`` are kept in memory."""
        if path in self._images:
            self._images.move_to_end(path)
            return self._images[path]
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = self.config.image_size / max(im.size)
            size = (max(28, round(im.size[0] * scale)), max(28, round(im.size[1] * scale)))
            self._images[path] = im.resize(size, Image.BILINEAR)
        if len(self._images) > IMAGE_CACHE:
            self._images.popitem(last=False)
        return self._images[path]

    def messages(self, episode: GuiEpisode, t: int, history: int) -> list[dict[str, Any]]:
        """The prompt of step ``t`` keeping its last ``history`` steps (renumbered from 1)."""
        kept: list[GuiStep] = keep_recent(episode.steps[:t], history)
        content: list[dict[str, Any]] = [{"type": "text", "text": f"Task: {episode.instruction}\n"}]
        for j, s in enumerate(kept, 1):
            content.append({"type": "text", "text": f"Step {j} screen:"})
            content.append({"type": "image", "image": self._image(s.screenshot)})
            content.append({"type": "text", "text": f"Step {j} action: {s.action.to_text()}\n"})
        content.append({"type": "text", "text": "Current screen:"})
        content.append({"type": "image", "image": self._image(episode.steps[t].screenshot)})
        content.append({"type": "text", "text": "Next action?"})
        return [
            {"role": "system", "content": [{"type": "text", "text": self.config.system_prompt}]},
            {"role": "user", "content": content},
        ]

    def _sample(self, episodes: list[GuiEpisode], i: int, t: int, split: str) -> Sample:
        ep = episodes[i]
        step = ep.steps[t]
        return Sample(
            id=f"{ep.id}/{t}",
            messages=self.messages(ep, t, self.config.max_history),
            answer=step.action.to_text(),
            meta={
                "action": step.action,
                "split": split,
                "episode": i,
                "episode_id": ep.id,
                "t": t,
                "box": step.target_box,
                "history": min(t, self.config.max_history),
            },
        )

    def num_train(self) -> int:
        return len(self.train_index)

    def train_sample(self, index: int) -> Sample:
        return self._sample(self.train_episodes, *self.train_index[index], "train")

    def eval_samples(self, n: int) -> list[Sample]:
        return [self._sample(self.eval_episodes, i, t, "eval") for i, t in self.eval_index[: n or None]]

    def begin_step(self, step: int, total_steps: int) -> None:
        self.step = step
        self.total_steps = self.config.dcs_total_steps or total_steps

    def history_length(self, sample: Sample, k: int) -> int:
        """DCS: the history length of rollout ``k`` of ``sample`` (seeded by run seed, step, sample, k)."""
        available = sample.meta["history"]
        if not self.config.dcs:
            return available
        rng = np.random.default_rng([self.seed, self.step, zlib.crc32(sample.id.encode()), k])
        return sample_history_length(self.step, self.total_steps, available, rng, self.config.dcs_s)

    def rollout_messages(self, sample: Sample, k: int) -> list[dict[str, Any]]:
        ep = (self.train_episodes if sample.meta["split"] == "train" else self.eval_episodes)[sample.meta["episode"]]
        return self.messages(ep, sample.meta["t"], self.history_length(sample, k))

    # -- rewards ---------------------------------------------------------------------------------
    def reward(self, samples: list[Sample], completions: list[str]) -> RewardOutput:
        preds = [parse_action(c) for c in completions]
        rewards, comps = step_rewards(
            preds, [s.meta["action"] for s in samples], [s.meta["box"] for s in samples], self.config.reward
        )
        return RewardOutput(rewards=rewards, components=comps)

    def eval_metrics(self, samples: list[Sample], completions: list[str]) -> dict[str, float]:
        out = self.reward(samples, completions)
        metrics = {"reward": float(out.rewards.mean())}
        metrics.update({k: float(v.mean()) for k, v in out.components.items()})
        by_episode: dict[str, list[float]] = {}
        for s, ok in zip(samples, out.components["step_success"].tolist()):
            by_episode.setdefault(s.meta["episode_id"], []).append(ok)
        metrics["episode_success"] = (
            float(np.mean([episode_success(v) for v in by_episode.values()])) if by_episode else 0.0
        )
        return metrics


__all__ = [
    "AhcConfig",
    "HiconAgentTask",
    "HiconConfig",
    "RecordConfig",
    "SYSTEM_PROMPT",
    "WarmStartConfig",
    "recorded_episodes",
]
