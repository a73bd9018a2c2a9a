"""What a run shows while it works: one progress bar on stderr from the first seconds on.

The bar counts training steps; its description names the phase, so a long phase is never a silent
``0/N``:

- ``load model`` (shown right after the config and the task are read),
- ``stage 1 · <what>`` (a supervised stage before RL, with its own bar below),
- ``train · rollout`` / ``train · reward`` / ``train · update`` (the trainers' phases),
- ``eval <i>/<N>`` (the i-th of the run's N evaluations), with a second bar over its items.

The result of every evaluation is printed as one line above the bars (``tqdm.write``, so the bar is
redrawn below it, not broken): ``eval step 10: accuracy=0.61 reward=0.58``. On ranks other than
the main one nothing is shown.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

_OPEN: "weakref.WeakSet[RunProgress]" = weakref.WeakSet()


def eval_index(step: int, max_steps: int, eval_every: int, at_start: bool) -> int:
    """Which evaluation of the run (counted from 1) the one at ``step`` is: one at step 0 when
    ``at_start``, one every ``eval_every`` steps (0: none), one at the end (or when the time limit
    stops the run) if that step is not already one."""
    n = int(at_start) + (step // eval_every if eval_every else 0)
    return n + int(step > 0 and (not eval_every or step % eval_every != 0))


def eval_count(max_steps: int, eval_every: int, at_start: bool) -> int:
    """How many evaluations a run of ``max_steps`` steps makes (see :func:`eval_index`)."""
    return eval_index(max_steps, max_steps, eval_every, at_start)


def format_results(step: int, metrics: dict[str, Any], prefix: str = "eval/") -> str:
    """``eval step <step>: name=value ...`` of the numeric metrics under ``prefix`` (the prefix
    dropped; per-category metrics ``<name>/<category>`` left out: the report has them), 3
    significant digits."""
    shown = []
    for key, value in metrics.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if not name or "/" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        shown.append(f"{name}={value:.3g}" if math.isfinite(value) else f"{name}={value}")
    return f"eval step {step}: " + (" ".join(shown) if shown else "(no metric)")


class RunProgress:
    """The run's bar (see the module docstring); every method is a no-op when ``enabled`` is False.

    Args:
        total_steps: the bar's length (``trainer.max_steps``).
        enabled: show anything (False on non-main ranks and for runs built only to evaluate).
    """

    def __init__(self, total_steps: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, desc="load model", unit="step", dynamic_ncols=True)
            _OPEN.add(self)

    def phase(self, name: str) -> None:
        """Name the current phase in the bar's description."""
        if self.bar is not None and self.bar.desc != name:
            self.bar.set_description_str(name, refresh=True)

    def start_at(self, step: int) -> None:
        """Show ``step`` steps as done (a resumed run) without counting them in the rate."""
        if self.bar is not None and step > self.bar.n:
            self.bar.n = self.bar.initial = self.bar.last_print_n = step
            self.bar.refresh()

    @contextmanager
    def items(self, total: int, desc: str) -> Iterator[Callable[[int], None]]:
        """A second bar (below the run's, removed afterwards) over ``total`` items; yields the
        function that advances it by ``n``."""
        if self.bar is None or total <= 0:
            yield lambda n: None
            return
        from tqdm.auto import tqdm

        # few updates (one per chunk of eval.batch_size items): draw each one
        sub = tqdm(total=total, desc=desc, unit="item", position=1, leave=False, dynamic_ncols=True, mininterval=0)
        try:
            yield sub.update
        finally:
            sub.close()

    def write(self, line: str) -> None:
        """Print ``line`` (stdout) above the bars without breaking them."""
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        tqdm.write(line)

    def close(self, clear: bool = False) -> None:
        """Close the bar; ``clear``: remove it from the terminal (a run that stopped with an error)."""
        if self.bar is not None:
            if clear:
                self.bar.leave = False
            self.bar.close()
            self.bar = None
        _OPEN.discard(self)


def clear_open_bars() -> None:
    """Remove every run bar still open (``mmpo`` calls this before it prints a user error: a run
    that stopped while loading leaves no ``load model 0%`` line above the message)."""
    for progress in list(_OPEN):
        progress.close(clear=True)


__all__ = ["RunProgress", "clear_open_bars", "eval_count", "eval_index", "format_results"]
