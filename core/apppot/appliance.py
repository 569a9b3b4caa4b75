"""Start one appliance, relay its stdio, wait for its status, tear it down.

Side effects live here (and in ``watchdog``); the argv comes from ``spec``.
An ``Appliance`` owns: a private run directory (COW file, control disk,
umid dir, notify socket, boot log), the UML process group, relay threads.
``close()`` always leaves nothing behind, whatever happened.
"""

import ctypes
import io
import logging
import os
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import status as st
from .errors import ApplianceError, ConfigError
from .process import readable
from .spec import Channels

log = logging.getLogger(__name__)

NOTIFY = struct.Struct("=IIiI")  # magic, version, type, len (mconsole.h)
MCONSOLE_MAGIC = 0xCAFEBABE
N_SOCKET, N_PANIC, N_USER = 0, 1, 3
FRAME = struct.Struct("!I")  # framed stdin, see init.unframe
CONTROL_MIN = 64 << 10  # keeps the kernel's partition probe inside the disk
STOP_GRACE = 2.0
SUN_PATH_MAX = 107  # AF_UNIX socket paths (UML's mconsole socket)


@dataclass
class Notice:
    """One message from the guest (``mconsole=notify:``)."""

    kind: int
    text: str
    at: float


def parse_notice(data, at=0.0):
    """Decode a notify datagram; None if it is not one."""
    if len(data) < NOTIFY.size:
        return None
    magic, _version, kind, length = NOTIFY.unpack_from(data)
    if magic != MCONSOLE_MAGIC:
        return None
    text = data[NOTIFY.size:NOTIFY.size + length].split(b"\0")[0]
    return Notice(kind, text.decode(errors="replace"), at)


def check_socket_path(rundir, umid):
    """UML's mconsole socket lives at RUNDIR/UMID/mconsole: refuse run
    directories whose socket path an AF_UNIX address cannot hold."""
    path = str(Path(rundir) / umid / "mconsole")
    if len(path.encode()) > SUN_PATH_MAX - 6:  # room for UML's own suffix
        raise ConfigError(f"run directory path too long for a UNIX socket: "
                          f"{str(rundir)!r}", hint="set TMPDIR to a shorter "
                          "path, e.g. /tmp")
    return path


def check_rundir_room(umid, prefix="apppot-"):
    """Before anything starts: will a run directory from ``make_rundir(prefix)``
    hold UML's socket for ``umid``?  (mkdtemp adds 8 characters.)"""
    return check_socket_path(Path(tempfile.gettempdir()) / (prefix + "x" * 8),
                             umid)


