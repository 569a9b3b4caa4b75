"""What a guest system call, page fault and clock read cost, natively and
in appliances, side by side in one run.

    python -m benchmarks.syscalls [--quick] [--out DIR] [--runs N]
    python -m benchmarks.syscalls --table DIR/syscalls.json

Configurations: native; Debian 12's UML 6.1 (ptrace); AppPot's own kernel
unpatched (``apppot-kernel build --unpatched``) and patched (the default
build with kpatches/), each in ptrace (``--seccomp off``) and seccomp mode.
In each, one appliance (or the host) runs ``syscalls.c`` (compiled here,
copied into the job dir): loops of getppid, open+close, clock_gettime,
gettimeofday, a 4 KiB pread from the page cache, anonymous and
file-backed page faults, fork+exit+wait; fork+exec+wait of ``python3 -c
pass``, ``import mpi4py`` and ``from mpi4py import MPI`` (MPI_Init); and
the Python loops of issue 17 (20,000 ``os.getppid()``, 2,000
``os.open``+``os.close``).  Every loop is repeated; a figure is the median
of all repetitions of all runs.  Then the host CPU time an idle appliance
(``sleep``) costs.  Writes syscalls.json (figures, ratios to native and the
full configuration: CPU model, host kernel, each kernel's path, version,
patch series and mode, iteration counts) and syscalls.png to DIR, and
prints the Markdown table the README shows (``--table`` renders it again
from a JSON file).
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).parent
SOURCE = HERE / "syscalls.c"
STOCK = "/usr/bin/linux.uml"
HOST_PYTHON = "/usr/bin/python3"
VENV_BIN = Path(sys.executable).parent
# C loops (syscalls.c), Python loops and program start-ups, in table order
LOOPS = ("getppid", "open_close", "clock_gettime", "gettimeofday", "read_4k",
         "fault_anon", "fault_file", "fork_exit_wait")
PYLOOPS = ("py_getppid", "py_open_close")
SPAWNS = {"python_start": ["-c", "pass"],
          "import_mpi4py": ["-c", "import mpi4py"],
          "mpi_init": ["-c", "from mpi4py import MPI"]}
LABELS = {
    "getppid": "getppid", "open_close": "open+close",
    "clock_gettime": "clock_gettime", "gettimeofday": "gettimeofday",
    "read_4k": "4 KiB read", "fault_anon": "page fault (anon)",
    "fault_file": "page fault (file)", "fork_exit_wait": "fork+exit+wait",
    "py_getppid": "Python os.getppid()", "py_open_close":
    "Python os.open+close", "python_start": "python3 -c pass",
    "import_mpi4py": "import mpi4py", "mpi_init": "from mpi4py import MPI",
    "idle_cpu": "idle appliance CPU"}
# the Python loops: 20,000 getppid, 2,000 open+close (at scale 1)
PYCODE = r"""
import json, os, sys, time
scale, reps = float(sys.argv[1]), int(sys.argv[2])
def getppid(n):
    for _ in range(n):
        os.getppid()
def open_close(n):
    for _ in range(n):
        os.close(os.open("/etc/passwd", os.O_RDONLY))
