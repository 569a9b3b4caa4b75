"""apppot-orchestrator against a real Slurm whose compute nodes are
appliances running slurmd (scripts/slurm-elastic.sh: slurmctld and a bridge
in a network namespace this test creates; nothing on the machine's own
interfaces).  A burst of jobs makes it start nodes, the jobs run in the
appliances, the orchestrator survives SIGKILL + restart without losing or
duplicating nodes, and idle nodes are stopped.  A node runs as the
unprivileged node user and shows its jobs nothing of the host's files.
The batch-job provider starts the same node appliance as a job of a second
Slurm (scripts/slurm-local.sh), through an ssh-like prefix.  Jobs get no
host directory: they run with srun, which streams their output back.
"""

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
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

    def shutdown(self, *extra):
        """``shutdown`` where ``run`` ran (in the cluster's namespace); its
        CompletedProcess."""
        self.stop()
        r = subprocess.run(["nsenter", f"--net=/run/netns/{self.el['NETNS']}",
                            sys.executable, "-m",
                            "apppot_mpi.orchestrator.cli", "shutdown",
                            "--state-dir", str(self.state), *extra],
                           env=self.el["env"], check=False, timeout=120,
                           capture_output=True, text=True)
        self.log.close()
        return r


def ready(st):
    return [n for n in st["nodes"] if n["state"] == "READY"]


def uml_pids():
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if is_uml(p.info["cmdline"])}


def submit(el, n, body):
    """``n`` sbatch jobs whose output nobody reads (it stays on the node)."""
    ids = []
    for _ in range(n):
        r = in_ns(el, ["sbatch", "--parsable", "-p", "cloud", "-D", "/tmp",
                       "-o", "/dev/null", "--wrap", body])
        assert r.returncode == 0, r.stderr
        ids.append(r.stdout.strip())
    return ids


