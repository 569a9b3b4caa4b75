"""Providers: start and stop compute nodes.

A provider never declares a node READY (only the node's own callback does);
it reports nodes that went away.  Interface:

* ``start(node) -> dict``: start it; the dict (pid, instance id, job id…)
  is kept in ``node.data`` and checkpointed;
* ``update(nodes) -> {nodeid: reason}``: which of these nodes are gone;
* ``stop(node)``: stop it; must not return before it is stopped (it runs
  in the orchestrator's thread pool) or raise so that it is retried;
* ``adopt(nodes)``: after a restart, nodes from the checkpoint.
"""

import ipaddress
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from apppot.errors import ConfigError
from apppot.images import cached_path

from . import batch as batchmod

log = logging.getLogger("apppot.orchestrator")
PROVIDERS = {}


def register(cls):
    PROVIDERS[cls.name] = cls
    return cls


class Provider:
    name = "?"

    def start(self, node):
        raise NotImplementedError

    def update(self, nodes):
        return {}

    def stop(self, node):
        raise NotImplementedError

    def adopt(self, nodes):
        pass

    def describe(self):
        return self.name


def ip(*args, check=True):
    argv = ["ip", *args]
    log.debug("executing: %s", shlex.join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise ConfigError(f"{shlex.join(argv)}: {proc.stderr.strip()}",
                          hint="the local provider needs root (or "
                          "CAP_NET_ADMIN) in the cluster's network namespace")
    return proc.stdout


def bridge_network(bridge):
    """The bridge's IPv4 network (e.g. 10.254.0.1/24), checked."""
    out = ip("-j", "-4", "addr", "show", "dev", bridge, check=False)
    try:
        info = json.loads(out or "[]")
        a = info[0]["addr_info"][0]
        return ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
    except (ValueError, IndexError, KeyError):
        raise ConfigError(f"no IPv4 bridge {bridge!r} in this network "
                          "namespace", hint="run scripts/slurm-elastic.sh up "
                          "and the orchestrator inside its namespace, or give "
                          "--bridge") from None


def node_image(environ=None):
    """Where ``apppot-orchestrator image`` puts the node image."""
    return cached_path(Path("images") / "apppot-slurm-node.img", environ)


@register
class LocalAppliances(Provider):
    """Appliances on this machine that boot as Slurm compute nodes.

    Each node: a veth pair (one end on the cluster's bridge, the appliance
    on the other through a packet socket), a 0600 JSON file with the munge
    key and its callback token (fed to the guest on stdin: never on a
    command line nor in a directory the nodes share), and ``apppot-start``
    in its own session running slurmd in the guest.  The job dir of every
    node is ``shared_dir`` (mounted at the same path, for job files).  The
    appliance outlives the orchestrator, so a restart adopts it.
    """

    name = "local"
    ID_KEY = "pid"  # in node.data once started

    def __init__(self, state_dir, callback_url, *, shared_dir=None,
                 bridge="br0",
                 conf_server=None, munge_key="/etc/munge/munge.key",
                 image=None, kernel=None, mem="256M", stop_timeout=30.0):
        self.dir = Path(state_dir)
        self.shared = Path(shared_dir) if shared_dir else self.dir / "shared"
        self.callback_url = callback_url
        self.bridge = bridge
        self.net = bridge_network(bridge)
        self.conf_server = conf_server or f"{self.net.ip}:6817"
        self.munge_key = Path(munge_key)
        if not os.access(self.munge_key, os.R_OK):
            raise ConfigError(f"cannot read the munge key {str(munge_key)!r}",
                              hint="the nodes need the cluster's key; run as "
                              "root or give --munge-key")
        self.image = Path(image) if image else node_image()
        if not self.image.exists():
            raise ConfigError(f"node image not found: {str(self.image)!r}",
                              hint="build it: apppot-orchestrator image")
        self.kernel, self.mem = kernel, mem
        self.stop_timeout = stop_timeout
        self._procs = {}  # nodeid → Popen (our children: reaped here)
        (self.dir / "nodes").mkdir(parents=True, exist_ok=True, mode=0o700)
        self.shared.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_shutdown(cls, state_dir, stop_timeout=30.0):
        """Just enough of a provider to stop nodes from a checkpoint."""
        self = cls.__new__(cls)
        self.dir, self._procs, self.stop_timeout = Path(state_dir), {}, \
            stop_timeout
        self.submit_prefix = []
        return self

    def links(self, node):
        return f"apo{node.nodeid}h", f"apo{node.nodeid}g"  # host, guest end

    def node_config(self, node):
        return {"nodename": node.name, "conf_server": self.conf_server,
                "munge_key": self.munge_key.read_bytes().hex(),
                "callback": self.callback_url, "token": node.token}

    def appliance_argv(self, node):
        _, guest_end = self.links(node)
        argv = [sys.executable, "-m", "apppot.start", "--image",
                str(self.image), "--id", node.name, "--mem", self.mem,
                "--net", f"raw:{guest_end}:{node.address}/"
                f"{self.net.network.prefixlen}"]
        if self.kernel:
            argv += ["--kernel", str(self.kernel)]
        return argv + ["--", "python3", "/usr/lib/apppot/slurmnode.py", "-"]

    def prepare(self, node):
        """The node's links and config file; its appliance command and the
        config file (the command's stdin)."""
        if not node.address:
            raise ConfigError(f"{node.name}: no address for it in the batch "
                              "system", hint="declare NodeAddr= for the node")
        host_end, guest_end = self.links(node)
        ip("link", "del", host_end, check=False)  # a stale one from a crash
        ip("link", "add", guest_end, "type", "veth", "peer", "name", host_end)
        ip("link", "set", host_end, "master", self.bridge, "up")
        ip("link", "set", guest_end, "up")
        cfg = self.dir / "nodes" / f"{node.name}.json"
        fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.node_config(node), f)
        return self.appliance_argv(node), cfg

    def start(self, node):
        argv, cfg = self.prepare(node)
        logf = self.dir / "nodes" / f"{node.name}.log"
        log.info("%s: executing: %s < %s", node.name, shlex.join(argv), cfg)
        with open(logf, "ab") as out, open(cfg, "rb") as stdin:
            proc = subprocess.Popen(argv, cwd=self.shared, stdin=stdin,
                                    stdout=out, stderr=out,
                                    start_new_session=True)
        self._procs[node.nodeid] = proc
        return self._record(node, {
            "pid": proc.pid, "since": psutil.Process(proc.pid).create_time(),
            "log": str(logf)})

    def _record(self, node, data):
        """Note what was started before the orchestrator checkpoints it: if
        it dies in between, ``adopt`` finds the appliance from this file."""
        path = self.dir / "nodes" / f"{node.name}.started"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"nodeid": node.nodeid, **data}))
        os.replace(tmp, path)
        return data

    def adopt(self, nodes):
        for node in nodes:
            if self.ID_KEY in node.data:
                continue
            try:
                rec = json.loads((self.dir / "nodes" / f"{node.name}.started"
                                  ).read_text())
            except (OSError, ValueError):
                continue
            if rec.pop("nodeid") == node.nodeid:
                node.data.update(rec)
                log.info("%s: adopted from its start record", node.name)

    def _gone(self, node):
        """None while the node's appliance runs, else why it is gone."""
        proc = self._procs.get(node.nodeid)
        if proc is not None:
            code = proc.poll()
            return None if code is None else f"appliance exited ({code})"
        pid = node.data.get("pid")
        if pid is None:
            return "never started"
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - node.data["since"]) > 0.5 or \
                    p.status() == psutil.STATUS_ZOMBIE:
                return "appliance exited"
        except psutil.NoSuchProcess:
            return "appliance exited"
        return None

    def update(self, nodes):
        gone = {}
        for node in nodes:
            if self.ID_KEY not in node.data:
                continue  # its start has not returned yet
            why = self._gone(node)
            if why:
                gone[node.nodeid] = why
                self._cleanup(node)
        return gone

    def stop(self, node):
        if self._gone(node) is None:
            pid = node.data["pid"]
            log.info("%s: stopping appliance (pid %d)", node.name, pid)
            os.killpg(pid, signal.SIGTERM)  # apppot-start halts the guest
            deadline = time.monotonic() + self.stop_timeout
            while self._gone(node) is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if self._gone(node) is None:
                os.killpg(pid, signal.SIGKILL)  # its watchdog ends UML
        self._cleanup(node)

    def _cleanup(self, node):
        self._procs.pop(node.nodeid, None)
        ip("link", "del", self.links(node)[0], check=False)
        for suffix in (".json", ".started"):
            (self.dir / "nodes" / f"{node.name}{suffix}").unlink(
                missing_ok=True)

    def describe(self):
        return (f"local appliances ({self.image.name}, {self.mem}, bridge "
                f"{self.bridge})")


