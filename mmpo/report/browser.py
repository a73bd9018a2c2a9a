"""Headless Debian Chromium through Selenium, for the report's tests and screenshots.

The flags are those MiniWoB++ starts Chromium with (headless, no GPU, no sandbox: it runs as
root in containers); ``SE_OFFLINE`` keeps Selenium from looking for drivers on the network.
"""

from __future__ import annotations

import base64
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mmpo.errors import ConfigError

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextmanager
def headless_chromium(width: int = 1400, height: int = 1000, *, logs: bool = True) -> Iterator[Any]:
    """A Selenium Chrome driver on headless Chromium (``width`` x ``height`` window); with
    ``logs`` the browser console and performance logs are kept (``driver.get_log``). Quit on exit."""
    binary = os.environ.get("MINIWOB_CHROME_BINARY") or shutil.which("chromium") or CHROMIUM
    driver_path = os.environ.get("MINIWOB_CHROMEDRIVER") or shutil.which("chromedriver") or CHROMEDRIVER
    if not (Path(binary).exists() and Path(driver_path).exists()):
        raise ConfigError(
            f"headless Chromium needs {binary} and {driver_path} (Debian: apt-get install chromium chromium-driver)"
        )
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("headless", "disable-gpu", "no-sandbox", "disable-dev-shm-usage", f"window-size={width},{height}"):
        options.add_argument(flag)
    options.binary_location = binary
    if logs:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def full_page_png(driver: Any, path: str | Path, width: int = 1400) -> Path:
    """Save a PNG of the whole page (``width`` CSS pixels wide, as tall as the page) to ``path``."""
    height = int(driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)"))
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    height = int(driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)"))
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


__all__ = ["headless_chromium", "full_page_png"]
