"""Multi-node jobs on a simulated cluster: network namespaces joined by a
bridge (in a namespace of its own: nothing touches the host's interfaces),
a batch allocation naming them, and the ``netns`` remote start.
"""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import STOCK_KERNEL, finish, is_uml, tool

pytestmark = [pytest.mark.uml, pytest.mark.root]

PROG = """\
import socket, sys, time
from mpi4py import MPI
c = MPI.COMM_WORLD
total = c.allreduce(c.rank + 1)
print(f"rank {c.rank} of {c.size} on {socket.gethostname()} sum {total}",
      flush=True)
if sys.argv[1:] == ["hang"]:
    if c.rank == 0:
        open("started", "w").close()
    time.sleep(600)
"""


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def cluster():
    """Two nodes (node0, node1) on one switch; yields the netns prefix."""
    assert os.getuid() == 0, "simulated nodes need root (ip netns)"
    prefix = f"apppot-t{os.getpid()}-"
    switch = prefix + "switch"
    made = []
    try:
        ip("netns", "add", switch)
        made.append(switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge",
           "mcast_snooping", "0")
        ip("-n", switch, "link", "set", "br0", "up")
        for k in range(2):
            ns = f"{prefix}node{k}"
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name",
               f"port{k}", "netns", switch)
            ip("-n", ns, "addr", "add", f"192.168.77.{k + 1}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
            ip("-n", switch, "link", "set", f"port{k}", "master", "br0", "up")
        yield prefix
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def sge_env(jobdir, prefix, slots=2):
    pe = jobdir / "pe_hostfile"
    pe.write_text("".join(f"node{k} {slots} all.q@node{k} UNDEFINED\n"
                          for k in range(2)))
    return {"PE_HOSTFILE": str(pe), "JOB_ID": "4242",
            "APPPOT_NETNS_PREFIX": prefix}


def slurm_env(prefix):
    return {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[0-1]",
            "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NTASKS": "4",
            "APPPOT_NETNS_PREFIX": prefix}


def mpirun(prefix, node, args, *, env, cwd, **kw):
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "PE_", "PBS_", "LSB_", "JOB_ID"))}
    full.update(env)
    argv = ["ip", "netns", "exec", f"{prefix}{node}", tool("apppot-mpirun"),
            "--launcher", "netns", *args]
    return subprocess.Popen(argv, env=full, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def ranks(out):
    return sorted(line for line in out.splitlines() if line.startswith("rank"))


@pytest.mark.parametrize("batch,mpi,mode", [
    ("sge", "openmpi", "hub"), ("slurm", "openmpi", "node"),
    ("sge", "mpich", "hub"), ("sge", "openmpi", "mcast")])
def test_four_ranks_split_over_two_nodes(cluster, image, mpich_image, jobdir,
                                         own_kernel, batch, mpi, mode):
    """hub: one appliance per rank, hubs joined across the nodes; node: one
    SMP appliance per node (own kernel); mcast: the legacy transport."""
    (jobdir / "prog.py").write_text(PROG)
    env = sge_env(jobdir, cluster) if batch == "sge" else slurm_env(cluster)
    opts = {"hub": ["--transport", "hub", "--per", "rank"],
            "node": ["--kernel", own_kernel, "--per", "node"],
            "mcast": ["--kernel", STOCK_KERNEL, "--transport", "mcast",
                      "--allow-open-lan"]}[mode]
    t0 = time.monotonic()
    p = mpirun(cluster, "node0", ["-v", "--mpi", mpi, *opts, "python3",
                                  "prog.py"], env=env, cwd=jobdir)
    out, err = finish(p, 300)
    wall = time.monotonic() - t0
    assert p.returncode == 0, err
    host = (lambda i: f"r{i // 2}") if mode == "node" else (lambda i: f"r{i}")
    assert ranks(out) == [f"rank {i} of 4 on {host(i)} sum 10"
                          for i in range(4)]
    assert ("nodes: node0: appliances 0; node1: appliances 1" if mode ==
            "node" else "nodes: node0: appliances 0,1; node1: appliances 2,3"
            ) in err
    if mode != "mcast":  # the hubs carried frames between the nodes
        assert re.search(r"hub: frames_in \d+, .* net_in [1-9]", err), err
    assert "multicast probe: all 2 nodes hear each other" in err
    assert "ttl 1" in err
    print(f"multi-node 4-rank job ({batch}, {mpi}, {mode}): {wall:.2f} s")
    print([line for line in err.splitlines() if "probe" in line
           or "timings" in line])


def test_probe_fails_when_multicast_is_not_forwarded(cluster, image, jobdir):
    # the switch stops flooding multicast to node1's port (as a switch with
    # IGMP snooping and no querier does): node1 hears nobody
    subprocess.run(["bridge", "-n", f"{cluster}switch", "link", "set", "dev",
                    "port1", "mcast_flood", "off"], check=True)
    (jobdir / "prog.py").write_text(PROG)
    env = sge_env(jobdir, cluster)
    before = set(os.listdir(jobdir))
    t0 = time.monotonic()
    p = mpirun(cluster, "node0", ["python3", "prog.py"], env=env, cwd=jobdir)
    out, err = finish(p, 120)
    assert p.returncode == 125, err
    assert "multicast does not reach between the nodes" in err
    assert "node1 did not hear node0" in err and "hint:" in err
    assert "node0 did not hear node1" not in err  # the other way works
    assert time.monotonic() - t0 < 30
    assert set(os.listdir(jobdir)) == before  # nothing booted, nothing lost


def _worker_of(head):
    for child in psutil.Process(head).children(recursive=True):
        if "apppot_mpi.worker" in " ".join(child.cmdline()):
            return child
    return None


def test_killing_a_nodes_worker_ends_the_job(cluster, image, jobdir):
    (jobdir / "prog.py").write_text(PROG)
    p = mpirun(cluster, "node0", ["-v", "--per", "rank", "python3", "prog.py",
                                  "hang"],
               env=sge_env(jobdir, cluster), cwd=jobdir)
    deadline = time.monotonic() + 120
    while not (jobdir / "started").exists():
        assert p.poll() is None, p.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    worker = _worker_of(p.pid)
    assert worker is not None
    umls = [c for c in psutil.Process(worker.pid).children(recursive=True)
            if is_uml(c.cmdline())]
    assert umls  # node1's appliances run under its worker
    t_kill = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)
    out, err = finish(p, 60)
    assert p.returncode == 121, err
    assert "node node1: worker exited" in err
    assert time.monotonic() - t_kill < 20
    print(f"job ended {time.monotonic() - t_kill:.2f} s after the kill:\n{err}")
    # conftest's no_leftovers: no UML, helper, diod, holder or run dir left


