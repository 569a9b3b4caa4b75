"""apppot-mpirun with real appliances: results, statuses, teardown, isolation.

Every LAN stays inside a network namespace: apppot-mpirun's own, or one the
test makes (``unshare -n`` with multicast routed to lo) for --no-netns runs.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import as_user, is_uml, run_job, tool

pytestmark = pytest.mark.uml

ALLREDUCE = ("from mpi4py import MPI; import socket, json; c = MPI.COMM_WORLD; "
             "h = socket.gethostname(); "
             "print(json.dumps([c.rank, c.size, h, socket.gethostbyname(h), "
             "c.allreduce(c.rank + 1), MPI.Get_library_version().split()[0]]),"
             " flush=True)")


def mpirun(args, *, cwd, user=None, input=None, timeout=240, env=None):
    full_env = {**os.environ, **(env or {})}
    if user is not None:
        full_env["HOME"] = str(cwd)
    return run_job(as_user(user) + [tool("apppot-mpirun"), *args], cwd=cwd,
                   input=input, timeout=timeout, env=full_env)


STOCK = "/usr/bin/linux.uml"
MCAST = ["--kernel", STOCK, "--transport", "mcast"]  # the legacy LAN


def rows(stdout):
    return sorted(json.loads(line) for line in stdout.decode().splitlines()
                  if line.startswith("["))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_openmpi_allreduce(jobdir, nobody, image, n):
    r = mpirun(["--per", "rank", "-n", str(n), "python3", "-c", ALLREDUCE],
               cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    out = rows(r.stdout)
    assert [row[0] for row in out] == list(range(n))
    assert all(row[1] == n and row[4] == n * (n + 1) // 2 for row in out)
    assert len({row[2] for row in out}) == n  # own hostname per rank
    assert len({row[3] for row in out}) == n  # own IP per rank
    assert {row[5] for row in out} == {"Open"}


@pytest.mark.parametrize("mpi", ["openmpi", "mpich"])
def test_ranks_share_one_smp_appliance(jobdir, nobody, image, mpich_image,
                                       own_kernel, mpi):
    r = mpirun(["--kernel", own_kernel, "--mpi", mpi, "--per", "node", "-v",
                "-n", "4", "python3", "-c", ALLREDUCE + "; import os; "
                "print('cpus', os.cpu_count()) if c.rank == 0 else None"],
               cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    out = rows(r.stdout)
    assert [(row[0], row[1], row[4]) for row in out] == [
        (i, 4, 10) for i in range(4)]
    assert {row[2] for row in out} == {"r0"}  # one appliance
    assert b"1 appliance, 4 ranks each" in r.stderr
    ncpus = min(4, os.cpu_count())
    assert f"cpus {ncpus}".encode() in r.stdout  # vCPUs up to the cores


def test_mpich_allreduce(jobdir, nobody, mpich_image):
    r = mpirun(["--mpi", "mpich", "--per", "rank", "-n", "2", "python3", "-c",
                ALLREDUCE], cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    out = rows(r.stdout)
    assert [(row[0], row[4], row[5]) for row in out] == [(0, 3, "MPICH"),
                                                          (1, 3, "MPICH")]
    assert out[0][3] != out[1][3]


def test_legacy_mcast_transport(jobdir, nobody, image):
    r = mpirun([*MCAST, "-v", "-n", "2", "python3", "-c", ALLREDUCE],
               cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    assert [row[4] for row in rows(r.stdout)] == [3, 3]
    assert b"LAN transport mcast" in r.stderr


def test_as_root_without_user_namespace(jobdir, image):
    r = mpirun(["-n", "2", "python3", "-c", ALLREDUCE], cwd=jobdir)
    assert r.returncode == 0, r.stderr
    assert [row[4] for row in rows(r.stdout)] == [3, 3]


# ranks 1 and 2 fail together right after a barrier, 2 with the larger status
FAIL_TOGETHER = ("from mpi4py import MPI; import sys; "
                 "r = MPI.COMM_WORLD.rank; MPI.COMM_WORLD.Barrier(); "
                 "sys.exit({1: 5, 2: 9}.get(r, 0))")


@pytest.mark.parametrize("mpi", ["openmpi", "mpich"])
def test_lowest_failing_rank_status(jobdir, nobody, image, mpich_image, mpi):
    # the image's mpirun reports the failure it notices first (Open MPI) or
    # the bitwise OR, 13 (Hydra); ours is the lowest failing rank's, 5
    r = mpirun(["--mpi", mpi, "-n", "3", "python3", "-c", FAIL_TOGETHER],
               cwd=jobdir, user=nobody)
    assert r.returncode == 5, r.stderr


@pytest.mark.parametrize("mpi", ["openmpi", "mpich"])
def test_failed_rank_ends_a_job_whose_other_ranks_go_on(jobdir, nobody,
                                                        image, mpich_image,
                                                        mpi):
    # rank 2 dies without MPI_Finalize while the others sleep: Hydra kills
    # them; Open MPI (told not to abort on non-zero statuses, so that ranks
    # failing together all report) leaves that to apppot-mpirun's grace
    prog = ("from mpi4py import MPI; import os, time; c = MPI.COMM_WORLD; "
            "c.Barrier(); os._exit(9) if c.rank == 2 else time.sleep(300)")
    t0 = time.monotonic()
    r = mpirun(["--mpi", mpi, "-n", "3", "python3", "-c", prog], cwd=jobdir,
               user=nobody, timeout=120)
    assert r.returncode == 9, r.stderr
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("mpi", ["openmpi", "mpich"])
def test_mpich_finalize_fix_is_preloaded(jobdir, nobody, image, mpich_image,
                                         mpi):
    # MPICH 4.0.2's finalize can deadlock (apppot_mpi/guest/mpich_finalize.c);
    # rankwrap preloads the fix into MPICH ranks only, keeping the user's
    r = mpirun(["--mpi", mpi, "-n", "2", "-x", "LD_PRELOAD=libm.so.6",
                "python3", "-c", "from mpi4py import MPI; import os; "
                "print(MPI.COMM_WORLD.rank, 'mpich_finalize.so' in "
                "open('/proc/self/maps').read()); "
                "print('preload', os.environ['LD_PRELOAD'])"],
               cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.decode().splitlines())
    loaded = mpi == "mpich"
    fix = "/usr/lib/apppot/mpich_finalize.so:" if loaded else ""
    assert lines == [f"0 {loaded}", f"1 {loaded}"] + [
        f"preload {fix}libm.so.6"] * 2


def test_mpich_ranks_finalize_together(jobdir, nobody, mpich_image):
    # one rank per appliance, all finalizing at once after a barrier: this
    # hung in MPI_Finalize in about one job in ten before the fix
    for _ in range(6):
        r = mpirun(["--mpi", "mpich", "--per", "rank", "--timeout", "60",
                    "-n", "3", "python3", "-c", FAIL_TOGETHER],
                   cwd=jobdir, user=nobody)
        assert r.returncode == 5, r.stderr


LANS = {"hub": [], "mcast": MCAST}  # teardown must not depend on the LAN


@pytest.mark.parametrize("lan", LANS)
def test_crashing_rank_tears_down_the_job(jobdir, nobody, image, lan):
    prog = ("from mpi4py import MPI; import os, time, signal; "
            "c = MPI.COMM_WORLD; c.Barrier(); "
            "os.kill(os.getpid(), signal.SIGKILL) if c.rank == 1 else "
            "time.sleep(300)")
    t0 = time.monotonic()
    r = mpirun([*LANS[lan], "-n", "2", "python3", "-c", prog], cwd=jobdir,
               user=nobody)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 60


def _uml_of_rank(rank, launcher_pid):
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if is_uml(cmd) and f"umid=r{rank}" in cmd:
            return p
    return None


@pytest.mark.parametrize("lan", LANS)
def test_dead_appliance_tears_down_the_job(jobdir, image, lan):
    p = subprocess.Popen([tool("apppot-mpirun"), *LANS[lan], "--per", "rank",
                          "-n", "2",
                          "python3", "-c", "import time; time.sleep(300)"],
                         cwd=jobdir,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        uml = None
        while uml is None and time.monotonic() < deadline:
            time.sleep(0.5)
            uml = _uml_of_rank(1, p.pid)
        assert uml is not None, "rank 1 appliance never started"
        time.sleep(5)
        t0 = time.monotonic()
        os.killpg(uml.pid, signal.SIGKILL)
        _, err = p.communicate(timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 121, err
    assert b"rank 1" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_tear_down(jobdir, nobody, image, sig):
    p = subprocess.Popen(as_user(nobody) + [tool("apppot-mpirun"), "-n", "2",
                         "sleep", "300"], cwd=jobdir, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "HOME": str(jobdir)})
    time.sleep(6)
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 128 + sig, err


def test_timeout(jobdir, nobody, image):
    t0 = time.monotonic()
    r = mpirun(["--timeout", "12", "-n", "2", "sleep", "300"], cwd=jobdir,
               user=nobody)
    assert r.returncode == 124, r.stderr
    assert b"timeout after 12 s; ranks exited: none" in r.stderr
    assert time.monotonic() - t0 < 40


@pytest.mark.parametrize("unprivileged,lan", [(True, "hub"), (False, "hub"),
                                              (True, "mcast")])
def test_sigkill_of_launcher_leaves_nothing(jobdir, nobody, image,
                                            unprivileged, lan):
    user = nobody if unprivileged else None
    p = subprocess.Popen(as_user(user) + [tool("apppot-mpirun"), *LANS[lan],
                         "--per", "rank", "-n", "2", "sleep", "300"],
                         cwd=jobdir, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "HOME": str(jobdir)})
    time.sleep(6)
    p.kill()
    p.wait()
    # the autouse fixture asserts all appliances are gone within 10 s


def test_mpirun_options(jobdir, nobody, image):
    prog = ("from mpi4py import MPI; import os, sys; r = MPI.COMM_WORLD.rank; "
            "data = sys.stdin.read() if r == 0 else ''; "
            "print(f'rank{r} {os.environ.get(\"FOO\")} {len(data)}')")
    r = mpirun(["-n", "2", "--tag-output", "-x", "FOO=bar baz", "python3",
                "-c", prog], cwd=jobdir, user=nobody, input=b"x" * 1000)
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.decode().splitlines())
    assert lines == ["[1,0]<stdout>:rank0 bar baz 1000",
                     "[1,1]<stdout>:rank1 bar baz 0"]
    r = mpirun(["-n", "2", "--per", "rank", "--log-dir", "logs",
                "--output-filename", "out",
                "python3", "-c",
                "from mpi4py import MPI; print('hi from', MPI.COMM_WORLD.rank)"],
               cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    files = sorted(p for p in (jobdir / "out").rglob("stdout"))
    assert [f.read_text() for f in files] == ["hi from 0\n", "hi from 1\n"]
    assert all(f.stat().st_uid == nobody.pw_uid for f in files)
    logs = sorted(p.name for p in (jobdir / "logs").iterdir())
    assert logs == ["rank0.log", "rank1.log"]
    assert b"apppot-init" in (jobdir / "logs" / "rank1.log").read_bytes()


def test_bad_input_errors(jobdir, nobody, image):
    r = mpirun(["-n", "2"], cwd=jobdir, user=nobody)
    assert r.returncode == 125 and b"no MPI program" in r.stderr
    r = mpirun(["-H", "a,,b", "-n", "1", "true"], cwd=jobdir, user=nobody)
    assert r.returncode == 125 and b"-H" in r.stderr and b"hint:" in r.stderr
    r = mpirun(["--subnet", "10.0.0.0/30", "--per", "rank", "-n", "4",
                "true"], cwd=jobdir, user=nobody)
    assert r.returncode == 125 and b"no room" in r.stderr
    r = mpirun(["-n", "2", "--hostfile", "missing", "true"], cwd=jobdir,
               user=nobody)
    assert r.returncode == 125 and b"cannot read" in r.stderr
    r = mpirun(["-n", "2", "--changes", "nope.tar.gz", "true"], cwd=jobdir,
               user=nobody)
    assert r.returncode == 125 and b"changes archive not readable" in r.stderr
    r = mpirun(["-n", "2", "--image", f"{jobdir}/c.cow:{image}", "true"],
               cwd=jobdir, user=nobody)
    assert r.returncode == 125 and b"one COW file cannot serve" in r.stderr


def test_no_multicast_route_fails_fast(jobdir, image):
    t0 = time.monotonic()
    r = subprocess.run(["unshare", "-n", tool("apppot-mpirun"), "--no-netns",
                        "--allow-open-lan", *MCAST, "-n", "2", "true"],
                       cwd=jobdir,
                       capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=60, check=False)
    assert r.returncode == 125, r.stderr
    assert b"no multicast route" in r.stderr and b"hint:" in r.stderr
    assert time.monotonic() - t0 < 15


SHARED_NETNS = ("ip link set lo up && ip route add 224.0.0.0/4 dev lo && "
                "exec \"$@\"")

ISOLATION = r"""
import os, socket, time, json
from mpi4py import MPI
c = MPI.COMM_WORLD
tag = os.environ["TAG"]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.bind(("", 9999))
s.settimeout(0.1)
seen = set()
c.Barrier()
end = time.time() + 8
while time.time() < end:
    if c.rank == 0:
        s.sendto(tag.encode(), ("10.253.255.255", 9999))
    try:
        seen.add(s.recvfrom(100)[0].decode())
    except socket.timeout:
        pass
