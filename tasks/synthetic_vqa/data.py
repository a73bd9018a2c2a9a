"""Synthetic visual questions with verifiable answers: coloured shapes on a grid.

Each image holds ``count`` shapes (1-4) of one colour and one kind, in distinct cells of a
2x2 grid with jittered size and position. A question asks for the colour, the kind or the
count, with the options listed in a fixed order, so the answer can only be read off the image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
COUNT_WORDS = ("1", "2", "3", "4")
LETTERS = "ABCDE"
QUESTION_TYPES = ("colour", "shape", "count")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    cells: tuple[int, ...]  # occupied cells of the 2x2 grid, 0..3
    sizes: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        return len(self.cells)


def random_scene(rng: random.Random, image_size: int) -> Scene:
    cell = image_size // 2
    count = rng.randint(1, 4)
    cells = tuple(sorted(rng.sample(range(4), count)))
    # shapes nearly fill their cell (a 2x2 grid of 28-pixel cells is a 2x2 grid of image
    # tokens for Qwen2-VL), with a little jitter in size and position
    lo, hi = int(cell * 0.75), int(cell * 0.85)
    sizes = tuple(rng.randint(lo, hi) for _ in cells)
    offsets = tuple((rng.randint(0, cell - s), rng.randint(0, cell - s)) for s in sizes)
    return Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), cells, sizes, offsets)


def render(scene: Scene, image_size: int, background: tuple[int, int, int] = (30, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    cell = image_size // 2
    fill = COLOURS[scene.colour]
    for c, s, (ox, oy) in zip(scene.cells, scene.sizes, scene.offsets):
        x0, y0 = (c % 2) * cell + ox, (c // 2) * cell + oy
        box = (x0, y0, x0 + s - 1, y0 + s - 1)
        if scene.shape == "square":
            draw.rectangle(box, fill=fill)
        elif scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon([(x0 + s / 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=fill)
    return img


def question(scene: Scene, qtype: str, answer_with: str = "option") -> tuple[str, list[str], str, list[str]]:
    """(question text with options, option letters, answer letter, option texts).

    ``answer_with="option"`` asks for the option's text, ``"letter"`` for its letter; the
    reward accepts either.
    """
    if qtype == "colour":
        names, answer, text = list(COLOURS), scene.colour, "What colour are the shapes?"
    elif qtype == "shape":
        names, answer, text = list(SHAPES), scene.shape, "What shape are they?"
    elif qtype == "count":
        names, answer, text = list(COUNT_WORDS), COUNT_WORDS[scene.count - 1], "How many shapes are there?"
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    letters = list(LETTERS[: len(names)])
    if answer_with == "letter":
        options = " ".join(f"{l}. {n}" for l, n in zip(letters, names))
        prompt = f"{text} {options}. Answer with the letter."
    else:
        prompt = f"{text} Options: {', '.join(names)}. Answer with one option."
    return prompt, letters, letters[names.index(answer)], names