HOLDER_CHECK = """\
import os, shutil, socket, tempfile
from pathlib import Path
from apppot import share
from apppot_mpi.mcastnet import NetnsHolder
holder = NetnsHolder()
d = Path(tempfile.mkdtemp(prefix="apppot-test-holder-"))
server = share.NinePServer(d, os.getuid(), d / "diod.log",
                           enter=holder.enter)
port = server.start()
try:
    socket.create_connection(("127.0.0.1", port), 0.5)
    print("reachable")
except OSError:
    print("closed", share.listening_port(server.proc.pid) == port)
server.stop()
holder.close()
shutil.rmtree(d)
"""


@pytest.mark.parametrize("user", [None, "nobody"])
def test_job_dir_server_is_out_of_reach_of_the_hosts_loopback(user, nobody):
    # with several nodes the launcher stays in the cluster's namespace; the
    # 9P server (no authentication but the user name) must not listen there
    import sys

    from conftest import as_user

    r = subprocess.run(as_user(nobody if user else None) + [
        sys.executable, "-c", HOLDER_CHECK], capture_output=True, text=True,
        cwd="/tmp", env=dict(os.environ, HOME="/tmp"), timeout=60, check=False)
    assert r.stdout.split() == ["closed", "True"], r.stderr


FORGER = """\
import socket, sys
group, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
frame = b"\\xff" * 6 + bytes.fromhex("020000000099") + b"\\x08\\x06" + b"\\0" * 28
for node in (0, 1, 7):  # a frame claiming each node, with a made-up tag
    s.sendto(b"APHB" + bytes([node]) + b"\\0" * 16 + frame, (group, port))
s.sendto(frame, (group, port))  # and a bare frame
"""


def test_hubs_drop_frames_without_the_jobs_key(cluster, image, jobdir):
    """Anyone on the cluster network can reach the job's group; the hubs
    deliver only frames tagged with the job's key."""
    (jobdir / "forge.py").write_text(FORGER)
    p, log = _job_log(jobdir, cluster, [
        "--transport", "hub", "--per", "rank", "--timeout", "60", "python3",
        "-c", "from mpi4py import MPI; import os, time; c = MPI.COMM_WORLD; "
        "c.Barrier(); open('started', 'w').close() if c.rank == 0 "
        "else None; [time.sleep(0.1) for _ in range(100) "
        "if not os.path.exists('forged')]; "
        "print(c.rank, c.allreduce(c.rank + 1), flush=True)"])
    group, port = _started_lan(p, jobdir, log)
    subprocess.run(["ip", "netns", "exec", f"{cluster}node1", sys.executable,
                    str(jobdir / "forge.py"), group, port], check=True,
                   timeout=30)
    (jobdir / "forged").touch()
    out, _ = finish(p, 120)
    err = log.read_text()
    assert p.returncode == 0, err
    assert sorted(out.split("\n")[:-1]) == ["0 10", "1 10", "2 10", "3 10"]
    head = re.search(r"^apppot: hub: .*forged (\d+)", err, re.M)
    assert head and int(head.group(1)) >= 4, err  # all caught at node0


