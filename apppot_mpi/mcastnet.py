"""The per-job virtual LAN: UML's ``mcast`` transport on a private group.

Planning is pure: ``plan_lan`` turns a job key and rank count into the
multicast group, port and TTL, a locally administered MAC and an IP per rank,
the UML argument and guest commands, and the MPI host file.  Side effects are
confined to the bottom: the multicast route check, the interface lookup
(netifaces, else psutil), and ``NetnsHolder``, a private network namespace
with multicast routed to lo for the job's helpers and, on one node, its LAN.
"""

import ctypes
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from apppot.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_SUBNET = "10.253.0.0/16"
GROUP_NET = ipaddress.ip_network("239.192.0.0/14")  # organisation-local scope
PORT_BASE, PORT_SPAN = 20000, 40000
MCAST_ROUTE = "224.0.0.0/4"


@dataclass(frozen=True)
class RankNet:
    rank: int
    mac: str
    ip: str
    hostname: str


@dataclass(frozen=True)
class LanPlan:
    """Everything about one job's LAN (pure data)."""

    group: str
    port: int
    ttl: int
    prefix: int
    ranks: tuple  # RankNet per appliance

    def guest_net(self, index, device="eth0"):
        """The guest's interface on the LAN (configured by guest init)."""
        return {"device": device,
                "address": f"{self.ranks[index].ip}/{self.prefix}"}

    def hosts(self):
        return [[r.ip, r.hostname] for r in self.ranks]

    def hostfile(self, flavour, slots=1):
        """MPI host file; ``slots``: one count, or one per appliance."""
        counts = slots if isinstance(slots, list | tuple) else [slots] * len(
            self.ranks)
        if flavour == "mpich":
            return "".join(f"{r.ip}:{n}\n" for r, n in zip(
                self.ranks, counts, strict=True))
        return "".join(f"{r.ip} slots={n}\n" for r, n in zip(
            self.ranks, counts, strict=True))

    def describe(self):
        lines = [f"LAN group {self.group} port {self.port} ttl {self.ttl}"]
        lines += [f"  rank {r.rank}: {r.hostname} {r.ip} {r.mac}"
                  for r in self.ranks]
        return "\n".join(lines)


class Transport:
    """How the appliances' Ethernet frames meet."""

    name = ""
    kernel_feature = ""  # apppot.kernel feature the guest kernel needs
    device = "eth0"  # the guest's interface on the job LAN
    hub = False  # needs a per-node hub process (apppot_mpi.hub)

    def uml_args(self, plan, index):
        """UML arguments; ``{fd}`` stands for the hub socket's number."""
        raise NotImplementedError

    def guest_net(self, plan, index):
        return plan.guest_net(index, self.device)


class McastTransport(Transport):
    """UML's legacy ``mcast`` (kernels before 6.16): every appliance joins
    the job's group itself; MTU 1500."""

    name = "mcast"
    kernel_feature = "mcast"

    def uml_args(self, plan, index):
        r = plan.ranks[index]
        return (f"{self.device}=mcast,{r.mac},{plan.group},{plan.port},"
                f"{plan.ttl}",)


class HubTransport(Transport):
    """The vector driver's ``fd`` transport to a hub on each node (see
    apppot_mpi.hub); MTU 9000.  Guest init renames vec0 to eth0."""

    name = "hub"
    kernel_feature = "vector"
    hub = True
    mtu = 9000

    def uml_args(self, plan, index):
        r = plan.ranks[index]
        return (f"vec0:transport=fd,fd={{fd}},mac={r.mac},mtu={self.mtu}",)

    def guest_net(self, plan, index):
        return {"device": "vec0", "name": self.device,
                "address": f"{plan.ranks[index].ip}/{plan.prefix}"}


TRANSPORTS = {t.name: t for t in (HubTransport, McastTransport)}


def choose_transport(name, kern):
    """``--transport``: hub, mcast, or auto (the hub where the kernel has
    the vector driver, else mcast)."""
    if name and name != "auto":
        transport = TRANSPORTS[name]()
        kern.require(transport.kernel_feature)
        return transport
    for cls in TRANSPORTS.values():
        if kern.has(cls.kernel_feature):
            return cls()
    kern.require(McastTransport.kernel_feature, HubTransport.kernel_feature)
    return None


