"""The diffusion kinds' evaluator for the one evaluator (:mod:`mmpo.evaluate`): deterministic images
of the task's held-out prompts, scored by the task's image rewards.

Each item's starting noise is drawn from its own generator, seeded by ``eval_seed`` plus the
item's index among all items, so an evaluation sharded over ranks (or split into other batches)
starts every image from the same noise as one process does. The pipeline is abstracted as an
:class:`ImageSampler` (``(samples, noise [n, C, h, w]) -> images [n, 3, H, W]``): the denoising
kind samples the denoiser's ODE / DDIM path from the noise, the noise kind maps it through its
Gaussians first. In training the sampler holds the live module; for ``mmpo eval`` one loaded
from the checkpoint, with neither optimizer nor training engine.

Rows: ``id`` the sample id, ``input`` the prompt, ``prediction`` ``"images.png#<i>"`` (the
``i``-th image, row-major, of the grid ``images.png`` beside ``predictions.jsonl``; ``i`` is
the item's index), ``answer`` the prompt's target meta (``color``, ``box``, ...; null when the
prompt has none), then ``reward`` and each reward component. The image travels with the row as
``_image`` (``[3, H, W]`` in [0, 1]) and is not written.
"""

from __future__ import annotations

import abc
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from mmpo.captions import MARGIN, upscale_factor, wrap_text
from mmpo.diffusion.images import MIN_CELL_SIDE, save_image_grid
from mmpo.diffusion.pipeline import DiffusionModel, PromptEmbeds, Schedule
from mmpo.tasks import Sample

#: the row fields that are not scores
ROW_FIELDS = ("id", "input", "prediction", "answer")
#: sample meta keys that are not a prompt's target
NOT_TARGET = ("prompt", "index")
GRID = "images.png"


@dataclass
class ImageSampler(abc.ABC):
    """Deterministic images of ``model`` on the ``schedule`` (the evaluation steps) at
    ``height`` x ``width``; subclasses implement :meth:`__call__`. ``autocast`` wraps model calls."""

    model: DiffusionModel
    schedule: Schedule
    height: int
    width: int
    negative_prompt: str
    autocast: Callable[[], AbstractContextManager]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the starting noise."""
        return self.model.latent_shape(self.height, self.width)

    def condition(self, samples: list[Sample]) -> PromptEmbeds:
        """The text conditioning of ``samples`` (with the negative prompt's under CFG)."""
        return self.model.encode([s.meta["prompt"] for s in samples], negative_prompt=self.negative_prompt)

    @abc.abstractmethod
    def __call__(self, samples: list[Sample], noise: Tensor) -> Tensor:
        """Images ``[n, 3, H, W]`` in [0, 1] of ``samples`` from standard-normal ``noise [n, C, h, w]``."""


def precision_autocast(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    """The autocast a training engine of ``precision`` applies (bf16 autocast, or none)."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


def item_noise(seed: int, first: int, n: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal ``[n, *shape]`` (float32, CPU): row ``j`` from a generator seeded
    ``seed + first + j``, so it does not depend on the batch the item is in."""
    gens = [torch.Generator().manual_seed(seed + first + j) for j in range(n)]
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def grid_text_width(image: Tensor) -> int:
    """Pixels of caption text under ``image [3, H, W]``'s cell of :func:`save_image_grid`."""
    h, w = image.shape[-2:]
    return w * upscale_factor(w, h, MIN_CELL_SIDE) - 2 * MARGIN


class ImageEvaluator:
    """The first ``num_samples`` evaluation prompts of ``task``, imaged by ``sampler`` in batches
    of ``batch_size`` from the noise of :func:`item_noise` (``seed``: the task's ``eval_seed``),
    scored by ``task.reward_images``. ``params`` wraps the sampling (ZeRO-3 gathers the sharded
    parameters there). The global RNG is left untouched."""

    def __init__(
        self,
        task: Any,
        sampler: ImageSampler,
        *,
        num_samples: int,
        batch_size: int,
        seed: int,
        params: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.task, self.sampler = task, sampler
        self.num_samples, self.batch_size, self.seed, self.params = num_samples, max(1, batch_size), seed, params
        self._items: list[Sample] | None = None

    def items(self) -> list[Sample]:
        if self._items is None:
            self._items = self.task.eval_samples(self.num_samples) if self.num_samples else []
        return self._items

    def images(self, items: list[Sample], offset: int) -> Tensor:
        """``[n, 3, H, W]`` of ``items`` (``items[0]`` is item ``offset`` of all), on the CPU."""
        out = []
        state = torch.get_rng_state()
        try:
            with torch.no_grad(), self.params():
                for s in range(0, len(items), self.batch_size):
                    part = items[s : s + self.batch_size]
                    noise = item_noise(self.seed, offset + s, len(part), self.sampler.latent_shape)
                    out.append(self.sampler(part, noise).float().cpu())
        finally:
            torch.set_rng_state(state)
        return torch.cat(out)

    def predict(self, items: list[Sample], offset: int) -> list[dict[str, Any]]:
        images = self.images(items, offset)
        scores = self.task.reward_images(images, items)
        rows = []
        for i, s in enumerate(items):
            target = {k: v for k, v in s.meta.items() if k not in NOT_TARGET}
            row: dict[str, Any] = {
                "id": s.id,
                "input": s.meta["prompt"],
                "prediction": f"{GRID}#{offset + i}",
                "answer": target or None,
                "reward": float(scores.rewards[i]),
            }
            row.update({k: float(v[i]) for k, v in scores.components.items()})
            row["_image"] = images[i]
            rows.append(row)
        return rows

    def summarize(self, items: list[Sample], rows: list[dict[str, Any]]) -> dict[str, float]:
        """The mean of ``reward`` and of each component over the rows."""
        keys = [k for k in rows[0] if k not in ROW_FIELDS and not k.startswith("_")]
        return {k: sum(float(r[k]) for r in rows) / len(rows) for k in keys}

    @staticmethod
    def save_grid(rows: list[dict[str, Any]], path: Path) -> Path:
        """The rows' images as one PNG grid (row-major, about square), each cell upscaled to at
        least 128 px and captioned with three lines: its prompt (two lines) and its reward."""
        captions = []
        for r in rows:
            prompt = wrap_text(r["input"], grid_text_width(r["_image"]), 2)
            captions.append([*prompt, *[""] * (2 - len(prompt)), f"reward {r['reward']:.3f}"])  # 3 lines each
        return save_image_grid(torch.stack([r["_image"] for r in rows]), path, captions=captions)

    def write_artifacts(self, out_dir: Path, items: list[Sample], rows: list[dict[str, Any]]) -> dict[str, str]:
        return {"images": str(self.save_grid(rows, out_dir / GRID))} if rows else {}


__all__ = ["ImageEvaluator", "ImageSampler", "item_noise", "precision_autocast"]