def test_open_mcast_lan_across_nodes_is_refused(cluster, image, jobdir):
    """Without --allow-open-lan: one line and a hint, nothing started on
    either node, the job dir untouched."""
    before = set(os.listdir(jobdir))
    t0 = time.monotonic()
    p = mpirun(cluster, "node0", ["--kernel", STOCK_KERNEL, "--transport",
                                  "mcast", "--output-filename", "out",
                                  "true"],
               env=sge_env(jobdir, cluster, slots=1), cwd=jobdir)
    out, err = finish(p, 60)
    assert p.returncode == 125, err
    assert err.splitlines() == [
        "apppot-mpirun: error: LAN transport mcast across nodes: the job's "
        "LAN (MPI data, launcher control) would be open to anyone on the "
        "cluster network who joins its multicast group",
        "hint: use --transport hub (frames between nodes are "
        "authenticated); --allow-open-lan accepts the open LAN"]
    assert time.monotonic() - t0 < 10
    assert set(os.listdir(jobdir)) == before | {"pe_hostfile"}


def _started_lan(p, jobdir, log):
    """Wait for the job's "started" file; its LAN group and port."""
    deadline = time.monotonic() + 120
    while not (jobdir / "started").exists():
        assert p.poll() is None, log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return re.search(r"LAN group (\S+) port (\d+)", log.read_text()).groups()


def _job_log(jobdir, cluster, args, env=None):
    """Start apppot-mpirun -v on node0, stderr to a file the attackers
    read (the LAN group is in its plan, as a verbose log would show)."""
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "PE_", "PBS_", "LSB_", "JOB_ID"))}
    full.update(env or sge_env(jobdir, cluster))
    log = jobdir / "mpirun.err"
    with open(log, "w") as err:
        p = subprocess.Popen(
            ["ip", "netns", "exec", f"{cluster}node0", tool("apppot-mpirun"),
             "--launcher", "netns", "-v", *args], env=full, cwd=jobdir,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            text=True)
    return p, log


PROBE_FLOODER = r"""
import json, os, re, socket, sys, time
log, done = sys.argv[1], sys.argv[2]
end = time.monotonic() + 60
m = None
while not m:  # the plan (group and port) is logged before the probe
    m = re.search(r"LAN group (\S+) port (\d+)", open(log).read())
    assert time.monotonic() < end
    time.sleep(0.002)
group, port = m[1], int(m[2]) + 1  # mcastnet.probe_port
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
rx.bind((group, port))
rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
              socket.inet_aton(group) + bytes(4))
rx.setblocking(False)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
deep = b"[" * 30000 + b"]" * 30000  # the old probe's RecursionError
junk = [deep, b"{}", b"null", b"\xff\xfe", b"A" * 60000, b"",
        json.dumps({"k": 1}).encode(), b"APPR" + bytes(16) + b"{}"]
real, sent = [], 0
while time.monotonic() < end and not os.path.exists(done):
    try:
        while True:  # the nodes' own probe datagrams (sent from the port)
            d, addr = rx.recvfrom(65536)
            if addr[1] == port:
                real = (real + [d])[-4:]
    except BlockingIOError:
        pass
    forged = []
    for d in real:  # replayed as is, and mangled
        forged += [d, d[:-1], d + b"}", d[:20] + deep[:1000], bytes(
            [d[0] ^ 1]) + d[1:]]
        i = d.find(b"{")  # the old probe's plain JSON: keep its nonce
        try:
            n = json.loads(d[i:])["n"]
            forged += [json.dumps({"n": n, "k": 1}).encode(),
                       json.dumps({"n": n, "k": 0, "t": 1, "heard": [1],
                                   "echo": {"1": 5}}).encode()]
        except (ValueError, KeyError, TypeError):
            pass
    for d in junk + forged:
        tx.sendto(d, (group, port))
        sent += 1
    time.sleep(0.001)
print(sent, len(real))
"""

