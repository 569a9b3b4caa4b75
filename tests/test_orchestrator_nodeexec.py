"""nodeexec: root opens the node's packet socket, the appliance runs as the
unprivileged node user with ``apppot-start --net fd:3:... --no-job-dir``.

In a network namespace of the test's own: a veth pair whose host end has
10.77.0.1 and a TCP server; the appliance on the other end (through the
inherited packet socket) connects to it.  On the host the appliance's
processes belong to the node user; in the guest the program runs in the
user's home and no hostfs mount reaches a host file.
"""

import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import NOBODY, as_user, finish, is_uml

from apppot.config import apppot_home
from apppot.errors import ConfigError
from apppot_mpi.orchestrator.providers import tx_checksum_off

pytestmark = [pytest.mark.uml, pytest.mark.root]
NODE_USER = "apppot-node"

GUEST = """\
import os, socket, subprocess
print("uid", os.getuid(), "cwd", os.getcwd())
s = socket.create_connection(("10.77.0.1", 7777), 10)
print("got", s.recv(100).decode())
mounts = [subprocess.run(["sudo", "-n", "mount", "-t", "hostfs", "-o", opt,
                          "none", "/mnt"], capture_output=True).returncode
          for opt in ("/", "..", "../..", "/var/tmp", "../var/tmp")]
print("mounts", mounts)
"""


@pytest.fixture
def netns():
    name = f"apppot-test-nx-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    run = ["ip", "-n", name]
    try:
        subprocess.run([*run, "link", "set", "lo", "up"], check=True)
        subprocess.run([*run, "link", "add", "nxg", "type", "veth", "peer",
                        "name", "nxh"], check=True)
        subprocess.run([*run, "addr", "add", "10.77.0.1/24", "dev", "nxh"],
                       check=True)
        for dev in ("nxh", "nxg"):
            subprocess.run([*run, "link", "set", dev, "up"], check=True)
        subprocess.run(["nsenter", f"--net=/run/netns/{name}",
                        sys.executable, "-c", "import sys; from apppot_mpi."
                        "orchestrator.providers import tx_checksum_off; "
                        "tx_checksum_off('nxh')"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def serve_once(ns, payload):
    """A TCP server on 10.77.0.1:7777 in ``ns`` that sends ``payload``."""
    code = ("import socket, sys\n"
            "l = socket.socket()\n"
            "l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "l.bind(('10.77.0.1', 7777)); l.listen(); l.settimeout(90)\n"
            "c, _ = l.accept(); c.sendall(sys.argv[1].encode())\n")
    return subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}",
                             sys.executable, "-c", code, payload])


def test_node_appliance_runs_as_the_node_user_on_an_inherited_socket(
        netns, tmp_path):
    (tmp_path / "marker").write_text("host-only")
    server = serve_once(netns, "hello-node")
    argv = ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-m",
            "apppot_mpi.orchestrator.nodeexec", "--user", NODE_USER,
            "--link", "nxg", "--", sys.executable, "-m", "apppot.start",
            "--seccomp", "off", "--no-job-dir", "--net",
            "fd:3:10.77.0.2/24", "--", "python3", "-c", GUEST]
    env = dict(os.environ, APPPOT_HOME=str(apppot_home()))
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    users = set()

    def watch():  # the appliance's processes (after nodeexec's exec)
        while proc.poll() is None:
            for p in psutil.process_iter(["cmdline", "username"]):
                cmd = p.info["cmdline"] or []
                if (is_uml(cmd) and f"umid=apppot-{proc.pid}" in cmd) or (
                        p.pid == proc.pid and cmd[1:3] == ["-m",
                                                           "apppot.start"]):
                    users.add(p.info["username"])
            time.sleep(0.1)

    t = threading.Thread(target=watch)
    t.start()
    out, err = finish(proc, 120)
    t.join()
    server.wait(10)
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    uid = int(subprocess.run(["id", "-u", NODE_USER], capture_output=True,
                             text=True, check=True).stdout)
    assert lines[0] == f"uid {uid} cwd /home/{NODE_USER}"
    assert lines[1] == "got hello-node"
    assert lines[2] == "mounts [32, 32, 32, 32, 32]"  # every mount fails
    assert users == {NODE_USER}, users  # the UML kernel and apppot-start
    assert b"host-only" not in out


def test_nodeexec_refuses_root_as_node_user_and_unprivileged_callers(netns):
    base = [sys.executable, "-m", "apppot_mpi.orchestrator.nodeexec",
            "--link", "nxg"]
    for argv, msg in (
            ([*base, "--user", "root", "--", "true"], "never run as root"),
            ([*base, "--user", "nosuchuser", "--", "true"], "does not exist"),
            ([*as_user(NOBODY), *base, "--", "true"], "must run as root"),
            ([*base[:-2], "--link", "nosuchlink", "--", "true"],
             "cannot open a packet socket on 'nosuchlink'")):
        r = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", *argv],
                           capture_output=True, text=True, check=False)
        assert r.returncode == 125, r.stderr
        assert msg in r.stderr and "hint:" in r.stderr
        assert r.stderr.count("\n") == 2, r.stderr


def test_tx_checksum_off_names_a_missing_link():
    with pytest.raises(ConfigError, match="cannot turn off tx checksum "
                       "offload on 'no-such-link'"):
        tx_checksum_off("no-such-link")