allseen = c.gather(sorted(seen))
if c.rank == 0:
    print(json.dumps(allseen))
"""


@pytest.mark.parametrize("transport", ["mcast", "hub"])
def test_two_jobs_on_one_host_are_isolated(jobdir, image, transport):
    """Both jobs share one network namespace (made here) and one subnet:
    only their multicast groups (mcast), or their own hubs, keep them
    apart."""
    script = jobdir / "iso.py"
    script.write_text(ISOLATION)
    opts = " ".join(["--allow-open-lan", *MCAST] if transport == "mcast"
                    else ["--transport", "hub", "--per", "rank"])
    holder = subprocess.run(
        ["unshare", "-n", "sh", "-c", SHARED_NETNS, "sh", "sh", "-c",
         f"TAG=jobA {tool('apppot-mpirun')} --no-netns {opts} -n 2 -x TAG "
         f"python3 {script} > a.out 2> a.err & "
         f"TAG=jobB {tool('apppot-mpirun')} --no-netns {opts} -n 2 -x TAG "
         f"python3 {script} > b.out 2> b.err; wait"],
        cwd=jobdir, capture_output=True, stdin=subprocess.DEVNULL, timeout=240,
        check=False)
    assert holder.returncode == 0, holder.stderr
    a = json.loads((jobdir / "a.out").read_text())
    b = json.loads((jobdir / "b.out").read_text())
    assert a == [["jobA"], ["jobA"]], (jobdir / "a.err").read_text()
    assert b == [["jobB"], ["jobB"]], (jobdir / "b.err").read_text()


GUEST_AGENT = """
import importlib.util
spec = importlib.util.spec_from_file_location("agent",
                                              "/usr/lib/apppot/agent.py")
