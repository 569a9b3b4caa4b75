"""Soak: many randomized apppot-mpirun jobs, each checked for what the README
promises: the exit status, an end within a bound (no hang), nothing left
behind, and a job dir that holds exactly what the ranks wrote.

    python -m benchmarks.soak --runs N --seed S [--out DIR]
    python -m benchmarks.soak --job SEED          # replay one job alone

Each job is drawn from its own seed (derived from S and its number), so any
failure can be replayed alone with ``--job``.  A job is: MPI (Open MPI,
MPICH) × ranks per appliance (per node, per rank) × kernel (AppPot's own,
Debian's 6.1) × LAN (hub; mcast where the kernel has it) × 1..8 ranks on
this machine's cores (oversubscribed included) × job dir (9P, hostfs) ×
an ending: success; one rank fails; several fail at the same instant; a
rank crashes with a signal; a rank's UML is SIGKILLed; SIGINT, SIGTERM or
SIGKILL to the launcher at a random moment (during boot too); --timeout;
a boot that cannot finish (tiny --boot-timeout).  A share of jobs runs
under a real Slurm (``sbatch``, some cancelled with ``scancel``), and some
run two or three at once.

Leftovers are found two ways: by a marker in the environment of every
process a job starts (``SOAK_JOB``), and by name (UML kernels, hubs, diod,
slirp helpers, watchdogs, workers, namespace holders) against what ran
before the soak; each job's TMPDIR (run dirs, umid dirs, COW files) must be
empty afterwards.  Writes ``soak.json`` (every job, its seed and verdict,
wall and teardown time percentiles); exits 0 only when every job was right.
"""

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from . import suite

STOCK = "/usr/bin/linux.uml"
MARK = "SOAK_JOB"
RANK_PROG = r'''
import json, os, signal, sys, time
from mpi4py import MPI
c = MPI.COMM_WORLD
spec = json.loads(sys.argv[1])
r, n = c.rank, c.size
os.makedirs("out", exist_ok=True)
with open(f"out/{r}.txt", "w") as f:
    f.write(f"rank {r} of {n} job {spec['seed']}\n")
open(f"out/running.{r}", "w").close()
c.Barrier()
kind = spec["kind"]
if kind == "fail" and str(r) in spec["codes"]:  # all at the same instant
    if spec["how"] == "exit":
        sys.exit(spec["codes"][str(r)])  # through MPI_Finalize
    os._exit(spec["codes"][str(r)])  # abruptly
if kind == "crash" and r == spec["rank"]:
    os.kill(os.getpid(), spec["signal"])
if kind == "hold":
    time.sleep(600)
'''
ENDINGS = ("success", "fail-one", "fail-together", "crash", "kill-uml",
           "sigint", "sigterm", "sigkill", "timeout", "boot-timeout")
HELPERS = ("linux", "linux.uml", "diod", "libslirp-helper")
HELPER_ARGS = ("apppot.watchdog", "apppot_mpi.hub", "apppot_mpi.worker")