def check_open_lan(transport, *, multi, private, allowed):
    """``mcast`` carries the whole LAN (MPI data, the MPI launchers' control
    connections) as plain multicast: whoever can join the group reads and
    injects frames; only the agent authenticates.  Refuse it where anyone
    but the job can join (across nodes, or one node without a private
    network namespace) unless ``--allow-open-lan`` accepts that."""
    if transport.name != "mcast" or allowed or (private and not multi):
        return
    where, hint = ("across nodes", "the cluster network") if multi else (
        "without a private network namespace", "this host")
    raise ConfigError(
        f"LAN transport mcast {where}: the job's LAN (MPI data, launcher "
        f"control) would be open to anyone on {hint} who joins its "
        "multicast group", hint="use --transport hub (frames between nodes "
        "are authenticated)" + ("" if multi else ", or let apppot-mpirun "
                                "make a private namespace (no --no-netns)")
        + "; --allow-open-lan accepts the open LAN")


def job_key(job_id, user, salt=None):
    """Job id and user plus randomness: two jobs never share a LAN."""
    salt = secrets.token_hex(8) if salt is None else salt
    return hashlib.sha256(f"{user}\0{job_id}\0{salt}".encode()).digest()


def plan_lan(key, count, *, subnet=DEFAULT_SUBNET, ttl=0, prefix_name="r"):
    """Plan ``count`` appliances on one LAN derived from ``key`` (bytes)."""
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as e:
        raise ConfigError(f"--subnet: not a network: {subnet!r}",
                          hint="e.g. --subnet 10.253.0.0/16") from e
    if net.version != 4 or net.num_addresses < count + 2:
        raise ConfigError(f"--subnet {subnet} has no room for {count} "
                          "appliances", hint="use a larger IPv4 network")
    offset = int.from_bytes(key[:4], "big") % GROUP_NET.num_addresses
    group = GROUP_NET.network_address + offset
    if int(group) & 0xFF in (0, 255):  # avoid .0/.255, easy to misfilter
        group += 1 if int(group) & 0xFF == 0 else -1
    port = PORT_BASE + int.from_bytes(key[4:6], "big") % PORT_SPAN
    job = key[6:9]
    ranks = []
    for i in range(count):
        mac = ":".join(f"{b:02x}" for b in (0x02, *job, i >> 8, i & 0xFF))
        ranks.append(RankNet(i, mac, str(net.network_address + i + 1),
                             f"{prefix_name}{i}"))
    return LanPlan(str(group), port, ttl, net.prefixlen, tuple(ranks))


# ------------------------------------------------------------ side effects
def interface_addresses():
    """{interface: [IPv4 addresses]}: netifaces if present, else psutil.

    netifaces is archived upstream; this is the one place that uses it.
    """
    try:
        import netifaces  # noqa: PLC0415

        return {name: [a["addr"] for a in netifaces.ifaddresses(name).get(
            netifaces.AF_INET, [])] for name in netifaces.interfaces()}
    except ImportError:
        import psutil  # noqa: PLC0415

        return {name: [a.address for a in addrs if a.family == socket.AF_INET]
                for name, addrs in psutil.net_if_addrs().items()}


