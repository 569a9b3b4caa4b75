"""Shared fixtures: the real kernel and images, job dirs, and a leftover check.

Real-appliance tests never skip: a missing kernel or image is a failure
(CI must notice).  Images and kernels are found the way the tools find them
(``$APPPOT_HOME`` if set, else the user's cache, then the machine-wide one
of scripts/setup.sh; CI: /var/cache/apppot), built beforehand by
``apppot-image build`` and ``apppot-kernel build``.
"""

import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from apppot.images import default_image

VENV_BIN = Path(sys.executable).parent
NOBODY = pwd.getpwnam("nobody")

# This session's mark and temporary directory: every process a test starts
# inherits both, so the leftover check below sees this session's processes
# and run directories only, never those of a second session on the machine
# (which it would otherwise kill).  Sticky and world-writable like /tmp:
# tests run appliances as other users too.
SESSION_MARK = "PYTEST_APPPOT_SESSION"
os.environ.setdefault(SESSION_MARK, f"{os.getpid()}-{time.time_ns()}")
SESSION_TMP = Path(tempfile.mkdtemp(prefix="pytest-apppot-", dir="/dev/shm"))
SESSION_TMP.chmod(0o1777)
os.environ["TMPDIR"] = str(SESSION_TMP)
tempfile.tempdir = None  # gettempdir() follows TMPDIR from now on


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_TMP, ignore_errors=True)


def tool(name):
    path = VENV_BIN / name
    assert path.exists(), f"{name} not installed next to {sys.executable}"
    return str(path)


@pytest.fixture(scope="session")
def image():
    path = default_image("openmpi")  # the tools' own lookup
    assert path.exists(), (f"Open MPI image missing: {path} "
                           "(build it: apppot-image build)")
    return path


@pytest.fixture(scope="session")
def mpich_image():
    path = default_image("mpich")
    assert path.exists(), (f"MPICH image missing: {path} "
                           "(build it: apppot-image build --mpi mpich)")
    return path


@pytest.fixture(scope="session")
def uml_kernel():
    path = shutil.which("linux.uml") or "/usr/bin/linux.uml"
    assert os.path.exists(path), "UML kernel missing (apt-get install " \
        "user-mode-linux)"
    return path


@pytest.fixture(scope="session")
def own_kernel():
    """AppPot's own UML build (SMP, seccomp, no mcast): apppot-kernel build."""
    from apppot.images import cache_homes
    from apppot.kernelbuild import cached_builds

    found = cached_builds()
    assert found, ("AppPot's kernel missing under "
                   f"{' or '.join(map(str, cache_homes()))} "
                   "(build it: apppot-kernel build)")
    return str(found[0][0])


STOCK_KERNEL = "/usr/bin/linux.uml"  # Debian 12's UML 6.1 (mcast, no SMP)


def scratch_dir(prefix, mode=0o755):
    """A directory under /var/tmp (pytest's tmp_path is 0700 root) that
    test users can read; a generator for fixtures: yields it, removes it."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    d.chmod(mode)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def jobdir():
    """A job dir any test user can write (pytest's tmp_path is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="apppot-test-job-", dir="/var/tmp"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_user(user):
    """argv prefix that runs a command as ``user`` (a pwd entry) or as us."""
    if user is None or os.getuid() == user.pw_uid:
        return []
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
            "--clear-groups", "--"]


def finish(proc, timeout, input=None):
    """``proc.communicate()`` that, when the job overruns ``timeout``, stops it
    the way a user would (SIGINT: apppot's teardown runs and says what it
    saw) and fails the test with the job's output, instead of leaving it
    running or killing it silently."""
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        out, err = (b if isinstance(b, str) else b.decode(errors="replace")
                    for b in (out, err))
        pytest.fail(f"{shlex.join(map(str, proc.args))} overran {timeout} s; "
                    f"stdout:\n{out[-3000:]}\nstderr:\n{err[-6000:]}",
                    pytrace=False)
    return out, err


def run_job(argv, *, timeout, input=None, stdin=None, **kw):
    """subprocess.run(argv, capture_output=True) with ``finish``'s timeout;
    stdin is ``input``, else ``stdin``, else /dev/null."""
    if input is not None:
        stdin = subprocess.PIPE
    elif stdin is None:
        stdin = subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)
    out, err = finish(proc, timeout, input)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start(args, *, cwd, user=None, input=None, stdin=None, timeout=120,
          env=None):
    """Run apppot-start; returns CompletedProcess with bytes output."""
    full_env = dict(os.environ)
    if user is not None:
        full_env["HOME"] = str(cwd)
    full_env.update(env or {})
    argv = as_user(user) + [tool("apppot-start"), *args]
    return run_job(argv, cwd=cwd, input=input, stdin=stdin, timeout=timeout,
                   env=full_env)


@pytest.fixture
def nobody():
    return NOBODY


def is_uml(cmdline):
    """A UML kernel process (any build: linux.uml, AppPot's own 'linux')."""
    return any(a.startswith("uml_dir=") for a in cmdline or ())


def _this_session(proc):
    """Started by this test session (its environment carries the mark)?
    A process whose environment cannot be read counts as ours."""
    try:
        return proc.environ().get(SESSION_MARK) == os.environ[SESSION_MARK]
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False


def _ours():
    """UML kernels, helpers, watchdogs, workers, netns holders running."""
    found = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "create_time"]):
        cmd = p.info["cmdline"] or []
        if not _this_session(p):
            continue
        if p.info["name"] in ("linux.uml", "libslirp-helper", "diod") or (
                is_uml(cmd)) or "apppot.watchdog" in cmd \
                or "apppot_mpi.worker" in cmd or "apppot_mpi.hub" in cmd \
                or "apppot.start" in cmd \
                or "apppot_mpi.orchestrator.cli" in cmd \
                or cmd == ["sleep", "infinity"]:
            found[p.info["pid"]] = (p.info["create_time"], " ".join(cmd)[:120])
    return found


def _rundirs():
    tmp = Path(tempfile.gettempdir())
    return {p for p in tmp.glob("apppot-*") if not p.name.startswith(
        "apppot-test-")}


@pytest.fixture(autouse=True)
def no_leftovers():
    """Fail a test that leaves a UML process, watchdog or run dir behind."""
    before, dirs_before = _ours(), _rundirs()
    yield
    deadline = time.monotonic() + 10
    while True:
        left = {pid: v for pid, v in _ours().items() if pid not in before}
        left = {pid: v for pid, v in left.items()
                if psutil.pid_exists(pid) and psutil.Process(pid).status()
                != psutil.STATUS_ZOMBIE}
        dirs = _rundirs() - dirs_before
        if (not left and not dirs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for pid in left:  # clean up so one failure does not cascade
        try:
            os.killpg(os.getpgid(pid), 9)
        except (ProcessLookupError, PermissionError):
            pass
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    assert not left, f"processes left behind: {left}"
    assert not dirs, f"run directories left behind: {dirs}"
