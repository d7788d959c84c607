"""A real headless Chromium for the dashboard and report tests: Debian's chromium and chromium-driver,
driven by Selenium (nothing is downloaded). Without them the tests skip locally and fail under CI
(tests/conftest.py fails a CI run on any skip; .ci/run installs both)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("INSITU_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("INSITU_CHROMEDRIVER", "/usr/bin/chromedriver")
EXTERNAL_REF = re.compile(r"""(?:src|href|action|xlink:href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() or shutil.which(path)):
            return (f"{path} not found: apt-get install -y --no-install-recommends chromium chromium-driver "
                    "(or set INSITU_CHROMIUM / INSITU_CHROMEDRIVER)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -c constraints.txt -e '.[test]'"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium (Selenium WebDriver), 1280 px wide, shared by one test module."""
    problem = _missing()
    if problem:
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1800",
                "--no-first-run", "--disable-extensions", "--disable-background-networking", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def resource_urls(driver: Any) -> list[str]:
    """Every URL the page fetched after the document itself (the browser's performance entries)."""
    return list(driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"))


def alert_text(driver: Any) -> str | None:
    """The text of an open alert() dialog, or None (a hostile client id must never open one)."""
    from selenium.common.exceptions import NoAlertPresentException

    try:
        return str(driver.switch_to.alert.text)
    except NoAlertPresentException:
        return None


def table_rows(driver: Any, table_id: str) -> list[list[str]]:
    """The visible text of each body row of the table ``#table_id``."""
    return list(driver.execute_script(
        "return [...document.querySelectorAll('#' + arguments[0] + ' tbody tr')]"
        ".map(tr => [...tr.cells].map(td => td.textContent))", table_id))


def screenshot(driver: Any, path: Path) -> None:
    """A full-page PNG (the window grown to the page's height first)."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1280, min(max(height, 800), 4000))
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 1800)
