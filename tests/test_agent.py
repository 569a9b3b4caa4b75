"""The guest's remote-start agent (apppot_mpi/guest/agent.py) on real
sockets, in process: an attacker's hand-made connections from many
addresses (127.0.0.0/8), recorded and replayed requests, idle and slow
peers.  The appliance tests (test_mpirun.py) attack it inside a job.
"""

import json
import os
import socket
import threading
import time

import pytest

from apppot_mpi.guest import agent

SECRET = b"s" * 32
HEAD_SIZE = agent.MAC + agent.LENGTH.size


class Server:
    """A Gate on 127.0.0.1 whose authenticated requests run as ``handle``
    runs them in a guest (here as this user, in ``cwd``)."""

    def __init__(self, cwd):
        self.logs = []
        self.log = agent.RateLimitedLog(self.logs.append)
        config = {"uid": os.getuid(), "gid": os.getgid(), "user": "u",
                  "home": str(cwd), "cwd": str(cwd), "env": {}}
        self.gate = agent.Gate(SECRET, lambda sock, nonce, length:
                               threading.Thread(target=agent.handle, args=(
                                   sock, nonce, length, SECRET, config,
                                   self.log), daemon=True).start(),
                               log=self.log)
        self.srv = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self.srv.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.gate.serve,
                                       args=(self.srv, self.stop), daemon=True)
        self.thread.start()

    def run(self, cmd, secret=SECRET):
        out = {b"o": Sink(), b"e": Sink()}
        code = agent.request("127.0.0.1", secret, json.dumps(
            {"cmd": cmd}).encode(), port=self.port, out=out)
        return code, out[b"o"].data, out[b"e"].data

    def connect(self, source="127.0.0.1"):
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", self.port))
        return s

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for p in list(self.gate.pending.values()):
            p.sock.close()
        self.srv.close()


class Sink:
    def __init__(self):
        self.data = b""

    def write(self, b):
        self.data += b

    def flush(self):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setattr(agent, "AUTH_TIMEOUT", 1.0)
    s = Server(tmp_path)
    yield s
    s.close()