# ------------------------------------------------------------------ planning
@dataclass(frozen=True)
class Job:
    """One randomized job (pure data; ``draw`` makes it from a seed)."""

    seed: int
    mpi: str
    kernel: str  # own | stock
    per: str  # node | rank
    transport: str  # hub | mcast
    ranks: int
    jobdir_fs: str  # 9p | hostfs
    ending: str
    detail: dict = field(default_factory=dict)
    slurm: bool = False

    def program(self):
        """The rank program's spec (what each rank does)."""
        kind = {"success": "ok", "fail-one": "fail", "fail-together": "fail",
                "crash": "crash"}.get(self.ending, "hold")
        if self.slurm and self.ending == "scancel":
            kind = "hold"
        return {"seed": self.seed, "kind": kind,
                "codes": self.detail.get("codes", {}),
                "how": self.detail.get("how", "exit"),
                "rank": self.detail.get("rank", 0),
                "signal": self.detail.get("signal", 0)}

    def argv(self, kernels):
        args = [suite.tool("apppot-mpirun"), "--kernel", kernels[self.kernel],
                "--mpi", self.mpi, "--per", self.per, "--transport",
                self.transport, "--jobdir-fs", self.jobdir_fs,
                "--oversubscribe", "-n", str(self.ranks)]
        if self.ending == "timeout":
            args += ["--timeout", str(self.detail["timeout"])]
        if self.ending == "boot-timeout":
            args += ["--boot-timeout", str(self.detail["boot_timeout"])]
        return [*args, "python3", "soak_rank.py", json.dumps(
            self.program(), separators=(",", ":"))]

    def expected(self):
        """The status the README promises (Popen's: -9 for SIGKILL)."""
        e = self.ending
        if e == "success":
            return 0
        if e in ("fail-one", "fail-together"):
            codes = {int(k): v for k, v in self.detail["codes"].items()}
            return codes[min(codes)]  # the lowest failing rank's
        return {"crash": 128 + self.detail.get("signal", 0),
                "kill-uml": 121, "sigint": 130, "sigterm": 143,
                "sigkill": -9, "timeout": 124, "boot-timeout": 120,
                "scancel": "CANCELLED"}[e]

    def bound(self):
        """Seconds the job may take before it counts as hung."""
        per_appliance = 3.0 if self.kernel == "stock" else 1.0
        appliances = self.ranks if self.per == "rank" else 1
        base = 60 + per_appliance * appliances * max(1, self.ranks / 2)
        if self.ending == "timeout":
            base += self.detail["timeout"]
        return base


def job_seed(master, i):
    h = hashlib.sha256(f"{master}:{i}".encode()).digest()
    return int.from_bytes(h[:6], "big")


def draw(seed, cores=None, slurm_share=0.0):
    """The job for ``seed`` (pure: the same seed gives the same job)."""
    rng = random.Random(seed)  # noqa: S311 (reproducible draws, not secrets)
    cores = cores or os.cpu_count() or 1
    kernel = rng.choice(("own", "own", "stock"))
    per = "rank" if kernel == "stock" else rng.choice(("node", "rank"))
    transport = "hub" if kernel == "own" else rng.choice(("hub", "mcast"))
    slurm = rng.random() < slurm_share
    # the local Slurm's node declares 4 CPUs
    ranks = rng.randint(1, 4 if slurm else max(8, cores))
    endings = ENDINGS if not slurm else ("success", "fail-one", "scancel")
    ending = rng.choice(endings)
    if ending == "fail-together" and ranks < 2:
        ending = "fail-one"
    detail = {}
    if ending == "fail-one":
        detail["codes"] = {str(rng.randrange(ranks)): rng.randint(1, 100)}
        detail["how"] = rng.choice(("exit", "_exit"))
    elif ending == "fail-together":
        failing = rng.sample(range(ranks), rng.randint(2, ranks))
        detail["codes"] = {str(r): rng.randint(1, 100) for r in failing}
        detail["how"] = rng.choice(("exit", "_exit"))
    elif ending == "crash":
        detail["rank"] = rng.randrange(ranks)
        detail["signal"] = rng.choice((signal.SIGSEGV, signal.SIGABRT,
                                       signal.SIGBUS))
    elif ending in ("sigint", "sigterm", "sigkill"):
        detail["after"] = round(rng.uniform(0.0, 5.0), 2)  # boot too
    elif ending == "kill-uml":
        detail["which"] = rng.random()
    elif ending == "timeout":
        detail["timeout"] = rng.choice((8, 12, 20))
    elif ending == "boot-timeout":
        detail["boot_timeout"] = rng.choice((0.05, 0.2))
    elif ending == "scancel":
        detail["after"] = round(rng.uniform(1.0, 6.0), 2)
    return Job(seed, rng.choice(("openmpi", "mpich")), kernel, per, transport,
               ranks, rng.choice(("9p", "hostfs")), ending, detail, slurm)


