"""A coherent job directory for several appliances: 9P from a host-side diod.

hostfs keeps each UML kernel's own page cache and i_size, so appliances that
write one file see stale data and O_APPEND writes land on each other.  Over
9P with ``cache=none`` every read, write and lock goes to one server on the
host: reads are fresh, ``O_APPEND`` opens are appends on the host (atomic per
write) and fcntl locks are shared, which MPI-IO needs.

The server is Debian's ``diod``, run as the caller on the loopback of a
private network namespace (only the job's helpers are in it: 9P has no
authentication but the user name); each appliance reaches it through its own
libslirp-helper, started in that namespace too (host loopback = 10.0.2.2).  The 9P
modules are taken from the kernel's own module tree and handed over on the
control disk, so any image works with any kernel that has them.
"""

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .process import ManagedProcess
from .spec import SLIRP_HOST

log = logging.getLogger(__name__)

MODULE_DIRS = ("/usr/lib/uml/modules",)
# load order: dependencies first (9p.ko depends on 9pnet, fscache, netfs)
MODULES = ("fs/netfs/netfs.ko", "fs/fscache/fscache.ko", "net/9p/9pnet.ko",
           "net/9p/9pnet_fd.ko", "fs/9p/9p.ko")


NETFS_9P = (6, 6)  # 9P moved onto netfs; cache modes changed meaning
APPEND_PATCH = "9p-appenders-keep-o-append"  # AppPot's 7.2 series, 0003


def cache_options(version, patches=()):
    """9P cache options for a kernel (its version tuple and patch names):
    every read and write goes to the server, so appends and MPI-IO stay
    coherent across appliances, and, where the kernel allows it without
    losing appends, files can be mapped MAP_SHARED (written back on msync
    or munmap, as on NFS).  Before 6.6 ``cache=mmap`` is exactly that.
    Since the netfs rework it caches reads and writes (``directio`` undoes
    that) and drops O_APPEND on the server, so concurrent appenders
    overwrite each other: only a kernel with AppPot's 9P patch gets it;
    others get ``cache=none`` (no shared writable mappings)."""
    if tuple(version) < NETFS_9P:
        return ("cache=mmap",)
    if any(APPEND_PATCH in name for name in patches):
        return ("cache=mmap", "directio")
    return ("cache=none",)


def module_paths(kernel):
    """The 9P modules built for ``kernel`` (a Kernel): [] when 9P is built
    in, None when neither."""
    if kernel.config.get("CONFIG_9P_FS") == "y":
        return []
    for base in MODULE_DIRS:
        root = Path(base) / kernel.version / "kernel"
        paths = [root / m for m in MODULES]
        if all(p.exists() for p in paths):
            return paths
    return None


@dataclass(frozen=True)
class ShareSpec:
    """What the guest needs to mount the job dir over 9P (pure data)."""

    jobdir: str
    port: int
    modules: tuple  # file names on the control disk, in load order
    uid: int
    gid: int
    user: str
    cache: tuple = ("cache=none",)  # cache_options() for the kernel

    def guest(self):
        opts = ",".join([
            "trans=tcp", f"port={self.port}", "version=9p2000.L",
            *self.cache, f"aname={self.jobdir}", "access=client",
            f"uname={self.user}", "msize=65560"])
        return {"type": "9p", "server": SLIRP_HOST, "options": opts,
                "modules": list(self.modules)}


DIOD_DIRS = ("/usr/sbin", "/sbin")  # not on a Debian user's PATH


def find_diod(environ=None):
    """diod on PATH, else where Debian installs it."""
    environ = os.environ if environ is None else environ
    path = os.pathsep.join([environ.get("PATH", os.defpath), *DIOD_DIRS])
    return shutil.which("diod", path=path)


class NinePServer(ManagedProcess):
    """diod serving ``jobdir`` to the caller's uid only, on 127.0.0.1 of a
    private network namespace (``enter`` joins it): nobody but the job's
    own slirp links can reach it, since 9P attaches by user name alone.

    It listens on a port the kernel picks; the port is read from diod's own
    listening socket (so no other process can stand in for it), and the job
    fails, naming it, if diod dies while the job runs."""

    def __init__(self, jobdir, uid, logfile, *, watchdog=None, enter=None):
        diod = find_diod()
        if not diod:
            raise ConfigError("--jobdir-fs 9p: diod is not installed",
                              hint="install Debian's diod package, or use "
                              "--jobdir-fs hostfs")
        if enter is None:
            raise ConfigError("the job dir server needs a private network "
                              "namespace", hint="use --jobdir-fs hostfs")
        # -n: no munge authentication (reachable only from the namespace);
        # -u: only the caller may attach (by name: diod looks the caller up
        # in the host's user database)
        argv = [diod, "-f", "-n", "-u", str(uid), "-l", "127.0.0.1:0",
                "-e", str(jobdir), "-L", str(logfile)]
        super().__init__("the job dir's 9P server (diod)", argv,
                         watchdog=watchdog, rundir=Path(logfile).parent,
                         log_path=logfile, preexec_fn=enter)
        self.jobdir = str(jobdir)
        self.port = None

    def start(self, note=" (in the job's private network namespace)"):
        super().start(note)
        self.port = self._wait_listening()
        return self.port

    def _wait_listening(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(f"diod exited with status "
                                  f"{self.proc.returncode}",
                                  hint=f"see {self.log_path}")
            port = listening_port(self.proc.pid)
            if port:
                return port
            time.sleep(0.02)
        raise ConfigError("diod did not start listening",
                          hint=f"see {self.log_path}")


def socket_inodes(pid):
    """Inodes of the sockets process ``pid`` holds open."""
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def listening_port(pid, address="0100007F"):
    """The TCP port on 127.0.0.1 that process ``pid`` itself listens on (a
    listener is matched to the process by its socket inode), or None.
    /proc/PID/net/tcp shows the process's own network namespace."""
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            rows = [r.split() for r in f.read().splitlines()[1:]]
    except OSError:
        return None
    mine = socket_inodes(pid)
    for r in rows:
        local, state, inode = r[1], r[3], int(r[9])
        if state == "0A" and inode in mine and local.startswith(address + ":"):
            return int(local.split(":")[1], 16)
    return None
