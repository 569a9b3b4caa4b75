"""Multi-node jobs: the head's handle on each other node, and the worker.

apppot-mpirun on the allocation's first node (the head) plans every
appliance, then starts ``python -m apppot_mpi.worker`` on each other node
through a remote-start class (``remote.py``).  The conversation runs over
the worker's stdin and stdout, one JSON object per line:

    head → worker   {"node", "names", "settings", "plans", "probe"}
    worker → head   {"ev": "probe", "report"}    multicast probe result
    head → worker   {"cmd": "boot"}              (only if every node heard
                                                  every other)
    worker → head   {"ev": "ready", "index"}     per appliance
                    {"ev": "rank", "rank", "status"}
                    {"ev": "error", "msg", "hint", "status", "details"}
    head → worker   EOF on stdin                 tear down and exit

A worker whose stdin closes (head gone, job over) tears its appliances
down; a head whose worker goes away (EOF, exit) tears the whole job down.
The secret for the appliances' agents is inside the plans, so it travels
only on this pipe.
"""

import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from argparse import Namespace

from apppot import status as st
from apppot.errors import ApplianceError, AppPotError, ConfigError
from apppot.process import readable
from apppot.spec import GuestSpec

from . import mcastnet

log = logging.getLogger(__name__)

WORKER_COMMAND = (sys.executable, "-m", "apppot_mpi.worker")
PROBE_TIMEOUT = 10.0  # s each node probes; covers remote start-up skew
STOP_GRACE = 15.0  # s a worker gets to tear down after EOF


def _send(stream, obj):
    stream.write(json.dumps(obj) + "\n")
    stream.flush()


# ------------------------------------------------------------------ head side
class RemoteNode:
    """The head's handle on one worker; quacks like an Appliance for
    ``appliance.wait_all`` (ready when all its appliances are)."""

    def __init__(self, index, host, argv, count):
        import shlex
        import subprocess

        self.index, self.host, self.count = index, host, count
        self.name = f"node {host}"
        log.debug("executing: %s", shlex.join(argv))
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            start_new_session=True)  # our teardown, not the terminal's ^C
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.started_at = time.monotonic()
        self.ready_at = self.exit_code = self.failure = None
        self.probe = self.error = None
        self.rank_status = {}
        self._ready = set()
        self._buf = b""
        self._eof = False

    def send(self, obj):
        try:
            self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the worker is gone: its stdout's EOF reports that

    def fileno(self):
        return self.proc.stdout.fileno()

    def poll_notices(self, timeout):
        if self._eof:
            return False
        if not readable([self], timeout):
            return False
        try:
            data = os.read(self.fileno(), 65536)
        except BlockingIOError:
            return False
        if not data:
            self._eof = True
            try:
                self.proc.wait(2)  # EOF: the worker is exiting
            except Exception:  # noqa: BLE001
                self._kill()
            return True
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            try:
                self._handle(json.loads(line))
            except (ValueError, KeyError, TypeError):
                log.warning("%s: unexpected output: %r", self.name, line[:200])
        return True

    def _handle(self, ev):
        kind = ev["ev"]
        if kind == "probe":
            self.probe = ev["report"]
        elif kind == "ready":
            self._ready.add(ev["index"])
            if len(self._ready) == self.count:
                self.ready_at = time.monotonic()
        elif kind == "rank":
            self.rank_status[int(ev["rank"])] = int(ev["status"])
        elif kind == "error":
            self.error = ev

    def result(self):
        if self.error:
            e = self.error
            raise ApplianceError(f"{self.name}: {e['msg']}",
                                 status=e.get("status", st.GUEST_CRASHED),
                                 hint=e.get("hint"), details=e.get("details"))
        raise ApplianceError(
            f"{self.name}: worker exited (status {self.proc.returncode}) "
            "while the job ran", status=st.GUEST_CRASHED,
            hint="the node's worker or its remote start was killed")

    def log_tail(self):
        return (self.error or {}).get("details") or ""

    def stop(self):
        """Ask the worker to tear down (EOF on its stdin)."""
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def _kill(self):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                self.proc.wait(3)
                return
            except Exception:  # noqa: BLE001, S112
                continue

    def close(self):
        self.stop()
        end = time.monotonic() + STOP_GRACE
        while self.proc.poll() is None and time.monotonic() < end:
            self.poll_notices(0.1)
        if self.proc.poll() is None:
            log.warning("%s: worker did not stop; killing it", self.name)
            self._kill()
        self.proc.stdout.close()


