"""``synthetic_vqa``: the quickstart task. Learn to read colour, shape and count off an image."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mmpo.data_rows import LoadSummary
from mmpo.rewards import choice_accuracy, choice_format, extract_choice
from mmpo.tasks import RewardOutput, Sample, TokenTask
from mmpo_tasks.synthetic_vqa.data import QUESTION_TYPES, question, random_scene, render


@dataclass
class SyntheticVQAConfig:
    num_train: int = field(default=4096, metadata={"help": "Distinct training questions (cycled)."})
    image_size: int = field(default=56, metadata={"help": "Image side in pixels (a multiple of 28)."})
    question_types: list[str] = field(
        default_factory=lambda: list(QUESTION_TYPES), metadata={"help": "Mix of question types: colour, shape, count."}
    )
    answer_with: str = field(
        default="option",
        metadata={
            "help": "'option': answer with the option text (e.g. 'red'); 'letter': with its letter. Both are accepted."
        },
    )
    format_weight: float = field(
        default=0.2, metadata={"help": "Weight of the format reward (an option is chosen, right or wrong)."}
    )


class SyntheticVQATask(TokenTask):
    name = "synthetic_vqa"
    description = "coloured shapes on a grid; multiple-choice colour / shape / count questions (quickstart)"
    Config = SyntheticVQAConfig
    gives_demonstrations = True

    def __init__(self, config: SyntheticVQAConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        bad = [q for q in config.question_types if q not in QUESTION_TYPES]
        if bad or not config.question_types:
            from mmpo.errors import ConfigError

            raise ConfigError(f"task.question_types: {bad or '[]'} not valid; choose from {list(QUESTION_TYPES)}")
        if config.answer_with not in ("option", "letter"):
            from mmpo.errors import ConfigError

            raise ConfigError(f"task.answer_with must be 'option' or 'letter', got {config.answer_with!r}")
        if config.image_size % 28:
            from mmpo.errors import ConfigError

            raise ConfigError(f"task.image_size must be a multiple of 28, got {config.image_size}")
        self._train_keys: set[tuple] | None = None
        self.data_summary = LoadSummary(
            self.name,
            unit="questions (generated)",
            splits={"train": config.num_train, "eval": "on demand"},
            held_out_why="evaluation questions come from their own seed; one equal to a training question is skipped",
        )
        self.data_summary.print()

    def _make(self, split: str, index: int) -> tuple[Sample, tuple]:
        rng = random.Random(f"{split}-{self.seed}-{index}")
        scene = random_scene(rng, self.config.image_size)
        qtype = self.config.question_types[index % len(self.config.question_types)]
        text, letters, answer, names = question(scene, qtype, self.config.answer_with)
        image = render(scene, self.config.image_size)
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
        sample = Sample(
            id=f"{split}-{index}",
            messages=messages,
            answer=answer,
            meta={"letters": letters, "options": names, "qtype": qtype},
        )
        return sample, (qtype, scene)

    def num_train(self) -> int:
        return self.config.num_train

    def train_sample(self, index: int) -> Sample:
        return self._make("train", index % self.config.num_train)[0]

    def eval_samples(self, n: int) -> list[Sample]:
        """``n`` held-out questions; any that coincides with a training question is skipped."""
        if self._train_keys is None:
            self._train_keys = {self._make("train", i)[1] for i in range(self.config.num_train)}
        out: list[Sample] = []
        i = 0
        while len(out) < n:
            sample, key = self._make("eval", i)
            i += 1
            if key not in self._train_keys:
                out.append(sample)
        return out

    def reward(self, samples: list[Sample], completions: list[str]) -> RewardOutput:
        """accuracy (the chosen option is right) + format_weight * format (an option was chosen).

        Only the answer form the prompt asks for (option text or letter) counts.
        """
        letters = [s.meta["letters"] for s in samples]
        options = [s.meta["options"] for s in samples]
        accept = self.config.answer_with
        acc = choice_accuracy(completions, [s.answer for s in samples], letters, options, accept=accept)
        fmt = choice_format(completions, letters, options, accept=accept)
        return RewardOutput(rewards=acc + self.config.format_weight * fmt, components={"accuracy": acc, "format": fmt})

    def demonstration(self, sample: Sample) -> str:
        """The right answer in the form the prompt asks for: the option's text (``answer_with:
        option``) or its letter (``letter``); its reward is ``1 + format_weight``."""
        if self.config.answer_with == "letter":
            return str(sample.answer)
        return str(sample.meta["options"][sample.meta["letters"].index(sample.answer)])

    def parse_prediction(self, sample: Sample, completion: str) -> str | None:
        """The letter of the option ``completion`` chose (in the form the prompt asks for), or None."""
        letters, options = sample.meta["letters"], sample.meta["options"]
        return extract_choice(completion, letters, options, accept=self.config.answer_with)

    def eval_metrics(self, samples: list[Sample], completions: list[str]) -> dict[str, float]:
        """accuracy, format, chance (1 / #options) and ``accuracy/<question type>``."""
        out = self.reward(samples, completions)
        metrics = {
            "accuracy": float(out.components["accuracy"].mean()),
            "format": float(out.components["format"].mean()),
        }
        metrics["chance"] = float(sum(1.0 / len(s.meta["letters"]) for s in samples) / len(samples))
        for q in self.config.question_types:
            idx = [i for i, s in enumerate(samples) if s.meta["qtype"] == q]
            if idx:
                metrics[f"accuracy/{q}"] = float(out.components["accuracy"][idx].mean())
        return metrics
