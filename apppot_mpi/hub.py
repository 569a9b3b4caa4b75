"""The job LAN's hub: one per node, joining its appliances' ``vec0``
interfaces (UML's vector driver, ``fd`` transport over a datagram socket
pair each) and, in multi-node jobs, the other nodes' hubs.

Why: the legacy ``mcast`` transport is gone from UML since 6.16 and caps
the MTU at 1500; the vector driver is in every kernel, takes MTU 9000, and
a node's own appliances never touch the network at all.

Forwarding is static: the launcher knows every appliance's MAC and node,
so a frame goes to the one local port or to the network by its
destination, and broadcast/multicast floods (never back where it came
from).  Between nodes, frames ride UDP multicast on the job's group (TTL 1)
as ``"APHB" node(1) counter(8) tag(16) frame``, the tag a keyed BLAKE2b
over header and frame under a per-job key, so a host that can reach the
group still cannot inject frames; the counter (per sending hub, from 1)
and a sliding window of WINDOW counters per sender (as IPsec and WireGuard
keep) make a captured frame useless to replay: a counter seen before, or
older than the window, is dropped and counted.  Frames are authenticated,
not encrypted: whoever can reach the group can read them.  Ports that
cannot take a frame at once queue up to BACKLOG frames, then drop (as a
switch does; TCP recovers).

Run as ``python -m apppot_mpi.hub`` with the sockets inherited and its
configuration as one JSON line on stdin; "ready" on stdout; EOF on stdin
ends it, printing frame and CPU counters as JSON.
"""

import hashlib
import hmac
import json
import os
import resource
import select
import socket
import struct
import sys
from collections import deque

MAGIC = b"APHB"
HEADER = struct.Struct("!4sBQ")  # magic, sending node, its frame counter
TAG = 16
BACKLOG = 1024
NET = -1  # the port index of the network
WINDOW = 1024  # counters per sender a late (reordered) frame may lag by
MASK = (1 << WINDOW) - 1


def tag(key, header, frame):
    h = hashlib.blake2b(key=key, digest_size=TAG)
    h.update(header)
    h.update(frame)
    return h.digest()


class ReplayWindow:
    """One sender's counters seen so far: the highest, and a bitmap of the
    WINDOW below it (bit k: counter top - k arrived).  Accepts each counter
    once, in any order within the window; anything older is refused."""

    __slots__ = ("top", "seen")

    def __init__(self):
        self.top, self.seen = 0, 1  # counters start at 1: 0 counts as seen

    def accept(self, n):
        if n > self.top:
            shift = n - self.top
            self.seen = ((self.seen << shift) | 1) & MASK \
                if shift < WINDOW else 1
            self.top = n
            return True
        age = self.top - n  # never 1 << age for an old counter: huge
        if age >= WINDOW or self.seen >> age & 1:
            return False  # too old, or seen before
        self.seen |= 1 << age
        return True


class Hub:
    """Forwarding state and counters (the loop is ``serve``)."""

    def __init__(self, ports, table, *, net=None, key=b"", node=0):
        self.ports = ports  # local sockets, index = port
        self.table = table  # MAC bytes -> local port index or NET
        self.net, self.key, self.node = net, key, node
        self.sent = 0  # our frame counter on the network
        self.windows = {}  # sending node -> ReplayWindow
        self.backlog = [deque() for _ in ports]
        self.stats = {"frames_in": 0, "bytes_in": 0, "frames_out": 0,
                      "net_out": 0, "net_in": 0, "dropped": 0, "forged": 0,
                      "replayed": 0, "queued": 0}
        self.ep = None

    # ------------------------------------------------------- forwarding
    def forward(self, frame, src):
        """Deliver one frame that came in on port ``src`` (NET = network)."""
        st = self.stats
        st["frames_in"] += 1
        st["bytes_in"] += len(frame)
        # broadcast / multicast (and unknown destinations) flood
        dest = None if frame[0] & 1 else self.table.get(bytes(frame[:6]))
        if dest is None:
            for i in range(len(self.ports)):
                if i != src:
                    self.send_local(i, frame)
            if src != NET:
                self.send_net(frame)
        elif dest == NET:
            if src != NET:
                self.send_net(frame)
        elif dest != src:
            self.send_local(dest, frame)

    def send_local(self, i, frame):
        q = self.backlog[i]
        if not q:
            try:
                self.ports[i].send(frame)
                self.stats["frames_out"] += 1
                return
            except BlockingIOError:
                if self.ep:
                    self.ep.modify(self.ports[i].fileno(),
                                   select.EPOLLIN | select.EPOLLOUT)
            except OSError:  # the appliance is gone: its teardown follows
                self.stats["dropped"] += 1
                return
        if len(q) >= BACKLOG:
            self.stats["dropped"] += 1
            return
        q.append(bytes(frame))
        self.stats["queued"] += 1

    def flush(self, i):
        q, sock = self.backlog[i], self.ports[i]
        while q:
            try:
                sock.send(q[0])
            except BlockingIOError:
                return
            except OSError:
                q.clear()
                break
            q.popleft()
            self.stats["frames_out"] += 1
        if self.ep:
            self.ep.modify(sock.fileno(), select.EPOLLIN)

    def send_net(self, frame):
        if self.net is None:
            return
        sock, addr = self.net
        self.sent += 1
        header = HEADER.pack(MAGIC, self.node, self.sent)
        try:
            sock.sendmsg([header, tag(self.key, header, frame), frame], [], 0,
                         addr)
            self.stats["net_out"] += 1
        except OSError:
            self.stats["dropped"] += 1

    def receive_net(self, data):
        """A datagram from the group: check, then deliver locally."""
        n = HEADER.size
        if len(data) < n + TAG + 14 or bytes(data[:4]) != MAGIC:
            self.stats["forged"] += 1
            return
        header, frame = bytes(data[:n]), data[n + TAG:]
        if not hmac.compare_digest(bytes(data[n:n + TAG]), tag(
                self.key, header, frame)):
            self.stats["forged"] += 1
            return
        _, sender, counter = HEADER.unpack(header)
        if sender == self.node:
            return  # our own (multicast loop is off; this is defensive)
        window = self.windows.get(sender)
        if window is None:
            window = self.windows[sender] = ReplayWindow()
        if not window.accept(counter):
            self.stats["replayed"] += 1
            return
        self.stats["net_in"] += 1
        self.forward(frame, NET)

    # -------------------------------------------------------------- loop
    def serve(self, stop_fd):
        self.ep = ep = select.epoll()
        by_fd = {}
        for i, s in enumerate(self.ports):
            s.setblocking(False)
            ep.register(s.fileno(), select.EPOLLIN)
            by_fd[s.fileno()] = i
        if self.net:
            self.net[0].setblocking(False)
            ep.register(self.net[0].fileno(), select.EPOLLIN)
            by_fd[self.net[0].fileno()] = NET
        ep.register(stop_fd, select.EPOLLIN)
        buf = bytearray(65536)
        view = memoryview(buf)
        while True:
            for fd, ev in ep.poll():
                if fd == stop_fd:
                    if not os.read(stop_fd, 4096):
                        return
                    continue
                src = by_fd[fd]
                if ev & select.EPOLLOUT:
                    self.flush(src)
                if not ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                    continue
                sock = self.net[0] if src == NET else self.ports[src]
                for _ in range(64):  # batch, but stay fair to other ports
                    try:
                        n = sock.recv_into(buf)
                    except BlockingIOError:
                        break
                    except OSError:
                        ep.unregister(fd)
                        break
                    if src == NET:
                        self.receive_net(view[:n])
                    elif n >= 14:
                        self.forward(view[:n], src)


