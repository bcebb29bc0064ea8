"""Headless Chromium for page tests: Debian's `chromium` + `chromium-driver` driven by Selenium, fully offline
(fresh profile, no background networking; Selenium Manager is never asked to download anything)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,800")


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    return (browser, driver) if browser and driver else None


def require_browser() -> tuple[str, str]:
    """Chromium and Selenium, or a skip naming what is missing (a failure under CI, where .ci/run installs them)."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    paths = chromium_paths()
    if paths is None:
        missing.append("chromium + chromedriver (apt-get install chromium chromium-driver)")
    if missing:
        message = "browser test needs " + " and ".join(missing) + "; .ci/run installs them"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return paths


def start_chrome(profile: Path | None = None):
    """A headless Chromium WebDriver with a fresh --user-data-dir (removed by the caller's tmp dir or ours)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile or tempfile.mkdtemp(prefix='chromium-profile-')}")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not reach out
    service = Service(executable_path=driver, log_output=subprocess.DEVNULL)
    return webdriver.Chrome(options=options, service=service)

