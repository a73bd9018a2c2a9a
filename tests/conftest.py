"""Shared fixtures: a small, fast config for end-to-end runs on the tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# decord's bundled libpng breaks pygame's PNG loading (gymnasium's Pendulum render) when it loads
# first; the readers import it after pygame (tasks/video_frames/video.py::_import_decord), and
# some tests import decord directly, so pygame's image module loads first for the whole session
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
try:
    import pygame.image  # noqa: F401
except ImportError:
    pass
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """Overrides that make configs/quickstart.yaml run a step in about a second."""
    return [
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=3",
        "eval.num_samples=8",
        "eval.batch_size=8",
        "trainer.eval_every=0",
        "task.num_train=64",
    ]
