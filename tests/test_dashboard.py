"""The live dashboard (issue 22) in a real headless browser: Debian's chromium, driven through
chromium-driver by Selenium, against a real daemon. The page loads, shows a session a test
started (and its tenant, and the device's health), updates when it ends, and logs no console error;
screenshots are kept in build/test-artifacts/ (``LIBREMOTE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import time

import pytest
from selenium import webdriver

from ops_support import (
    ARTIFACTS,
    MetricsDaemon,
    release,
    require_tool,
    spawn_holder,
    wait_holding,
)


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium = require_tool("chromium", "chromium")
    driver_path = require_tool("chromedriver", "chromium-driver")
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1400,1100"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path, log_output=str(tmp_path / "driver.log")),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = driver.execute_script(predicate)
        if result:
            return result
        time.sleep(0.2)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "dashboard-failure.png"))
    raise AssertionError(f"the dashboard never showed {what} within {timeout} s; page text:\n"
                         f"{driver.execute_script('return document.body.innerText')}")


def test_the_dashboard_shows_a_session_and_updates_when_it_ends(browser, tmp_path):
    with MetricsDaemon("--device-memory", "64MiB", "--host-spill", "256MiB") as server:
        browser.get(server.url + "/")
        assert browser.title == "libremote pool"
        _wait(browser, f"return document.getElementById('daemon').textContent.includes('{server.address}')",
              "the daemon's address")
        _wait(browser, "return document.getElementById('ready').textContent === 'ready'", "readiness")
        assert browser.execute_script("return document.querySelectorAll('#devices .device').length") == 1
        assert "healthy" in browser.execute_script("return document.querySelector('#devices .device h3').textContent")
        holder = spawn_holder(server.address, tmp_path, "a", LIBREMOTE_TENANT="research")
        try:
            session = wait_holding(holder, tmp_path, "a")
            row = f"document.querySelector('#sessions tbody tr[data-key=\"{session}\"]')"
            _wait(browser, f"return {row} !== null", f"session {session}")
            _wait(browser, f"return {row}.cells[7].textContent !== '0'", "the session's ops")  # (its worker's figures)
            cells = browser.execute_script(f"return Array.from({row}.cells).map((c) => c.textContent)")
            assert cells[1] == "research" and cells[3] == "0", cells
            _wait(browser, "return document.querySelector('#tenants tbody tr[data-key=\"research\"]') !== null",
                  "the tenant research")
            assert browser.execute_script("return document.getElementById('tile-sessions').textContent") == "1"
            _wait(browser, "return document.querySelectorAll('#devices svg.chart path').length === 2", "the charts")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "dashboard-session.png"))
        finally:
            if holder.poll() is None:
                release(holder, tmp_path, "a")
        _wait(browser, f"return {row} === null", "the session's end")
        _wait(browser, "return document.querySelector('#sessions tbody').textContent.includes('no sessions')",
              "no sessions")
        browser.save_screenshot(str(ARTIFACTS / "dashboard-ended.png"))
        errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
    assert (ARTIFACTS / "dashboard-session.png").stat().st_size > 10_000
