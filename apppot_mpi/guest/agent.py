#!/usr/bin/python3 -IB
"""In-guest remote start for MPI launchers: an authenticated rsh.

Standard library only; installed in images as /usr/lib/apppot/agent.py.

``agent.py serve`` (started by the MPI hook in every appliance) listens on
the job LAN.  ``apppot-rsh HOST CMD...`` (Open MPI's ``plm_rsh_agent``,
Hydra's ``-launcher-exec``) asks HOST's agent to run CMD with ``/bin/sh -c``
as the job user, relays its stdout/stderr and returns its status, like ssh.

Protocol (the secret reaches the guests on their private control disks,
never on a command line):

    agent  → client  nonce (32 random bytes, fresh per connection)
    client → agent   head: HMAC(secret, "head" nonce length) length(4)
    client → agent   body: request (JSON, length bytes)
                           HMAC(secret, "body" nonce length request)
    agent  → client  frame "a" (accepted), then "o"/"e" output, "x" status

Authenticate small first: until the 36-byte head proves the secret, a
connection is one of at most MAX_PENDING (PER_PEER per address; the oldest
goes first) held by one event loop, may take AUTH_TIMEOUT seconds, and
makes the agent read nothing more.  The nonce makes every MAC single-use,
so a recorded request cannot be replayed; the body's MAC keeps a peer that
can see and inject LAN frames from swapping the request after the head.
Rejections are logged to the console, rate-limited.  A client whose
connection ends before "a" knows nothing ran and retries.  If the client
goes away, the agent kills the command's process group.
"""

import hashlib
import hmac
import json
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

PORT = 7711
SECRET = "/run/apppot/mpi/secret"  # noqa: S105  (a path)
CONFIG = "/run/apppot/mpi/agent.json"
NONCE = 32
MAC = 32
LENGTH = struct.Struct("!I")
MAX_REQUEST = 1 << 20
AUTH_TIMEOUT = 5.0  # s an unauthenticated connection may take for its head
BODY_TIMEOUT = 30.0  # s an authenticated client may take for its request
MAX_PENDING = 64  # unauthenticated connections held at once...
PER_PEER = 8  # ...and from one address
RETRIES = 5  # client attempts while its connection ends before "a"
HEAD = struct.Struct("!cI")  # frame: kind (a, o, e, x), length


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def head_mac(secret, nonce, length):
    return hmac.new(secret, b"apppot-agent head\0" + nonce + length,
                    hashlib.sha256).digest()


def body_mac(secret, nonce, length, body):
    return hmac.new(secret, b"apppot-agent body\0" + nonce + length + body,
                    hashlib.sha256).digest()


def request_bytes(secret, nonce, payload):
    """What a client sends once it has the agent's nonce."""
    length = LENGTH.pack(len(payload))
    return (head_mac(secret, nonce, length) + length + payload
            + body_mac(secret, nonce, length, payload))


class RateLimitedLog:
    """At most ``burst`` lines at once, then one per ``interval`` s; the
    next line says how many were held back."""

    def __init__(self, write, burst=5, interval=1.0, clock=time.monotonic):
        self.write, self.burst, self.interval = write, burst, interval
        self.clock = clock
        self.tokens, self.stamp, self.held = float(burst), clock(), 0
        self.lock = threading.Lock()

    def __call__(self, msg):
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (
                now - self.stamp) / self.interval)
            self.stamp = now
            if self.tokens < 1:
                self.held += 1
                return
            self.tokens -= 1
            if self.held:
                msg += f" ({self.held} more not logged)"
                self.held = 0
        self.write(msg)


# ------------------------------------------------------------------ server
def notify(message):
    with open("/proc/mconsole", "w") as f:
        f.write(message)


def report_statuses(stop, fifo="/run/apppot/mpi/status", forward=notify):
    """Forward each rank's exit status ("RANK CODE" lines that rankwrap
    writes into a FIFO) to the launcher; only root may write /proc/mconsole.
    Opened read-write, so writers never block and there is never an EOF.
    Once ``stop`` is set (init ends the appliance with SIGTERM when the
    launcher is done) it forwards what is still in the FIFO, then returns:
    the last ranks' statuses must not die with the appliance."""
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    buf = b""
    while True:
        stopping = stop.is_set()
        if stopping or select.select([fd], [], [], 0.2)[0]:
            try:
                while chunk := os.read(fd, 4096):
                    buf += chunk
            except BlockingIOError:
                pass
        *lines, buf = buf.split(b"\n")
        for line in lines:
            try:
                rank, code = (int(x) for x in line.split())
                forward(f"apppot:rank {rank} {code}")
            except (OSError, ValueError):
                continue
        if stopping:
            return


def serve(config):
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    secret = bytes.fromhex(config["secret"])
    srv = socket.create_server((config["ip"], config.get("port", PORT)),
                               backlog=64)
    gate = Gate(secret, lambda sock, nonce, length: threading.Thread(
        target=handle, args=(sock, nonce, length, secret, config,
                             gate.log), daemon=True).start())
    threading.Thread(target=gate.serve, args=(srv,), daemon=True).start()
    report_statuses(stop)  # in the main thread, where SIGTERM lands