agent = importlib.util.module_from_spec(spec)
spec.loader.exec_module(agent)
"""

FORGE = GUEST_AGENT + r"""
import json, os, socket
from mpi4py import MPI
c = MPI.COMM_WORLD
result = None
if c.rank == 0:
    peer = socket.gethostbyname("r1")
    def attempt(key, cmd):
        s = socket.create_connection((peer, 7711), timeout=10)
        nonce = agent.recv_exact(s, agent.NONCE)
        s.sendall(agent.request_bytes(key, nonce, json.dumps(
            {"cmd": cmd}).encode()))
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        s.close()
        frames = []
        while data:
            kind, size = agent.HEAD.unpack(data[:5])
            frames.append([kind.decode(), data[5:5 + size].decode()])
            data = data[5 + size:]
        return frames
    jobdir = os.getcwd()
    forged = attempt(b"x" * 32, f"touch {jobdir}/pwned")
    secret = bytes.fromhex(open("/run/apppot/mpi/secret").read().strip())
    good = attempt(secret, "echo legit")
    result = [forged, good]
print(json.dumps(result)) if c.rank == 0 else None
c.Barrier()
"""


def test_agent_rejects_unauthenticated_requests(jobdir, nobody, image):
    script = jobdir / "forge.py"
    script.write_text(FORGE)
    r = mpirun(["--per", "rank", "-n", "2", "python3", str(script)],
               cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    forged, good = json.loads(r.stdout)
    assert forged == []  # connection closed, nothing sent back
    # positive control: the real secret works
    assert good == [["a", ""], ["o", "legit\n"], ["x", "0"]]
    assert not (jobdir / "pwned").exists()


SIEGE = GUEST_AGENT + r"""
import json, os, socket, subprocess, sys, threading, time
from mpi4py import MPI
c = MPI.COMM_WORLD
if c.rank != 0:  # their appliances' agents are the targets
    while not os.path.exists("done"):
        time.sleep(0.2)
    sys.exit(0)
