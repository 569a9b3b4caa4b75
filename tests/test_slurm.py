"""apppot-mpirun under a real Slurm (scripts/slurm-local.sh): sbatch, srun,
scancel.  The rank count and hosts come from Slurm's own variables (no -n).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import finish, is_uml, tool

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.uml, pytest.mark.root]

PROG = """\
import sys, time
from mpi4py import MPI
c = MPI.COMM_WORLD
print(f"rank {c.rank} of {c.size} sum {c.allreduce(c.rank + 1)}", flush=True)
if len(sys.argv) > 1 and sys.argv[1] == "hang":
    if c.rank == 0:
        open("started", "w").close()
    time.sleep(600)
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 and c.rank == 1 else 0)
"""


@pytest.fixture(scope="module")
def slurm():
    """A running single-host Slurm; stopped again after this module."""
    assert os.getuid() == 0, "the Slurm tests run as root (CI does)"
    up = subprocess.run([REPO / "scripts/slurm-local.sh", "up"],
                        capture_output=True, text=True, timeout=900,
                        check=False)
    assert up.returncode == 0, f"slurm-local.sh up failed:\n{up.stderr}"
    conf = up.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
    env = dict(os.environ, SLURM_CONF=conf)  # APPPOT_HOME, if set, too
    for var in [v for v in env if v.startswith(("SLURM_", "PE_", "PBS_",
                                                "LSB_")) and v != "SLURM_CONF"]:
        del env[var]
    yield env
    subprocess.run([REPO / "scripts/slurm-local.sh", "down"], check=False,
                   timeout=60)


def job_script(jobdir, body):
    path = jobdir / "job.sh"
    path.write_text(f"#!/bin/sh\ncd {jobdir}\n{body}\n")
    path.chmod(0o755)
    (jobdir / "prog.py").write_text(PROG)
    return path


def sbatch_wait(jobdir, script, ntasks, env):
    """``sbatch --wait``; a job that overruns is cancelled and the test fails
    with its stderr (the scripts' own --timeout should end it first)."""
    name = f"apppot-test-{jobdir.name}"
    p = subprocess.Popen(["sbatch", "--wait", "-J", name, "-n", str(ntasks),
                          "-o", "out", "-e", "err", "-D", str(jobdir),
                          str(script)], env=env, cwd=jobdir, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = finish(p, 300)
    except pytest.fail.Exception as e:
        subprocess.run(["scancel", "-n", name], env=env, check=False,
                       timeout=30)
        pytest.fail(f"{e}\njob stderr:\n{(jobdir / 'err').read_text()}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def rank_lines(text):
    return sorted(line for line in text.splitlines() if line.startswith("rank"))


def test_sbatch_takes_ranks_from_slurm(slurm, image, jobdir):
    script = job_script(jobdir, f"exec {tool('apppot-mpirun')} --timeout 150 "
                        "python3 prog.py")
    r = sbatch_wait(jobdir, script, 4, slurm)
    err = (jobdir / "err").read_text()
    assert r.returncode == 0, f"{r.stderr}\njob stderr:\n{err}"
    assert rank_lines((jobdir / "out").read_text()) == [
        f"rank {i} of 4 sum 10" for i in range(4)]
    assert "slurm allocation" not in err  # quiet without -v


def test_sbatch_exit_status(slurm, image, jobdir):
    script = job_script(jobdir, f"{tool('apppot-mpirun')} --timeout 150 "
                        "python3 prog.py 6")
    r = sbatch_wait(jobdir, script, 2, slurm)
    assert r.returncode == 6, r.stderr + (jobdir / "err").read_text()


def test_srun_one_launcher_per_step(slurm, image, jobdir):
    (jobdir / "prog.py").write_text(PROG)
    r = subprocess.run(["srun", "-n", "2", tool("apppot-mpirun"), "-v",
                        "--timeout", "150", "python3", "prog.py", "5"],
                       env=slurm, cwd=jobdir,
                       stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=300, check=False)
    assert rank_lines(r.stdout) == ["rank 0 of 2 sum 3", "rank 1 of 2 sum 3"]
    assert r.returncode == 5, r.stderr  # srun: the highest task status
    assert "slurm allocation: " in r.stderr and "; 2 ranks" in r.stderr
    assert "task 0 runs the appliances" in r.stderr


def _umls():
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if is_uml(p.info["cmdline"])
            and p.status() != psutil.STATUS_ZOMBIE}


def test_scancel_leaves_nothing(slurm, image, jobdir):
    before = _umls()
    script = job_script(jobdir, f"exec {tool('apppot-mpirun')} --per rank "
                        "python3 prog.py hang")
    r = subprocess.run(["sbatch", "--parsable", "-n", "2", "-o", "out", "-e",
                        "err", "-D", str(jobdir), str(script)], env=slurm,
                       capture_output=True, text=True, timeout=60, check=True)
    job = r.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while not (jobdir / "started").exists():
        assert time.monotonic() < deadline, (jobdir / "err").read_text()
        time.sleep(0.2)
    assert len(_umls() - before) >= 2  # both appliances are running
    subprocess.run(["scancel", job], env=slurm, check=True, timeout=30)
    deadline = time.monotonic() + 60
    while _umls() - before or subprocess.run(
            ["squeue", "-h", "-j", job], env=slurm, capture_output=True,
            text=True, check=False).stdout.strip():
        assert time.monotonic() < deadline, f"left: {_umls() - before}"
        time.sleep(0.2)
    # no_leftovers (conftest) also checks watchdogs, helpers and run dirs


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))


