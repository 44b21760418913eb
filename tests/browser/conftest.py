"""Real headless Chromium (Debian's chromium + chromedriver; never selenium-manager downloads)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "bench-results" / "screenshots"


def make_driver(width: int = 1400, height: int = 900):
    """A headless Chromium driven by Debian's chromedriver, in a fresh profile directory."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="heartloop-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(20)
    driver._heartloop_profile = profile  # type: ignore[attr-defined]
    return driver


@pytest.fixture
def chrome():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail("chromium/chromedriver missing in CI")
        pytest.skip("Debian chromium and chromedriver are not installed here (.ci/run installs them)")
    driver = make_driver()
    yield driver
    driver.quit()
    shutil.rmtree(driver._heartloop_profile, ignore_errors=True)


@pytest.fixture
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
