"""The trust boundary of a job, tried as another user would.

* The job dir's 9P server (no authentication but the user name) is never on
  a loopback another user shares: it runs in a private network namespace,
  and without one (no user namespaces) the job falls back to hostfs.
* diod is found where Debian puts it (/usr/sbin) and supervised: the job
  fails, naming it, if it dies.
* The guest can reach the host with exactly the owner's rights (hostfs
  is not a confinement), never more.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import as_user, tool
from test_mpirun import mpirun

pytestmark = pytest.mark.uml
NOUSERNS = Path(__file__).with_name("progs") / "nouserns.py"


def job_processes(launcher):
    """The launcher and everything it started (helpers, UML and theirs)."""
    root = psutil.Process(launcher)
    return [root, *root.children(recursive=True)]


def tcp_listeners(pid):
    """(network namespace, port) of every TCP socket process ``pid`` itself
    listens on (/proc/PID/net/tcp* show that process's namespace)."""
    try:
        ns = os.readlink(f"/proc/{pid}/ns/net")
        inodes = {int(os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1])
                  for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")}
    except OSError:
        return set()
    found = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for row in f.read().splitlines()[1:]:
                col = row.split()
                if col[3] == "0A" and int(col[9]) in inodes:
                    found.add((ns, int(col[1].rsplit(":", 1)[1], 16)))
    return found


CONNECT = """\
import socket, sys
for port in map(int, sys.argv[1:]):
    for host in ("127.0.0.1", socket.gethostname()):
        try:
            socket.create_connection((host, port), 1).close()
            print("open", host, port)
        except OSError as e:
            print("refused", host, port, type(e).__name__)
"""


def wait_for(path, proc, timeout=90):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def start_job(args, cwd, user=None, prefix=()):
    return subprocess.Popen(
        [*prefix, *as_user(user), tool("apppot-mpirun"), *args], cwd=cwd,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**os.environ, "HOME": str(cwd)})


def stop_job(p):
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    return p.returncode, out, err


RUNNING = ["sh", "-c", "touch up.$OMPI_COMM_WORLD_RANK; exec sleep 300"]


@pytest.mark.parametrize("mode", ["netns", "no-netns"])
def test_no_job_port_is_reachable_by_another_user(jobdir, nobody, image,
                                                  mode):
    """Every TCP port any process of the job listens on: none is in the
    host's network namespace, and another uid connecting to each port
    number on this host's addresses is refused."""
    args = ["--per", "rank", "-n", "2", *RUNNING]
    if mode == "no-netns":  # the LAN in the caller's namespace (the host's)
        args = ["--no-netns", *args]
    p = start_job(args, jobdir)  # as root: the strongest owner to steal from
    try:
        for rank in (0, 1):
            wait_for(jobdir / f"up.{rank}", p)  # written over 9P
        host_ns = os.readlink("/proc/self/ns/net")
        listeners = set()
        for proc in job_processes(p.pid):
            listeners |= tcp_listeners(proc.pid)
        assert listeners, "the 9P server listens somewhere"
        assert all(ns != host_ns for ns, _ in listeners), listeners
        ports = sorted({port for _, port in listeners})
        r = subprocess.run(as_user(nobody) + [sys.executable, "-c", CONNECT,
                           *map(str, ports)], capture_output=True, text=True,
                           timeout=60, check=True, cwd="/")
        assert "open" not in r.stdout and r.stdout.count("refused") == \
            2 * len(ports), r.stdout
        diod = [q for q in job_processes(p.pid) if q.name() == "diod"]
        assert len(diod) == 1
        assert os.readlink(f"/proc/{diod[0].pid}/ns/net") != host_ns
    finally:
        code, _, err = stop_job(p)
    assert code == 128 + signal.SIGTERM, err