# ------------------------------------------- two simulated nodes, real srun
@pytest.fixture(scope="module")
def slurm_cluster():
    """scripts/slurm-sim-cluster.sh: node0 and node1 in network namespaces,
    real slurmctld/slurmd; yields (env for clients, client argv prefix)."""
    assert os.getuid() == 0, "the Slurm tests run as root (CI does)"
    script = REPO / "scripts/slurm-sim-cluster.sh"
    subprocess.run([script, "down"], check=False, timeout=120)  # stale run
    up = subprocess.run([script, "up"], capture_output=True, text=True,
                        timeout=900, check=False)
    if up.returncode != 0:
        subprocess.run([script, "down"], check=False, timeout=120)
    assert up.returncode == 0, f"slurm-sim-cluster.sh up failed:\n{up.stderr}"
    found = dict(line.split("=", 1) for line in up.stdout.split())
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PE_", "PBS_", "LSB_"))}
    env.update(SLURM_CONF=found["SLURM_CONF"])
    yield env, ["nsenter", f"--net=/run/netns/{found['NETNS']}"]
    subprocess.run([script, "down"], check=False, timeout=120)


def test_sbatch_over_two_nodes_uses_srun_to_start_the_workers(
        slurm_cluster, image, jobdir):
    env, on_node0 = slurm_cluster
    script = job_script(jobdir, f"exec {tool('apppot-mpirun')} -v --per rank "
                        "python3 prog.py")
    t0 = time.monotonic()
    r = subprocess.run([*on_node0, "sbatch", "--wait", "-N", "2", "-n", "4",
                        "-o", "out", "-e", "err", "-D", str(jobdir),
                        str(script)], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    wall = time.monotonic() - t0
    err = (jobdir / "err").read_text()
    assert r.returncode == 0, f"{r.stderr}\njob stderr:\n{err}"
    assert rank_lines((jobdir / "out").read_text()) == [
        f"rank {i} of 4 sum 10" for i in range(4)]
    assert "slurm allocation: node0:2, node1:2; 4 ranks" in err
    assert "node1: appliances 2,3 (remote start: srun)" in err
    assert "multicast probe: all 2 nodes hear each other" in err
    assert "apppot[node1]: job dir shared over 9P" in err
    print(f"sbatch -N 2 -n 4 round trip {wall:.1f} s;",
          [line for line in err.splitlines() if "probe" in line
           or "timings" in line])


def test_scancel_of_a_two_node_job_leaves_nothing(slurm_cluster, image,
                                                  jobdir):
    env, on_node0 = slurm_cluster
    before = _umls()
    script = job_script(jobdir, f"exec {tool('apppot-mpirun')} --per rank "
                        "python3 prog.py hang")
    r = subprocess.run([*on_node0, "sbatch", "--parsable", "-N", "2", "-n",
                        "4", "-o", "out", "-e", "err", "-D", str(jobdir),
                        str(script)], env=env, capture_output=True, text=True,
                       timeout=60, check=True)
    job = r.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while not (jobdir / "started").exists():
        assert time.monotonic() < deadline, (jobdir / "err").read_text()
        time.sleep(0.2)
    umids = {arg for p in _umls() - before for arg in psutil.Process(
        p).cmdline() if arg.startswith("umid=")}
    assert umids == {"umid=r0", "umid=r1", "umid=r2", "umid=r3"}
    subprocess.run([*on_node0, "scancel", job], env=env, check=True,
                   timeout=30)
    deadline = time.monotonic() + 60
    while _umls() - before:
        assert time.monotonic() < deadline, f"left: {_umls() - before}"
        time.sleep(0.2)