# --------------------------------------------------------------- observing
def marked(tag):
    """Processes whose environment carries SOAK_JOB=tag."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(MARK) == tag:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def helpers_running():
    """{pid: what} of every AppPot helper process, by name."""
    found = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if p.info["name"] in HELPERS or any(a.startswith("uml_dir=")
                                            for a in cmd) or any(
                h in cmd for h in HELPER_ARGS) or cmd == ["sleep", "infinity"]:
            found[p.info["pid"]] = " ".join(cmd)[:100]
    return found


def uml_mains(tag):
    """The main UML process of each appliance of a running job."""
    procs = [p for p in marked(tag) if any(
        a.startswith("uml_dir=") for a in p.cmdline())]
    pids = {p.pid for p in procs}
    return [p for p in procs if p.ppid() not in pids]


def wait_running(jobdir, ranks, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if all((jobdir / "out" / f"running.{r}").exists()
               for r in range(ranks)):
            return True
        time.sleep(0.1)
    return False


# ----------------------------------------------------------------- running
@dataclass
class Result:
    job: dict
    status: object = None
    expected: object = None
    wall: float = 0.0
    teardown: float = 0.0
    hung: bool = False
    leftovers: list = field(default_factory=list)
    files: list = field(default_factory=list)
    stderr: str = ""

    @property
    def ok(self):
        return (self.status == self.expected and not self.hung
                and not self.leftovers and not self.files)


class Run:
    """One job in flight: its job dir, TMPDIR, marker and process."""

    def __init__(self, job, kernels, root):
        self.job = job
        self.kernels = kernels
        self.tag = f"{job.seed}-{os.getpid()}"
        self.jobdir = Path(tempfile.mkdtemp(prefix=f"soak-{job.seed}-",
                                            dir=root))
        self.jobdir.chmod(0o755)
        (self.jobdir / "soak_rank.py").write_text(RANK_PROG)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"soak-tmp-{job.seed}-",
                                         dir="/dev/shm"))
        self.env = {**os.environ, MARK: self.tag, "TMPDIR": str(self.tmp)}
        self.proc = None
        self.t0 = self.t_end = None
        self.slurm_id = None
        self.actions = []
        self.t_action = None  # when the ending was set off from outside

    def start(self, slurm_env=None):
        argv = self.job.argv(self.kernels)
        self.t0 = time.monotonic()
        if self.job.slurm:
            script = self.jobdir / "job.sh"
            script.write_text("#!/bin/sh\nexec " + " ".join(
                _q(a) for a in argv) + "\n")
            script.chmod(0o755)
            cmd = ["sbatch", "--wait", "--parsable", "-n", str(self.job.ranks),
                   "--oversubscribe", f"--output={self.jobdir}/slurm.out",
                   f"--chdir={self.jobdir}", f"--job-name=soak-{self.job.seed}",
                   str(script)]
            env = {**self.env, **(slurm_env or {})}
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE,
                                         stdin=subprocess.DEVNULL, text=True)
        else:
            self.proc = subprocess.Popen(argv, cwd=self.jobdir, env=self.env,
                                         stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE,
                                         stdin=subprocess.DEVNULL, text=True)
        return self

    def act(self, slurm_env=None):
        """The ending's action from outside (signals, kills, scancel)."""
        j = self.job
        if j.ending in ("sigint", "sigterm", "sigkill"):
            time.sleep(j.detail["after"])
            sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM,
                   "sigkill": signal.SIGKILL}[j.ending]
            if self.proc.poll() is None:
                self.t_action = time.monotonic()
                self.proc.send_signal(sig)
                self.actions.append(f"{sig.name} at {j.detail['after']} s")
        elif j.ending == "kill-uml":
            if wait_running(self.jobdir, j.ranks, self.proc, j.bound()):
                mains = sorted(uml_mains(self.tag), key=lambda p: p.pid)
                if mains:
                    victim = mains[int(j.detail["which"] * len(mains))]
                    self.t_action = time.monotonic()
                    victim.kill()
                    self.actions.append(f"SIGKILL UML {victim.pid}")
        elif j.ending == "scancel":
            time.sleep(j.detail["after"])
            self.t_action = time.monotonic()
            subprocess.run(["scancel", "-n", f"soak-{j.seed}"],
                           env={**os.environ, **(slurm_env or {})},
                           check=False, capture_output=True)
            self.actions.append(f"scancel at {j.detail['after']} s")

    def finish(self, slurm_env=None):
        res = Result(asdict(self.job), expected=self.job.expected())
        try:
            out, err = self.proc.communicate(timeout=self.job.bound())
        except subprocess.TimeoutExpired:
            res.hung = True
            res.leftovers.append(describe_tree(self.proc.pid))
            self.proc.kill()
            out, err = self.proc.communicate()
            if self.slurm_id or self.job.slurm:
                subprocess.run(["scancel", "-n", f"soak-{self.job.seed}"],
                               env={**os.environ, **(slurm_env or {})},
                               check=False, capture_output=True)
        self.t_end = time.monotonic()
        res.wall = round(self.t_end - self.t0, 3)
        res.status = self.proc.returncode
        res.stderr = (err or "")[-2000:]
        if self.job.slurm:
            res.status = slurm_status(out, self.proc.returncode,
                                      self.job.ending, slurm_env)
            res.stderr = _read(self.jobdir / "slurm.out")[-2000:]
        settle, left = self.settle()
        # teardown: from the ending set off from outside (signal, kill,
        # scancel) or else from the launcher's exit, until nothing is left
        res.teardown = round(settle + (self.t_end - self.t_action
                                       if self.t_action else 0.0), 3)
        res.leftovers += left
        res.files = self.check_files(res.status == 0)
        if self.actions:
            res.job = {**res.job, "actions": self.actions}
        return res

    def settle(self, limit=15.0):
        """Wait until nothing of the job is left; (seconds it took, what is
        still there after ``limit``)."""
        t0 = time.monotonic()
        while True:
            procs = marked(self.tag)
            files = [str(p) for p in self.tmp.iterdir()]
            if not procs and not files:
                return round(time.monotonic() - t0, 3), []
            if time.monotonic() - t0 > limit:
                return round(time.monotonic() - t0, 3), [
                    f"process {p.pid} {' '.join(p.cmdline())[:80]}"
                    for p in procs] + [f"file {f}" for f in files]
            time.sleep(0.02)

    def check_files(self, complete):
        """The job dir holds what the ranks wrote and nothing else; after a
        success, every rank's file."""
        bad = []
        allowed = {"soak_rank.py", "out", "job.sh", "slurm.out"}
        bad += [f"unexpected {p.name}" for p in self.jobdir.iterdir()
                if p.name not in allowed]
        out = self.jobdir / "out"
        n = self.job.ranks
        want = {f"{r}.txt": f"rank {r} of {n} job {self.job.seed}\n"
                for r in range(n)}
        names = {p.name for p in out.iterdir()} if out.is_dir() else set()
        for name in names:
            if name.startswith("running."):
                continue
            if name not in want:
                bad.append(f"unexpected out/{name}")
            elif (out / name).read_text() != want[name]:
                bad.append(f"out/{name} holds {(out / name).read_text()!r}")
        if complete:
            bad += [f"missing out/{m}" for m in sorted(set(want) - names)]
        return bad

    def close(self):
        shutil.rmtree(self.jobdir, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def slurm_status(out, rc, ending, slurm_env):
    """sbatch --wait returns the job's exit status; a cancelled job is
    reported by its state."""
    if ending == "scancel":
        jobid = (out or "").strip().split(";")[0]
        show = subprocess.run(
            ["scontrol", "-o", "show", "job", jobid],
            env={**os.environ, **(slurm_env or {})}, capture_output=True,
            text=True, check=False).stdout
        for item in show.split():
            if item.startswith("JobState="):
                return item.split("=", 1)[1]
        return f"status {rc}, state unknown"
    return rc


def describe_tree(pid):
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(True)]
        return "hung: " + "; ".join(f"{p.pid} {p.name()} {p.status()}"
                                    for p in procs)[:1500]
    except psutil.Error:
        return "hung"


