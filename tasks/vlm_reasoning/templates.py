"""Prompt templates of ``vlm_reasoning``: system prompts and chat messages for qwen-vl-utils.

Templates (the output contract each rewards, see ``rewards.py``):

- ``think``: R1 / Patho-R1 convention, reasoning in ``<think>...</think>`` then the final answer
  in ``<answer>...</answer>``.
- ``concise``: the same tags with a chain-of-draft instruction (a few words per reasoning step).
- ``plain``: only ``<answer>...</answer>``.
- ``direct``: the bare answer, no tags; a multiple-choice answer is the option's text. For tiny
  or base models that cannot follow a tag contract yet (the pathology demo on CPU).

A multiple-choice question lists its options as ``"A. text"`` lines (unless the question already
has them) and asks for the letter. Images go where the question has ``<image>`` placeholders when
their number matches the images, else all before the text; a video goes first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmpo.errors import DataError
from mmpo_tasks.vlm_reasoning.data import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Row

TEMPLATES = ("think", "concise", "plain", "direct")

SYSTEM_PROMPTS: dict[str, str] = {
    "think": (
        "You are a careful visual reasoning assistant. First think about the question step by step, "
        "then give the final answer. Write your reasoning inside <think> </think> tags, followed by the "
        "final answer inside <answer> </answer> tags, "
        "i.e. <think> reasoning here </think><answer> answer here </answer>."
    ),
    "concise": (
        "You are a careful visual reasoning assistant. Think step by step, but keep only a minimal draft "
        "of each step, five words at most. Write the draft inside <think> </think> tags, followed by the "
        "final answer inside <answer> </answer> tags, i.e. <think> short draft </think><answer> answer here </answer>."
    ),
    "plain": (
        "You are a visual question answering assistant. Answer directly, without explanation. Write only "
        "the final answer inside <answer> </answer> tags, i.e. <answer> answer here </answer>."
    ),
    "direct": "You are a visual question answering assistant. Reply with the answer only.",
}

CHOICE_INSTRUCTION = "Answer with the letter of the correct option."
DIRECT_CHOICE_INSTRUCTION = "Answer with the text of the correct option."
OPEN_INSTRUCTION = "Answer with a single word, number or short phrase."


@dataclass(frozen=True)
class VisionSettings:
    """Resolution and frame budget of the vision parts (pixels are per image / per video frame)."""

    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 16
    video_fps: float = 2.0
    video_max_frames: int = 8


def system_prompt(template: str, override: str | None = None) -> str:
    """The system prompt of ``template`` (``override`` replaces it when given)."""
    if template not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    return override if override else SYSTEM_PROMPTS[template]


def question_tail(row: Row, template: str = "think") -> str:
    """What follows the question: the option lines (when not in the question) and the answer form."""
    lines = []
    if row.options and not row.options_in_question:
        lines += [f"{letter}. {text}" for letter, text in zip(row.letters, row.options)]
    if row.options:
        lines.append(DIRECT_CHOICE_INSTRUCTION if template == "direct" else CHOICE_INSTRUCTION)
    else:
        lines.append(OPEN_INSTRUCTION)
    return "\n".join(lines)


def user_text(row: Row, template: str = "think") -> str:
    """The whole user text with placeholders removed (what the model reads around the images)."""
    text = row.question.replace(IMAGE_PLACEHOLDER, " ").replace(VIDEO_PLACEHOLDER, " ")
    return "\n".join(line.strip() for line in text.strip().splitlines()).strip() + "\n" + question_tail(row, template)


def _image_part(img: Any, vision: VisionSettings) -> dict[str, Any]:
    return {"type": "image", "image": img, "min_pixels": vision.min_pixels, "max_pixels": vision.max_pixels}


def _load_images(row: Row) -> list[Any]:
    out = []
    for k, src in enumerate(row.images):
        try:
            out.append(src.load())
        except DataError as exc:
            raise DataError(f"{row.where}: field 'images[{k}]': {exc}") from None
    return out


def _video_part(row: Row, vision: VisionSettings) -> dict[str, Any]:
    assert row.video is not None
    try:
        frames, fps = row.video.load(vision.video_fps, vision.video_max_frames)
    except DataError as exc:
        raise DataError(f"{row.where}: field 'video': {exc}") from None
    return {
        "type": "video",
        "video": frames,
        "min_pixels": vision.min_pixels,
        "max_pixels": vision.max_pixels,
        "sample_fps": fps,
    }


def user_content(row: Row, vision: VisionSettings, template: str = "think") -> list[dict[str, Any]]:
    """The user turn's parts: video, images (decoded now) and text, in qwen-vl-utils layout."""
    parts: list[dict[str, Any]] = []
    if row.video is not None:
        parts.append(_video_part(row, vision))
    images = _load_images(row)
    question = row.question.replace(VIDEO_PLACEHOLDER, " ")
    pieces = question.split(IMAGE_PLACEHOLDER)
    tail = question_tail(row, template)
    if images and len(pieces) - 1 == len(images):  # interleave at the placeholders
        for k, piece in enumerate(pieces):
            text = piece.strip()
            if k == len(pieces) - 1:
                text = f"{text}\n{tail}" if text else tail
            if text:
                parts.append({"type": "text", "text": text})
            if k < len(images):
                parts.append(_image_part(images[k], vision))
        return parts
    parts += [_image_part(img, vision) for img in images]
    parts.append({"type": "text", "text": user_text(row, template)})
    return parts


def build_messages(
    row: Row, *, template: str = "think", system: str | None = None, vision: VisionSettings | None = None
) -> list[dict[str, Any]]:
    """Chat messages of ``row``: the template's system prompt (or ``system``) and the user turn."""
    vision = vision or VisionSettings()
    return [
        {"role": "system", "content": system_prompt(template, system)},
        {"role": "user", "content": user_content(row, vision, template)},
    ]


__all__ = [
    "TEMPLATES",
    "SYSTEM_PROMPTS",
    "CHOICE_INSTRUCTION",
    "DIRECT_CHOICE_INSTRUCTION",
    "OPEN_INSTRUCTION",
    "VisionSettings",
    "system_prompt",
    "question_tail",
    "user_text",
    "user_content",
    "build_messages",
]
