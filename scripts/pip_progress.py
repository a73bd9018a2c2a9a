"""Compact progress of a ``pip install`` (the Makefile's install steps).

    pip install ... 2>&1 | python3 scripts/pip_progress.py

pip's per-package lines (``Collecting``, ``Downloading``, ``Requirement already satisfied``, ...)
become one status line, redrawn in place on a terminal (``collecting 37: numpy``) and printed every
``EVERY`` packages otherwise, then one summary line (``61 packages installed, 12 already there``).
Any other line (a warning, an error and everything after it) is passed through unchanged, so
nothing pip reports as a problem is hidden. pip's exit status is the Makefile's (``pipefail``).
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import sys
from typing import Iterable, TextIO

#: pip's routine lines (first word(s) of the line); indented lines are routine too until an error
ROUTINE = (
    "Collecting ",
    "Downloading ",
    "Using cached ",
    "Requirement already satisfied",
    "Obtaining ",
    "Processing ",
    "Preparing ",
    "Installing build dependencies",
    "Checking if build backend",
    "Getting requirements",
    "Building wheel",
    "Building wheels",
    "Building editable",
    "Created wheel",
    "Stored in directory",
    "Installing collected packages",
    "Attempting uninstall",
    "Found existing installation",
    "Uninstalling ",
    "Successfully uninstalled",
    "Looking in indexes",
    "Looking in links",
)
EVERY = 25


def compact(lines: Iterable[str], out: TextIO, tty: bool) -> dict[str, int]:
    """Write the compact form of pip's output ``lines`` to ``out``; returns the counts
    (``collected``, ``satisfied``, ``installed``, ``passed``: lines passed through)."""
    counts = {"collected": 0, "satisfied": 0, "installed": 0, "passed": 0}
    status_open = False  # a status line without its newline is on the terminal
    in_error = False

    def end_status() -> None:
        nonlocal status_open
        if status_open:
            out.write("\n")
            status_open = False

    for raw in lines:
        line = raw.rstrip("\n")
        stripped = line.strip()
        if line.startswith(("ERROR", "error:")) or stripped.startswith("×"):
            in_error = True
        if not in_error and line.startswith("Collecting "):
            counts["collected"] += 1
            name = line.split()[1] if len(line.split()) > 1 else ""
            if tty:
                out.write(f"\r      collecting {counts['collected']}: {name[:60]:<60}")
                status_open = True
            elif counts["collected"] % EVERY == 0:
                out.write(f"      collecting {counts['collected']} ...\n")
            out.flush()
            continue
        if not in_error and line.startswith("Requirement already satisfied"):
            counts["satisfied"] += 1
            continue
        if not in_error and line.startswith("Successfully installed"):
            counts["installed"] += len(line.split()) - 2
            continue
        if not in_error and (not stripped or line.startswith(ROUTINE) or line[:1].isspace()):
            continue
        end_status()
        out.write(line + "\n")
        out.flush()
        counts["passed"] += 1
    end_status()
    done = []
    if counts["installed"]:
        done.append(f"{counts['installed']} package(s) installed")
    if counts["satisfied"]:
        done.append(f"{counts['satisfied']} already there")
    if done and not in_error:
        out.write("      " + ", ".join(done) + "\n")
    out.flush()
    return counts


def main() -> int:
    compact(sys.stdin, sys.stdout, sys.stdout.isatty())
    return 0


if __name__ == "__main__":
    sys.exit(main())