class Pending:
    """A connection that has the nonce and owes us its head."""

    __slots__ = ("sock", "peer", "nonce", "head", "deadline")

    def __init__(self, sock, peer, nonce, deadline):
        self.sock, self.peer, self.nonce = sock, peer, nonce
        self.head, self.deadline = b"", deadline


class Gate:
    """One event loop holds every unauthenticated connection: it sends the
    nonce, reads the head (never more), and hands a connection whose head
    carries the secret's MAC to ``authenticated(sock, nonce, length)``.
    Bounded: MAX_PENDING connections, PER_PEER per address (a new one
    evicts that address's oldest, or the oldest of the busiest address),
    each for AUTH_TIMEOUT s.  ``stats`` counts what happened."""

    def __init__(self, secret, authenticated, *, log=None):
        self.secret, self.authenticated = secret, authenticated
        self.log = log or RateLimitedLog(console)
        self.pending = {}  # socket -> Pending, oldest first
        self.sel = selectors.DefaultSelector()
        self.stats = dict.fromkeys(("connections", "authenticated", "closed",
                                    "rejected", "timed_out", "evicted",
                                    "unauthenticated_bytes"), 0)

    def serve(self, srv, stop=None):
        """Until ``stop`` (an Event, for tests) is set: forever here."""
        srv.setblocking(False)
        self.sel.register(srv, selectors.EVENT_READ)
        while not (stop and stop.is_set()):
            timeout = 0.1 if stop else None
            if self.pending:  # all have the same grace: the oldest ends first
                timeout = min(timeout or AUTH_TIMEOUT, max(0.0, next(iter(
                    self.pending.values())).deadline - time.monotonic()))
            for key, _ in self.sel.select(timeout):
                if key.fileobj is srv:
                    self.accept(srv)
                elif key.fileobj in self.pending:
                    self.read(self.pending[key.fileobj])
            now = time.monotonic()
            for p in [p for p in self.pending.values() if p.deadline <= now]:
                self.drop(p, "timed_out", f"no credentials within "
                          f"{AUTH_TIMEOUT:g} s")

    def accept(self, srv):
        for _ in range(MAX_PENDING):
            try:
                sock, addr = srv.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of file descriptors
                self.log(f"accept: {e}")
                time.sleep(0.1)  # not a busy loop while it lasts
                return
            self.stats["connections"] += 1
            sock.setblocking(False)
            nonce = os.urandom(NONCE)
            try:
                if sock.send(nonce) != NONCE:
                    raise ConnectionError("short send")
            except OSError:  # gone already (a peer's readiness check)
                sock.close()
                continue
            self.make_room(addr[0])
            p = Pending(sock, addr[0], nonce, time.monotonic() + AUTH_TIMEOUT)
            self.pending[sock] = p
            self.sel.register(sock, selectors.EVENT_READ)

    def make_room(self, peer):
        mine = [p for p in self.pending.values() if p.peer == peer]
        if len(mine) >= PER_PEER:
            victim = mine[0]
        elif len(self.pending) >= MAX_PENDING:
            count = {}
            for p in self.pending.values():
                count[p.peer] = count.get(p.peer, 0) + 1
            busiest = max(count, key=count.get)
            victim = next(p for p in self.pending.values()
                          if p.peer == busiest)
        else:
            return
        self.drop(victim, "evicted", "too many unauthenticated connections")

    def read(self, p):
        want = MAC + LENGTH.size - len(p.head)
        try:
            data = p.sock.recv(want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop(p, "closed")
            return
        self.stats["unauthenticated_bytes"] += len(data)
        p.head += data
        if len(p.head) < MAC + LENGTH.size:
            return
        mac, length = p.head[:MAC], p.head[MAC:]
        if not hmac.compare_digest(mac, head_mac(self.secret, p.nonce,
                                                 length)):
            self.drop(p, "rejected", "unauthenticated request")
            return
        self.sel.unregister(p.sock)
        del self.pending[p.sock]
        self.stats["authenticated"] += 1
        p.sock.setblocking(True)
        try:
            self.authenticated(p.sock, p.nonce, length)
        except RuntimeError as e:  # no thread to spare: the client retries
            self.log(f"cannot serve a request now: {e}")
            p.sock.close()

    def drop(self, p, what, why=""):
        self.stats[what] += 1
        if why:
            self.log(f"{why}: dropped a connection from {p.peer}")
        self.sel.unregister(p.sock)
        del self.pending[p.sock]
        p.sock.close()


def handle(sock, nonce, length, secret, config, log):
    """An authenticated head: read and check the request, then run it."""
    with sock:
        (size,) = LENGTH.unpack(length)
        if size > MAX_REQUEST:
            return
        try:
            sock.settimeout(BODY_TIMEOUT)
            data = recv_exact(sock, size + MAC)
        except (OSError, ConnectionError):
            return
        body = data[:size]
        if not hmac.compare_digest(data[size:], body_mac(secret, nonce,
                                                         length, body)):
            log("request body does not match its head: dropped")
            return
        try:
            cmd = json.loads(body)["cmd"]
        except (ValueError, KeyError, TypeError, RecursionError):
            cmd = None
        if not isinstance(cmd, str):
            log("malformed request: dropped")
            return
        sock.settimeout(None)
        try:
            sock.sendall(HEAD.pack(b"a", 0))
        except OSError:
            return
        run_request(sock, cmd, config)
        try:  # FIN now: close() alone waits for the watcher's recv
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def run_request(conn, cmd, config):
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": config["home"],
           "USER": config["user"], "LOGNAME": config["user"],
           "LANG": "C.UTF-8", **config.get("env", {})}
    if config.get("root"):  # an imported image: run in its tree
        who = {"preexec_fn": lambda: enter_root(config)}
    else:
        who = {"cwd": config["cwd"], "user": config["uid"],
               "group": config["gid"], "extra_groups": []}
    proc = subprocess.Popen(
        ["/bin/sh", "-c", cmd], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        start_new_session=True, **who)
    lock = threading.Lock()

    def send(kind, data):
        with lock:
            conn.sendall(HEAD.pack(kind, len(data)) + data)

    def pump(stream, kind):
        try:
            while data := stream.read1(65536):
                send(kind, data)
        except OSError:
            pass

    def watch_client():  # the client hung up: end the command
        try:
            conn.recv(1)
        except OSError:
            pass
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    pumps = [threading.Thread(target=pump, args=(proc.stdout, b"o"),
                              daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, b"e"),
                              daemon=True)]
    for t in pumps:
        t.start()
    threading.Thread(target=watch_client, daemon=True).start()
    status = proc.wait()
    for t in pumps:  # output the command left in its pipes; but a stray
        t.join(2.0)  # descendant holding them must not hold up its status
    code = 128 - status if status < 0 else status
    try:
        send(b"x", str(code).encode())
    except OSError:
        pass


