#!/usr/bin/python3 -IB
"""In-guest remote start for MPI launchers: an authenticated rsh.

Standard library only; installed in images as /usr/lib/apppot/agent.py.

``agent.py serve`` (started by the MPI hook in every appliance) listens on
the job LAN.  ``apppot-rsh HOST CMD...`` (Open MPI's ``plm_rsh_agent``,
Hydra's ``-launcher-exec``) asks HOST's agent to run CMD with ``/bin/sh -c``
as the job user, relays its stdout/stderr and returns its status, like ssh.

Authentication: the agent sends a fresh 32-byte nonce; the client answers
HMAC-SHA256(job secret, nonce + request).  The secret reaches the guests on
their private control disks, never on a command line; a frame injected into
the job's multicast group cannot produce a valid answer, so nothing runs.
If the client goes away, the agent kills the command's process group.
"""

import hashlib
import hmac
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading

PORT = 7711
SECRET = "/run/apppot/mpi/secret"  # noqa: S105  (a path)
CONFIG = "/run/apppot/mpi/agent.json"
NONCE = 32
MAX_REQUEST = 1 << 20
HEAD = struct.Struct("!cI")  # frame: kind (o, e, x), length


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def sign(secret, nonce, payload):
    return hmac.new(secret, nonce + payload, hashlib.sha256).digest()


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
    srv = socket.create_server((config["ip"], PORT), backlog=64)
    threading.Thread(target=accept_loop, args=(srv, secret, config),
                     daemon=True).start()
    report_statuses(stop)  # in the main thread, where SIGTERM lands


def accept_loop(srv, secret, config):
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn, secret, config),
                         daemon=True).start()


def handle(conn, secret, config):
    with conn:
        try:
            nonce = os.urandom(NONCE)
            conn.sendall(nonce)
            mac = recv_exact(conn, 32)
            (size,) = struct.unpack("!I", recv_exact(conn, 4))
            if size > MAX_REQUEST:
                return
            payload = recv_exact(conn, size)
        except (OSError, ConnectionError):
            return
        if not hmac.compare_digest(mac, sign(secret, nonce, payload)):
            log(f"rejected unauthenticated request from {conn.getpeername()}")
            return
        request = json.loads(payload)
        run_request(conn, request["cmd"], config)


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


def log(msg):
    try:
        with open("/dev/console", "w") as con:
            con.write(f"apppot-agent: {msg}\n")
    except OSError:
        pass


# ------------------------------------------------------------------ client
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
    try:
        sock = socket.create_connection((host, PORT), timeout=30)
        sock.settimeout(None)
        nonce = recv_exact(sock, NONCE)
        sock.sendall(sign(secret, nonce, payload)
                     + struct.pack("!I", len(payload)) + payload)
        while True:
            kind, size = HEAD.unpack(recv_exact(sock, HEAD.size))
            data = recv_exact(sock, size)
            if kind == b"x":
                return int(data)
            out = sys.stdout if kind == b"o" else sys.stderr
            out.buffer.write(data)
            out.flush()
    except (OSError, ConnectionError) as e:
        print(f"apppot-rsh: {host}: {e}", file=sys.stderr)
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