def write_control_disk(path, spec_json, changes=None, files=()):
    """The control disk is a plain tar (block aligned), padded to 64 KiB.

    ``files``: extra (name, host path) members, e.g. kernel modules.
    """
    with open(path, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("spec.json")
            info.size, info.mode = len(spec_json), 0o600
            tar.addfile(info, io.BytesIO(spec_json))
            if changes:
                tar.add(str(changes), arcname="changes.tar.gz", recursive=False)
            for name, src in files:
                tar.add(str(src), arcname=name, recursive=False)
        if raw.tell() < CONTROL_MIN:
            raw.truncate(CONTROL_MIN)
    os.chmod(path, 0o400)


def choose_memdir(environ=None):
    """The directory UML will back guest RAM with (same rule as UML's)."""
    environ = os.environ if environ is None else environ
    for var in ("TMPDIR", "TMP", "TEMP"):
        if environ.get(var):
            return Path(environ[var]), var
    if _is_tmpfs("/dev/shm"):
        return Path("/dev/shm"), "/dev/shm"
    return Path("/tmp"), "/tmp"


def _is_tmpfs(path):
    try:
        with open("/proc/mounts") as f:
            return any(line.split()[1] == path and line.split()[2] == "tmpfs"
                       for line in f)
    except OSError:
        return False


def check_memdir(mem_bytes, environ=None):
    memdir, source = choose_memdir(environ)
    try:
        vfs = os.statvfs(memdir)
    except OSError as e:
        raise ConfigError(f"guest memory directory {str(memdir)!r} ({source}) "
                          "is not usable", hint="set TMPDIR to a writable "
                          "directory on tmpfs") from e
    if vfs.f_flag & os.ST_NOEXEC:
        raise ConfigError(f"guest memory directory {str(memdir)!r} ({source}) "
                          "is mounted noexec", hint="UML maps guest RAM "
                          "executable there: set TMPDIR to a tmpfs without "
                          "noexec")
    if not os.access(memdir, os.W_OK | os.X_OK):
        raise ConfigError(f"guest memory directory {str(memdir)!r} ({source}) "
                          "is not writable", hint="set TMPDIR to a writable "
                          "directory")
    free = vfs.f_bavail * vfs.f_frsize
    if free < mem_bytes:
        raise ConfigError(f"guest memory directory {str(memdir)!r} ({source}) "
                          f"has {free >> 20} MiB free, --mem needs "
                          f"{mem_bytes >> 20} MiB", hint="lower --mem or set "
                          "TMPDIR to a larger tmpfs")
    return memdir


def check_max_map_count(mem_bytes, path="/proc/sys/vm/max_map_count"):
    """Warn when one guest process could hit the host's mapping limit."""
    try:
        with open(path) as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return None
    # the guest kernel keeps some RAM, so a process cannot map all of --mem
    pages = mem_bytes // 4096 - (32 << 20) // 4096
    if pages > limit:
        want = 1 << (mem_bytes // 4096 + 4096).bit_length()
        log.warning("--mem %d MiB: vm.max_map_count=%d lets one guest process "
                    "map only %d MiB; processes using more may be killed",
                    mem_bytes >> 20, limit, limit * 4096 >> 20)
        log.warning("hint: ask the admin for: sysctl -w vm.max_map_count=%d",
                    want)
        return want
    return None


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork


def _child_setup(enter=None):
    def setup():
        if enter is not None:
            enter()
        # If the launcher dies, the kernel kills UML's main process; the
        # watchdog then kills the rest of its process group.
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a panic dumps core
    return setup


class Appliance:
    """One running UML appliance.  Use as a context manager."""

    STOP_GRACE = STOP_GRACE

    def __init__(self, rundir, *, name="appliance", keep=False, verbose=False,
                 log_path=None, watchdog=None):
        self.rundir = Path(rundir)
        self.name = name
        self.keep = keep
        self.verbose = verbose
        self.log_path = log_path
        self.watchdog = watchdog
        self.proc = None
        self.helper = None
        self.started_at = None
        self.ready_at = None
        self.booted_at = None
        self.exit_code = None
        self.failure = None
        self.panic = None
        self.rank_status = {}  # MPI rank -> exit status, from the guest
        self._threads = []
        self._stdin_go = threading.Event()
        self._sock = None
        self._log_files = []
        self._log_tail = []
        self._log_lock = threading.Lock()

    # ----------------------------------------------------------------- start
    def start(self, spec, env, *, stdout_fd=1, stderr_fd=2, stdin_fd=None,
              interactive=False, enter=None):
        """Spawn UML for ``spec`` (whose channels must be ours: see
        ``make_channels``) and start the relays.  ``enter``: a function the
        child runs before exec (joining the job's network namespace)."""
        check_socket_path(spec.uml_dir, spec.umid)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(spec.notify))
        argv = spec.argv()
        log.debug("executing: %s", shlex.join(argv))
        for key in ("TMPDIR", "LD_PRELOAD"):
            if key in env:
                log.debug("env: %s=%s", key, env[key])
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._console_w,
            stderr=self._console_w, pass_fds=spec.fds(), env=env,
            preexec_fn=_child_setup(enter),  # noqa: PLW1509 (prctl, setns)
            cwd=self.rundir)
        if self.watchdog:
            self.watchdog.track(self.proc.pid, self.rundir, keep=self.keep)
        for fd in self._child_ends:
            os.close(fd)
        self._child_ends = []
        self._log_files = [open(path, "ab") for path in  # noqa: SIM115
                           (self.rundir / "console.log", self.log_path) if path]
        self._relay(self._console_r, self._log_sink, "console")
        if not interactive:
            self._relay(self._out_r, _fd_sink(stdout_fd), "stdout")
            self._relay(self._err_r, _fd_sink(stderr_fd), "stderr")
            self._start_stdin(stdin_fd)
        return self

    def make_channels(self, interactive=False, terminal=None):
        """Pipes (or the pty slave) that become the guest's channels."""
        self._console_r, self._console_w = os.pipe()
        self._child_ends = [self._console_w]
        if interactive:
            self._child_ends.append(terminal)
            return Channels(console=self._console_w, terminal=terminal)
        self._out_r, out_w = os.pipe()
        self._err_r, err_w = os.pipe()
        in_r, self._in_w = os.pipe()
        self._child_ends += [out_w, err_w, in_r]
        return Channels(console=self._console_w, stdout=out_w, stderr=err_w,
                        stdin=in_r)

    def start_slirp(self, helper, preexec=None):
        """User-mode NAT: libslirp-helper on one end of a datagram socket
        pair, the other end (returned) for UML's vector ``fd`` transport.
        ``preexec`` can move the helper into another network namespace."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        argv = [helper, "--fd", str(ours.fileno()), "--exit-with-parent",
                "--disable-ipv6"]
        log.debug("executing: %s", shlex.join(argv))
        self.helper = subprocess.Popen(
            argv, pass_fds=(ours.fileno(),), stdin=subprocess.DEVNULL,
            stdout=self._console_w, stderr=self._console_w,
            start_new_session=True, preexec_fn=preexec)  # noqa: PLW1509
        if self.watchdog:
            self.watchdog.track(self.helper.pid, self.rundir, keep=True)
        ours.close()
        fd = theirs.detach()
        self._child_ends.append(fd)
        return fd

    def _relay(self, src, sink, name):
        def run():
            try:
                while data := os.read(src, 65536):
                    sink(data)
            except OSError:
                pass
            finally:
                os.close(src)
        t = threading.Thread(target=run, name=f"{self.name}-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def _log_sink(self, data):
        with self._log_lock:
            self._log_tail = (self._log_tail + data.decode(
                errors="replace").splitlines())[-40:]
            for f in self._log_files:
                f.write(data)
                f.flush()
        if self.verbose:
            os.write(2, data)

    def _start_stdin(self, stdin_fd):
        """Framed copy of our stdin once the guest has its tty open.

        Data written earlier would sit unseen: UML's edge-triggered epoll
        only notices input that arrives after the guest opens the tty.
        """
        in_w = self._in_w

        def run():
            try:
                self._stdin_go.wait()
                if stdin_fd is not None:
                    while data := os.read(stdin_fd, 65536):
                        _write_all(in_w, FRAME.pack(len(data)) + data)
                _write_all(in_w, FRAME.pack(0))
                # keep the pipe open: an EOF would hang up the guest tty
                while self.proc.poll() is None:
                    time.sleep(0.2)
            except OSError:
                pass
            finally:
                os.close(in_w)
        t = threading.Thread(target=run, name=f"{self.name}-stdin", daemon=True)
        t.start()

    # ------------------------------------------------------------------ wait
    def poll_notices(self, timeout):
        """Read guest notices for up to ``timeout`` s; True if any came."""
        if not readable([self._sock], timeout):
            return False
        while True:
            try:
                data = self._sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            notice = parse_notice(data, time.monotonic())
            if notice:
                self._handle(notice)

    def _handle(self, n):
        log.debug("%s: notice %d %r", self.name, n.kind, n.text)
        if n.kind == N_SOCKET and self.booted_at is None:
            self.booted_at = n.at
        elif n.kind == N_PANIC:
            self.panic = n.text
        elif n.kind == N_USER and n.text.startswith("apppot:"):
            word, _, rest = n.text[7:].partition(" ")
            try:
                self._handle_user(word, rest, n.at)
            except ValueError:  # a guest cannot make the launcher fail
                log.warning("%s: malformed notice ignored: %r", self.name,
                            n.text[:80])

    def _handle_user(self, word, rest, at):
        if word == "ready":
            self.ready_at = at
        elif word == "stdin":
            self._stdin_go.set()
        elif word == "exit":
            self.exit_code = _status(rest)
        elif word == "fail":
            self.failure = rest
        elif word == "rank":
            rank, _, code = rest.partition(" ")
            rank = int(rank)
            if not 0 <= rank < 1 << 24:
                raise ValueError(rank)
            self.rank_status[rank] = _status(code)

    def wait(self, *, boot_timeout=60.0, timeout=None, interrupted=None):
        """Wait until UML exits; return the run's status (see ``status``).
        ``close()`` (the context manager) tears down on every exit path."""
        return wait_all([self], boot_timeout=boot_timeout, timeout=timeout,
                        interrupted=interrupted)

    def result(self):
        rc = self.proc.returncode
        if self.failure is not None:
            raise ApplianceError(f"{self.name}: guest init failed: "
                                 f"{self.failure}", status=st.BOOT_FAILED,
                                 hint="see the boot log (-v)",
                                 details=self.log_tail())
        if self.exit_code is not None:
            if rc != self.exit_code:
                log.debug("%s: UML exit %s, guest said %s", self.name, rc,
                          self.exit_code)
            return self.exit_code
        booted = self.ready_at is not None
        what = f"guest kernel panic: {self.panic}" if self.panic else (
            f"UML exited with status {rc}")
        raise ApplianceError(
            f"{self.name}: {'appliance crashed' if booted else 'boot failed'}"
            f": {what}", status=st.GUEST_CRASHED if booted else st.BOOT_FAILED,
            hint="see the boot log (-v)", details=self.log_tail())

    def log_tail(self, lines=15):
        with self._log_lock:
            return "\n".join(self._log_tail[-lines:])

    # ------------------------------------------------------------- teardown
    def kill_now(self):
        """SIGKILL the whole group without waiting, for appliances whose
        state does not matter (throw-away COW): many then die in parallel
        and ``close()`` only reaps them."""
        if self.proc is not None:
            _kill_group(self.proc.pid)

    def stop(self):
        """SIGTERM the UML process group, SIGKILL after a grace period."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # UML calls setsid(): its pid is its pgid
        for sig, grace in ((signal.SIGTERM, self.STOP_GRACE),
                           (signal.SIGKILL, 5.0)):
            if not _group_alive(pgid) and self.proc.poll() is not None:
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                try:
                    self.proc.send_signal(sig)  # before UML's setsid()
                except ProcessLookupError:
                    pass
            end = time.monotonic() + grace
            while time.monotonic() < end and (
                    self.proc.poll() is None or _group_alive(pgid)):
                time.sleep(0.02)
        self.proc.poll()

    def close(self):
        """Tear everything down; safe to call more than once."""
        if self.proc is not None:
            if self.proc.poll() is None or _group_alive(self.proc.pid):
                self.stop()
            _kill_group(self.proc.pid)  # helpers can outlive the main pid
        if self.helper is not None:
            _kill_group(self.helper.pid)
            self.helper.wait()
            if self.watchdog:
                self.watchdog.untrack(self.helper.pid)
        self._stdin_go.set()
        for t in self._threads:
            t.join(2.0)
        for f in self._log_files:
            f.close()
        self._log_files = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in getattr(self, "_child_ends", []):
            try:
                os.close(fd)
            except OSError:
                pass
        self._child_ends = []
        if self.watchdog and self.proc is not None:
            self.watchdog.untrack(self.proc.pid)
        if not self.keep:
            shutil.rmtree(self.rundir, ignore_errors=True)

    def fileno(self):
        """The guest notice socket (for select)."""
        return self._sock.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rank_statuses(apps):
    """{MPI rank: exit status} as the appliances' guests reported them."""
    out = {}
    for app in apps:
        out.update(getattr(app, "rank_status", {}))
    return out


