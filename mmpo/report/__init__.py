"""``mmpo report RUN_DIR``: one HTML page of a run, ``RUN_DIR/report.html``, that opens offline.

It holds the curves of every metric (plotly.js, inlined: zoom, pan, hover), the evaluation
results per checkpoint and per category, the logged rollouts browsable by step with their
pictures, reward components and advantages, a grid of generated images per prompt across steps
(diffusion and FIND runs), and the resolved config. Pictures stay in the run folder and are
referenced by relative paths, so the page is one file next to them; its Content-Security-Policy
forbids every network request.

Training writes it at the end (and at every evaluation with ``trainer.report: true``) through
:func:`write_report_safely`: a report that fails to build never loses the run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPORT_FILE = "report.html"


def build_report(run_dir: str | Path, kind: str | None = None) -> Path:
    """Write ``<run_dir>/report.html`` (atomically) and return its path. ``kind``: the trainer
    kind (``token``, ``denoising``, ...: the loop and `mmpo report` pass it); None shows no per-prompt image grid.
    ConfigError when ``run_dir`` is not a run folder."""
    from mmpo.report.collect import read_run
    from mmpo.report.render import render

    run = read_run(run_dir, kind=kind)
    path = Path(run_dir) / REPORT_FILE
    tmp = path.with_name(f".{REPORT_FILE}.tmp-{os.getpid()}")
    tmp.write_text(render(run), encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_report_safely(run_dir: str | Path, kind: str | None = None) -> Path | None:
    """:func:`build_report`, or one warning line on stderr naming the error and None."""
    try:
        return build_report(run_dir, kind=kind)
    except Exception as exc:  # the run's results are already saved; a report must not fail it
        print(f"warning: report not written ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
        return None


__all__ = ["REPORT_FILE", "build_report", "write_report_safely"]
