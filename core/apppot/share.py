"""A coherent job directory for several appliances: 9P from a host-side diod.

hostfs keeps each UML kernel's own page cache and i_size, so appliances that
write one file see stale data and O_APPEND writes land on each other.  Over
9P with ``cache=none`` every read, write and lock goes to one server on the
host: reads are fresh, ``O_APPEND`` opens are appends on the host (atomic per
write) and fcntl locks are shared, which MPI-IO needs.

The server is Debian's ``diod``, run as the caller on the launcher's
loopback; each appliance reaches it through its own libslirp-helper (host
loopback = 10.0.2.2).  The 9P modules are taken from the kernel's own module
tree and handed over on the control disk, so any image works with any kernel
that has them.
"""

import logging
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .spec import SLIRP_HOST

log = logging.getLogger(__name__)

MODULE_DIRS = ("/usr/lib/uml/modules",)
# load order: dependencies first (9p.ko depends on 9pnet, fscache, netfs)
MODULES = ("fs/netfs/netfs.ko", "fs/fscache/fscache.ko", "net/9p/9pnet.ko",
           "net/9p/9pnet_fd.ko", "fs/9p/9p.ko")


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

    def guest(self):
        opts = ",".join([
            "trans=tcp", f"port={self.port}", "version=9p2000.L", "cache=none",
            f"aname={self.jobdir}", "access=client", f"uname={self.user}",
            "msize=65560"])
        return {"type": "9p", "server": SLIRP_HOST, "options": opts,
                "modules": list(self.modules)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NinePServer:
    """diod serving ``jobdir`` on 127.0.0.1 to the caller's uid only."""

    def __init__(self, jobdir, uid, logfile):
        self.jobdir = str(jobdir)
        self.uid = uid
        self.logfile = logfile
        self.port = None
        self.proc = None

    @staticmethod
    def available():
        return shutil.which("diod")

    def start(self, watchdog=None, preexec=None):
        diod = self.available()
        if not diod:
            raise ConfigError("--jobdir-fs 9p: diod is not installed",
                              hint="install Debian's diod package, or use "
                              "--jobdir-fs hostfs")
        self.port = free_port()
        # attach is by user name (the kernel sends no numeric uid first), so
        # diod looks the caller up in the host's user database; -u lets only
        # the caller attach; -n: the socket is on a private loopback
        argv = [diod, "-f", "-n", "-u", str(self.uid), "-l",
                f"127.0.0.1:{self.port}", "-e", self.jobdir, "-L",
                str(self.logfile)]
        log.debug("executing: %s", shlex.join(argv))
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     start_new_session=True,
                                     preexec_fn=preexec)  # noqa: PLW1509
        if watchdog:
            watchdog.track(self.proc.pid, Path(self.logfile).parent)
        self._wait_listening()
        return self.port

    def _wait_listening(self, timeout=10.0):
        import time  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(f"diod exited with status {self.proc.returncode}",
                                  hint=f"see {self.logfile}")
            if self._listening():
                return
            time.sleep(0.05)
        raise ConfigError("diod did not start listening",
                          hint=f"see {self.logfile}")

    def _listening(self):
        """Is diod's port open?  (/proc/PID/net/tcp: works from outside the
        network namespace diod may run in.)"""
        try:
            with open(f"/proc/{self.proc.pid}/net/tcp") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            return False
        want = f"0100007F:{self.port:04X}"
        return any(r.split()[1] == want and r.split()[3] == "0A" for r in rows)

    def stop(self, watchdog=None):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if watchdog:
            watchdog.untrack(self.proc.pid)