out = {}
for name, fn, n in (("py_getppid", getppid, 20000),
                    ("py_open_close", open_close, 2000)):
    n = max(1, int(n * scale))
    fn(n // 10 + 1)
    ns = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(n)
        ns.append((time.perf_counter() - t) / n * 1e9)
    out[name] = {"iterations": n, "ns": ns}
print(json.dumps({"unit": "ns/op", "loops": out}))
"""


def log(msg):
    print(f"[syscalls] {msg}", file=sys.stderr, flush=True)


def profile(quick):
    if quick:
        return {"scale": 0.05, "reps": 3, "spawns": 3, "runs": 1,
                "idle_s": 4.0}
    return {"scale": 1.0, "reps": 5, "spawns": 7, "runs": 2, "idle_s": 10.0}


# ------------------------------------------------------------ configuration
def own_kernels(patched=None, unpatched=None):
    """(patched, unpatched) paths of AppPot's own builds: given, else the
    newest cached build with, and without, a patch series."""
    from apppot.kernelbuild import cached_builds  # noqa: PLC0415

    found = cached_builds()
    if patched is None:
        patched = next((str(p) for p, m in found if m.get("patches")), None)
    if unpatched is None:
        unpatched = next((str(p) for p, m in found if not m.get("patches")),
                         None)
    for path, how in ((patched, "apppot-kernel build"),
                      (unpatched, "apppot-kernel build --unpatched")):
        if not path:
            raise SystemExit(f"syscalls: an own kernel is missing (build it: "
                             f"{how}, or pass --patched/--unpatched PATH)")
    return patched, unpatched


def configs(patched, unpatched):
    """name -> apppot-start options (None: native)."""
    return {
        "native": None,
        "debian-6.1": ["--kernel", STOCK, "--seccomp", "off"],
        "own-unpatched-ptrace": ["--kernel", unpatched, "--seccomp", "off"],
        "own-unpatched-seccomp": ["--kernel", unpatched, "--seccomp", "on"],
        "own-patched-ptrace": ["--kernel", patched, "--seccomp", "off"],
        "own-patched-seccomp": ["--kernel", patched, "--seccomp", "on"],
    }


def describe_kernel(path):
    """Path, version, patch series and features of a kernel binary."""
    from apppot import kernel  # noqa: PLC0415

    k = kernel.load_kernel(Path(path).resolve())
    meta = {}
    stamp = Path(path).resolve().parent / "build.json"
    if stamp.exists():
        meta = json.loads(stamp.read_text())
    return {"path": str(path), "version": k.version,
            "own": k.own, "smp": k.has("smp"),
            "patches": meta.get("patches", []), "key": meta.get("key"),
            "source": meta.get("source")}


def machine():
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in
                  cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in
                      cpuinfo.splitlines() if line.startswith("flags")), []))
    return {"cpu": model, "cpus": os.cpu_count(),
            "cpu_flags": sorted(flags & {"avx2", "avx512f", "amx_tile",
                                         "hypervisor", "constant_tsc"}),
            "host_kernel": platform.release(),
            "clocksource": _read("/sys/devices/system/clocksource/"
                                 "clocksource0/current_clocksource"),
            "python": platform.python_version()}


def now():
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def save(result, out, stem, render, draw):
    """STEM.json and STEM.png in ``out``; print the table and what was
    written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    draw(result, out / f"{stem}.png")
    print(render(result))
    print(f"# wrote {out / stem}.json, {out / stem}.png in "
          f"{result['seconds']} s")


def _read(path):
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


# ---------------------------------------------------------------- measuring
class Job:
    """A job dir with the compiled loops, readable from the appliances."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="apppot-bench-sys-",
                                          dir="/var/tmp"))
        self.path.chmod(0o755)
        cc = shutil.which(os.environ.get("CC", "cc")) or "gcc"
        argv = [cc, "-O2", "-o", str(self.path / "syscalls"), str(SOURCE)]
        log(shlex.join(argv))
        subprocess.run(argv, check=True)
        (self.path / "pyloops.py").write_text(PYCODE)

    def close(self):
        shutil.rmtree(self.path, ignore_errors=True)


def script(p):
    """The shell script one run executes (host or guest): JSON lines."""
    lines = [f"./syscalls {p['scale']} {p['reps']} /dev/shm"]
    for args in SPAWNS.values():
        lines.append(f"./syscalls spawn {p['spawns']} /usr/bin/python3 "
                     + shlex.join(args))
    lines.append(f"python3 pyloops.py {p['scale']} {p['reps']}")
    return " && ".join(lines)


def run_once(job, opts, p):
    """One run (one boot): {test: [ns per op, ...]} and its output."""
    if opts is None:
        cmd = ["sh", "-c", script(p)]
        env = dict(os.environ, PATH="/usr/bin:/bin")
    else:
        cmd = [str(VENV_BIN / "apppot-start"), *opts, "--mem", "512M", "--",
               "sh", "-c", script(p)]
        env = None
    proc = subprocess.run(cmd, cwd=job.path, capture_output=True, text=True,
                          timeout=1800, stdin=subprocess.DEVNULL, env=env,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): "
                           f"{proc.stderr[-1500:]}")
    out, iterations = {}, {}
    spawns = iter(SPAWNS)
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        if "loops" in d:
            for name, loop in d["loops"].items():
                out[name] = loop["ns"]
                iterations[name] = loop["iterations"]
        else:
            name = next(spawns)
            out[name] = d["ns"]
            iterations[name] = len(d["ns"])
    missing = set(LOOPS + PYLOOPS) | set(SPAWNS)
    missing -= set(out)
    if missing:
        raise RuntimeError(f"{shlex.join(cmd)}: no figures for "
                           f"{', '.join(sorted(missing))}: {proc.stdout[-800:]}")
    return out, iterations


def idle_cpu(job, opts, seconds):
    """Host CPU time (ms per second) of an appliance whose program sleeps:
    every process of the appliance's process group, sampled after boot."""
    cmd = [str(VENV_BIN / "apppot-start"), *opts, "--", "sleep",
           str(seconds + 8)]
    proc = subprocess.Popen(cmd, cwd=job.path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        time.sleep(4.0)  # booted and asleep
        t0, c0 = time.monotonic(), _uml_cpu(proc.pid)
        time.sleep(seconds)
        t1, c1 = time.monotonic(), _uml_cpu(proc.pid)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {proc.stderr[-800:]}")
    return (c1 - c0) / (t1 - t0) * 1000


def _uml_cpu(parent):
    """CPU seconds of the UML processes under ``parent`` (apppot-start):
    every thread of each (the kernel's vCPUs, its CLONE_VM helpers, the
    stubs), from schedstat's nanoseconds (cpu_times ticks are 10 ms)."""
    total = 0
    try:
        kids = psutil.Process(parent).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    for p in kids:
        try:
            if not (any(a.startswith("umid=") for a in p.cmdline())
                    or p.name() == "uml-userspace"):
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for stat in Path(f"/proc/{p.pid}/task").glob("*/schedstat"):
            try:
                total += int(stat.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def measure(p, patched, unpatched, only=None):
    job = Job()
    rows, iterations = {}, {}
    try:
        for name, opts in configs(patched, unpatched).items():
            if only and name not in only:
                continue
            samples = {}
            for i in range(p["runs"]):
                log(f"{name}: run {i + 1}/{p['runs']}")
                t0 = time.monotonic()
                got, iterations = run_once(job, opts, p)
                for test, ns in got.items():
                    samples.setdefault(test, []).extend(ns)
                log(f"{name}: {time.monotonic() - t0:.0f} s")
            rows[name] = {t: statistics.median(v) for t, v in samples.items()}
            rows[name]["_samples"] = samples
            if opts is not None:
                rows[name]["idle_cpu"] = idle_cpu(job, opts, p["idle_s"])
    finally:
        job.close()
    return rows, iterations


# ---------------------------------------------------------------- reporting
def ratios(rows):
    native = rows["native"]
    return {name: {t: r[t] / native[t] for t in native
                   if not t.startswith("_") and t in r and native[t]}
            for name, r in rows.items() if name != "native"}


def fmt(test, ns):
    if test == "idle_cpu":
        return f"{ns:.1f} ms/s"
    if test in SPAWNS or test == "fork_exit_wait":
        return f"{ns / 1e6:.1f} ms" if ns >= 1e6 else f"{ns / 1e3:.0f} µs"
    return f"{ns / 1000:.2f} µs" if ns < 10000 else f"{ns / 1000:.1f} µs"


def table(result):
    """The README table: one row per test, one column per configuration,
    ratio to native in parentheses."""
    rows = result["rows"]
    names = list(rows)
    head = ["| | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|"]
    body = []
    for test in (*LOOPS, *PYLOOPS, *SPAWNS, "idle_cpu"):
        cells = []
        for name in names:
            v = rows[name].get(test)
            if v is None:
                cells.append("–")
                continue
            r = result["ratios"].get(name, {}).get(test)
            cells.append(fmt(test, v) + (f" ({r:.0f}×)" if r and r >= 10
                                         else f" ({r:.1f}×)" if r else ""))
        body.append(f"| {LABELS[test]} | " + " | ".join(cells) + " |")
    m = result["machine"]
    foot = (f"\n\n{m['cpu']}, {m['cpus']} CPUs, host {m['host_kernel']}; "
            f"{result['date'][:10]}; median of {result['profile']['runs']} "
            f"runs × {result['profile']['reps']} repetitions")
    return "\n".join(head + body) + foot


def plot(result, path):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = result["rows"]
    names = list(rows)
    tests = [t for t in (*LOOPS, *PYLOOPS, *SPAWNS) if t in rows["native"]]
    fig, ax = plt.subplots(figsize=(13, 5.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([x + i * width for x in range(len(tests))],
               [rows[name].get(t, 0) / 1000 for t in tests], width,
               label=name)
    ax.set_yscale("log")
    ax.set_ylabel("µs per operation (log)")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tests))])
    ax.set_xticklabels([LABELS[t] for t in tests], rotation=30, ha="right")
    ax.legend(fontsize=8)
    ax.set_title(f"Guest system calls vs native ({result['machine']['cpu']}, "
                 f"{result['machine']['cpus']} CPUs; lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.syscalls",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="few iterations, one run each (a smoke test)")
    ap.add_argument("--out", default="benchmarks/results", type=Path)
    ap.add_argument("--runs", type=int, help="boots per configuration")
    ap.add_argument("--patched", help="patched own kernel (default: the "
                    "newest cached build with patches)")
    ap.add_argument("--unpatched", help="unpatched own kernel (default: "
                    "the newest cached build without)")
    ap.add_argument("--only", action="append",
                    help="measure only this configuration (repeatable; "
                    "native is always measured)")
    ap.add_argument("--table", type=Path, metavar="JSON",
                    help="print the table of an earlier run and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    p = profile(args.quick)
    if args.runs:
        p["runs"] = args.runs
    patched, unpatched = own_kernels(args.patched, args.unpatched)
    only = set(args.only or ()) | {"native"} if args.only else None
    t0 = time.monotonic()
    rows, iterations = measure(p, patched, unpatched, only)
    samples = {name: r.pop("_samples") for name, r in rows.items()}
    kernels = {"debian-6.1": STOCK, "own-unpatched": unpatched,
               "own-patched": patched}
    result = {
        "date": now(), "machine": machine(), "profile": p,
        "iterations": iterations,
        "configs": {name: {"apppot_start": opts, "seccomp": (
            None if opts is None else opts[opts.index("--seccomp") + 1])}
            for name, opts in configs(patched, unpatched).items()
            if name in rows},
        "kernels": {k: describe_kernel(v) for k, v in kernels.items()},
        "unit": "ns per operation (idle_cpu: host CPU ms per second)",
        "rows": rows, "ratios": ratios(rows), "samples": samples,
        "seconds": round(time.monotonic() - t0)}
    save(result, args.out, "syscalls", table, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
