"""The benchmarks: functions that run one measurement and return data.

Every figure is taken in the same run in up to three places:
``native-shm`` (the host's mpirun, shared memory), ``native-tcp`` (the host's
mpirun over TCP loopback) and ``appliance`` (apppot-mpirun, one appliance per
rank, with the kernel and LAN it picks; ``benchmarks.modes`` compares the
kernels, LANs and ranks per appliance).  Host and appliances use the same
stack: Debian 12's Open MPI 4.1.4 and python3-mpi4py 3.1.4.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).parent
VENV_BIN = Path(sys.executable).parent
HOST_PYTHON = "/usr/bin/python3"  # Debian's, with python3-mpi4py
ENVS = ("native-shm", "native-tcp", "appliance")
HELLO = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
         "v = c.allreduce(c.rank + 1); print(c.rank, v) if c.rank == 0 else None")


class Workdir:
    """A job dir with osu.py in it, readable from the appliances."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="apppot-bench-", dir="/var/tmp"))
        self.path.chmod(0o755)
        shutil.copy(HERE / "osu.py", self.path / "osu.py")

    def close(self):
        shutil.rmtree(self.path, ignore_errors=True)


def tool(name):
    return str(VENV_BIN / name)


def mpi_command(env, n, argv):
    """argv running ``argv`` (a Python program and args) on ``n`` ranks."""
    if env == "appliance":  # the user's original design (see modes.py)
        return [tool("apppot-mpirun"), "--per", "rank", "-n", str(n),
                "--oversubscribe", "python3", *argv]
    btl = "vader,self" if env == "native-shm" else "tcp,self"
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(n),
            "--mca", "btl", btl, "--mca", "pml", "ob1", HOST_PYTHON, *argv]


def run_json(cmd, cwd, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode})"
                           f": {proc.stderr[-800:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def osu(work, env, test, n, max_size, budget):
    """One OSU-style test; returns [(size, value)]."""
    cmd = mpi_command(env, n, ["osu.py", test, "--max", str(max_size),
                               "--budget", str(budget)])
    data = run_json(cmd, work.path)
    return [(r["size"], r["value"]) for r in data["results"]]


def wall(cmd, cwd):
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr[-800:]}")
    return time.perf_counter() - t, proc


def job_walltime(work, env, n, repeat=1):
    """Wall time of an n-rank hello-world allreduce job (median)."""
    return statistics.median(
        wall(mpi_command(env, n, ["-c", HELLO]), work.path)[0]
        for _ in range(repeat))


def launch_to_payload(work, k=5):
    """apppot-start's own launch-to-payload measurement, median of k, and the
    native counterpart (start of a Python process)."""
    appl = []
    for _ in range(k):
        _, proc = wall([tool("apppot-start"), "-v", "python3", "-c", "pass"],
                       work.path)
        m = re.search(r"launch to payload ([\d.]+) s", proc.stderr)
        appl.append(float(m.group(1)))
    native = [wall([HOST_PYTHON, "-c", "pass"], work.path)[0] for _ in range(k)]
    return statistics.median(appl), statistics.median(native)


SLEEPER = ("from mpi4py import MPI; import time; c = MPI.COMM_WORLD; "
           "c.Barrier(); time.sleep({s}); c.Barrier()")


def image_cache_mib(image=None):
    """Host page cache held by the base image (util-linux fincore): shared
    by all appliances, so counted once per job."""
    if image is None:
        from apppot.images import default_image  # noqa: PLC0415

        image = default_image("openmpi")
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output",
                          "RES", str(image)], capture_output=True, text=True,
                         check=False).stdout.strip()
    return int(out or 0) / 2**20


def memory_per_rank(work, env, n, hold=10.0):
    """Host memory per rank (PSS, MiB) while an n-rank job idles after
    MPI_Init: summed over each appliance's processes (plus the base image's
    page cache, counted once and split over the ranks), or the rank
    process."""
    cmd = mpi_command(env, n, ["-c", SLEEPER.format(s=hold)])
    before = {p.pid for p in psutil.process_iter()}
    proc = subprocess.Popen(cmd, cwd=work.path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        best = None
        deadline = time.monotonic() + hold + 60
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1.0)
            sample = _pss_by_rank(env, before)
            if len(sample) == n and (best is None or sum(sample) > sum(best)):
                best = sample
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if not best:
        raise RuntimeError(f"memory: no complete sample for {env} n={n}")
    shared = image_cache_mib() / n if env == "appliance" else 0.0
    return statistics.mean(best) + shared


def _pss(p):
    try:
        return p.memory_full_info().pss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def _same_mm(pid1, pid2):
    """kcmp(KCMP_VM): UML's helper threads are clone(CLONE_VM) processes
    sharing the kernel process's memory; count that memory once."""
    import ctypes  # noqa: PLC0415

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(312, pid1, pid2, 1, 0, 0) == 0  # SYS_kcmp, KCMP_VM


def _distinct_mm(procs):
    out = []
    for p in procs:
        if not any(_same_mm(p.pid, q.pid) for q in out):
            out.append(p)
    return out


def _pss_by_rank(env, before):
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"])
             if p.pid not in before]
    if env == "appliance":
        groups = {}
        for p in procs:
            cmd = p.info["cmdline"] or []
            if any(a.startswith("uml_dir=") for a in cmd):
                try:
                    groups.setdefault(os.getpgid(p.pid), []).append(p)
                except ProcessLookupError:
                    continue
        return [sum(_pss(p) for p in _distinct_mm(g)) / 2**20
                for g in groups.values()]
    ranks = [p for p in procs if (p.info["cmdline"] or [""])[0] == HOST_PYTHON]
    return [_pss(p) / 2**20 for p in ranks]