@register
class BatchJobAppliances(LocalAppliances):
    """An appliance submitted as a job to another batch system (the 2012
    grid-job model): the same node appliance, started by ``sbatch`` there
    instead of here.  ``submit_prefix`` reaches that system (e.g. ``ssh
    login-node`` or ``env SLURM_CONF=...``); ``job_prefix`` is put before
    the appliance command inside the job (e.g. entering the network
    namespace its link is in)."""

    name = "batchjob"
    ID_KEY = "jobid"

    def __init__(self, state_dir, callback_url, *, submit_prefix=(),
                 job_prefix=(), **kwargs):
        super().__init__(state_dir, callback_url, **kwargs)
        self.submit_prefix = list(submit_prefix)
        self.job_prefix = list(job_prefix)

    def sbatch_argv(self, node, argv, cfg):
        out = self.dir / "nodes" / f"{node.name}.log"
        return [*self.submit_prefix, "sbatch", "--parsable",
                f"--job-name=apppot-node-{node.name}", f"--output={out}",
                f"--chdir={self.shared}", "--wrap",
                shlex.join([*self.job_prefix, *argv]) + " < "
                + shlex.quote(str(cfg))]

    def start(self, node):
        argv, cfg = self.prepare(node)
        out = batchmod.run(self.sbatch_argv(node, argv, cfg))
        jobid = out.strip().split(";")[0]
        log.info("%s: submitted as job %s", node.name, jobid)
        return self._record(node, {"jobid": jobid})

    def _gone(self, node):
        jobid = node.data.get("jobid")
        if jobid is None:
            return "never submitted"
        try:
            state = batchmod.run([*self.submit_prefix, "squeue", "-h", "-j",
                                  jobid, "-o", "%T"]).strip()
        except batchmod.BatchError:
            state = ""  # finished jobs leave squeue (or make it fail)
        if state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return None
        return f"job {jobid} ended ({state or 'gone'})"

    def stop(self, node):
        if self._gone(node) is None:
            batchmod.run([*self.submit_prefix, "scancel", node.data["jobid"]])
            deadline = time.monotonic() + self.stop_timeout
            while self._gone(node) is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if self._gone(node) is None:
                raise RuntimeError(f"job {node.data['jobid']} still there")
        self._cleanup(node)

    def describe(self):
        return f"appliances as batch jobs ({shlex.join(self.submit_prefix)})"


