"""Shared fixtures of the GUI tests: no browser started by a test outlives it."""

from __future__ import annotations

import time

import psutil
import pytest


def own_browsers() -> set[int]:
    """Chromium / chromedriver processes started by this test process (not other users')."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "chrom" in p.name().lower():
                out.add(p.pid)
        except psutil.Error:
            pass
    return out


@pytest.fixture
def no_leftover_browser():
    before = own_browsers()
    yield
    deadline = time.time() + 5
    while own_browsers() - before and time.time() < deadline:
        time.sleep(0.2)
    assert own_browsers() - before == set(), "a browser outlived the test"