class Cluster:
    """The nodes of a multi-node job, seen from the head (node 0)."""

    def __init__(self, placement, plans, settings, starter, lan, environ):
        self.placement = placement
        self.names = [h for h, _ in placement]
        self.local = set(placement[0][1])
        self.plans = {p.index: p for p in plans}
        self.settings = settings
        self.starter = starter
        self.lan = lan
        self.environ = environ

    def commands(self):
        return [(h, self.starter.argv(h, list(WORKER_COMMAND)))
                for h, _ in self.placement[1:]]

    def start(self, interrupted=None):
        """Start the workers, probe multicast among all nodes, then let the
        workers boot; returns their handles.  Nothing boots unless every
        node hears every other."""
        nonce = secrets.token_hex(8)
        secret = self.plans[0].guest.extra["mpi"]["secret"]
        probe = {"group": self.lan.group, "port": mcastnet.probe_port(
            self.lan.port), "nonce": nonce, "count": len(self.placement),
            "ttl": self.lan.ttl, "timeout": PROBE_TIMEOUT,
            "key": mcastnet.probe_key(secret).hex()}  # on stdin, like plans
        remotes = []
        try:
            for k, ((host, indexes), (_, argv)) in enumerate(zip(
                    self.placement[1:], self.commands(), strict=True), 1):
                node = RemoteNode(k, host, argv, len(indexes))
                remotes.append(node)
                node.send({"node": k, "names": self.names,
                           "settings": self.settings.to_dict(),
                           "plans": [{"index": i, "guest": self.plans[
                               i].guest.to_json().decode(), "net_args": list(
                               self.plans[i].net_args), "ranks": list(
                               self.plans[i].ranks)} for i in indexes],
                           "probe": probe})
            self._probe(remotes, probe, interrupted)
            for node in remotes:
                node.send({"cmd": "boot"})
            return remotes
        except BaseException:
            for node in remotes:
                node.close()
            raise

    def _probe(self, remotes, probe, interrupted):
        mine = {}
        t = threading.Thread(target=lambda: mine.update(_run_probe(probe, 0)),
                             daemon=True)  # a report, or {} if it failed
        t.start()
        deadline = time.monotonic() + probe["timeout"] + 30
        while t.is_alive() or any(r.probe is None for r in remotes):
            signum = interrupted() if interrupted else None
            if signum:
                raise ApplianceError(f"interrupted by signal {signum}",
                                     status=st.from_signal(signum))
            for r in remotes:
                r.poll_notices(0.05 / len(remotes))
                if r.error:
                    r.result()
                if r.probe is None and r.proc.poll() is not None:
                    raise ConfigError(
                        f"{r.name}: the worker exited (status "
                        f"{r.proc.returncode}) before reporting",
                        hint=f"check that '{self.starter.name}' can start "
                        f"{' '.join(WORKER_COMMAND)} on {r.host}")
            if time.monotonic() > deadline:
                late = [r.name for r in remotes if r.probe is None]
                raise ConfigError(f"no probe report from {', '.join(late)}",
                                  hint="is the remote start hanging?")
        reports = [mine] + [r.probe for r in remotes]
        self.probe_reports = reports
        missing = mcastnet.probe_failures(reports, self.names)
        where = (f"group {probe['group']} port {probe['port']}, TTL "
                 f"{probe['ttl']}")
        if missing:
            raise ConfigError(
                f"multicast does not reach between the nodes ({where}): "
                + "; ".join(missing[:4]), hint="the cluster network must "
                "forward IPv4 multicast between the job's nodes (a switch "
                "with IGMP snooping needs a querier; check firewalls); or "
                "run the job on one node")
        log.info("multicast probe: all %d nodes hear each other (%s); %s",
                 len(reports), where, describe_probe(reports, self.names))


def _run_probe(probe, node):
    return mcastnet.run_probe(
        probe["group"], probe["port"], probe["nonce"], node, probe["count"],
        key=bytes.fromhex(probe["key"]), ttl=probe["ttl"],
        timeout=probe["timeout"])


def describe_probe(reports, names):
    """'node0: full mesh after 12.3 ms, rtt node1 0.21 ms; ...' (pure)."""
    parts = []
    for rep in reports:
        rtt = ", ".join(f"{names[int(p)]} {v:.3f} ms"
                        for p, v in sorted(rep["rtt_ms"].items()))
        parts.append(f"{names[rep['node']]}: full mesh after "
                     f"{rep['elapsed_ms']:.1f} ms, {rep['sent']} sent, "
                     f"{rep['received']} received, {rep.get('rejected', 0)} "
                     f"rejected, rtt {rtt or '-'}")
    return "; ".join(parts)


