"""Headless Chromium for the browser tests: find it, launch it through Playwright, or skip/fail.

Playwright drives the installed Chromium (Debian's ``chromium``) through ``executable_path``;
``playwright install`` is never run and nothing is downloaded. Without a Chromium (or without
the ``playwright`` package) a browser test skips and says how to get one, unless
LORA_COURSE_REQUIRE_BROWSER=1 (CI), where it fails instead.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

HOW_TO_GET_CHROMIUM = (
    "the browser test needs Chromium: install it with `sudo apt-get install -y chromium` (Debian/Ubuntu), "
    "or point LORA_COURSE_CHROMIUM at a Chromium/Chrome executable. (`playwright install` is not needed.)"
)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def find_chromium() -> str | None:
    """The Chromium to use: $LORA_COURSE_CHROMIUM, else the first of the usual names on PATH."""
    explicit = os.environ.get("LORA_COURSE_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def unavailable(reason: str):
    """Skip the test, or fail it where LORA_COURSE_REQUIRE_BROWSER=1 (CI must run browser tests)."""
    if os.environ.get("LORA_COURSE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"LORA_COURSE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason + " (set LORA_COURSE_REQUIRE_BROWSER=1 to make this a failure instead of a skip)")


@contextlib.contextmanager
def launched_chromium():
    """A Playwright ``Browser`` on the installed Chromium, closed afterwards whatever happened."""
    chromium = find_chromium()
    if chromium is None:
        unavailable(HOW_TO_GET_CHROMIUM)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the browser test needs the `playwright` Python package: pip install -r requirements.txt")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