def enter_root(config):
    """In the child, before exec: chroot into the image's tree, then drop
    to the job user (Popen's own user= would drop first)."""
    os.chroot(config["root"])
    os.setgroups([])
    os.setgid(config["gid"])
    os.setuid(config["uid"])
    os.chdir(config["cwd"])


def console(msg):
    try:
        with open("/dev/console", "w") as con:
            con.write(f"apppot-agent: {msg}\n")
    except OSError:
        pass


# ------------------------------------------------------------------ client
class NotAccepted(ConnectionError):
    """The connection ended before the agent accepted the request: nothing
    ran, so trying again is safe."""


def request(host, secret, payload, port=None, out=None):
    """Send one request; relay its output; return the command's status."""
    out = out or {b"o": sys.stdout.buffer, b"e": sys.stderr.buffer}
    with socket.create_connection((host, port or PORT), timeout=30) as sock:
        try:
            nonce = recv_exact(sock, NONCE)
            sock.sendall(request_bytes(secret, nonce, payload))
            kind, _ = HEAD.unpack(recv_exact(sock, HEAD.size))
        except (OSError, ConnectionError) as e:
            raise NotAccepted(str(e)) from e
        if kind != b"a":
            raise ConnectionError(f"unexpected answer {kind!r}")
        sock.settimeout(None)
        while True:
            kind, size = HEAD.unpack(recv_exact(sock, HEAD.size))
            data = recv_exact(sock, size)
            if kind == b"x":
                return int(data)
            stream = out[b"o" if kind == b"o" else b"e"]
            stream.write(data)
            stream.flush()


def rsh(argv):
    """``apppot-rsh [ssh-style options] HOST CMD...`` → CMD's status."""
    args = list(argv)
    while args and args[0].startswith("-"):  # ignore ssh flags (-x, -q...)
        args.pop(0)
    if len(args) < 2:
        print("usage: apppot-rsh HOST COMMAND...", file=sys.stderr)
        return 255
    host, cmd = args[0], " ".join(args[1:])
    with open(SECRET, "rb") as f:
        secret = bytes.fromhex(f.read().decode().strip())
    payload = json.dumps({"cmd": cmd}).encode()
    for attempt in range(RETRIES):
        try:
            return request(host, secret, payload)
        except NotAccepted as e:
            error = e
            time.sleep(0.1 * 2 ** attempt)  # evicted or timed out: again
        except (OSError, ConnectionError) as e:
            error = e
            break
    print(f"apppot-rsh: {host}: {error}", file=sys.stderr)
    return 255


def main(argv):
    if argv[:1] == ["serve"]:
        with open(CONFIG) as f:
            serve(json.load(f))
        return 0
    if argv[:1] == ["rsh"]:
        return rsh(argv[1:])
    print("usage: agent.py serve | agent.py rsh HOST CMD...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
