"""apppot-orchestrator against a real Slurm whose compute nodes are
appliances running slurmd (scripts/slurm-elastic.sh: slurmctld and a bridge
in a network namespace this test creates; nothing on the machine's own
interfaces).  A burst of jobs makes it start nodes, the jobs run in the
appliances, the orchestrator survives SIGKILL + restart without losing or
duplicating nodes, and idle nodes are stopped.  The batch-job provider
starts the same node appliance as a job of a second Slurm
(scripts/slurm-local.sh).
"""

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import is_uml

from apppot.config import apppot_home
from apppot_mpi.orchestrator.providers import node_image

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.uml, pytest.mark.root]


def sh_vars(text):
    return dict(line.split("=", 1) for line in text.split() if "=" in line)


@pytest.fixture(scope="module")
def elastic():
    assert os.getuid() == 0, "the orchestrator's Slurm tests run as root"
    assert node_image().exists(), \
        f"node image missing: {node_image()} (apppot-orchestrator image)"
    env = dict(os.environ, ELASTIC_NODES="3")
    up = subprocess.run([REPO / "scripts/slurm-elastic.sh", "up"], env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
    assert up.returncode == 0, f"slurm-elastic.sh up failed:\n{up.stderr}"
    v = sh_vars(up.stdout)
    v["env"] = {k: val for k, val in os.environ.items()
                if not k.startswith("SLURM_")}
    v["env"].update(SLURM_CONF=v["SLURM_CONF"],
                    APPPOT_HOME=str(apppot_home()))
    yield v
    subprocess.run([REPO / "scripts/slurm-elastic.sh", "down"], check=False,
                   timeout=120)


def in_ns(el, argv, **kw):
    return subprocess.run(["nsenter", f"--net=/run/netns/{el['NETNS']}",
                           *map(str, argv)], env=el["env"], text=True,
                          capture_output=True, check=False, **kw)


class Orch:
    """One apppot-orchestrator run inside the cluster's namespace."""

    def __init__(self, el, state, *extra):
        self.el, self.state = el, Path(state)
        self.argv = ["nsenter", f"--net=/run/netns/{el['NETNS']}",
                     sys.executable, "-m", "apppot_mpi.orchestrator.cli",
                     "run", "-v", "--state-dir", str(state), "--listen",
                     "10.254.0.1:8470", "--cycle", "1", "--max-nodes", "2",
                     "--idle-time", "6", *extra]
        self.log = open(self.state.parent / "orchestrator.log", "ab")  # noqa: SIM115
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.argv, env=self.el["env"],
                                     stdout=self.log, stderr=self.log,
                                     start_new_session=True)
        return self

    def checkpoint(self):
        try:
            return json.loads((self.state / "orchestrator.json").read_text())
        except FileNotFoundError:
            return {"nodes": [], "cycle": -1, "decisions": [], "started": 0}

    def wait(self, what, cond, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.checkpoint()
            if cond(st):
                return st
            assert self.proc.poll() is None, \
                f"orchestrator exited ({self.proc.returncode}):\n{self.text()}"
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.text()}")

    def text(self):
        return (self.state.parent / "orchestrator.log").read_text()[-3000:]

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)
        return self.proc.returncode

    def shutdown(self):
        self.stop()
        subprocess.run([sys.executable, "-m", "apppot_mpi.orchestrator.cli",
                        "shutdown", "--state-dir", str(self.state)],
                       env=self.el["env"], check=False, timeout=120,
                       capture_output=True)
        self.log.close()


def ready(st):
    return [n for n in st["nodes"] if n["state"] == "READY"]


def uml_pids():
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if is_uml(p.info["cmdline"])}


def submit(el, shared, n, body):
    ids = []
    for _ in range(n):
        r = in_ns(el, ["sbatch", "--parsable", "-p", "cloud", "-D", shared,
                       "-o", f"{shared}/%j.out", "--wrap", body])
        assert r.returncode == 0, r.stderr
        ids.append(r.stdout.strip())
    return ids


def queue_empty(el):
    r = in_ns(el, ["squeue", "-h", "-p", "cloud"])
    return r.returncode == 0 and not r.stdout.strip()


