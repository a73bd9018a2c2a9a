"""Keep third-party chatter off a run's progress bar, at its source.

- :func:`quiet_hf_progress`: transformers' per-call "Loading weights" / "Writing model shards"
  bars, hidden for one block;
- :func:`quiet_libraries`: the same for the whole process of a run, plus the notices that are
  expected there (see its docstring). Warnings and errors about anything else still show.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

#: transformers notices that say what mmpo does on purpose: new token rows (a VLA policy's action
#: tokens) start at the mean and covariance of the old ones (mmpo.policies.action_codecs)
EXPECTED_NOTICES = (
    "The new embeddings will be initialized from a multivariate normal distribution",
    "The new lm_head weights will be initialized from a multivariate normal distribution",
)


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


class _DropExpected(logging.Filter):
    """Drops the log records that start with one of :data:`EXPECTED_NOTICES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(EXPECTED_NOTICES)


_FILTER = _DropExpected()


def quiet_libraries(device: Any = None) -> None:
    """For the rest of this process (a run: mmpo draws its own bars), at the source:

    - transformers' and huggingface_hub's progress bars are off ("Loading weights", "Writing
      model shards" at every save);
    - transformers' :data:`EXPECTED_NOTICES` are dropped (its other warnings pass), and the
      FutureWarning that PEFT's own check of ``is_gradient_checkpointing`` raises inside transformers
      (a LoRA run; nothing the user can change);
    - on a CPU ``device``, ``DS_ACCELERATOR=cpu`` is set unless already set: DeepSpeed, which
      accelerate imports when a model is saved, then takes the CPU without printing its "Setting
      accelerator to CPU" guess (mmpo's DeepSpeed engine sets the same for a CPU run).

    Calling it again changes nothing more."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # an old huggingface_hub: nothing of it draws here
        pass
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    modeling = logging.getLogger("transformers.modeling_utils")
    if _FILTER not in modeling.filters:
        modeling.addFilter(_FILTER)
    if device is not None and getattr(device, "type", str(device)).startswith("cpu"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


__all__ = ["EXPECTED_NOTICES", "quiet_hf_progress", "quiet_libraries"]
