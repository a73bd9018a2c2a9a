"""``framemind``: FrameMind-style video QA (arXiv 2509.24008): frame-interleaved
reasoning with tool calls over the sample's own video, trained with DRFS-GRPO.

A rollout starts from a few frames of the video (an initial frame-sampling setting), may call
``video_clip(start_s, end_s, num_frames)`` / ``frame_at(t_s)`` (multi-turn agent loop), and ends
with ``<answer>LETTER</answer>``. DRFS: the G rollouts of a question start from different settings
of a resolution ladder (many small frames ... few large frames), so the group compares temporal
against spatial detail; the advantage is the usual group-relative one over these rollouts.

Reward: accuracy + format + tool use + a turn-efficiency bonus (lambda_turn = 0.5 for 2-3 turns),
each logged. By default the tool and turn terms count only for a correct answer
(``reward.shaping_needs_correct``), so calling tools cannot pay without answering right.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmpo.data_rows import KeyCheck, LoadSummary
from mmpo.errors import ConfigError, DataError
from mmpo.tasks import RewardOutput, Sample, TokenTask

LETTERS = "ABCDEFGH"
DEFAULT_PROMPT = (
    "Video of {duration:.1f} s; the frames above are at {times}.\n"
    "Question: {question}\n{options}\n"
    "Tools: video_clip(start_s, end_s, num_frames) shows frames of a time range; frame_at(t_s) shows one larger frame. "
    'Call one as <tool_call>{{"name": "frame_at", "arguments": {{"t_s": 1.5}}}}</tool_call>, '
    "then answer as <answer>LETTER</answer>."
)


@dataclass
class SyntheticVideoConfig:
    """Synthetic event videos (used when ``data`` is empty): coloured shapes shown at known times."""

    num_train: int = field(default=64, metadata={"help": "Training videos (one question each).", "min": 1})
    num_eval: int = field(default=32, metadata={"help": "Held-out videos (another seed).", "min": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the training set (held-out: seed + 1)."})
    duration_s: float = field(default=8.0, metadata={"help": "Clip length.", "gt": 0.0})
    fps: float = field(default=4.0, metadata={"help": "Frames per second.", "gt": 0.0})
    size: int = field(default=64, metadata={"help": "Frame side in pixels.", "min": 16})
    num_events: int = field(default=3, metadata={"help": "Shapes shown per clip.", "min": 1})
    kinds: list[str] = field(
        default_factory=lambda: ["colour_at"],
        metadata={"help": "Question kinds: colour_at, first_shape, when_colour, count."},
    )
    shuffle_options: bool = field(
        default=True,
        metadata={
            "help": "Shuffle colour options per question (false: always red, green, blue, yellow, "
            "so a tiny model can tie a colour to a letter)."
        },
    )


@dataclass
class FrameMindReward:
    accuracy: float = field(default=1.0, metadata={"help": "Weight of the correct answer.", "min": 0.0})
    format: float = field(
        default=0.2,
        metadata={"help": "Weight of a well-formed <answer>LETTER</answer> with no malformed tool call.", "min": 0.0},
    )
    tool: float = field(default=0.2, metadata={"help": "Weight of at least one successful tool call.", "min": 0.0})
    turn_bonus: float = field(
        default=0.5,
        metadata={
            "help": "lambda_turn: bonus when the rollout used bonus_turns turns with a working tool call "
            "(FrameMind: 0.5 for 2-3).",
            "min": 0.0,
        },
    )
    bonus_turns: list[int] = field(
        default_factory=lambda: [2, 3], metadata={"help": "Turn counts that earn the bonus (FrameMind: 2-3)."}
    )
    shaping_needs_correct: bool = field(
        default=True,
        metadata={
            "help": "Tool and turn terms count only for a correct answer (false: the paper's unconditional terms)."
        },
    )


@dataclass
class FrameMindConfig:
    data: str = field(
        default="",
        metadata={
            "help": "Training video QA rows (.jsonl / .parquet: video, question, options, answer); "
            "empty: synthetic videos."
        },
    )
    eval_data: str = field(
        default="",
        metadata={
            "help": "Held-out rows (same layout); empty: synthetic held-out videos (or the training rows' last 10%)."
        },
    )
    synthetic: SyntheticVideoConfig = field(
        default_factory=SyntheticVideoConfig, metadata={"help": "Synthetic videos when data is empty."}
    )
    ladder: list[list[int]] = field(
        default_factory=lambda: [[8, 56], [4, 84], [2, 112]],
        metadata={
            "help": "DRFS resolution ladder: [num_frames, longer side px] settings, many small ... few large "
            "(similar image-token budgets)."
        },
    )
    drfs: bool = field(
        default=True,
        metadata={
            "help": "Rollout k of a group starts from ladder[k mod len]; "
            "false: every rollout from ladder[initial_setting]."
        },
    )
    initial_setting: int = field(
        default=1, metadata={"help": "Ladder index used without DRFS and at evaluation.", "min": 0}
    )
    max_turns: int = field(default=3, metadata={"help": "Turn cap of a rollout.", "min": 1})
    tool_timeout_s: float = field(default=10.0, metadata={"help": "Per-call timeout.", "gt": 0.0})
    max_concurrency: int = field(default=8, metadata={"help": "Tool calls running at once.", "min": 1})
    clip_size: int = field(default=56, metadata={"help": "Longer side of video_clip frames (px).", "min": 28})
    frame_size: int = field(default=112, metadata={"help": "Longer side of frame_at frames (px).", "min": 28})
    max_clip_frames: int = field(default=8, metadata={"help": "Cap of video_clip's num_frames.", "min": 1})
    reward: FrameMindReward = field(default_factory=FrameMindReward, metadata={"help": "Reward components."})
    prompt: str = field(
        default=DEFAULT_PROMPT,
        metadata={"help": "User text after the initial frames ({duration}, {times}, {question}, {options})."},
    )


def synthetic_folder(cfg: SyntheticVideoConfig, seed: int, n: int) -> Path:
    """The cache folder of a synthetic set (written once, like the tiny models)."""
    from mmpo.models import tiny_cache_root, write_cache_folder
    from mmpo_tasks.video_frames.video import synthetic_dataset

    need = 1.0 + cfg.num_events * 1.0 + (cfg.num_events - 1) * 0.5  # 1-s events, 0.5-s gaps and margins
    if cfg.duration_s < need:
        raise ConfigError(
            f"task.synthetic: {cfg.num_events} events need duration_s >= {need:g} s; got {cfg.duration_s:g}"
        )
    spec = {**asdict(cfg), "seed": seed, "n": n, "version": 1}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = tiny_cache_root() / "video_qa" / f"synthetic-{key}"
    return write_cache_folder(
        folder,
        "qa.jsonl",
        lambda out: synthetic_dataset(
            out,
            n,
            seed,
            kinds=cfg.kinds,
            duration_s=cfg.duration_s,
            fps=cfg.fps,
            size=cfg.size,
            num_events=cfg.num_events,
            shuffle_options=cfg.shuffle_options,
        ),
        what="Synthetic video set",
    )


class FrameMindTask(TokenTask):
    name = "framemind"
    description = (
        "FrameMind: video QA with frame tools (video_clip, frame_at) in a multi-turn loop, "
        "DRFS-GRPO over a resolution ladder"
    )
    Config = FrameMindConfig

    def __init__(self, config: FrameMindConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        from mmpo_tasks.video_frames import tools as _tools  # noqa: F401  (registers the tools)
        from mmpo_tasks.video_frames.data import load_video_qa

        if not config.ladder or any(len(s) != 2 or s[0] < 1 or s[1] < 28 for s in config.ladder):
            raise ConfigError(f"task.ladder must be [[num_frames >= 1, size >= 28 px], ...]; got {config.ladder}")
        if config.initial_setting >= len(config.ladder):
            raise ConfigError(
                f"task.initial_setting={config.initial_setting} but the ladder has {len(config.ladder)} settings"
            )
        syn = config.synthetic
        keys = KeyCheck(self.unknown_keys)
        summary = self.data_summary = LoadSummary(self.name)
        train_path = config.data or synthetic_folder(syn, syn.seed, syn.num_train) / "qa.jsonl"
        self.train_rows, self.skipped = load_video_qa(train_path, unknown_keys=keys)
        if config.eval_data:
            self.eval_rows, skipped = load_video_qa(config.eval_data, unknown_keys=keys)
            self.skipped += skipped
            summary.held_out_why = "evaluation reads task.eval_data"
        elif not config.data:
            self.eval_rows, _ = load_video_qa(
                synthetic_folder(syn, syn.seed + 1, syn.num_eval) / "qa.jsonl", unknown_keys=keys
            )
            summary.held_out_why = "synthetic videos: evaluation has its own set (seed + 1)"
        else:  # a held-out tail of the training rows
            cut = max(1, len(self.train_rows) // 10)
            self.train_rows, self.eval_rows = self.train_rows[:-cut], self.train_rows[-cut:]
            summary.held_out, summary.held_out_why = cut, "the last 10% of task.data rows, no task.eval_data"
        if not self.train_rows:
            raise DataError(f"task.data: no usable training row ({len(self.skipped)} skipped)")
        summary.splits = {"train": len(self.train_rows), "eval": len(self.eval_rows)}
        for bad in self.skipped:
            summary.skip(bad["reason"])
        summary.print()
        if self.skipped:  # bad rows never stop a run; say how many and why (first few)
            import sys

            shown = "; ".join(str(x["error"]) for x in self.skipped[:3])
            print(
                f"framemind: skipped {len(self.skipped)} row(s) "
                f"with a missing or unreadable video or bad fields: {shown}",
                file=sys.stderr,
            )

    # -- samples --------------------------------------------------------------------------------
    def _sample(self, row: dict[str, Any], evaluation: bool) -> Sample:
        meta = {"row": row, "eval": evaluation, "options": list(row["options"])}
        s = Sample(id=str(row["id"]), messages=[], answer=row["answer"], meta=meta)
        s.messages = self.rollout_messages(s, 0)
        return s

    def num_train(self) -> int:
        return len(self.train_rows)

    def train_sample(self, index: int) -> Sample:
        return self._sample(self.train_rows[index], False)

    def eval_samples(self, n: int) -> list[Sample]:
        return [self._sample(r, True) for r in self.eval_rows[: n or None]]

    def setting(self, sample: Sample, k: int) -> tuple[int, int]:
        """``(num_frames, size)`` the k-th rollout starts from: DRFS walks the ladder; evaluation and
        ``drfs: false`` use ``initial_setting``."""
        c = self.config
        i = c.initial_setting if sample.meta.get("eval") or not c.drfs else k % len(c.ladder)
        n, size = c.ladder[i]
        return int(n), int(size)

    def rollout_messages(self, sample: Sample, k: int) -> list[dict[str, Any]]:
        from mmpo_tasks.video_frames.tools import DEFAULT_CACHE

        row = sample.meta["row"]
        n, size = self.setting(sample, k)
        reader = DEFAULT_CACHE.get(row["video"])
        dur = reader.duration_s
        times = [(j + 0.5) * dur / n for j in range(n)]
        frames = reader.frames_at(times, size)
        options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(row["options"]))
        text = self.config.prompt.format(
            duration=dur, times=", ".join(f"{t:.1f} s" for t in times), question=row["question"], options=options
        )
        content = [{"type": "image", "image": f} for f in frames] + [{"type": "text", "text": text}]
        return [{"role": "user", "content": content}]

    # -- tools ----------------------------------------------------------------------------------
    def tools(self) -> list[Any]:
        from mmpo_tasks.video_frames.tools import FrameAtTool, VideoClipTool

        return [VideoClipTool(max_frames=self.config.max_clip_frames), FrameAtTool()]

    def agent_settings(self) -> dict[str, Any]:
        c = self.config
        return {"max_turns": c.max_turns, "tool_timeout_s": c.tool_timeout_s, "max_concurrency": c.max_concurrency}

    def tool_context(self, sample: Sample) -> dict[str, Any]:
        return {
            "video": sample.meta["row"]["video"],
            "clip_size": self.config.clip_size,
            "frame_size": self.config.frame_size,
        }

    # -- rewards --------------------------------------------------------------------------------
    def _letter(self, answer: str | None, sample: Sample) -> str | None:
        if answer is None:
            return None
        a = answer.strip().strip("().").strip()
        letters = LETTERS[: len(sample.meta["row"]["options"])]
        return a if len(a) == 1 and a in letters else None

    def reward_trajectories(self, samples: list[Sample], trajectories: list[Any]) -> RewardOutput:
        w = self.config.reward
        comp: dict[str, list[float]] = {
            k: []
            for k in (
                "accuracy",
                "format",
                "tool_use",
                "turn_bonus",
                "turns",
                "tool_calls",
                "tool_errors",
                "malformed_calls",
            )
        }
        for s, t in zip(samples, trajectories):
            letter = self._letter(t.answer, s)
            used_tool = t.tool_calls - t.tool_errors > 0
            comp["accuracy"].append(float(letter is not None and letter == s.answer))
            # well-formed: an option letter in <answer>, and no malformed call on the way
            comp["format"].append(float(letter is not None and t.malformed_calls == 0))
            comp["tool_use"].append(float(used_tool))
            # the turns must have been spent on working tool calls: a malformed call followed by
            # an answer is two turns too, and was learned as a shortcut to the bonus
            comp["turn_bonus"].append(float(used_tool and t.num_turns in w.bonus_turns))
            comp["turns"].append(float(t.num_turns))
            comp["tool_calls"].append(float(t.tool_calls))
            comp["tool_errors"].append(float(t.tool_errors))
            comp["malformed_calls"].append(float(t.malformed_calls))
        c = {k: torch.tensor(v) for k, v in comp.items()}
        gate = c["accuracy"] if w.shaping_needs_correct else torch.ones_like(c["accuracy"])
        reward = (
            w.accuracy * c["accuracy"]
            + w.format * c["format"]
            + gate * (w.tool * c["tool_use"] + w.turn_bonus * c["turn_bonus"])
        )
        return RewardOutput(rewards=reward, components=c)

    def eval_trajectories(self, samples: list[Sample], trajectories: list[Any]) -> dict[str, float]:
        """reward, each component's mean, and ``accuracy/<kind>`` per question kind (a row's
        ``kind``, as the synthetic videos have; rows without one are left out of it)."""
        metrics = super().eval_trajectories(samples, trajectories)
        acc = self.reward_trajectories(samples, trajectories).components["accuracy"]
        kinds = [s.meta["row"].get("meta", {}).get("kind") for s in samples]
        for kind in sorted({str(k) for k in kinds if k is not None}):
            idx = [i for i, k in enumerate(kinds) if k is not None and str(k) == kind]
            metrics[f"accuracy/{kind}"] = float(acc[idx].mean())
        return metrics

    def reward(self, samples: list[Sample], completions: list[str]) -> RewardOutput:
        raise ConfigError("framemind is rewarded on multi-turn trajectories (reward_trajectories)")


__all__ = ["FrameMindConfig", "FrameMindReward", "FrameMindTask", "SyntheticVideoConfig"]