def _q(arg):
    import shlex

    return shlex.quote(arg)


def _read(path):
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def run_batch(jobs, kernels, root, slurm_env=None):
    """Start ``jobs`` together, act on each, collect their results."""
    import threading

    runs = [Run(j, kernels, root).start(slurm_env) for j in jobs]
    threads = [threading.Thread(target=r.act, args=(slurm_env,)) for r in runs]
    for t in threads:
        t.start()
    results = []
    for r, t in zip(runs, threads, strict=True):
        results.append(r.finish(slurm_env))
        t.join()
        r.close()
    return results


# -------------------------------------------------------------- the driver
def kernels_here():
    from apppot.kernelbuild import cached_builds

    own = cached_builds()
    if not own:
        raise SystemExit("soak: AppPot's kernel is missing (apppot-kernel "
                         "build)")
    return {"own": str(own[0][0]), "stock": STOCK}


def slurm_up():
    """The single-host Slurm of scripts/slurm-local.sh: its environment."""
    script = Path(__file__).resolve().parent.parent / "scripts/slurm-local.sh"
    out = subprocess.run([str(script), "up"], capture_output=True, text=True,
                         check=True).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return {"SLURM_CONF": env["SLURM_CONF"]}


def slurm_down():
    script = Path(__file__).resolve().parent.parent / "scripts/slurm-local.sh"
    subprocess.run([str(script), "down"], capture_output=True, check=False)


