"""AppPot's kernel patches, seen from inside real appliances: what each
patch exposes to guest user space cannot be abused, clock reads are right
and stay out of the guest kernel, and guest behaviour is unchanged
(signals, threads, fork/exec storms, strace and gdb) in both modes.

strace and gdb are not in the default images (they would grow every
appliance's image and page cache for a debugging need): the session
builds one extra image with them (``debug_image``, cached by its inputs
like every image, ~40 s the first time).
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import NOBODY, start, tool

from apppot.config import apppot_home
from apppot.images import cache_homes
from apppot.kernelbuild import cached_builds

pytestmark = [pytest.mark.uml, pytest.mark.one_kernel]

PROGS = Path(__file__).with_name("progs")
MODES = ("on", "off")  # --seccomp: seccomp mode, ptrace mode


@pytest.fixture(scope="session")
def patched_kernel():
    """AppPot's kernel built with its patch series (apppot-kernel build)."""
    found = [p for p, m in cached_builds() if m.get("patches")]
    assert found, (f"no patched kernel under {' or '.join(map(str, cache_homes()))}"
                   " (build it: apppot-kernel build)")
    return str(found[0])


@pytest.fixture(scope="session")
def progs(tmp_path_factory):
    """guestcheck and behave, compiled on the host (guests run Debian 12 too),
    with symbols for gdb."""
    out = tmp_path_factory.mktemp("kpatch-progs")
    for name, extra in (("guestcheck", []), ("behave", ["-pthread"])):
        subprocess.run(["cc", "-O2", "-g", "-Wall", "-o", str(out / name),
                        str(PROGS / f"{name}.c"), *extra], check=True)
    return out