PROGRESS = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
            "print(c.rank, c.allreduce(c.rank + 1), flush=True)")


def test_probe_flood_cannot_stop_a_multi_node_start(cluster, image, jobdir):
    """A sender on node1 floods the probe's group from the moment the plan
    exists: deeply nested JSON, junk, oversized datagrams, and the nodes'
    own probe datagrams captured, mangled and replayed.  The job starts
    and is correct; each node counts what it rejected."""
    (jobdir / "flood.py").write_text(PROBE_FLOODER)
    (jobdir / "mpirun.err").touch()
    flooder = subprocess.Popen(
        ["ip", "netns", "exec", f"{cluster}node1", sys.executable,
         str(jobdir / "flood.py"), str(jobdir / "mpirun.err"),
         str(jobdir / "done")], stdout=subprocess.PIPE, text=True)
    try:
        p, log = _job_log(jobdir, cluster, ["--per", "rank", "python3", "-c",
                                            PROGRESS])
        out, _ = finish(p, 240)
    finally:
        (jobdir / "done").touch()
        sent, real = map(int, flooder.communicate(timeout=30)[0].split())
    err = log.read_text()
    assert p.returncode == 0, err
    assert sorted(out.split("\n")[:-1]) == ["0 10", "1 10", "2 10", "3 10"]
    rejected = re.search(r"multicast probe: all 2 nodes hear each other "
                         r".*node0: [^;]* (\d+) rejected, .*node1: [^;]* "
                         r"(\d+) rejected", err)
    assert rejected, err
    assert sent > 1000 and real > 0, (sent, real)  # replays were sent
    assert int(rejected[1]) > 0 and int(rejected[2]) > 0
    print(f"probe flood: {sent} datagrams sent; rejected: node0 "
          f"{rejected[1]}, node1 {rejected[2]}")


REPLAYER = r"""
import socket, sys, time
group, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((group, port))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             socket.inet_aton(group) + bytes(4))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.settimeout(0.2)
captured = []
end = time.monotonic() + seconds
while time.monotonic() < end:  # the other node's frames, as they pass
    try:
        d, addr = s.recvfrom(65536)
    except TimeoutError:
        continue
    if addr[1] == port:  # a hub's (the other replayer sends from elsewhere)
        captured.append(d)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for d in captured:  # replayed into this node: its hub gets them
    tx.sendto(d, (group, port))
    time.sleep(0.0002)
print(len(captured))
"""

BUSY = """\
import os, time
from mpi4py import MPI
c = MPI.COMM_WORLD
c.Barrier()
if c.rank == 0:
    open("started", "w").close()
rounds = 0
while not c.bcast(os.path.exists("replayed") if c.rank == 0 else None):
    assert c.allreduce(c.rank + 1) == 10  # traffic between the nodes
    rounds += 1
    time.sleep(0.01)
print(c.rank, c.allreduce(c.rank + 1), rounds > 0, flush=True)
"""


def test_hubs_drop_and_count_replayed_frames(cluster, image, jobdir):
    """While the job exchanges data between the nodes, a process on each
    node captures the other node's tagged frames off the group and replays
    them all: each hub counts them as replays, none is delivered, and the
    job's results are right."""
    (jobdir / "replay.py").write_text(REPLAYER)
    (jobdir / "busy.py").write_text(BUSY)
    p, log = _job_log(jobdir, cluster, ["--transport", "hub", "--per",
                                        "rank", "--timeout", "120", "python3",
                                        "busy.py"])
    group, port = _started_lan(p, jobdir, log)
    replayers = [subprocess.Popen(
        ["ip", "netns", "exec", f"{cluster}{node}", sys.executable,
         str(jobdir / "replay.py"), group, port, "3"], stdout=subprocess.PIPE,
        text=True) for node in ("node0", "node1")]
    captured = [int(r.communicate(timeout=60)[0]) for r in replayers]
    (jobdir / "replayed").touch()
    out, _ = finish(p, 120)
    err = log.read_text()
    assert p.returncode == 0, err
    assert sorted(out.split("\n")[:-1]) == [f"{r} 10 True" for r in range(4)]
    replayed = {m[0]: int(m[1]) for m in re.findall(
        r"^apppot(\[node1\])?: hub: .*replayed (\d+)", err, re.M)}
    assert set(replayed) == {"", "[node1]"}, err
    # node0's replayer captured node1's frames and replayed them to node0
    for node, got in (("", captured[0]), ("[node1]", captured[1])):
        assert got > 100, captured
        assert replayed[node] >= 0.95 * got, (replayed, captured)
    print(f"replayed: captured {captured}, counted {replayed}")
