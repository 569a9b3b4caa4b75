"""Helper processes a launcher starts and supervises (the job dir's 9P
server, ...), and the one way to wait on many file descriptors.

A ``ManagedProcess`` starts in its own session with its argv logged, is
tracked by the watchdog, is stopped TERM → grace → KILL and reaped, and has
the surface ``appliance.wait_all`` supervises: if it exits while the job
runs, the job fails with a one-line reason naming it.
"""

import logging
import os
import select
import shlex
import signal
import subprocess
import time
from pathlib import Path

from . import status as st
from .errors import ApplianceError

log = logging.getLogger(__name__)


def readable(objs, timeout):
    """The objects of ``objs`` (with ``fileno()``) readable within
    ``timeout`` seconds.  poll(), not select(): a launcher with many
    appliances has descriptors beyond select()'s limit of 1024."""
    poller = select.poll()
    by_fd = {}
    for obj in objs:
        fd = obj if isinstance(obj, int) else obj.fileno()
        by_fd.setdefault(fd, []).append(obj)
        poller.register(fd, select.POLLIN | select.POLLPRI)
    try:
        events = poller.poll(max(0.0, timeout) * 1000)
    except InterruptedError:
        return []
    return [obj for fd, _ in events for obj in by_fd.get(fd, ())]


class ManagedProcess:
    """One supervised helper process (see the module docstring)."""

    def __init__(self, name, argv, *, watchdog=None, rundir=None, grace=2.0,
                 log_path=None, **popen_kw):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.watchdog = watchdog
        self.rundir = rundir
        self.grace = grace
        self.log_path = Path(log_path) if log_path else None
        self.popen_kw = popen_kw
        self.proc = None
        self.pidfd = None
        self.started_at = self.ready_at = None
        self.exit_code = self.failure = None
        self.rank_status = {}

    def start(self, note=""):
        log.debug("executing: %s%s", shlex.join(self.argv), note)
        kw = {"stdin": subprocess.DEVNULL, **self.popen_kw}
        self.proc = subprocess.Popen(self.argv, start_new_session=True, **kw)
        self.pidfd = os.pidfd_open(self.proc.pid)
        if self.watchdog:
            self.watchdog.track(self.proc.pid, self.rundir or "/nonexistent",
                                keep=True)
        self.started_at = self.ready_at = time.monotonic()
        return self

    # ----------------------------------------------- supervised surface
    def fileno(self):
        """Readable once the process has exited (a pidfd)."""
        return self.pidfd

    def poll_notices(self, timeout):
        return bool(readable([self], timeout)) if timeout else False

    def log_tail(self, lines=10):
        if not self.log_path:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def result(self):
        """Called once the process has exited while the job ran."""
        raise ApplianceError(
            f"{self.name} exited (status {self.proc.returncode}) while the "
            "job ran", status=st.GUEST_CRASHED, details=self.log_tail(),
            hint=f"see {self.log_path}" if self.log_path else
            "run with --debug")

    # ------------------------------------------------------------ stop
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        """TERM the process group, KILL after the grace period, reap."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, self.grace), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        try:  # anything it left in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if self.watchdog:
            self.watchdog.untrack(self.proc.pid)