peers = [socket.gethostbyname(h) for h in ("r1", "r2")]
aliases = [f"10.253.1.{k}" for k in range(1, 12)]  # other hosts on the LAN
for a in aliases:
    subprocess.run(["sudo", "ip", "addr", "add", f"{a}/16", "dev", "eth0"],
                   check=True)

def lifetime(src, slow):
    # seconds until the agent hangs up on a connection that never
    # authenticates: idle, or one byte of the head every second
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(1)
    s.connect((peers[0], 7711))
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < 15:
        try:
            if not s.recv(100):
                return time.monotonic() - t0
        except TimeoutError:
            if slow and sent < 35:
                s.send(b"x")
                sent += 1
        except OSError:
            return time.monotonic() - t0
    return None  # never dropped

stop, opened = threading.Event(), [0]
def flood(ip):  # hold 300 connections open, opening ~500 new ones a second
    held, k = [], 0
    while not stop.is_set():
        try:
            s = socket.socket()
            s.bind((aliases[k % 10], 0))
            k += 1
            s.settimeout(2)
            s.connect((ip, 7711))
            held.append(s)
            opened[0] += 1
        except OSError:
            s.close()
        if len(held) > 300:
            held.pop(0).close()
        time.sleep(0.002)
    for s in held:
        s.close()

