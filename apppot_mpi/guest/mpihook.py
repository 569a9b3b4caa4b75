"""Guest init hook for MPI appliances (installed as /usr/lib/apppot/mpihook.py).

Runs inside init (PID 1) after the network step has configured eth0 and
/etc/hosts from the launcher's LAN plan.  Steps:

1. write the MPI host file and the job secret (readable by the job user);
2. start the authenticated remote-start agent (``agent.py serve``);
3. rank 0 only: wait until every other appliance's agent answers, so the
   MPI launcher finds all hosts up.
"""

import json
import os
import socket
import subprocess
import time

MPI_DIR = "/run/apppot/mpi"
AGENT = "/usr/lib/apppot/agent.py"
AGENT_PORT = 7711


def write(path, text, mode, uid=0, gid=0):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chown(path, uid, gid)


def wait_for_peers(peers, timeout, log):
    deadline = time.monotonic() + timeout
    pending = list(peers)
    while pending:
        ip = pending[0]
        try:
            with socket.create_connection((ip, AGENT_PORT), timeout=1):
                pending.pop(0)
                continue
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"appliance {ip} did not come up within "
                                   f"{timeout:g} s") from None
            time.sleep(0.2)
    log(f"all {len(peers)} peers answer")


def run(spec, user, log):
    mpi = spec["mpi"]
    os.makedirs(MPI_DIR, mode=0o755, exist_ok=True)
    os.mkfifo(f"{MPI_DIR}/status", 0o600)  # rank statuses, see rankwrap
    os.chown(f"{MPI_DIR}/status", user["uid"], user["gid"])
    write(f"{MPI_DIR}/hostfile", mpi["hostfile"], 0o644)
    write(f"{MPI_DIR}/secret", mpi["secret"] + "\n", 0o400, user["uid"],
          user["gid"])
    config = {"secret": mpi["secret"], "ip": mpi["ip"], "uid": user["uid"],
              "gid": user["gid"], "user": user["name"], "home": user["home"],
              "cwd": spec.get("jobdir") or user["home"],
              "env": mpi.get("agent_env", {}),
              # an imported image: commands run in its tree (init's chroot)
              "root": "/run/apppot-root" if spec.get("image_root") else None}
    write(f"{MPI_DIR}/agent.json", json.dumps(config), 0o600)
    console = os.open("/dev/console", os.O_WRONLY)
    subprocess.Popen(["/usr/bin/python3", "-IB", AGENT, "serve"],
                     stdin=subprocess.DEVNULL, stdout=console, stderr=console,
                     start_new_session=True)
    os.close(console)
    if mpi["rank"] == 0:
        peers = [ip for ip in mpi["peers"] if ip != mpi["ip"]]
        wait_for_peers(peers, float(mpi.get("wait", 120)), log)
