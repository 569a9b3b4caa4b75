"""A Slurm compute node inside an appliance (installed as
/usr/lib/apppot/slurmnode.py; run by apppot-orchestrator's local provider).

    python3 /usr/lib/apppot/slurmnode.py - < NODE.json

NODE.json (on stdin: never on a command line nor in the job dir the nodes
share) holds the node name, slurmctld's address, the cluster's munge key and
the orchestrator's ready callback with this node's token.  Runs as root in
the guest.  Steps:

1. install the munge key and start munged (as user munge);
2. mount cgroup v1 hierarchies and start slurmd in configless mode (it
   fetches slurm.conf from slurmctld);
3. when slurmd listens, tell the orchestrator (POST to the callback);
4. wait for slurmd; its exit status is the appliance's.
"""

import json
import os
import pwd
import subprocess
import sys
import time
import urllib.parse
import urllib.request

SLURMD_PORT = 6818


def log(msg):
    print(f"slurmnode: {msg}", file=sys.stderr, flush=True)


def install_munge_key(key_hex):
    munge = pwd.getpwnam("munge")
    for d in ("/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge"):
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
    os.chmod("/run/munge", 0o755)  # clients reach the socket
    path = "/etc/munge/munge.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(bytes.fromhex(key_hex))
    os.chown(path, munge.pw_uid, munge.pw_gid)
    return munge


def mount_cgroups():
    """slurmd insists on a cgroup file system even with proctrack/linuxproc
    and task/none; cgroup v1 needs no systemd (v2 would, for its scope)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "cgroup",
                    "/sys/fs/cgroup"], check=True)
    with open("/proc/cgroups") as f:
        have = {line.split()[0] for line in f if not line.startswith("#")}
    for ctl in ("freezer", "cpuacct", "memory", "devices"):
        if ctl in have:
            os.makedirs(f"/sys/fs/cgroup/{ctl}", exist_ok=True)
            subprocess.run(["mount", "-t", "cgroup", "-o", ctl, ctl,
                            f"/sys/fs/cgroup/{ctl}"], check=True)
    # the named hierarchy Slurm's cgroup/v1 plugin looks for
    os.makedirs("/sys/fs/cgroup/systemd", exist_ok=True)
    subprocess.run(["mount", "-t", "cgroup", "-o", "none,name=systemd",
                    "systemd", "/sys/fs/cgroup/systemd"], check=True)


def listening(port, timeout, proc):
    """Wait for a listening TCP socket on ``port`` while ``proc`` runs (read
    from /proc: a test connection would make slurmd log an error)."""
    want = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    next(f)
                    if any(want in line and line.split()[3] == "0A"
                           for line in f):  # 0A = LISTEN
                        return True
            except OSError:
                pass
        time.sleep(0.1)
    return False


def callback(url, nodename, token, tries=20):
    data = urllib.parse.urlencode({"node": nodename, "token": token}).encode()
    for i in range(tries):
        try:
            with urllib.request.urlopen(url, data, timeout=5) as r:  # noqa: S310
                return r.status == 200
        except OSError as e:  # the orchestrator may be restarting
            log(f"ready callback failed ({e}); retry {i + 1}")
            time.sleep(1.0)
    return False


def main(argv):
    if argv[1:] == ["-"]:
        cfg = json.load(sys.stdin)
    else:
        with open(argv[1]) as f:
            cfg = json.load(f)
    name = cfg["nodename"]
    # 1. munge, with the cluster's key
    munge = install_munge_key(cfg["munge_key"])
    munged = subprocess.Popen(["/usr/sbin/munged", "-F"], user=munge.pw_uid,
                              group=munge.pw_gid)
    for d in ("/var/spool/slurmd", "/var/log/slurm", "/run/slurm"):
        os.makedirs(d, exist_ok=True)
    mount_cgroups()
    # 2. slurmd, configless: the controller hands out slurm.conf
    slurmd = subprocess.Popen(["/usr/sbin/slurmd", "-D", "-N", name,
                               "--conf-server", cfg["conf_server"]])
    # 3. ready once slurmd accepts connections
    if not listening(SLURMD_PORT, 60, slurmd):
        log(f"slurmd did not start listening (status {slurmd.poll()})")
        slurmd.kill()
        munged.kill()
        return 1
    if not callback(cfg["callback"], name, cfg["token"]):
        log("could not reach the orchestrator's ready callback")
    else:
        log(f"{name} ready")
    # 4. serve until slurmd ends (or the appliance is halted)
    status = slurmd.wait()
    munged.terminate()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