def percentiles(values):
    if not values:
        return {}
    v = sorted(values)
    return {"p50": round(statistics.median(v), 3),
            "p99": round(v[min(len(v) - 1, int(len(v) * 0.99))], 3),
            "max": round(v[-1], 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--job", type=int, action="append",
                    help="replay the job of this seed alone (repeatable)")
    ap.add_argument("--slurm-share", type=float, default=0.1,
                    help="share of jobs under a real Slurm (default 0.1)")
    ap.add_argument("--together-share", type=float, default=0.15,
                    help="share of batches of 2-3 jobs at once")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    kernels = kernels_here()
    seeds = args.job or [job_seed(args.seed, i) for i in range(args.runs)]
    slurm_share = 0.0 if args.job else args.slurm_share
    jobs = [draw(s, slurm_share=slurm_share) for s in seeds]
    slurm_env = slurm_up() if any(j.slurm for j in jobs) else None
    root = Path(tempfile.mkdtemp(prefix="soak-", dir="/var/tmp"))
    root.chmod(0o755)
    before = helpers_running()
    rng = random.Random(args.seed)  # noqa: S311
    results, i, t_start = [], 0, time.monotonic()
    try:
        while i < len(jobs):
            n = rng.choice((2, 3)) if rng.random() < args.together_share else 1
            batch = [j for j in jobs[i:i + n]]
            i += len(batch)
            for res in run_batch(batch, kernels, root, slurm_env):
                results.append(res)
                stray = {p: w for p, w in helpers_running().items()
                         if p not in before}
                if stray and len(batch) == 1:
                    res.leftovers += [f"helper {p} {w}" for p, w in
                                      stray.items()]
                mark = "ok  " if res.ok else "FAIL"
                print(f"{mark} job {res.job['seed']}: {res.job['mpi']} "
                      f"{res.job['kernel']} per {res.job['per']} "
                      f"{res.job['transport']} -n {res.job['ranks']} "
                      f"{res.job['jobdir_fs']} {res.job['ending']}"
                      f"{' (slurm)' if res.job['slurm'] else ''}: status "
                      f"{res.status} (want {res.expected}) in {res.wall} s, "
                      f"teardown {res.teardown} s", flush=True)
                if not res.ok:
                    print(f"     {res.leftovers} {res.files} "
                          f"{res.stderr[-400:]!r}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if slurm_env:
            slurm_down()
    bad = [r for r in results if not r.ok]
    report = {
        "seed": args.seed, "runs": len(results),
        "machine": {"cpu": suite_cpu(), "cores": os.cpu_count(),
                    "kernel": platform.release()},
        "kernels": kernels, "seconds": round(time.monotonic() - t_start, 1),
        "wrong_status": sum(r.status != r.expected for r in results),
        "hangs": sum(r.hung for r in results),
        "leftovers": sum(bool(r.leftovers) for r in results),
        "bad_files": sum(bool(r.files) for r in results),
        "wall": percentiles([r.wall for r in results]),
        "teardown": percentiles([r.teardown for r in results]),
        "failures": [r.job["seed"] for r in bad],
        "jobs": [asdict(r) | {"ok": r.ok} for r in results],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    print(f"soak: {len(results)} jobs, {len(bad)} wrong ({report['hangs']} "
          f"hangs, {report['wrong_status']} wrong statuses, "
          f"{report['leftovers']} with leftovers, {report['bad_files']} with "
          f"bad job-dir files); wall p50 {report['wall'].get('p50')} s, "
          f"teardown p99 {report['teardown'].get('p99')} s; replay a failure "
          "with --job SEED", flush=True)
    return 0 if not bad else 1


def suite_cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