def wait_for(what, cond, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_burst_starts_nodes_that_run_jobs_survives_restart_stops_idle(
        elastic, tmp_path):
    state = tmp_path / "state"
    shared = state / "shared"
    shared.mkdir(parents=True)
    orch = Orch(elastic, state).start()
    try:
        orch.wait("first cycle", lambda st: st["cycle"] >= 1)
        assert not orch.checkpoint()["nodes"]  # empty queue: no node
        t0 = time.monotonic()
        jobs = submit(elastic, shared, 6, "hostname; uname -r; sleep 5")
        st = orch.wait("a node ready", ready)
        t_first = time.monotonic() - t0
        st = orch.wait("two nodes ready", lambda st: len(ready(st)) == 2)
        t_both = time.monotonic() - t0
        before = {n["nodeid"]: (n["name"], n["data"]["pid"])
                  for n in st["nodes"]}
        shown, as_json = (subprocess.run(
            [sys.executable, "-m", "apppot_mpi.orchestrator.cli", "status",
             *flags, "--state-dir", str(state)], capture_output=True,
            text=True, check=True).stdout for flags in ([], ["--json"]))
        assert "apppot-n1" in shown and "READY" in shown
        assert all(n["token"] not in as_json + shown for n in st["nodes"])
        assert sorted(n for n, _ in before.values()) == ["apppot-n1",
                                                         "apppot-n2"]
        # SIGKILL mid-burst: the appliances keep running ...
        orch.stop(signal.SIGKILL)
        assert all(psutil.pid_exists(pid) for _, pid in before.values())
        # ... and a new orchestrator on the same state dir adopts them
        orch.start()
        st = orch.wait("resume", lambda st: any(
            "resumed from" in d[1] for d in st["decisions"]) and
            st["cycle"] >= 1)
        wait_for("all jobs done", lambda: queue_empty(elastic))
        t_done = time.monotonic() - t0
        st = orch.checkpoint()
        assert st["started"] == 2, "no node may be started twice"
        alive = {n["nodeid"]: (n["name"], n["data"]["pid"])
                 for n in st["nodes"]}
        assert set(alive.items()) <= set(before.items())
        hosts = set()
        for j in jobs:
            name, release = (shared / f"{j}.out").read_text().split()[:2]
            hosts.add(name)
            assert release != platform.release()  # the guest's kernel
        assert hosts == {"apppot-n1", "apppot-n2"}
        # idle for 6 s: drained, stopped, gone from Slurm's idle nodes
        st = orch.wait("idle nodes stopped", lambda st: not st["nodes"]
                       and st["stopped"] == 2, timeout=120)
        assert [n["state"] for n in st["history"][-2:]] == ["DOWN", "DOWN"]
        info = in_ns(elastic, ["sinfo", "-h", "-N", "-p", "cloud", "-o",
                               "%N %T"]).stdout
        assert "idle" not in info, info
        wait_for("no appliance left", lambda: not uml_pids(), 30)
        assert orch.stop() == 0
        decisions = " | ".join(d[1] for d in st["decisions"])
        print(f"\nburst figures: first node ready {t_first:.1f} s, both "
              f"{t_both:.1f} s, 6 jobs done {t_done:.1f} s after submission; "
              f"{decisions}")
    finally:
        orch.shutdown()


def test_start_failure_backs_off_and_bad_token_is_refused(elastic, tmp_path):
    state = tmp_path / "state"
    # a kernel that cannot boot: every start fails, the orchestrator backs
    # off instead of starting nodes in a loop
    orch = Orch(elastic, state, "--kernel", "/bin/false").start()
    try:
        submit(elastic, state / "shared", 1, "true")
        st = orch.wait("a failed start", lambda st: st.get("failures", 0)
                       >= 1)
        time.sleep(3)
        st = orch.checkpoint()
        assert st["started"] == 1 and st["failures"] == 1
        assert any("no new node for 30 s" in d[1] for d in st["decisions"])
        # the callback refuses a wrong token
        r = in_ns(elastic, ["curl", "-s", "-o", "/dev/null", "-w",
                            "%{http_code}", "--data", "node=apppot-n1&token=x",
                            "http://10.254.0.1:8470/x/ready"])
        assert r.stdout == "403"
    finally:
        orch.shutdown()
        in_ns(elastic, ["scancel", "-p", "cloud"])


@pytest.fixture
def other_slurm():
    """A second Slurm (on the host's own namespace): the batch system the
    batch-job provider submits node appliances to."""
    up = subprocess.run([REPO / "scripts/slurm-local.sh", "up"],
                        capture_output=True, text=True, timeout=900,
                        check=False)
    assert up.returncode == 0, f"slurm-local.sh up failed:\n{up.stderr}"
    yield up.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
    subprocess.run([REPO / "scripts/slurm-local.sh", "down"], check=False,
                   timeout=60)


def test_batch_job_provider_runs_the_node_as_a_job_elsewhere(
        elastic, other_slurm, tmp_path):
    state = tmp_path / "state"
    shared = state / "shared"
    shared.mkdir(parents=True)
    host_ns = f"nsenter --net=/proc/{os.getpid()}/ns/net"
    prefix = f"{host_ns} env SLURM_CONF={other_slurm}"
    orch = Orch(elastic, state, "--provider", "batchjob", "--max-nodes", "1",
                "--submit-prefix", prefix, "--job-prefix",
                f"nsenter --net=/run/netns/{elastic['NETNS']}").start()
    other = dict(os.environ, SLURM_CONF=other_slurm)
    try:
        jobs = submit(elastic, shared, 2, "hostname; sleep 2")
        st = orch.wait("the node ready", ready, timeout=120)
        node = ready(st)[0]
        q = subprocess.run(["squeue", "-h", "-j", node["data"]["jobid"], "-o",
                            "%T %j"], env=other, capture_output=True,
                           text=True, check=False).stdout.split()
        assert q == ["RUNNING", f"apppot-node-{node['name']}"]
        wait_for("jobs done", lambda: queue_empty(elastic))
        assert {(shared / f"{j}.out").read_text().strip() for j in jobs} == \
            {node["name"]}
        orch.wait("node stopped", lambda st: not st["nodes"]
                  and st["stopped"] == 1, timeout=120)
        left = subprocess.run(["squeue", "-h", "-n",
                               f"apppot-node-{node['name']}"], env=other,
                              capture_output=True, text=True,
                              check=False).stdout
        assert not left.strip(), left
        wait_for("no appliance left", lambda: not uml_pids(), 60)
    finally:
        orch.shutdown()
