"""Fault injection for tests: kill the process with SIGKILL at a named point of a run.

A testing aid, inert unless the environment variable ``MMPO_FAULT_AT`` is set::

    MMPO_FAULT_AT=<phase>:<n>      e.g. MMPO_FAULT_AT=checkpoint_write:2

kills the process (``SIGKILL``: no handler, no ``finally``, no flush) at the ``n``-th time
(counted from 1 within this process) that the run passes the point named by ``phase``:

==================  ==========================================================================
phase               the point
==================  ==========================================================================
checkpoint_write    inside :func:`mmpo.checkpoint.atomic_checkpoint`, after the trainer's files
                    are written into the temporary folder, before the ``COMPLETE`` marker and
                    the rename
evaluation          inside ``TrainerBase.evaluate``, after the evaluation's files
                    (``eval/step_*``) are written, before its metrics are logged
step                after a train step (its logged rollouts written), before its metrics are
                    logged and its checkpoint saved
==================  ==========================================================================

``tests/test_fault_injection.py`` uses it to check that a run killed at these points (and at
random times) and restarted ends bit-identical to a straight run. A malformed value is a
ConfigError naming the variable.
"""

from __future__ import annotations

import os
import signal

from mmpo.errors import ConfigError

ENV_VAR = "MMPO_FAULT_AT"
PHASES = ("checkpoint_write", "evaluation", "step")

_counts: dict[str, int] = {}


def parse_fault(value: str) -> tuple[str, int]:
    """``"<phase>:<n>"`` -> ``(phase, n)``; ConfigError for an unknown phase or ``n < 1``."""
    phase, sep, count = value.strip().partition(":")
    if not sep or phase not in PHASES or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"{ENV_VAR}={value!r}: expected <phase>:<n> with phase one of {', '.join(PHASES)} and n >= 1")
    return phase, int(count)


def fault_point(phase: str) -> None:
    """Mark one pass through ``phase``; SIGKILL this process when ``MMPO_FAULT_AT`` names this
    phase and this is its ``n``-th pass. Does nothing when the variable is unset."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return
    target, n = parse_fault(value)
    if target != phase:
        return
    _counts[phase] = _counts.get(phase, 0) + 1
    if _counts[phase] == n:
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV_VAR", "PHASES", "fault_point", "parse_fault"]
