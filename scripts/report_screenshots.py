"""A full-page screenshot of a run report in headless Chromium (for docs/img/).

    .venv/bin/python scripts/report_screenshots.py RUN_DIR OUT.png [--width 1400] [--step N] [--max-height PX]

Writes ``RUN_DIR/report.html`` first (``mmpo report RUN_DIR``; ``--no-build`` keeps the one
there), opens it from file://, shows the rollouts of ``--step`` (default: the last logged step), waits for every
picture and plot, and saves the page ``--width`` CSS pixels wide, cut at ``--max-height``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mmpo.report import REPORT_FILE, build_report
from mmpo.report.browser import full_page_png, headless_chromium
from mmpo.trainers import run_kind


def screenshot(
    run_dir: Path, out: Path, *, width: int = 1400, step: int | None = None, max_height: int = 0, build: bool = True
) -> Path:
    """Save a PNG of ``run_dir``'s report (rebuilt first with ``build``) to ``out``; returns ``out``."""
    page = run_dir / REPORT_FILE
    if build or not page.is_file():
        build_report(run_dir, kind=run_kind(str(run_dir)))
    with headless_chromium(width=width, height=1000, logs=True) as driver:
        driver.get(page.resolve().as_uri())
        if step is not None:
            found = driver.execute_script(
                "var s = document.getElementById('rollout-step');"
                "if (!s || !Array.from(s.options).some(o => o.value === arguments[0])) return false;"
                "window.mmpoShowStep(arguments[0]); return true;",
                str(step),
            )
            if not found:
                raise SystemExit(f"{page}: no logged rollouts at step {step}")
        deadline = time.time() + 60
        while time.time() < deadline:
            ready = driver.execute_script(
                "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"
                " && Array.from(document.querySelectorAll('div.plot'))"
                ".every(d => d.classList.contains('js-plotly-plot'))"
            )
            if ready:
                break
            time.sleep(0.2)
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        for message in errors:
            print(f"console error: {message}", file=sys.stderr)
        if max_height:
            driver.execute_script(
                "document.body.style.maxHeight = arguments[0] + 'px'; document.body.style.overflow = 'hidden';",
                max_height,
            )
        return full_page_png(driver, out, width=width)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--width", type=int, default=1400, help="page width in CSS pixels")
    p.add_argument("--step", type=int, default=None, help="show the rollouts of this step (default: the last)")
    p.add_argument("--max-height", type=int, default=0, help="cut the page at this height (0: the whole page)")
    p.add_argument("--no-build", action="store_true", help="shoot the report.html there (default: rebuild it first)")
    args = p.parse_args(argv)
    path = screenshot(
        args.run_dir, args.out, width=args.width, step=args.step, max_height=args.max_height, build=not args.no_build
    )
    print(f"screenshot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
