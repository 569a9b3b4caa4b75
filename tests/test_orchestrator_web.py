"""The orchestrator's status page and ready callback in a real headless
browser (Debian's chromium + chromedriver through Selenium), against a real
``apppot-orchestrator run`` with the libcloud provider (libcloud's dummy
driver) and no batch system; a policy file asks for one node.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

POLICY = """\
from apppot_mpi.orchestrator.policy import Policy

class OneNode(Policy):
    def new_node_needed(self):
        return not self.orch.alive_nodes()

    def can_stop(self, node):
        return False
"""


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for exe in ("chromium", "chromedriver"):
        assert shutil.which(exe), f"{exe} missing (apt-get install chromium " \
            "chromium-driver; scripts/setup.sh does)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(
        shutil.which("chromedriver")))
    yield driver
    driver.quit()


@pytest.fixture
def orchestrator(tmp_path):
    (tmp_path / "one.py").write_text(POLICY)
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "apppot_mpi.orchestrator.cli", "run",
         "--state-dir", str(state), "--batch", "none", "--provider",
         "libcloud", "--policy", str(tmp_path / "one.py"), "--listen",
         "127.0.0.1:0", "--cycle", "0.5"],
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stderr.readline()
    m = re.search(r"status page (http://\S+/)", line)
    assert m, f"no status page line: {line!r}"
    url = m.group(1)
    deadline = time.monotonic() + 20
    ckpt = state / "orchestrator.json"
    while not (ckpt.exists() and json.loads(ckpt.read_text())["nodes"]):
        assert time.monotonic() < deadline, "no node started"
        time.sleep(0.1)
    yield url, state, proc
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(20) == 0


def post(url, **fields):
    data = urllib.parse.urlencode(fields).encode()
    try:
        with urllib.request.urlopen(url, data, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_status_page_login_and_ready_callback_in_chromium(
        browser, orchestrator, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    def wait(cond):
        WebDriverWait(browser, 10).until(cond)

    url, state, _ = orchestrator
    admin = (state / "web-token").read_text().strip()
    assert oct((state / "web-token").stat().st_mode & 0o777) == "0o600"
    node = json.loads((state / "orchestrator.json").read_text())["nodes"][0]

    # not logged in: the page sends us to the login form
    browser.get(url)
    assert browser.current_url.endswith("/login")
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.ID, "login").click()
    wait(ec.presence_of_element_located((By.ID, "error")))
    assert "Wrong token" in browser.find_element(By.ID, "error").text
    browser.find_element(By.ID, "token").send_keys(admin)
    browser.find_element(By.ID, "login").click()
    wait(ec.url_to_be(url))
    cookie = browser.get_cookie("apppot_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    table = browser.find_element(By.ID, "nodes")
    assert node["name"] in table.text and "STARTING" in table.text
    assert "libcloud (dummy" in browser.page_source

    # the node's callback: wrong token refused, its own token accepted
    ready = url + "x/ready"
    assert post(ready, node=node["name"], token="guess") == 403
    assert post(ready, node=node["name"], token=admin) == 403
    assert post(ready, node=node["name"], token=node["token"]) == 200
    browser.refresh()
    row = browser.find_element(By.CSS_SELECTOR, "#nodes tr.READY")
    assert node["name"] in row.text
    assert "ready after" in browser.find_element(By.ID, "decisions").text
    # no token anywhere on the page, nor in status.json
    for secret in (node["token"], admin):
        assert secret not in browser.page_source
    browser.get(url + "status.json")
    assert node["token"] not in browser.page_source
    assert json.loads(browser.find_element(By.TAG_NAME, "pre").text)[
        "nodes"][0]["state"] == "READY"
    browser.get(url)
    assert browser.save_screenshot(str(tmp_path / "status.png"))
    assert (tmp_path / "status.png").stat().st_size > 10_000
    shot = os.environ.get("APPPOT_SCREENSHOT")  # README's picture
    if shot:
        shutil.copy(tmp_path / "status.png", shot)

    # a GET on the callback is refused; logging out ends the session
    browser.get(ready)
    assert "use POST" in browser.page_source
    browser.get(url)
    browser.find_element(By.CSS_SELECTOR, "form[action='/logout'] button"
                         ).click()
    wait(ec.url_contains("/login"))
    browser.get(url)
    assert browser.current_url.endswith("/login")
    assert post(url + "login", token="wrong") == 403