def test_without_user_namespaces_the_job_dir_falls_back_to_hostfs(
        jobdir, nobody, image):
    """No private network namespace (user namespaces disabled, not root):
    9P would listen on the shared loopback, so auto takes hostfs and says
    so, and --jobdir-fs 9p is refused before anything starts."""
    prefix = [sys.executable, str(NOUSERNS), str(nobody.pw_uid),
              str(nobody.pw_gid)]
    env = {**os.environ, "HOME": str(jobdir)}
    r = subprocess.run([*prefix, tool("apppot-mpirun"), "--per", "rank",
                        "-n", "2", "sh", "-c",
                        "mount | grep -c ' type hostfs '"], cwd=jobdir,
                       env=env, capture_output=True, timeout=240, check=False,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [b"1", b"1"]
    assert b"private network namespace" in r.stderr and b"can lose data" in \
        r.stderr, r.stderr
    before = sorted(os.listdir(jobdir))
    r = subprocess.run([*prefix, tool("apppot-mpirun"), "--jobdir-fs", "9p",
                        "-n", "2", "true"], cwd=jobdir, env=env,
                       capture_output=True, timeout=60, check=False,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 125, r.stderr
    err = r.stderr.decode()
    assert err.count("\n") == 2 and "--jobdir-fs 9p: missing a private " \
        "network namespace" in err and "hint:" in err, err
    assert sorted(os.listdir(jobdir)) == before


def test_diod_is_found_in_sbin_and_its_death_ends_the_job(jobdir, nobody,
                                                          image):
    # a Debian user's PATH has no /usr/sbin: 9P all the same
    p = start_job(["--per", "rank", "-n", "2", *RUNNING], jobdir, nobody)
    try:
        wait_for(jobdir / "up.1", p)
        diod = [q for q in job_processes(p.pid) if q.name() == "diod"]
        assert len(diod) == 1
        t0 = time.monotonic()
        diod[0].kill()
        _, err = p.communicate(timeout=60)
        assert time.monotonic() - t0 < 15
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 121, err
    assert b"9P server (diod) exited" in err and b"hint:" in err, err


def test_diod_not_installed(jobdir, nobody, image):
    """Without diod, auto falls back to hostfs (saying so) and 9p is an
    error (diod hidden in a private mount namespace)."""
    hide = ["unshare", "-m", "sh", "-c",
            'mount --bind /dev/null /usr/sbin/diod && exec "$@"', "-"]
    r = subprocess.run([*hide, *as_user(nobody), tool("apppot-mpirun"),
                        "--jobdir-fs", "9p", "-n", "1", "true"], cwd=jobdir,
                       capture_output=True, timeout=60, check=False,
                       env={**os.environ, "HOME": str(jobdir)},
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 125
    assert b"--jobdir-fs 9p: missing diod" in r.stderr and b"hint:" in r.stderr


def test_guest_reaches_the_host_with_the_owners_rights_only(jobdir, nobody,
                                                           image):
    """hostfs is not a confinement: guest root (sudo) can mount hostfs with
    a path leading out of the job dir and read what the owner (nobody) can
    read on the host, and nothing more."""
    script = ("sudo mkdir -p /mnt/h && sudo mount -t hostfs none /mnt/h "
              "-o ../../../../../../.. && head -c 5 /mnt/h/etc/passwd && "
              "echo && (sudo cat /mnt/h/etc/shadow >/dev/null 2>&1 && "
              "echo shadow-read || echo shadow-denied)")
    r = mpirun(["--jobdir-fs", "hostfs", "-n", "1", "sh", "-c", script],
               cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [b"root:", b"shadow-denied"], r.stdout


def test_over_9p_the_guest_gets_no_hostfs_prefix(jobdir, nobody, image):
    r = mpirun(["--per", "rank", "-n", "1", "--debug", "sh", "-c",
                "sudo mount -t hostfs none /mnt -o / && ls /mnt | head -3; "
                "echo done"], cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [b"done"], r.stdout  # nothing listed
    uml = [ln for ln in r.stderr.decode().splitlines()
           if "executing:" in ln and "uml_dir=" in ln]
    from apppot.spec import NO_HOSTFS  # below /dev/null: no path reaches it

    assert len(uml) == 1 and f"hostfs={NO_HOSTFS} " in uml[0], uml