timing = {}
timers = [threading.Thread(target=lambda: timing.update(
    idle=lifetime(aliases[10], False))), threading.Thread(
    target=lambda: timing.update(slow=lifetime(aliases[10], True)))]
floods = [threading.Thread(target=flood, args=(ip,)) for ip in peers]
for t in timers + floods:
    t.start()
time.sleep(1)
# a whole MPI job across the three appliances, started through the agents
# under siege (the launcher command apppot-mpirun itself uses)
env = {k: v for k, v in os.environ.items()
       if not k.startswith(("OMPI_", "PMIX_", "OPAL_", "ORTE_"))}
inner = subprocess.run(json.load(open("inner.json")), env=env,
                       capture_output=True, text=True, timeout=120)
probe = ("pid=$(pgrep -o -f '^/usr/bin/python3 -IB /usr/lib/apppot/agent.py "
         "serve'); grep Threads: /proc/$pid/status; sudo ls /proc/$pid/fd "
         "| wc -l")
agent_r1 = subprocess.run(["/usr/lib/apppot/apppot-rsh", "r1", probe],
                          capture_output=True, text=True, timeout=60)
stop.set()
for t in timers + floods:
    t.join()
print(json.dumps({"inner": inner.stdout.splitlines(), "rc": inner.returncode,
                  "err": inner.stderr[-2000:], "opened": opened[0],
                  "agent_r1": agent_r1.stdout.split(), **timing}), flush=True)