@register
class LibcloudNodes(Provider):
    """Apache Libcloud: a cloud server per node.  The node's ready callback
    comes from the server (cloud-init user data carries the URL and token);
    with libcloud's dummy driver nothing calls back unless told to."""

    name = "libcloud"

    def __init__(self, driver="dummy", key="0", secret=None, image=None,
                 size=None, callback_url="", **extra):
        from libcloud.compute.providers import get_driver
        from libcloud.compute.types import NodeState
        from libcloud.compute.types import Provider as LP

        self.states = NodeState
        cls = get_driver(getattr(LP, driver.upper()))
        args = (key,) if secret is None else (key, secret)
        self.driver = cls(*args, **extra)
        self.driver_name = driver
        self.image = self._pick(self.driver.list_images(), image, "image")
        self.size = self._pick(self.driver.list_sizes(), size, "size")
        self.callback_url = callback_url

    @staticmethod
    def _pick(items, wanted, what):
        if wanted is None:
            return items[0]
        for item in items:
            if wanted in (item.id, item.name):
                return item
        raise ConfigError(f"libcloud: no {what} {wanted!r}",
                          hint=f"one of: {', '.join(i.id for i in items[:10])}")

    def start(self, node):
        kwargs = {}
        if self.driver_name != "dummy":  # cloud-init tells the node its way
            kwargs["ex_userdata"] = (
                "#!/bin/sh\ncurl -fsS --retry 30 --data "
                f"'node={node.name}&token={node.token}' {self.callback_url}\n")
        server = self.driver.create_node(name=node.name, size=self.size,
                                         image=self.image, **kwargs)
        return {"instance": server.id}

    def _servers(self):
        return {s.id: s for s in self.driver.list_nodes()}

    def update(self, nodes):
        servers, gone = self._servers(), {}
        for node in nodes:
            inst = node.data.get("instance")
            if inst is None:
                continue
            s = servers.get(inst)
            if s is None or s.state in (self.states.TERMINATED,
                                        self.states.STOPPED):
                gone[node.nodeid] = "server terminated"
        return gone

    def stop(self, node):
        s = self._servers().get(node.data.get("instance"))
        if s is not None and not self.driver.destroy_node(s):
            raise RuntimeError(f"destroy_node({s.id}) refused")

    def describe(self):
        return f"libcloud ({self.driver_name}, size {self.size.id})"