def net_socket(group, port, ttl):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((group, port))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                 socket.inet_aton(group) + bytes(4))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    return s


def main():
    conf = json.loads(sys.stdin.buffer.readline())
    ports = [socket.socket(fileno=fd) for fd in conf["fds"]]
    table = {bytes.fromhex(mac.replace(":", "")): port
             for mac, port in conf["table"].items()}
    net = None
    if conf.get("net"):
        n = conf["net"]
        net = (net_socket(n["group"], n["port"], n["ttl"]),
               (n["group"], n["port"]))
    hub = Hub(ports, table, net=net, key=bytes.fromhex(conf.get("key", "")),
              node=conf.get("node", 0))
    print("ready", flush=True)
    hub.serve(sys.stdin.fileno())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({**hub.stats, "cpu_s": round(ru.ru_utime + ru.ru_stime,
                                                  3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------ launcher side
class HubProcess:
    """The launcher's handle on its node's hub: one datagram socket pair per
    local appliance (``uml_fds[i]`` goes to appliance i's UML), supervised
    like an appliance by ``appliance.wait_all`` (the job fails if it dies)."""

    name = "LAN hub"

    def __init__(self, count, table, *, net=None, key="", node=0, dog=None,
                 rundir=None):
        import logging
        import shlex
        import subprocess
        import time

        log = logging.getLogger(__name__)
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                 for _ in range(count)]
        for a, b in pairs:
            for s in (a, b):  # room for a burst of 9000-byte frames
                for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                    s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        argv = [sys.executable, "-m", "apppot_mpi.hub"]
        log.debug("executing: %s", shlex.join(argv))
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            pass_fds=[a.fileno() for a, _ in pairs], start_new_session=True)
        if dog:
            dog.track(self.proc.pid, rundir or "/nonexistent", keep=True)
        self.dog = dog
        conf = {"fds": [a.fileno() for a, _ in pairs], "table": table,
                "net": net, "key": key, "node": node}
        self.proc.stdin.write(json.dumps(conf).encode() + b"\n")
        self.proc.stdin.flush()
        for a, _ in pairs:
            a.close()
        self.uml_fds = [b.detach() for _, b in pairs]
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.close()
            from apppot.errors import ConfigError

            raise ConfigError("the LAN hub did not start", hint="run with "
                              "--debug to see its error")
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.started_at = self.ready_at = time.monotonic()
        self.exit_code = self.failure = None
        self.rank_status = {}
        self.stats = None
        self._out = b""

    def fileno(self):
        return self.proc.stdout.fileno()

    def poll_notices(self, timeout):
        from apppot.process import readable

        r = readable([self], timeout)
        if r:
            try:
                data = os.read(self.fileno(), 65536)
            except BlockingIOError:
                return False
            self._out += data
            if not data:  # EOF: the hub is exiting; let poll() see it
                try:
                    self.proc.wait(2)
                except Exception:  # noqa: BLE001
                    self.proc.kill()
        return bool(r)

    def result(self):
        from apppot import status as st
        from apppot.errors import ApplianceError

        raise ApplianceError(f"the job LAN's hub exited (status "
                             f"{self.proc.returncode}) while the job ran",
                             status=st.GUEST_CRASHED,
                             hint="run with --debug for its error")

    def log_tail(self):
        return ""

    def close(self):
        """Stop the hub; its frame and CPU counters land in ``stats``."""
        for fd in getattr(self, "uml_fds", ()):
            try:
                os.close(fd)
            except OSError:
                pass
        self.uml_fds = []
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()
        os.set_blocking(self.proc.stdout.fileno(), True)
        out = self._out + self.proc.stdout.read()
        self.proc.stdout.close()
        if self.dog:
            self.dog.untrack(self.proc.pid)
        for line in out.splitlines():
            if line.startswith(b"{"):
                self.stats = json.loads(line)
        return self.stats