# ---------------------------------------------------------------- worker side
def _prepare(settings, count):
    """This node's own checks of the head's settings (kernel, image, job
    dir on a shared file system, memory), as apppot-mpirun does."""
    from apppot.start import prepare_common

    jobdir = settings["jobdir"]
    try:
        os.chdir(jobdir)
    except OSError as e:
        raise ConfigError(f"job dir {jobdir!r} is not reachable on this node",
                          hint="multi-node jobs need the job dir on a file "
                          "system every node mounts at the same path") from e
    args = Namespace(mem=f"{settings['mem'] // 1024}K", timeout=None,
                     boot_timeout=settings["boot_timeout"],
                     kernel=settings["kernel"], image=settings["image"],
                     mpi=None, changes=settings["changes"],
                     seccomp=settings.get("seccomp", "auto"))
    return prepare_common(args, os.environ, count=count)


def serve(msg, proto, stdin_fd):
    """Run this node's part of the job (see the module docstring)."""
    from apppot.start import Interrupts, uml_env
    from apppot.watchdog import Watchdog

    from .rankspawn import NodeRun, NodeSettings, RankPlan, choose_jobdir_fs

    settings = NodeSettings(**{**msg["settings"], "node": msg["node"]})
    plans = [RankPlan(p["index"], GuestSpec.from_json(p["guest"]),
                      tuple(p["net_args"]), tuple(p["ranks"]))
             for p in msg["plans"]]
    common = _prepare(msg["settings"], len(plans))
    common.kernel.require(mcastnet.TRANSPORTS[settings.transport]
                          .kernel_feature)
    why = ""
    if settings.jobdir_fs != "hostfs":
        why = mcastnet.private_netns_possible()[1]
    share_modules = choose_jobdir_fs(settings.jobdir_fs, common.kernel, why)
    report = _run_probe(msg["probe"], msg["node"])
    _send(proto, {"ev": "probe", "report": report})
    line = _readline(stdin_fd)
    if not line or json.loads(line).get("cmd") != "boot":
        return 0  # the head gave up (probe failed elsewhere)
    with Watchdog() as dog, Interrupts() as interrupted:
        node = NodeRun(settings, common.kernel, dog,
                       uml_env(os.environ, common.kernel),
                       share_modules)
        try:
            apps = node.start(plans)
            return _supervise(apps, node.supervised(), proto, stdin_fd,
                              settings.boot_timeout, interrupted)
        finally:
            node.close()


def _readline(fd):
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data


def _supervise(apps, helpers, proto, stdin_fd, boot_timeout, interrupted):
    """Report readiness and rank statuses until the head hangs up; raise
    (naming the rank or helper) when an appliance or the hub fails."""
    t0 = time.monotonic()
    ready, ranks = set(), {}
    while True:
        r = readable([stdin_fd, *apps, *helpers], 0.2)
        for app in (*apps, *helpers):
            if app in r:
                app.poll_notices(0)
        for h in helpers:
            if h.proc.poll() is not None:
                h.result()  # raises
        if stdin_fd in r and not os.read(stdin_fd, 4096):
            return 0  # EOF: the job is over
        signum = interrupted()
        if signum:
            raise ApplianceError(f"interrupted by signal {signum}",
                                 status=st.from_signal(signum))
        for i, app in enumerate(apps):
            if app.ready_at and i not in ready:
                ready.add(i)
                _send(proto, {"ev": "ready", "index": i})
            for rank, code in app.rank_status.items():
                if ranks.get(rank) != code:
                    ranks[rank] = code
                    _send(proto, {"ev": "rank", "rank": rank, "status": code})
            if app.proc.poll() is not None:
                app.poll_notices(0)
                code = app.result()  # raises with the rank's name
                raise ApplianceError(f"{app.name}: appliance exited (status "
                                     f"{code}) while the job ran",
                                     status=st.GUEST_CRASHED)
            if app.ready_at is None and time.monotonic() - t0 > boot_timeout:
                raise ApplianceError(f"{app.name}: not booted after "
                                     f"{boot_timeout:g} s",
                                     status=st.BOOT_FAILED,
                                     details=app.log_tail())


def main():
    # stdout is the protocol: keep a private copy, send everything else
    # (children included) to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    stdin_fd = 0
    line = _readline(stdin_fd)
    if not line:
        return 2
    msg = json.loads(line)
    host = msg["names"][msg["node"]]
    verbose = msg["settings"].get("verbose", 0)
    level = logging.DEBUG if verbose >= 2 else (
        logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format=f"apppot[{host}]: %(message)s")
    try:
        return serve(msg, proto, stdin_fd)
    except AppPotError as e:
        _send(proto, {"ev": "error", "msg": str(e), "hint": e.hint,
                      "details": e.details, "status": e.status})
        return e.status
    except Exception as e:  # report, then let the traceback show on stderr
        _send(proto, {"ev": "error", "msg": f"worker failed: {e!r}",
                      "status": st.APPPOT_ERROR})
        raise


if __name__ == "__main__":
    sys.exit(main())