open("done", "w").close()
"""


def test_agent_under_siege_still_starts_an_mpi_job(jobdir, nobody, image):
    """From rank 0's appliance, addresses of its own on the LAN play other
    hosts: they hold 300 idle connections to each other appliance's agent
    and open ~500 more a second, while an idle and a slow connection time
    the agent's patience; meanwhile a new MPI job is launched through the
    agents.  Before the fix the agent grew a thread per connection and kept
    idle ones forever."""
    from apppot_mpi import rankspawn

    (jobdir / "siege.py").write_text(SIEGE)
    inner = rankspawn.launcher_argv("openmpi", 3, ["python3", "-c",
                                                   ALLREDUCE])
    inner.remove(rankspawn.RANKWRAP)  # its statuses are not the job's
    (jobdir / "inner.json").write_text(json.dumps(inner))
    r = mpirun(["--per", "rank", "-n", "3", "--timeout", "150", "python3",
                "siege.py"], cwd=jobdir, user=nobody, timeout=240)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["rc"] == 0, res["err"]
    assert [row[4] for row in rows(("\n".join(res["inner"]) + "\n").encode(
        ))] == [6, 6, 6], res
    from apppot_mpi.guest import agent
    for kind in ("idle", "slow"):  # dropped at AUTH_TIMEOUT (5 s)
        assert res[kind] is not None, res
        assert agent.AUTH_TIMEOUT - 0.5 < res[kind] < agent.AUTH_TIMEOUT + 2.5
    assert res["opened"] > 1000, res  # the siege was real
    threads, fds = int(res["agent_r1"][1]), int(res["agent_r1"][2])
    assert threads < 30 and fds < agent.MAX_PENDING + 60, res
    print(f"siege: {res['opened']} connections opened; agent on r1: "
          f"{threads} threads, {fds} fds; idle dropped after "
          f"{res['idle']:.2f} s, slow after {res['slow']:.2f} s")


def test_injected_frames_cannot_run_anything(jobdir, image):
    """A host process that joins the job's group can reach the guests with
    hand-made frames (ARP, a TCP handshake, the agent's nonce all come
    back), but without the job secret the agent runs nothing."""
    inject = Path(__file__).with_name("progs") / "inject.py"
    script = ("ip link set lo up && ip route add 224.0.0.0/4 dev lo && "
              f"{tool('apppot-mpirun')} --no-netns --allow-open-lan "
              f"{' '.join(MCAST)} -n 2 "
              "sleep 40 "
              "> job.out 2> job.err & "
              f"sleep 15; {sys.executable} {inject} {jobdir} > inject.json; "
              "wait")
    r = subprocess.run(["unshare", "-n", "sh", "-c", script], cwd=jobdir,
                       capture_output=True, stdin=subprocess.DEVNULL,
                       timeout=180, check=False)
    assert r.returncode == 0, r.stderr
    seen = json.loads((jobdir / "inject.json").read_text())
    assert seen["arp_reply"] and seen["syn_ack"], seen  # frames do get in
    assert seen["nonce_bytes"] == 32, seen
    assert seen["closed_by_agent"] and seen["answer_bytes"] == 0, seen
    assert not (jobdir / "pwned").exists()
