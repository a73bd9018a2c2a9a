"""Quiet transformers' progress bars while mmpo draws its own."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' per-call "Loading weights" / "Writing model shards" bars.

    They would interleave with the training progress bar; the previous setting is restored.
    """
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


__all__ = ["quiet_hf_progress"]