@pytest.fixture(scope="session")
def debug_image():
    """An image with strace and gdb (no MPI), built once per cache."""
    out = apppot_home() / "images" / "apppot-debug.img"
    r = subprocess.run([tool("apppot-image"), "build", "--mpi", "none",
                        "--packages", "strace,gdb", "--output", str(out)],
                       capture_output=True, text=True, timeout=1200,
                       stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture
def job(jobdir, progs):
    for name in ("guestcheck", "behave"):
        shutil.copy2(progs / name, jobdir / name)
    return jobdir


def run_in(job, kernel, mode, argv, *, image=None, user=NOBODY, timeout=300):
    args = ["--kernel", kernel, "--seccomp", mode]
    if image:
        args += ["--image", str(image)]
    r = start([*args, "--", *argv], cwd=job, user=user, timeout=timeout)
    out = r.stdout.decode(errors="replace")
    err = r.stderr.decode(errors="replace")
    return r.returncode, out, err


def ok_lines(out):
    assert "FAIL" not in out, out
    return [line for line in out.splitlines() if line.startswith("ok ")]


# ------------------------------------------------------- 0002: vDSO clocks
@pytest.mark.parametrize("mode", MODES)
def test_clock_reads_agree_with_the_guest_kernel(job, patched_kernel, mode):
    """Every vDSO clock lies between two system calls of the same clock,
    resolutions match, CPU-time clocks are the guest's, and MONOTONIC never
    goes backwards over many reads (2 million, or 3 s) and a sleep."""
    code, out, err = run_in(job, patched_kernel, mode, ["./guestcheck",
                                                        "clocks"])
    assert code == 0, out + err
    lines = ok_lines(out)
    assert sum(line.startswith("ok clock ") for line in lines) == 7
    reads = int(re.search(r"^ok monotonic (\d+) reads", out, re.M).group(1))
    assert reads >= 10000


@pytest.mark.parametrize("mode, traps", [("on", False), ("off", True)])
def test_clock_reads_stay_out_of_the_guest_kernel(job, patched_kernel,
                                                  debug_image, mode, traps):
    """strace in the guest sees every system call the guest kernel gets: in
    seccomp mode 10,000 clock reads (time.time, time.monotonic) make none;
    in ptrace mode the vDSO falls back to the system call for each."""
    code, out, err = run_in(job, patched_kernel, mode, [
        "strace", "-f", "-c", "-e", "trace=clock_gettime,gettimeofday,time",
        "python3", "-c", "import time\nfor _ in range(5000): time.time(); "
        "time.monotonic()"], image=debug_image)
    assert code == 0, out + err
    m = re.search(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?"
                  r"clock_gettime$", err, re.M)
    calls = int(m.group(1)) if m else 0
    if traps:
        assert calls >= 10000, err
    else:
        assert calls < 100, err  # start-up's own, if any


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("root", [False, True], ids=["user", "guest-root"])
def test_vdso_data_page_is_read_only(job, patched_kernel, mode, root):
    """The [vvar] page the patch adds: a store faults, mprotect(PROT_WRITE)
    is refused, /proc/self/mem and ptrace pokes are refused, and the
    clock still agrees afterwards; as the user and as guest root."""
    argv = ["./guestcheck", "vvar"]
    code, out, err = run_in(job, patched_kernel, mode,
                            ["sudo", *argv] if root else argv)
    assert code == 0, out + err
    lines = ok_lines(out)
    for what in ("store into vvar faulted", "mprotect refused",
                 "/proc/self/mem write refused", "ptrace poke refused",
                 "clock unchanged"):
        assert any(what in line for line in lines), out


# --------------------------------------------------- 0001: spin-then-park
@pytest.mark.parametrize("mode", MODES)
def test_tampering_with_the_handoff_word_harms_nobody(job, patched_kernel,
                                                      mode):
    """The stub data page is writable from guest user space (upstream's
    known issue); the patch's FUTEX_WAITER bit and stub spin budget live
    there.  A process that flips the bit and asks for an endless spin while
    making system calls and sleeping gets right answers and finishes, and
    the appliance goes on working (a second program runs, status 0)."""
    code, out, err = run_in(job, patched_kernel, mode, [
        "sh", "-c", "./guestcheck handoff && ./behave target"], timeout=240)
    assert code == 0, out + err
    lines = ok_lines(out)
    assert any(line.startswith("ok stub data at 0x") for line in lines), out
    assert "ok 2000 system calls with the hand-off word tampered" in lines
    assert out.count("ppid ") == 3


# ------------------------------------------------- guest behaviour, 0001+
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("what", ["signals", "threads", "storm"])
def test_guest_behaviour_is_unchanged(job, patched_kernel, mode, what):
    code, out, err = run_in(job, patched_kernel, mode, ["./behave", what])
    assert code == 0, out + err
    expected = {"signals": 5, "threads": 2, "storm": 2}[what]
    assert len(ok_lines(out)) == expected, out


@pytest.mark.parametrize("mode", MODES)
def test_programs_run_without_address_randomization(job, patched_kernel,
                                                    mode):
    """setarch -R (as gdb runs its programs): the stack top sits right at
    STACK_TOP, below the vDSO and its data pages, not on them."""
    code, out, err = run_in(job, patched_kernel, mode, [
        "setarch", "-R", "./behave", "target"])
    assert code == 0, out + err
    assert out.count("ppid ") == 3, out


@pytest.mark.parametrize("mode", MODES)
def test_strace_in_the_guest(job, patched_kernel, debug_image, mode):
    """ptrace inside the guest (PTRACE_SYSCALL, -f across fork and exec)."""
    code, out, err = run_in(job, patched_kernel, mode, [
        "strace", "-f", "-qq", "-e", "trace=execve,getppid,exit_group",
        "sh", "-c", "./behave target; true"], image=debug_image)
    assert code == 0, out + err
    assert out.count("ppid ") == 3
    assert len(re.findall(r"execve\(\"\./behave\"", err)) == 1, err
    # behave's three calls (the shell before it may make its own)
    assert len(re.findall(r"\[pid +\d+\] getppid\(\)\s+= \d+", err)) == 3, err
    assert re.search(r"exit_group\(0\)", err), err


@pytest.mark.parametrize("mode", MODES)
def test_gdb_in_the_guest(job, patched_kernel, debug_image, mode):
    """Breakpoints, single steps and a crash's backtrace under gdb."""
    code, out, err = run_in(job, patched_kernel, mode, [
        "gdb", "-q", "-batch", "-ex", "break getppid", "-ex", "run",
        "-ex", "bt 1", "-ex", "stepi", "-ex", "continue", "-ex", "continue",
        "-ex", "continue", "--args", "./behave", "target"], image=debug_image)
    assert code == 0, out + err
    assert len(re.findall(r"Breakpoint 1, .*getppid", out)) == 3, out
    assert "exited normally" in out, out
    code, out, err = run_in(job, patched_kernel, mode, [
        "gdb", "-q", "-batch", "-ex", "run", "-ex", "bt",
        "--args", "./behave", "crash"], image=debug_image)
    assert code == 0, out + err
    assert "SIGSEGV" in out and re.search(r"#0 .*crash_here", out), out
    assert re.search(r"#1 .* main", out), out


def test_patched_kernel_says_so(patched_kernel):
    """apppot-kernel list names the patched kernel's series, and -v its
    patches."""
    r = subprocess.run([tool("apppot-kernel"), "list", "-v"],
                       capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines()
                if x.startswith(patched_kernel))
    assert "patched" in line.split("[", 1)[1]
    meta = json.loads((Path(patched_kernel).parent / "build.json").read_text())
    for p in meta["patches"]:
        assert f"    patch {p['name']}" in r.stdout
