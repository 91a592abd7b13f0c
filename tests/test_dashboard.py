"""Dashboard test: Debian's chromium + chromedriver, driven headless by selenium, against a real AdminServer.

The server runs in its own monkey-patched process (tests/admin_fixture_server.py via test_admin.AdminFixture) with a
real session Registry holding two sessions, sampling every 0.2 s over a 12 s window. The browser opens /?token=...,
exactly as an operator would; the page sends the token as an Authorization header on its own fetches. Skipped only when
/usr/bin/chromium is absent (CI installs it). Leaves a screenshot in artifacts/dashboard.png.
"""
import os
import shutil
import tempfile

import pytest

from test_admin import TOKEN, AdminFixture

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts")
WAIT = 20           # seconds for anything the page does by itself

# Pixels of a chart's series colour (RGB within a tolerance, mostly opaque): a drawn line, not just axes and grid.
COUNT_PIXELS_JS = """
const [id, r, g, b] = arguments;
const c = document.getElementById(id);
const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 0; i < d.length; i += 4) {
  if (d[i + 3] > 180 && Math.abs(d[i] - r) < 40 && Math.abs(d[i + 1] - g) < 40 && Math.abs(d[i + 2] - b) < 40) n++;
}
return n;
"""


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("%s is not installed (apt-get install chromium chromium-driver)" % CHROMIUM)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="kiln-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM          # with the driver path below, selenium-manager is never consulted
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=1400,1900", "--user-data-dir=" + profile):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def admin_process():
    # A 12 s window instead of 15 minutes, so that a few seconds of samples already draw long lines.
    server = AdminFixture("--token", TOKEN, "--interval", "0.2", "--window", "12")
    yield server
    status = server.stop()
    assert status == 0, "\n".join(server.stderr[-40:])
    assert not server.problems(), "\n".join(server.stderr)


def test_dashboard_shows_sessions_charts_heap_and_closes_a_session(browser, admin_process):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT)
    browser.get(admin_process.url("/?token=" + TOKEN))

    # the sessions table
    row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, 'tr[data-session-key="c10e0001"]')))
    wait.until(lambda d: "Peter Gibbons" in row.text)
    for text in ("initech", "Laptop", "git-upload-pack 'initech/project.git'", "c10e0001"):
        assert text in row.text
    assert "Albert Wesker" in browser.find_element(By.CSS_SELECTOR, 'tr[data-session-key="c10e0002"]').text
    assert browser.find_element(By.ID, "version").text == "0.1.42-abcdef0123-20260101.120000"
    assert browser.find_element(By.ID, "uptime").text.startswith("1h2m")
    assert browser.find_element(By.ID, "health").text == "ok"

    # charts: several samples plotted, and the series colour is really on the canvas
    def chart_points(chart):
        return int(browser.find_element(By.ID, chart).get_attribute("data-points") or 0)
    wait.until(lambda d: chart_points("chart-rss") >= 20 and chart_points("chart-bytes") >= 20)
    assert browser.execute_script(COUNT_PIXELS_JS, "chart-rss", 0x25, 0x63, 0xeb) > 100
    assert browser.execute_script(COUNT_PIXELS_JS, "chart-bytes", 0x08, 0x91, 0xb2) > 100   # the clone's bytes out
    assert browser.find_element(By.ID, "window-title").text == "Last 12 seconds"
    assert "/s" in browser.find_element(By.ID, "latest-bytes").text

    # heap: the top types table fills in on load
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#heap-types tbody tr")) >= 10)
    assert "hub" in browser.find_element(By.ID, "heap-status").text

    os.makedirs(ARTIFACTS, exist_ok=True)
    assert browser.save_screenshot(os.path.join(ARTIFACTS, "dashboard.png"))

    # closing takes two clicks (arm, confirm); the session's closer runs in the server process
    button = browser.find_element(By.CSS_SELECTOR, 'tr[data-session-key="c10e0002"] button.close-session')
    button.click()
    wait.until(lambda d: button.text == "Confirm close")
    button.click()
    assert admin_process.wait_for(r"^CLOSED (\w+) (.*)$", WAIT).groups() == ("c10e0002", "closed by admin")
    wait.until(ec.invisibility_of_element_located((By.CSS_SELECTOR, 'tr[data-session-key="c10e0002"]')))
    assert "Closed session c10e0002" in browser.find_element(By.ID, "sessions-status").text
    assert browser.find_elements(By.CSS_SELECTOR, 'tr[data-session-key="c10e0001"]')

    # nothing blocked by the Content-Security-Policy, no script errors
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
