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


# ------------------------------------------- hand-made requests, real sockets
class FakeOrch:
    def __init__(self):
        self.ready = []

    def status(self):
        return {"cycle": 3, "nodes": [], "history": [], "decisions": []}

    def node_ready(self, name, token):
        self.ready.append((name, token))
        return token == "good-node-token"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


ADMIN = "admin-token-0123456789"


@pytest.fixture
def server():
    from apppot_mpi.orchestrator.web import WebServer

    clock = Clock()
    web = WebServer(FakeOrch(), "127.0.0.1", 0, ADMIN, session_seconds=60,
                    clock=clock, max_connections=4, max_per_client=2,
                    idle_seconds=1.0, request_seconds=2.5).start()
    web.clock_ = clock
    yield web
    web.close()


def connect(web, source="127.0.0.1"):
    import socket

    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(web.httpd.server_address)
    return s


def exchange(web, raw, source="127.0.0.1"):
    """Send ``raw`` bytes; the whole response and the seconds it took."""
    s = connect(web, source)
    t0 = time.monotonic()
    s.sendall(raw)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out, time.monotonic() - t0


def status_of(response):
    return int(response.split(b" ", 2)[1]) if response else None


@pytest.mark.parametrize(("length", "code"), [
    ("-1", 400), ("abc", 400), ("1e3", 400), (" +5", 400),
    ("99999999999999999999", 400), ("4097", 413), ("1000000000", 413)])
def test_bad_content_length_is_refused_before_reading(server, capsys,
                                                      length, code):
    # nothing follows the headers: a server that reads the body would wait
    # for the idle timeout (1 s) instead of answering at once
    out, took = exchange(server, b"POST /x/ready HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: " + length.encode() + b"\r\n\r\n")
    assert status_of(out) == code, out
    assert took < 0.5
    assert server.orch.ready == []
    assert "Traceback" not in capsys.readouterr().err


def test_missing_length_chunked_and_unknown_post_paths(server):
    out, took = exchange(server, b"POST /login HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(out) == 411 and took < 0.5
    out, _ = exchange(server, b"POST /login HTTP/1.1\r\nTransfer-Encoding: "
                      b"chunked\r\n\r\n5\r\ntoken\r\n0\r\n\r\n")
    assert status_of(out) == 411
    out, _ = exchange(server, b"POST /x/ready HTTP/1.1\r\nContent-Length: 3"
                      b"\r\nContent-Length: 3\r\n\r\nabc")
    assert status_of(out) == 411
    # an unknown path: answered without reading the (announced) body
    out, took = exchange(server, b"POST /upload HTTP/1.1\r\nContent-Length: "
                         b"100000000\r\n\r\n")
    assert status_of(out) == 404 and took < 0.5
    # a short body (the client stops sending) is not taken for a form
    out, took = exchange(server, b"POST /x/ready HTTP/1.1\r\nContent-Length: "
                         b"40\r\n\r\nnode=a&token=good-node-token")
    assert status_of(out) is None or status_of(out) == 400
    assert server.orch.ready == []
    body = b"node=apppot-n1&token=good-node-token"
    out, _ = exchange(server, b"POST /x/ready HTTP/1.1\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert status_of(out) == 200
    assert server.orch.ready == [("apppot-n1", "good-node-token")]


def test_idle_and_slow_drip_sockets_are_closed(server):
    # idle: connected, nothing sent → closed after the idle timeout
    s = connect(server)
    t0 = time.monotonic()
    assert s.recv(100) == b""
    assert 0.8 < time.monotonic() - t0 < 3
    s.close()
    # slowloris: a header byte every 0.3 s never hits the idle timeout,
    # but the connection's deadline (2.5 s) ends it
    s = connect(server)
    t0 = time.monotonic()
    closed = None
    for byte in b"POST /login HTTP/1.1\r\nX-Pad: " + b"a" * 100:
        try:
            s.send(bytes([byte]))
        except OSError:
            closed = time.monotonic() - t0
            break
        s.settimeout(0.3)
        try:
            if s.recv(100) == b"":
                closed = time.monotonic() - t0
                break
        except TimeoutError:
            pass
    s.close()
    assert closed is not None and 2.0 < closed < 5, closed


def test_connections_are_capped_per_client_and_in_all(server):
    a1, a2 = connect(server), connect(server)
    time.sleep(0.2)
    a3 = connect(server)  # a third from the same address: closed at once
    a3.settimeout(0.5)
    assert a3.recv(100) == b""
    b1, b2 = connect(server, "127.0.0.2"), connect(server, "127.0.0.2")
    time.sleep(0.2)
    c1 = connect(server, "127.0.0.3")  # 4 open in all: closed at once
    c1.settimeout(0.5)
    assert c1.recv(100) == b""
    for s in (a1, a2, a3, b1, b2, c1):
        s.close()
    time.sleep(0.3)
    out, _ = exchange(server, b"GET /login HTTP/1.0\r\n\r\n", "127.0.0.3")
    assert status_of(out) == 200


def test_sessions_expire_and_empty_tokens_never_match(server):
    def login(token):
        body = urllib.parse.urlencode({"token": token}).encode()
        out, _ = exchange(server, b"POST /login HTTP/1.0\r\nContent-Length: "
                          + str(len(body)).encode() + b"\r\n\r\n" + body)
        return out

    def status_with(header):
        out, _ = exchange(server, b"GET /status.json HTTP/1.0\r\n" + header
                          + b"\r\n\r\n")
        return status_of(out)

    assert status_of(login("")) == 403
    assert status_with(b"Authorization: Bearer ") == 401
    assert status_with(b"Cookie: apppot_session=") == 401
    out = login(ADMIN)
    assert status_of(out) == 303
    cookie = re.search(rb"apppot_session=([^;]+); HttpOnly; SameSite=Strict;"
                       rb" Path=/; Max-Age=60", out).group(1)
    assert status_with(b"Cookie: apppot_session=" + cookie) == 200
    server.clock_.t += 61
    assert status_with(b"Cookie: apppot_session=" + cookie) == 401
    assert not server.sessions


def test_web_server_refuses_an_empty_admin_token():
    from apppot_mpi.orchestrator.web import WebServer

    with pytest.raises(ValueError, match="empty admin token"):
        WebServer(FakeOrch(), "127.0.0.1", 0, "")


def test_one_run_per_state_dir_and_shutdown_stops_it_first(tmp_path):
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "apppot_mpi.orchestrator.cli", "run",
            "--state-dir", str(state), "--batch", "none", "--provider",
            "libcloud", "--listen", "127.0.0.1:0", "--cycle", "0.2"]
    first = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        assert "status page" in first.stderr.readline()
        second = subprocess.run(argv, capture_output=True, text=True,
                                timeout=30, check=False)
        assert second.returncode == 125
        assert f"another apppot-orchestrator (pid {first.pid}) runs on" in \
            second.stderr and second.stderr.count("\n") == 2
        down = subprocess.run([sys.executable, "-m",
                               "apppot_mpi.orchestrator.cli", "shutdown",
                               "--state-dir", str(state), "--batch", "none"],
                              capture_output=True, text=True, timeout=90,
                              check=False)
        assert down.returncode == 0, down.stderr
        assert f"stopping the orchestrator running on this state dir (pid " \
            f"{first.pid}) first" in down.stderr
        assert first.wait(5) == 0  # already gone when shutdown went on
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
