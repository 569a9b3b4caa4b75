"""How Slurm's memory accounting sees appliances: RSS vs PSS.

    python -m benchmarks.slurm_memory [--out DIR] [--ranks N] [--touch MIB]

Needs root and the local Slurm (scripts/slurm-local.sh).  For each of
Slurm's two jobacct_gather/linux modes (plain RSS, and PSS with
JobAcctGatherParams=UsePss) it restarts the local Slurm, submits an sbatch
job running ``apppot-mpirun`` whose ranks each touch TOUCH MiB and wait,
reads what Slurm accounts for the batch step (``sstat``), and compares with
what the job's processes really use (PSS and RSS summed from /proc, and the
guest RAM files' size).  Writes slurm-memory.json and prints a table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
PROG = """\
import sys, time
from mpi4py import MPI
c = MPI.COMM_WORLD
block = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
c.Barrier()
if c.rank == 0:
    open("touched", "w").close()
time.sleep(600)
"""


def slurm(acct):
    env = dict(os.environ, SLURM_LOCAL_ACCT=acct)
    script = REPO / "scripts/slurm-local.sh"
    subprocess.run([script, "down"], env=env, check=True)
    out = subprocess.run([script, "up"], env=env, check=True,
                         capture_output=True, text=True).stdout
    conf = out.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return dict(env, SLURM_CONF=conf)


def to_mib(text):
    """sstat's '123456K' / '12M' → MiB."""
    text = text.strip()
    if not text:
        return None
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1 << 20}
    if text[-1] in units:
        return round(float(text[:-1]) * units[text[-1]], 1)
    return round(float(text) / (1 << 20), 1)


def job_processes(env, job):
    out = subprocess.run(["scontrol", "listpids", job], env=env,
                         capture_output=True, text=True, check=False).stdout
    pids = set()
    for line in out.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].isdigit():
            pids.add(int(fields[0]))
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return procs


def measure(acct, ranks, touch, venv_bin, mem):
    env = slurm(acct)
    jobdir = Path(tempfile.mkdtemp(prefix="apppot-memjob-", dir="/var/tmp"))
    try:
        (jobdir / "prog.py").write_text(PROG)
        script = jobdir / "job.sh"
        script.write_text(f"#!/bin/sh\ncd {jobdir}\nexec {venv_bin}/apppot-mpirun"
                          f" --mem {mem} python3 prog.py {touch}\n")
        script.chmod(0o755)
        job = subprocess.run(
            ["sbatch", "--parsable", "-n", str(ranks), "-o", "out", "-e", "err",
             "-D", str(jobdir), str(script)], env=env, capture_output=True,
            text=True, check=True).stdout.strip().split(";")[0]
        deadline = time.monotonic() + 180
        while not (jobdir / "touched").exists():
            if time.monotonic() > deadline:
                raise RuntimeError((jobdir / "err").read_text())
            time.sleep(0.5)
        time.sleep(4)  # a few of the 1 s accounting samples
        sstat = subprocess.run(
            ["sstat", "-n", "-P", "-j", f"{job}.batch", "-o",
             "MaxRSS,AveRSS,MaxVMSize"], env=env, capture_output=True,
            text=True, check=False).stdout.strip().split("|")
        procs = job_processes(env, job)
        rss = pss = uss = 0
        umls = 0
        for p in procs:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, pss, uss = rss + info.rss, pss + info.pss, uss + info.uss
            umls += any(a.startswith("uml_dir=") for a in p.cmdline())
        subprocess.run(["scancel", job], env=env, check=False)
        deadline = time.monotonic() + 60
        while subprocess.run(["squeue", "-h", "-j", job], env=env,
                             capture_output=True, text=True,
                             check=False).stdout.strip():
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return {"acct": acct, "job": job, "ranks": ranks, "touch_mib": touch,
                "guest_mem": mem, "processes": len(procs),
                "uml_processes": umls,
                "slurm_maxrss_mib": to_mib(sstat[0]) if sstat[0] else None,
                "slurm_averss_mib": to_mib(sstat[1]) if len(sstat) > 1 else None,
                "sum_rss_mib": round(rss / 2**20, 1),
                "sum_pss_mib": round(pss / 2**20, 1),
                "sum_uss_mib": round(uss / 2**20, 1)}
    finally:
        subprocess.run(["rm", "-rf", str(jobdir)], check=False)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.slurm_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--touch", type=int, default=64,
                        help="MiB each rank allocates and touches")
    parser.add_argument("--mem", default="256M", help="guest memory")
    args = parser.parse_args(argv)
    if os.getuid() != 0:
        print("slurm_memory: run as root (it restarts the local Slurm)",
              file=sys.stderr)
        return 2
    venv_bin = Path(sys.executable).parent
    rows = []
    try:
        for acct in ("rss", "pss"):
            rows.append(measure(acct, args.ranks, args.touch, venv_bin,
                                args.mem))
    finally:
        slurm("rss")  # leave the default mode running
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "slurm-memory.json").write_text(json.dumps(rows, indent=1))
    print(f"{args.ranks} ranks, each touching {args.touch} MiB in a "
          f"{args.mem} appliance")
    print("| Slurm mode | Slurm MaxRSS (batch step) | sum RSS | sum PSS | "
          "sum USS | processes (UML) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['acct']} | {r['slurm_maxrss_mib']} MiB | "
              f"{r['sum_rss_mib']} MiB | {r['sum_pss_mib']} MiB | "
              f"{r['sum_uss_mib']} MiB | {r['processes']} "
              f"({r['uml_processes']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
