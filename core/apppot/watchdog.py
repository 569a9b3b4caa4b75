"""Watchdog: if the launcher dies (even by SIGKILL), kill its appliances.

The launcher starts ``python -m apppot.watchdog`` in its own session with a
pipe on stdin and writes ``track PGID KEEP DIR`` / ``untrack PGID`` lines,
and ``dir DIR`` / ``undir DIR`` for directories of its own (a node's job
directory).  When the pipe reaches EOF while groups are still tracked, the
launcher is gone: the watchdog SIGKILLs those UML process groups (UML's
helpers survive their main process) and removes their run directories.
"""

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)


class Watchdog:
    """The launcher's handle on its watchdog process."""

    def __init__(self):
        argv = [sys.executable, "-m", "apppot.watchdog"]
        log.debug("executing: %s", shlex.join(argv))
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     start_new_session=True, close_fds=True)

    def _send(self, line):
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            log.warning("watchdog is gone; appliances may outlive a killed "
                        "launcher")

    def track(self, pgid, rundir, keep=False):
        self._send(f"track {pgid} {int(keep)} {rundir}")

    def untrack(self, pgid):
        self._send(f"untrack {pgid}")

    def track_dir(self, path):
        """Remove ``path`` too if the launcher dies."""
        self._send(f"dir {path}")

    def untrack_dir(self, path):
        self._send(f"undir {path}")

    def close(self):
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def kill_groups(pgids, wait=5.0):
    """SIGKILL every group at once (throw-away appliances: nothing to save,
    and one at a time would add up), then wait for them to go."""
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + wait
    alive = set(pgids)
    while alive and time.monotonic() < end:
        for pgid in list(alive):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                alive.discard(pgid)
        time.sleep(0.02)


def main():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only EOF on stdin counts
    tracked, dirs = {}, set()
    for line in sys.stdin.buffer:
        word, _, rest = line.decode().rstrip("\n").partition(" ")
        if word == "track":
            pgid, keep, rundir = rest.split(" ", 2)
            tracked[int(pgid)] = (rundir, keep == "1")
        elif word == "untrack":
            tracked.pop(int(rest), None)
        elif word == "dir":
            dirs.add(rest)
        elif word == "undir":
            dirs.discard(rest)
    kill_groups(list(tracked))  # the launcher died
    for rundir, keep in tracked.values():
        if not keep:
            dirs.add(rundir)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