def closed_by_peer(sock, timeout=5.0):
    """Seconds until the agent hangs up on ``sock`` (reading what it sent)."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def answer(sock, timeout=5.0):
    """Everything the agent sends until it hangs up (FIN or, with our
    bytes unread, RST)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def wait_until(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def test_an_authenticated_request_runs(server):
    assert server.run("echo out; echo err >&2; exit 3") == (3, b"out\n",
                                                            b"err\n")
    assert server.gate.stats["authenticated"] == 1 and not server.logs


def test_unauthenticated_peers_get_the_nonce_and_nothing_more_is_read(
        server, tmp_path):
    """Each sends a guessed head and a megabyte: the agent reads the 36
    bytes of the head, hangs up, runs nothing, and logs (rate-limited)."""
    payload = json.dumps({"cmd": f"touch {tmp_path}/pwned"}).encode()
    junk = os.urandom(32) + agent.LENGTH.pack(len(payload)) + payload + \
        b"x" * (1 << 20)
    for _ in range(40):
        s = server.connect()
        assert len(agent.recv_exact(s, agent.NONCE)) == agent.NONCE
        s.setblocking(False)
        try:
            s.send(junk)  # as much as the kernel takes
        except OSError:
            pass
        s.setblocking(True)
        assert closed_by_peer(s) < 1.0
        s.close()
    wait_until(lambda: server.gate.stats["rejected"] == 40)
    assert server.gate.stats["unauthenticated_bytes"] == 40 * HEAD_SIZE
    assert not (tmp_path / "pwned").exists()
    assert 1 <= len(server.logs) <= 6  # a burst of 5, then one per second
    assert all(line.startswith("unauthenticated request: dropped a "
                               "connection from 127.0.0.1")
               for line in server.logs)


def test_a_recorded_request_cannot_be_replayed(server, tmp_path):
    payload = json.dumps({"cmd": "echo once >> ran"}).encode()
    s = server.connect()
    nonce = agent.recv_exact(s, agent.NONCE)
    recorded = agent.request_bytes(SECRET, nonce, payload)
    s.sendall(recorded)
    assert agent.recv_exact(s, agent.HEAD.size) == agent.HEAD.pack(b"a", 0)
    closed_by_peer(s)
    s.close()
    for _ in range(3):  # the same bytes on new connections (new nonces)
        s = server.connect()
        agent.recv_exact(s, agent.NONCE)
        s.sendall(recorded)
        assert answer(s) == b""
        s.close()
    wait_until(lambda: server.gate.stats["rejected"] == 3)
    assert (tmp_path / "ran").read_text() == "once\n"


def test_a_request_swapped_behind_a_valid_head_is_refused(server, tmp_path):
    """Someone who can see and inject the LAN's frames keeps the client's
    head and replaces its body: the body's MAC does not match."""
    s = server.connect()
    nonce = agent.recv_exact(s, agent.NONCE)
    good = json.dumps({"cmd": "true"}).encode()
    evil = json.dumps({"cmd": f"touch {tmp_path}/pwn"}).encode()[:len(good)]
    head = agent.request_bytes(SECRET, nonce, good)[:HEAD_SIZE]
    s.sendall(head + evil + os.urandom(agent.MAC))
    assert answer(s) == b""
    wait_until(lambda: server.logs)
    assert server.logs == ["request body does not match its head: dropped"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("body", [b"[" * 50000 + b"]" * 50000, b"{}",
                                  b'{"cmd": 5}', b"\xff", b'"x"'])
def test_malformed_requests_from_a_key_holder_run_nothing(server, tmp_path,
                                                          body):
    s = server.connect()
    nonce = agent.recv_exact(s, agent.NONCE)
    s.sendall(agent.request_bytes(SECRET, nonce, body))
    assert answer(s) == b""
    wait_until(lambda: server.logs)
    assert server.logs == ["malformed request: dropped"]


def test_idle_and_slow_connections_are_dropped_at_the_deadline(server):
    idle = server.connect()
    slow = server.connect()
    t0 = time.monotonic()

    def drip():  # slowloris: one byte of the head every 100 ms
        for _ in range(HEAD_SIZE - 1):
            try:
                slow.send(b"x")
            except OSError:
                return
            time.sleep(0.1)
    threading.Thread(target=drip, daemon=True).start()
    for s in (idle, slow):
        closed_by_peer(s)
        assert 0.9 < time.monotonic() - t0 < 2.0  # AUTH_TIMEOUT is 1 s
        s.close()
    assert server.gate.stats["timed_out"] == 2
    assert "no credentials within 1 s: dropped a connection from " \
        "127.0.0.1" in server.logs


def test_many_connections_cannot_exhaust_the_agent(server):
    """200 idle connections from 20 addresses: the agent holds at most
    MAX_PENDING (PER_PEER per address), no thread per connection, and a
    legitimate request from another address still runs at once."""
    threads = threading.active_count()
    held = []
    for k in range(200):
        held.append(server.connect(f"127.0.0.{2 + k % 20}"))
        assert len(server.gate.pending) <= agent.MAX_PENDING
    wait_until(lambda: server.gate.stats["connections"] == 200)
    assert len(server.gate.pending) == agent.MAX_PENDING
    per_peer = {}
    for p in server.gate.pending.values():
        per_peer[p.peer] = per_peer.get(p.peer, 0) + 1
    assert max(per_peer.values()) <= agent.PER_PEER
    assert threading.active_count() == threads
    t0 = time.monotonic()
    assert server.run("echo legit") == (0, b"legit\n", b"")
    assert time.monotonic() - t0 < 0.5
    evicted = server.gate.stats["evicted"]
    assert evicted >= 200 - agent.MAX_PENDING
    for s in held:
        s.close()


def test_rate_limited_log_says_what_it_held_back():
    now = [0.0]
    lines = []
    log = agent.RateLimitedLog(lines.append, burst=3, interval=1.0,
                               clock=lambda: now[0])
    for i in range(10):
        log(f"m{i}")
    assert lines == ["m0", "m1", "m2"]
    now[0] = 1.0
    log("m10")
    log("m11")
    assert lines[3:] == ["m10 (7 more not logged)"]
    now[0] = 100.0
    for i in range(5):
        log(f"n{i}")
    assert lines[4:] == ["n0 (1 more not logged)", "n1", "n2"]


def test_client_retries_when_its_connection_ends_before_acceptance(
        tmp_path, monkeypatch, capfd):
    """An agent that dropped the client (evicted, timed out) ran nothing:
    apppot-rsh tries again; a request the agent accepted is never sent
    twice."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.hex() + "\n")
    monkeypatch.setattr(agent, "SECRET", str(secret_file))
    srv = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setattr(agent, "PORT", srv.getsockname()[1])
    config = {"uid": os.getuid(), "gid": os.getgid(), "user": "u",
              "home": str(tmp_path), "cwd": str(tmp_path), "env": {}}
    seen = []

    def fake_agent():  # drops the first two after the nonce, as an evictor
        for i in range(3):
            conn, _ = srv.accept()
            nonce = os.urandom(agent.NONCE)
            conn.sendall(nonce)
            seen.append(i)
            if i < 2:
                conn.close()
                continue
            head = agent.recv_exact(conn, HEAD_SIZE)
            agent.handle(conn, nonce, head[agent.MAC:], SECRET, config,
                         print)
    t = threading.Thread(target=fake_agent, daemon=True)
    t.start()
    assert agent.rsh(["-x", "127.0.0.1", "echo", "hi"]) == 0
    t.join(5)
    srv.close()
    assert seen == [0, 1, 2]
    assert capfd.readouterr().out == "hi\n"