def multicast_route(group, port):
    """(source address, interface) the host routes ``group`` through.

    A UDP connect() does the route lookup without sending anything.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((group, port))
        except OSError as e:
            if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENODEV):
                raise ConfigError(
                    f"no multicast route for the job's LAN group {group}",
                    hint="add one (ip route add 224.0.0.0/4 dev IFACE) or let "
                    "apppot-mpirun use a private network namespace") from e
            raise
        source = s.getsockname()[0]
    for name, addrs in interface_addresses().items():
        if source in addrs:
            return source, name
    if source == "0.0.0.0":  # noqa: S104  (a route to lo has no source)
        return source, "lo"
    return source, "?"


CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP, IFF_MULTICAST = 0x8913, 0x8914, 0x1, 0x1000


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork


def _make_private_netns():
    """Move this single-threaded process (a forked child) into a new network
    namespace, and a user namespace too when not root (mapping our own uid
    and gid to themselves), with lo up and multicast routed to lo.
    Returns 0, or the errno of the step that failed."""
    uid, gid = os.getuid(), os.getgid()
    if _LIBC.unshare(CLONE_NEWNET | (CLONE_NEWUSER if uid != 0 else 0)) != 0:
        return ctypes.get_errno() or errno.EPERM
    try:
        if uid != 0:
            for path, text in (("/proc/self/setgroups", "deny"),
                               ("/proc/self/uid_map", f"{uid} {uid} 1"),
                               ("/proc/self/gid_map", f"{gid} {gid} 1")):
                with open(path, "w") as f:
                    f.write(text)
        _link_up("lo")
        _add_route_to_lo(MCAST_ROUTE)
    except OSError as e:
        return e.errno or errno.EPERM
    return 0


def private_netns_possible():
    """Can this user make a private network namespace here?  ``(True, "")``
    or ``(False, why)``.  Tried in a throw-away child, so this process never
    ends up half-way into a namespace."""
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 1
        try:
            code = min(_make_private_netns(), 255)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return True, ""
    what = "user and network" if os.getuid() != 0 else "network"
    return False, f"cannot create a {what} namespace: {os.strerror(code)}"


class NetnsHolder:
    """A private network namespace (lo up, multicast routed to lo) kept
    alive by a holder process.  The job's helpers that must not be on the
    host's loopback (the job dir's 9P server and the appliances' slirp
    links), and on one node the whole LAN (UML and the hub), run in it;
    ``enter()`` is the preexec function that joins it.  The launcher itself
    stays where it is."""

    def __init__(self, watchdog=None, rundir=None):
        import subprocess  # noqa: PLC0415

        self.user = os.getuid() != 0
        argv = ["sleep", "infinity"]
        log.debug("executing: %s (in a new network namespace)", " ".join(argv))
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_holder_setup)  # noqa: PLW1509 (unshare)
        self.watchdog = watchdog
        if watchdog:
            watchdog.track(self.proc.pid, rundir or "/nonexistent", keep=True)
        self._fds = []
        deadline = time.monotonic() + 5
        mine = os.readlink("/proc/self/ns/net")
        try:
            while os.readlink(f"/proc/{self.proc.pid}/ns/net") == mine:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise OSError("the namespace holder did not start")
                time.sleep(0.005)
            kinds = (("user", CLONE_NEWUSER),) if self.user else ()
            for kind, flag in (*kinds, ("net", CLONE_NEWNET)):
                self._fds.append((os.open(f"/proc/{self.proc.pid}/ns/{kind}",
                                          os.O_RDONLY), flag))
        except OSError as e:
            self.close()
            raise ConfigError(f"could not create a private network namespace "
                              f"({e.strerror or e})", hint="use --no-netns "
                              "and --jobdir-fs hostfs, or ask the admin to "
                              "allow user namespaces") from None

    def enter(self):
        """In a forked child before exec: join the namespaces (opened in the
        parent, so the child only makes system calls)."""
        for fd, flag in self._fds:
            if _LIBC.setns(fd, flag) != 0:
                raise OSError(ctypes.get_errno(), "setns")

    def pid(self):
        return self.proc.pid

    def close(self):
        for fd, _ in self._fds:
            os.close(fd)
        self._fds = []
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.watchdog:
            self.watchdog.untrack(self.proc.pid)


def _holder_setup():
    # in the holder child: a new net (and user) namespace with lo up
    if _make_private_netns() != 0:
        os._exit(1)


def _link_up(ifname):
    import fcntl  # noqa: PLC0415

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", ifname.encode(), 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack(
            "16sH14x", ifname.encode(), flags | IFF_UP | IFF_MULTICAST))


def _add_route_to_lo(cidr):
    """``ip route add CIDR dev lo`` through rtnetlink."""
    net = ipaddress.ip_network(cidr)
    rtm_newroute, nlm_f_request, nlm_f_ack, nlm_f_create = 24, 1, 4, 0x400
    rtmsg = struct.pack("BBBBBBBBI", socket.AF_INET, net.prefixlen, 0, 0,
                        254, 3, 253, 1, 0)  # main table, boot, link, unicast
    attrs = (struct.pack("HH", 8, 1) + net.network_address.packed  # RTA_DST
             + struct.pack("HHI", 8, 4, socket.if_nametoindex("lo")))  # OIF
    body = rtmsg + attrs
    msg = struct.pack("IHHII", 16 + len(body), rtm_newroute,
                      nlm_f_request | nlm_f_ack | nlm_f_create, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                       socket.NETLINK_ROUTE) as nl:
        nl.send(msg)
        reply = nl.recv(4096)
    err = struct.unpack_from("i", reply, 16)[0]
    if err not in (0, -errno.EEXIST):
        raise OSError(-err, f"adding route {cidr} dev lo: {os.strerror(-err)}")


# ------------------------------------------------- multi-node multicast probe
PROBE_INTERVAL = 0.02
PROBE_MAGIC = b"APPR"
PROBE_TAG = 16


def probe_key(secret):
    """The probe's key, from the job secret (hex) every node's plan holds."""
    return hashlib.sha256(b"apppot-probe\0" + secret.encode()).digest()


def probe_limit(count):
    """Bytes a real probe datagram among ``count`` nodes stays under (its
    lists grow by one short entry per node); anything larger is dropped
    unread."""
    return min(65000, 512 + 96 * count)


def _probe_tag(key, body):
    return hashlib.blake2b(body, key=key, digest_size=PROBE_TAG).digest()


def _number(x):
    return type(x) in (int, float) and math.isfinite(x)


@dataclass
class ProbeState:
    """One node's view of a probe among ``count`` nodes (pure logic).

    Every node multicasts ``"APPR" tag body`` every 20 ms, the body
    ``{"n": nonce, "k": me, "t": send time, "heard": [...], "echo": {peer:
    [peer's send time, held]}}`` and the tag a keyed BLAKE2b of it under
    the job's probe key.  A datagram that is too large, unauthenticated,
    malformed or older than one already heard from its sender is dropped
    (and counted) before any of it is parsed or used.  A node is done when
    it heard every other node and every other node heard it; the echoes
    give multicast round-trip times without synchronised clocks."""

    nonce: str
    me: int
    count: int
    key: bytes
    heard_at: dict = field(default_factory=dict)  # peer -> first heard (s)
    peers_heard: dict = field(default_factory=dict)  # peer -> nodes it heard
    last: dict = field(default_factory=dict)  # peer -> (its t, our receive)
    rtts: dict = field(default_factory=dict)  # peer -> [seconds]
    sent: int = 0
    received: int = 0
    rejected: int = 0  # datagrams dropped (forged, malformed, replayed)
    send_error: str = ""

    def message(self, now):
        self.sent += 1
        echo = {str(p): [t, now - got] for p, (t, got) in self.last.items()}
        body = json.dumps({"n": self.nonce, "k": self.me, "t": now,
                           "heard": sorted(self.heard_at), "echo": echo},
                          separators=(",", ":")).encode()
        return PROBE_MAGIC + _probe_tag(self.key, body) + body

    def receive(self, data, now, since=0.0):
        msg = self._check(data)
        if msg is None:
            self.rejected += 1
            return
        peer, t, heard, echo = msg
        self.received += 1
        self.heard_at.setdefault(peer, now - since)
        self.peers_heard[peer] = heard
        self.last[peer] = (t, now)
        if echo:
            self.rtts.setdefault(peer, []).append(now - echo[0] - echo[1])

    def _check(self, data):
        """(peer, t, heard, echo to us) of an authentic, well-formed, fresh
        datagram from another node of this probe; else None."""
        n = len(PROBE_MAGIC) + PROBE_TAG
        if not n < len(data) <= probe_limit(self.count) or \
                data[:len(PROBE_MAGIC)] != PROBE_MAGIC:
            return None
        body = data[n:]
        if not hmac.compare_digest(data[len(PROBE_MAGIC):n],
                                   _probe_tag(self.key, body)):
            return None
        try:  # authentic: one of our nodes made it; still check each field
            msg = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(msg, dict) or msg.get("n") != self.nonce:
            return None  # a previous start's probe under the same key
        peer, t = msg.get("k"), msg.get("t")
        heard, echo = msg.get("heard"), msg.get("echo")
        if type(peer) is not int or not 0 <= peer < self.count or \
                peer == self.me or not _number(t) or \
                not isinstance(heard, list) or not isinstance(echo, dict):
            return None
        if peer in self.last and t <= self.last[peer][0]:
            return None  # replayed (or reordered): we have a newer one
        heard = {h for h in heard if type(h) is int}
        mine = echo.get(str(self.me))
        if mine is not None and not (isinstance(mine, list) and len(
                mine) == 2 and all(_number(x) for x in mine)):
            return None
        return peer, t, heard, mine

    def done(self):
        others = set(range(self.count)) - {self.me}
        return set(self.heard_at) >= others and all(
            self.me in self.peers_heard.get(p, ()) for p in others)

    def report(self, elapsed, error=""):
        return {"node": self.me, "heard": sorted(self.heard_at),
                "heard_ms": {str(p): round(t * 1e3, 2)
                             for p, t in self.heard_at.items()},
                "rtt_ms": {str(p): round(sorted(v)[len(v) // 2] * 1e3, 3)
                           for p, v in self.rtts.items()},
                "sent": self.sent, "received": self.received,
                "rejected": self.rejected, "complete": self.done(),
                "elapsed_ms": round(elapsed * 1e3, 1),
                "send_error": self.send_error, "error": error}


def probe_port(port):
    """The probe's port: next to the LAN's, so the appliances' UML never
    sees probe datagrams as frames."""
    return port + 1 if port < 65535 else port - 1


def run_probe(group, port, nonce, me, count, *, key, ttl=1, timeout=5.0,
              linger=0.2):
    """Multicast probe among ``count`` nodes (run concurrently on each);
    returns ``ProbeState.report``, with ``error`` set if this node could
    not take part at all.  Keeps answering for ``linger`` s after this
    node is done, so slower peers can finish too."""
    state = ProbeState(nonce, me, count, key)
    t0 = time.monotonic()
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as e:
        return state.report(0.0, f"probe socket: {e.strerror or e}")
    with s:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # room to ride out a flood of junk until it is read and dropped
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((group, port))  # only this group's datagrams
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                         socket.inet_aton(group) + bytes(4))  # any interface
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        except OSError as e:
            return state.report(0.0, f"joining {group} port {port}: "
                                f"{e.strerror or e}")
        s.setblocking(False)
        limit = probe_limit(count)
        end = t0 + timeout
        done_at = None
        next_send = t0
        while True:
            now = time.monotonic()
            if now >= next_send:
                try:
                    s.sendto(state.message(now), (group, port))
                except OSError as e:  # no route: keep listening, report it
                    state.send_error = e.strerror or str(e)
                next_send = now + PROBE_INTERVAL
            if done_at is None and state.done():
                done_at = now
            if now >= end or (done_at is not None and now - done_at >= linger):
                break
            r, _, _ = select.select([s], [], [], max(0.0, min(
                next_send, end) - now))
            for _ in range(256) if r else ():  # a batch, then send on time
                try:  # one byte over the limit tells an oversized datagram
                    data = s.recv(limit + 1)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # e.g. an ICMP error queued on the socket
                    continue
                state.receive(data, time.monotonic(), t0)
        return state.report((done_at or time.monotonic()) - t0)


def _valid_report(rep, node, count):
    """A report as ``ProbeState.report`` makes them, from node ``node``."""
    def numbers(d):
        return isinstance(d, dict) and all(
            isinstance(k, str) and _number(v) for k, v in d.items())
    return (isinstance(rep, dict) and rep.get("node") == node
            and isinstance(rep.get("heard"), list)
            and all(type(h) is int and 0 <= h < count for h in rep["heard"])
            and numbers(rep.get("rtt_ms")) and all(
                type(rep.get(k)) is int for k in ("sent", "received"))
            and _number(rep.get("elapsed_ms"))
            and isinstance(rep.get("send_error", ""), str)
            and isinstance(rep.get("error", ""), str))


def probe_failures(reports, names):
    """Which node did not hear which, from every node's report (pure);
    report i is node i's (an empty or malformed one is a failure)."""
    missing = []
    for me, rep in enumerate(reports):
        if not _valid_report(rep, me, len(names)):
            missing.append(f"{names[me]}: no usable probe report")
        elif rep.get("error"):
            missing.append(f"{names[me]} could not probe: {rep['error']}")
        elif rep.get("send_error"):
            missing.append(f"{names[me]} cannot send to the group: "
                           f"{rep['send_error']}")
    for me, rep in enumerate(reports):
        if not _valid_report(rep, me, len(names)) or rep.get("error"):
            continue
        for peer in range(len(names)):
            if peer != me and peer not in rep["heard"]:
                missing.append(f"{names[me]} did not hear {names[peer]}")
    return missing