class Sruns:
    """Jobs run with srun from the host (in the cluster's namespace): their
    output streams back here, as with any cluster without shared files."""

    def __init__(self, el, n, body, *extra):
        self.procs = [subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{el['NETNS']}", "srun", "-p",
             "cloud", "-D", "/tmp", *extra, "sh", "-c", body],
            env=el["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True) for _ in range(n)]

    def outputs(self, timeout=180):
        outs = []
        for p in self.procs:
            try:
                out, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.cancel()
                out, err = p.communicate()
                pytest.fail(f"srun overran {timeout} s: {out} {err}")
            assert p.returncode == 0, f"srun failed ({p.returncode}): {err}"
            outs.append(out)
        return outs

    def cancel(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def node_processes(node):
    """The node's processes on the host: its session (nodeexec exec'd into
    apppot-start), its UML processes, and the watchdog apppot-start made."""
    sid, found = node["data"]["pid"], {}
    for p in psutil.process_iter(["pid", "cmdline", "username", "ppid"]):
        try:
            cmd = p.info["cmdline"] or []
            if os.getsid(p.pid) == sid or f"umid={node['name']}" in cmd or (
                    "apppot.watchdog" in cmd and p.info["ppid"] == sid):
                found[p.pid] = (p.info["username"], cmd, p.info["ppid"])
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


def veths(el):
    return in_ns(el, ["ip", "-o", "link", "show", "type", "veth"]).stdout


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
    orch = Orch(elastic, state).start()
    jobs = None
    try:
        orch.wait("first cycle", lambda st: st["cycle"] >= 1)
        assert not orch.checkpoint()["nodes"]  # empty queue: no node
        t0 = time.monotonic()
        jobs = Sruns(elastic, 6, "hostname; uname -r; sleep 5")
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
        outputs = jobs.outputs()
        wait_for("all jobs done", lambda: queue_empty(elastic))
        t_done = time.monotonic() - t0
        st = orch.checkpoint()
        assert st["started"] == 2, "no node may be started twice"
        alive = {n["nodeid"]: (n["name"], n["data"]["pid"])
                 for n in st["nodes"]}
        assert set(alive.items()) <= set(before.items())
        hosts = set()
        for out in outputs:
            name, release = out.split()[:2]
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
        assert "apo" not in veths(elastic)
        assert orch.stop() == 0
        decisions = " | ".join(d[1] for d in st["decisions"])
        print(f"\nburst figures: first node ready {t_first:.1f} s, both "
              f"{t_both:.1f} s, 6 jobs done {t_done:.1f} s after submission; "
              f"{decisions}")
    finally:
        if jobs:
            jobs.cancel()
        orch.shutdown()


def test_start_failure_backs_off_and_bad_token_is_refused(elastic, tmp_path):
    state = tmp_path / "state"
    # a kernel that cannot boot: every start fails, the orchestrator backs
    # off instead of starting nodes in a loop
    orch = Orch(elastic, state, "--kernel", "/bin/false").start()
    try:
        submit(elastic, 1, "true")
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


FAKE_SSH = """\
#!/bin/sh
# like ssh HOST CMD...: the arguments after the host joined with spaces and
# run by the remote user's shell
shift
exec sh -c "$*"
"""


def test_batch_job_provider_runs_the_node_as_a_job_elsewhere(
        elastic, other_slurm, tmp_path):
    # a state dir whose path needs quoting, reached through an ssh-like
    # prefix: every quote must survive the remote shell's re-splitting
    state = tmp_path / "st ate 'q'"
    ssh = tmp_path / "fake-ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    host_ns = f"nsenter --net=/proc/{os.getpid()}/ns/net"
    prefix = f"{ssh} login1 {host_ns} env SLURM_CONF={other_slurm}"
    orch = Orch(elastic, state, "--provider", "batchjob", "--max-nodes", "1",
                "--submit-prefix", prefix, "--job-prefix",
                f"nsenter --net=/run/netns/{elastic['NETNS']}").start()
    other = dict(os.environ, SLURM_CONF=other_slurm)
    jobs = None
    try:
        jobs = Sruns(elastic, 2, "hostname; sleep 2")
        st = orch.wait("the node ready", ready, timeout=120)
        node = ready(st)[0]
        q = subprocess.run(["squeue", "-h", "-j", node["data"]["jobid"], "-o",
                            "%T %j"], env=other, capture_output=True,
                           text=True, check=False).stdout.split()
        assert q == ["RUNNING", f"apppot-node-{node['name']}"]
        # the node job runs as the node user, not as the job's root
        users = {u for u, _ in node_processes_of_umid(node["name"])}
        assert users == {"apppot-node"}, users
        assert {o.strip() for o in jobs.outputs()} == {node["name"]}
        wait_for("jobs done", lambda: queue_empty(elastic))
        orch.wait("node stopped", lambda st: not st["nodes"]
                  and st["stopped"] == 1, timeout=120)
        left = subprocess.run(["squeue", "-h", "-n",
                               f"apppot-node-{node['name']}"], env=other,
                              capture_output=True, text=True,
                              check=False).stdout
        assert not left.strip(), left
        wait_for("no appliance left", lambda: not uml_pids(), 60)
        log = (state / "nodes" / f"{node['name']}.log").read_text()
        assert "slurmnode: apppot-n1 ready" in log
    finally:
        if jobs:
            jobs.cancel()
        orch.shutdown("--submit-prefix", prefix)


def node_processes_of_umid(name):
    return [(p.info["username"], p.info["cmdline"])
            for p in psutil.process_iter(["username", "cmdline"])
            if f"umid={name}" in (p.info["cmdline"] or ())]


NO_HOST_FILES = """\
id -u
grep -w hostfs /proc/filesystems
mkdir -p /mnt/h
for opt in "" / . .. ../.. ../../.. ../../../.. {marker_dir} ../{marker_dir} \\
        ../../{marker_dir} ../../../{marker_dir}; do
    if mount -t hostfs -o "$opt" none /mnt/h 2>/dev/null; then
        echo "MOUNTED '$opt'"
        ls -a /mnt/h | head -5
        cat /mnt/h/{marker} /mnt/h/{marker_dir}/marker /mnt/h/marker \\
            2>/dev/null
        umount /mnt/h
    else
        echo "refused '$opt'"
    fi
done
"""


def test_node_is_unprivileged_and_shows_its_jobs_no_host_file(
        elastic, tmp_path):
    """A job on a cloud node (root in its guest) cannot mount any host path
    through hostfs; on the host the node's UML runs as the node user, in
    ptrace mode, with no real hostfs= prefix.  The job's name carries a
    newline and '|' (a forged queue line): the orchestrator still starts a
    node for it and no cycle fails."""
    secret = f"host-secret-{os.getpid()}-{time.time_ns()}"
    marker_dir = Path(tempfile.mkdtemp(prefix="apppot-test-marker-",
                                       dir="/var/tmp"))
    (marker_dir / "marker").write_text(secret)
    marker_dir.chmod(0o755)
    (marker_dir / "marker").chmod(0o644)
    script = NO_HOST_FILES.format(marker=str(marker_dir / "marker")[1:],
                                  marker_dir=str(marker_dir)[1:])
    evil = ("probe\n99999|PENDING|64|2026-01-01T00:00:00|N/A|cloud|root||"
            "fake")
    state = tmp_path / "state"
    orch = Orch(elastic, state, "--max-nodes", "1").start()
    job = None
    try:
        orch.wait("first cycle", lambda st: st["cycle"] >= 1)
        job = Sruns(elastic, 1, script + "sleep 3", "-J", evil)
        st = orch.wait("the node ready", ready)
        node = ready(st)[0]
        # the queue as the orchestrator reads it: the name intact, no forged
        # job 99999, in both formats (--json and the fallback without names)
        probe = in_ns(elastic, [sys.executable, "-c", (
            "import json; from apppot_mpi.orchestrator import batch as b\n"
            "s = b.Slurm('cloud')\n"
            "print(json.dumps([[j.jobid, j.name, j.state] for j in s.jobs()] "
            "+ [[j.jobid, j.name, j.state] for j in b.parse_squeue(b.run("
            "s.squeue_argv(as_json=False)))]))")])
        assert probe.returncode == 0, probe.stderr
        seen = json.loads(probe.stdout)
        assert len(seen) == 2 and seen[0][1] == evil and seen[1][1] == ""
        assert seen[0][0] == seen[1][0] != "99999"
        assert "skipped" not in probe.stderr, probe.stderr
        # on the host: every process of the node is the node user's ...
        procs = node_processes(node)
        umls = {pid: cmd for pid, (_, cmd, ppid) in procs.items()
                if any(a.startswith("uml_dir=") for a in cmd)}
        assert umls, procs
        assert {u for u, _, _ in procs.values()} == {"apppot-node"}, procs
        kernel = [pid for pid in umls  # UML's main process (its helpers
                  if procs[pid][2] == node["data"]["pid"]]  # come and go)
        assert len(kernel) == 1, umls
        ps = subprocess.run(["ps", "-o", "user=", "-p", str(kernel[0])],
                            capture_output=True, text=True, check=True)
        assert ps.stdout.strip() == "apppot-node"
        # ... in ptrace mode, with no host directory behind hostfs=
        for cmd in umls.values():
            assert {a for a in cmd if a.startswith("seccomp=")} <= {
                "seccomp=off"}, cmd
            hostfs = [a.split("=", 1)[1] for a in cmd
                      if a.startswith("hostfs=")]
            assert hostfs == ["/dev/null/apppot-no-host-files"], cmd
            assert not any(str(state) in a or str(marker_dir) in a
                           for a in cmd)
        # the job, as root in its guest, found nothing of the host
        out = job.outputs()[0]
        lines = out.splitlines()
        assert lines[0] == "0", out  # root in the guest
        assert lines[1].split() == ["nodev", "hostfs"], out  # it could mount
        assert secret not in out and "MOUNTED" not in out, out
        assert len([x for x in lines if x.startswith("refused")]) == 11, out
        st = orch.checkpoint()
        assert not any("cycle failed" in d[1] for d in st["decisions"]), \
            st["decisions"]
    finally:
        if job:
            job.cancel()
        orch.shutdown()
        shutil.rmtree(marker_dir, ignore_errors=True)