def _exited(apps, mpi):
    """Which MPI ranks had exited: tells a hung program from a hung exit."""
    if mpi is None:
        return ""
    done = rank_statuses(apps)
    return "; ranks exited: " + (", ".join(
        f"{r} (status {c})" for r, c in sorted(done.items())) or "none")


def wait_all(apps, *, boot_timeout, timeout=None, interrupted=None,
             rank_grace=None):
    """Wait for ``apps[0]`` to exit and return its status; raise an
    ApplianceError (naming the appliance) as soon as any appliance fails to
    boot in time or exits first, on ``timeout``, or when ``interrupted()``
    returns a signal number.  The caller tears the appliances down.

    With ``rank_grace``, a job in which an MPI rank has failed gets that
    many seconds to end by itself (its launcher exits), so that ranks
    failing together all report, then ends with the lowest failed rank's
    status.

    Anything with the same surface (fileno, poll_notices, proc, started_at,
    ready_at, exit_code, failure, result, log_tail, name) can stand in for
    an appliance: apppot-mpirun's handle on another node's worker does."""
    t0 = min(a.started_at for a in apps)
    failed_at = None
    while True:
        for app in readable(apps, 0.1):
            app.poll_notices(0)
        now = time.monotonic()
        signum = interrupted() if interrupted else None
        if signum:
            raise ApplianceError(f"interrupted by signal {signum}",
                                 status=st.from_signal(signum))
        if timeout and now - t0 > timeout:
            raise ApplianceError(f"timeout after {timeout:g} s"
                                 f"{_exited(apps, rank_grace)}",
                                 status=st.TIMEOUT)
        for app in apps:
            if app.ready_at is None and app.exit_code is None and (
                    app.failure is None and app.proc.poll() is None
                    and now - t0 > boot_timeout):
                raise ApplianceError(
                    f"{app.name}: not booted after {boot_timeout:g} s",
                    status=st.BOOT_FAILED, details=app.log_tail(),
                    hint="see the boot log (-vv); raise --boot-timeout")
        for i, app in enumerate(apps):
            if app.proc.poll() is None:
                continue
            app.poll_notices(0)
            code = app.result()  # raises with the appliance's name
            if i == 0:
                return code
            raise ApplianceError(f"{app.name}: appliance exited (status "
                                 f"{code}) while the job ran",
                                 status=st.GUEST_CRASHED)
        if rank_grace is None:
            continue
        statuses = rank_statuses(apps)
        if failed_at is None and any(statuses.values()):
            failed_at = now
        if failed_at is not None and now - failed_at > rank_grace and (
                apps[0].exit_code is None):  # else: already powering off
            rank = st.lowest_failed_rank(statuses)
            raise ApplianceError(
                f"rank {rank} failed (status {statuses[rank]}) and the job "
                f"did not end within {rank_grace:g} s: stopped",
                status=statuses[rank])


def _status(text):
    """An exit status from a guest notice (0-255), or ValueError."""
    code = int(text)
    if not 0 <= code <= 255:
        raise ValueError(code)
    return code


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_alive(pgid):
    """Does the process group have a member that is not a zombie?  (UML's
    orphaned helpers stay zombies until init reaps them.)"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp
            return True
    return False


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fd_sink(fd):
    if callable(fd):
        return fd

    def sink(data):
        try:
            _write_all(fd, data)
        except BrokenPipeError:
            pass
    return sink


def make_rundir(prefix="apppot-"):
    """A private (0700) run directory under $TMPDIR (or /tmp)."""
    return Path(tempfile.mkdtemp(prefix=prefix))
