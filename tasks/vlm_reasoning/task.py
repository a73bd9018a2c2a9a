"""``vlm_reasoning``: visual question answering with an R1-style ``<think>/<answer>`` contract.

Data come from a JSONL / JSON / Parquet file (ours, TRL, verl / EasyR1 or LLaVA layouts, see
``data.py``), or, with no ``train_file``, from the offline pathology demo set. The reward is
``accuracy_weight * accuracy + format_weight * format`` (Patho-R1 / OThink-MR1 use 1 and 1).

``demonstration`` writes one correct completion per prompt (the row's ``solution`` as reasoning
when it has one), for SRFT (arXiv 2506.19767) and DR-IRL (arXiv 2503.18991). ``hipo.enabled``
switches to HiPO's think-on / think-off contract (arXiv 2509.23967, ``hipo.py``): the rows then
carry ``mode [N]`` and ``segment_mask [N, T]`` for ``algorithm.advantage: hipo``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from mmpo.config import FieldError
from mmpo.core.ares import bucket_codes
from mmpo.data_rows import KeyCheck, LoadSummary
from mmpo.errors import DataError
from mmpo.rewards import weighted_sum
from mmpo.tasks import RewardOutput, RolloutView, Sample, TokenTask
from mmpo_tasks.vlm_reasoning import ares, hipo
from mmpo_tasks.vlm_reasoning.data import Row, load_rows
from mmpo_tasks.vlm_reasoning.rewards import accuracy_reward, answer_found, parsed_answer, score
from mmpo_tasks.vlm_reasoning.templates import VisionSettings, build_messages


@dataclass
class AresConfig:
    """ARES / AEPO entropy shaping (code shawn0728/ARES); its state is saved in checkpoints."""

    enabled: bool = field(default=False, metadata={"help": "Add ARES's hierarchical entropy reward r_H to the reward."})
    window: int = field(default=4, metadata={"help": "Window entropy length w (tokens after each position).", "min": 1})
    percentile: float = field(
        default=95.0,
        metadata={
            "help": "Per-response percentile of window entropies behind the HWE threshold.",
            "min": 0.0,
            "max": 100.0,
        },
    )
    tau_init: float = field(default=1.5, metadata={"help": "Initial HWE threshold (ARES's fallback 1.5).", "gt": 0.0})
    tau_momentum: float = field(
        default=0.99,
        metadata={
            "help": "EMA weight of the old threshold (0.99 old / 0.01 new batch median).",
            "min": 0.0,
            "max": 1.0,
        },
    )
    targets: Optional[dict[str, float]] = field(
        default=None,
        metadata={
            "help": "Fixed HWE-count targets per bucket {easy, medium, hard}; null = each step's rounded bucket "
            "mean (ARES code, which makes the alpha adaptation nearly inert)."
        },
    )


@dataclass
class HipoConfig:
    """HiPO hybrid think-on / think-off (arXiv 2509.23967): the output contract of ``hipo.py``."""

    enabled: bool = field(
        default=False,
        metadata={
            "help": "Ask for a mode tag (<think_on> / <think_off>) and a justification before the answer; the "
            "rows carry their mode and mode-segment tokens for algorithm.advantage: hipo (required then)."
        },
    )


@dataclass
class VLMReasoningConfig:
    train_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "Training data: a .jsonl/.json/.parquet file or a folder of them; null = the offline "
            "pathology demo set.",
            "path": True,
        },
    )
    eval_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "Held-out data; null = the demo test split (no train_file) or eval_fraction of the train rows.",
            "path": True,
        },
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of train_file rows held out for evaluation when eval_file is null (chosen by a "
            "hash of each row, so the split does not depend on the seed or the row order).",
            "min": 0.0,
            "max": 0.9,
        },
    )
    format: Literal["auto", "mmpo", "trl", "verl", "llava"] = field(
        default="auto", metadata={"help": "Data layout; 'auto' detects it per file from its first row."}
    )
    image_root: Optional[str] = field(
        default=None,
        metadata={
            "help": "Folder that relative image paths are read from first (then the data file's folder).",
            "path": True,
        },
    )
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Skip rows that do not fit (counted and reported) instead of stopping."}
    )
    template: Literal["think", "concise", "plain", "direct"] = field(
        default="think",
        metadata={
            "help": "'think': <think>..</think><answer>..</answer> (R1 / Patho-R1); 'concise': the same with "
            "chain-of-draft (short) thinking; 'plain': only <answer>..</answer>; 'direct': the bare answer "
            "(option text), for tiny / base models that cannot follow tags yet."
        },
    )
    system_prompt: Optional[str] = field(
        default=None, metadata={"help": "Replaces the template's system prompt (keep its output contract)."}
    )
    accuracy_weight: float = field(default=1.0, metadata={"help": "Weight of the accuracy reward."})
    format_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the format reward (the template's tags); OThink-MR1 found 1.0 best in [0, 1]."},
    )
    answer_type: Literal["auto", "choice", "open"] = field(
        default="auto",
        metadata={
            "help": "'auto': multiple choice when a row has options; 'choice': rows without options are bad "
            "rows; 'open': ask for the option's text instead of its letter."
        },
    )
    rel_tol: float = field(
        default=0.0,
        metadata={"help": "Relative tolerance for numeric open answers (absolute 1e-6 always).", "min": 0.0},
    )
    min_pixels: int = field(
        default=28 * 28 * 4, metadata={"help": "Fewest pixels per image / video frame after resizing.", "min": 1}
    )
    max_pixels: int = field(
        default=28 * 28 * 16,
        metadata={
            "help": "Most pixels per image / video frame after resizing (28x28 px = one vision token).",
            "min": 1,
        },
    )
    video_fps: float = field(default=2.0, metadata={"help": "Frames per second sampled from video files.", "gt": 0.0})
    video_max_frames: int = field(default=8, metadata={"help": "Most frames kept per video (evenly spread).", "min": 2})
    max_rows: int = field(
        default=0, metadata={"help": "Use only the first N good rows of each data source (0 = all).", "min": 0}
    )
    ares: AresConfig = field(
        default_factory=AresConfig,
        metadata={"help": "ARES / AEPO adaptive entropy reward (window entropy, HWE triggers, difficulty buckets)."},
    )
    hipo: HipoConfig = field(
        default_factory=HipoConfig,
        metadata={"help": "HiPO think-on / think-off template; its mode-aware advantage is algorithm.advantage hipo."},
    )

    def validate_config(self, where: str) -> None:
        if self.min_pixels > self.max_pixels:
            key = f"{where}.min_pixels" if where else "min_pixels"
            raise FieldError(key, f"key '{key}' ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})")
        if self.hipo.enabled:
            key = f"{where}.hipo.enabled" if where else "hipo.enabled"
            if self.template != "think":
                why = f"its contract replaces the think template, but template is {self.template!r} (use 'think')"
                raise FieldError(key, f"key '{key}' (true): {why}")
            if self.ares.enabled:
                why = "does not combine with ares.enabled (ARES has its own reward)"
                raise FieldError(key, f"key '{key}' (true) {why}")


def _order_key(row: Row) -> str:
    """A stable pseudo-random key of a row (its content, not its position or the seed)."""
    return hashlib.sha1(f"{row.id}\x00{row.question}\x00{row.answer}".encode()).hexdigest()


_TAGS = re.compile(r"</?(?:think|answer|think_on|think_off)>", re.I)


def _demo_reasoning(solution: object) -> str | None:
    """The reasoning of a worked solution: its ``<think>`` block's content, else the text without
    ``<answer>`` blocks; leftover tags removed. None when nothing is left."""
    if not isinstance(solution, str) or not solution.strip():
        return None
    m = re.search(r"<think>(.*?)</think>", solution, re.S | re.I)
    text = m.group(1) if m else re.sub(r"<answer>.*?</answer>", " ", solution, flags=re.S | re.I)
    text = _TAGS.sub(" ", text).strip()
    return text or None


def _metric_name(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", str(text)).strip("_") or "none"


class VLMReasoningTask(TokenTask):
    name = "vlm_reasoning"
    description = "image / video question answering with <think>/<answer> tags (files: ours, TRL, verl, LLaVA)"
    Config = VLMReasoningConfig
    gives_demonstrations = True

    def __init__(self, config: VLMReasoningConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        self.vision = VisionSettings(config.min_pixels, config.max_pixels, config.video_fps, config.video_max_frames)
        self.train_rows, self.eval_rows = self._load_splits()
        self.needs_token_entropy = config.ares.enabled
        #: ARES's rewards attach each row's difficulty bucket (read by kl_schedule ares_bucket)
        self.row_info_keys = ("bucket", "correct", "soft_cost") if config.ares.enabled else ()
        if config.hipo.enabled:
            #: HiPO's rows carry their mode [N] and mode/justification tokens [N, T]
            self.row_info_keys = ("mode", "segment_mask")
            self.required_advantage = "hipo"
        self.hwe_threshold = ares.HWEThreshold(tau=config.ares.tau_init, momentum=config.ares.tau_momentum)
        self.ares_state = ares.AresRewardState(targets=dict(config.ares.targets) if config.ares.targets else None)

    # -- data ---------------------------------------------------------------------------
    def _load(self, path: str | Path) -> list[Row]:
        c = self.config
        res = load_rows(
            path,
            format=c.format,
            image_root=c.image_root,
            answer_type=c.answer_type,
            skip_bad_rows=c.skip_bad_rows,
            max_rows=c.max_rows,
            unknown_keys=self._keys,
        )
        self.data_summary.skipped.update(res.skip_reasons)
        return res.rows

    def _load_splits(self) -> tuple[list[Row], list[Row]]:
        """The train and eval rows; prints the data summary line (:class:`~mmpo.data_rows.LoadSummary`)."""
        self._keys = KeyCheck(self.unknown_keys)
        self.data_summary = LoadSummary(self.name)
        train, evals = self._split()
        self.data_summary.splits = {"train": len(train), "eval": len(evals)}
        self.data_summary.print()
        return train, evals

    def _split(self) -> tuple[list[Row], list[Row]]:
        c, summary = self.config, self.data_summary
        if c.train_file is None:
            from mmpo_tasks.vlm_reasoning.pathology_demo import ensure_demo

            demo = ensure_demo()
            train = self._load(demo["train"])
            summary.held_out_why = "evaluation reads " + ("task.eval_file" if c.eval_file else "the demo's test split")
            return train, self._load(c.eval_file) if c.eval_file else self._load(demo["test"])
        rows = self._load(c.train_file)
        if c.eval_file:
            summary.held_out_why = "evaluation reads task.eval_file"
            return rows, self._load(c.eval_file)
        n_eval = round(c.eval_fraction * len(rows))
        if c.eval_fraction > 0 and len(rows) >= 2:
            n_eval = min(max(1, n_eval), len(rows) - 1)
        held = {id(r) for r in sorted(rows, key=_order_key)[:n_eval]}
        summary.held_out = len(held)
        summary.held_out_why = f"eval_fraction={c.eval_fraction:g} of task.train_file, no task.eval_file"
        return [r for r in rows if id(r) not in held], [r for r in rows if id(r) in held]

    def sample(self, row: Row) -> Sample:
        """The prompt of one row (images decoded now)."""
        system = self.config.system_prompt or (hipo.SYSTEM_PROMPT if self.config.hipo.enabled else None)
        messages = build_messages(row, template=self.config.template, system=system, vision=self.vision)
        meta = {
            "options": list(row.options) if row.options else None,
            "letters": row.letters,
            "answer_type": row.answer_type,
            "qtype": row.meta.get("qtype"),
            "source": row.meta.get("source"),
            "where": row.where,
            "solution": row.solution,  # the worked solution, when the data has one (demonstrations)
            # per image / video part of the prompt, in order: the image file it was read from (None:
            # from bytes, or a video), for the evaluation rows' image references
            "image_files": [None] * (row.video is not None)
            + [str(src.path) if src.path is not None else None for src in row.images],
        }
        return Sample(id=row.id, messages=messages, answer=row.answer, meta=meta)

    def num_train(self) -> int:
        return len(self.train_rows)

    def train_sample(self, index: int) -> Sample:
        return self.sample(self.train_rows[index % len(self.train_rows)])

    def eval_samples(self, n: int) -> list[Sample]:
        """Up to ``n`` held-out samples, in a fixed order that spreads over the eval data."""
        if not self.eval_rows and n > 0:
            raise DataError(
                "vlm_reasoning has no evaluation rows: set task.eval_file, or task.eval_fraction > 0 with at least "
                "2 train rows (or eval.num_samples: 0)"
            )
        return [self.sample(r) for r in sorted(self.eval_rows, key=_order_key)[:n]]

    # -- rewards and evaluation ----------------------------------------------------------
    def reward(self, samples: list[Sample], completions: list[str]) -> RewardOutput:
        """``accuracy_weight * accuracy + format_weight * format`` (``rewards.py``); with
        ``hipo.enabled`` the format is HiPO's contract (``hipo.py``) and ``think_on`` (the mode,
        weight 0) is logged."""
        c = self.config
        if c.hipo.enabled:
            if len(samples) != len(completions):
                raise ValueError(f"{len(samples)} samples but {len(completions)} completions")
            components = {
                "accuracy": accuracy_reward(samples, completions, rel_tol=c.rel_tol, template="think"),
                "format": hipo.hipo_format(completions),
                "answer_found": answer_found(completions, "think"),
                "think_on": hipo.modes(completions).float(),
            }
            return weighted_sum(components, {"accuracy": c.accuracy_weight, "format": c.format_weight})
        return score(
            samples,
            completions,
            template=c.template,
            accuracy_weight=c.accuracy_weight,
            format_weight=c.format_weight,
            rel_tol=c.rel_tol,
        )

    def reward_with_rollout(self, samples: list[Sample], completions: list[str], rollout: RolloutView) -> RewardOutput:
        """The reward; with ``ares.enabled``, R = accuracy + r_H (ARES adds no format term) and
        per-row bucket / correctness / soft cost for the ``ares_bucket`` KL controller.

        Batch statistics (threshold median, bucket targets, alpha update) are gathered over all
        ranks, so every rank's state moves alike.
        """
        out = self.reward(samples, completions)
        if self.config.hipo.enabled:
            if rollout.tokenizer is None:
                raise ValueError("vlm_reasoning with hipo.enabled needs the policy's tokenizer in the rollout view")
            out.row_info = {
                "mode": hipo.modes(completions),
                "segment_mask": hipo.segment_mask(rollout.completion_ids, rollout.mask, rollout.tokenizer),
            }
            return out
        a = self.config.ares
        if not a.enabled:
            return out
        if rollout.token_entropy is None or rollout.token_texts is None:
            raise ValueError("vlm_reasoning with ares.enabled needs token entropies of the rollout")
        ent, mask = rollout.token_entropy, rollout.mask.bool()
        correct = out.components["accuracy"]
        count, soft, invalid = ares.hwe_count(ent, mask, rollout.token_texts, self.hwe_threshold.tau, window=a.window)
        buckets = ares.difficulty_buckets(correct, rollout.group_ids)
        pct = ares.window_percentiles(ent, mask, window=a.window, q=a.percentile)
        gathered = self.all_gather((pct.tolist(), count.tolist(), buckets))
        self.hwe_threshold.update([p for g in gathered for p in g[0]])
        all_counts = [c for g in gathered for c in g[1]]
        all_buckets = [b for g in gathered for b in g[2]]
        targets = ares.resolve_targets([float(c) for c in all_counts], all_buckets, self.ares_state, None)
        ares.update_alpha(self.ares_state, all_counts, all_buckets, targets)
        r_h = ares.hierarchical_entropy_reward(correct, count, buckets, self.ares_state, targets=targets)
        components = dict(out.components)
        components.update(
            {
                "entropy_shaping": r_h,
                "hwe_count": count.float(),
                "hwe_invalid": invalid.float(),
                "hwe_tau": torch.full_like(r_h, self.hwe_threshold.tau),
            }
        )
        row_info = {"bucket": bucket_codes(buckets), "correct": correct, "soft_cost": soft.float()}
        return RewardOutput(
            rewards=self.config.accuracy_weight * correct + r_h, components=components, row_info=row_info
        )

    def state_dict(self) -> dict[str, object]:
        if not self.config.ares.enabled:
            return {}
        return {"hwe_threshold": self.hwe_threshold.state_dict(), "ares_reward": self.ares_state.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "hwe_threshold" in state:
            self.hwe_threshold.load_state_dict(state["hwe_threshold"])
        if "ares_reward" in state:
            self.ares_state.load_state_dict(state["ares_reward"])

    def demonstration(self, sample: Sample) -> str | None:
        """One correct completion in the template's format (SRFT arXiv 2506.19767, DR-IRL arXiv 2503.18991).

        The answer is the option letter (multiple choice; the option's text for ``direct``) or the
        reference answer. The reasoning is the row's ``solution`` when the data has one (its
        ``<think>`` content, else the text without answer blocks and tags), else empty. With
        ``hipo.enabled``: think-on with the solution, think-off without. None when the text would
        not earn the full reward (e.g. an answer holding tags).
        """
        c = self.config
        letters, answer = sample.meta.get("letters") or [], str(sample.answer)
        if letters and c.template == "direct" and answer in letters:
            options = [str(o) for o in sample.meta.get("options") or []]
            text = options[letters.index(answer)] if len(options) == len(letters) else answer
            if [o.lower() for o in options].count(text.lower()) == 1:
                answer = text
        reasoning = _demo_reasoning(sample.meta.get("solution"))
        if c.hipo.enabled:
            if reasoning:
                demo = f"{hipo.ON_TAG} This question needs step-by-step reasoning. <think>\n{reasoning}\n</think>"
            else:
                demo = f"{hipo.OFF_TAG} The answer can be given directly. "
            demo += f"<answer>{answer}</answer>"
        elif c.template == "direct":
            demo = answer
        elif c.template == "plain":
            demo = f"<answer>{answer}</answer>"
        else:
            demo = f"<think>\n{reasoning or ''}\n</think><answer>{answer}</answer>"
        out = self.reward([sample], [demo]).components
        return demo if float(out["accuracy"][0]) == 1.0 and float(out["format"][0]) == 1.0 else None

    def parse_prediction(self, sample: Sample, completion: str) -> str | None:
        """The answer ``completion`` gives: the chosen option's letter (multiple choice, None when
        it names none) or the answer text (open; None without an answer)."""
        return parsed_answer(sample, completion, self.config.template)

    def eval_metrics(self, samples: list[Sample], completions: list[str]) -> dict[str, float]:
        """reward, accuracy, format, answer_found, chance (1/#options for multiple choice, 0 open),
        ``accuracy/<qtype>``."""
        if not samples:
            return {}
        out = self.reward(samples, completions)
        acc = out.components["accuracy"]
        metrics = {"reward": float(out.rewards.mean())}
        metrics.update({k: float(v.mean()) for k, v in out.components.items()})
        metrics["chance"] = sum(1.0 / len(s.meta["letters"]) if s.meta.get("letters") else 0.0 for s in samples) / len(
            samples
        )
        qtypes = sorted({str(s.meta["qtype"]) for s in samples if s.meta.get("qtype") is not None})
        for q in qtypes:
            idx = [i for i, s in enumerate(samples) if s.meta.get("qtype") is not None and str(s.meta["qtype"]) == q]
            metrics[f"accuracy/{_metric_name(q)}"] = float(acc[idx].mean())
        return metrics


__all__ = ["VLMReasoningConfig", "VLMReasoningTask"]
