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

import ctypes
import fcntl
import ipaddress
import json
import logging
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil

from apppot.errors import ConfigError
from apppot.images import SYSTEM_HOME, cached_path

from . import batch as batchmod
from . import nodeexec

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


SIOCETHTOOL, ETHTOOL_STXCSUM = 0x8946, 0x17


def tx_checksum_off(ifname):
    """``ethtool -K IFNAME tx off``, by ioctl: frames the host sends
    through the veth then carry complete checksums.  The node's packet
    socket hands frames to UML as they are (no virtio-net header saying
    "checksum still to be done"), and the guest drops frames whose checksum
    the host left to a NIC that does not exist."""
    value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_STXCSUM, 0))
    ifreq = struct.pack("16sP16x", ifname.encode(), ctypes.addressof(value))
    log.debug("%s: tx checksum offload off (SIOCETHTOOL)", ifname)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s, SIOCETHTOOL, ifreq)
        except OSError as e:
            raise ConfigError(f"cannot turn off tx checksum offload on "
                              f"{ifname!r}: {e.strerror}", hint="the local "
                              "provider needs root (CAP_NET_ADMIN) in the "
                              "cluster's network namespace") from None


def this_netns():
    """This process's network namespace, e.g. 'net:[4026532281]'."""
    return os.readlink("/proc/self/ns/net")


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


def node_env(environ=None):
    """The environment nodeexec starts with: the orchestrator's cache
    (nodeexec keeps only a few APPPOT_* variables of it)."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k in nodeexec.KEEP_ENV}
    env.setdefault("APPPOT_HOME", str(SYSTEM_HOME))
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    return env


def readable_by(path, user):
    """Whether ``user`` (a pwd entry) may read ``path`` by its mode bits."""
    st = Path(path).stat()
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & 0o400)
    if st.st_gid == user.pw_gid:
        return bool(st.st_mode & 0o040)
    return bool(st.st_mode & 0o004)


@register
class LocalAppliances(Provider):
    """Appliances on this machine that boot as Slurm compute nodes, each no
    more privileged than a real compute node.

    Each node: a veth pair (one end on the cluster's bridge), a 0600 JSON
    file with the munge key and its callback token (fed to the guest on
    stdin: never on a command line nor in any directory a node sees), and
    ``nodeexec`` in its own session: as root it opens a packet socket on
    the veth's guest end, drops to ``node_user`` and executes
    ``apppot-start --net fd:3:ADDR --seccomp off --no-job-dir``, which runs
    slurmd in the guest.  No host directory is mounted in a node: jobs get
    their files through Slurm.  The appliance outlives the orchestrator, so
    a restart adopts it.
    """

    name = "local"
    ID_KEY = "pid"  # in node.data once started

    def __init__(self, state_dir, callback_url, *, bridge="br0",
                 conf_server=None, munge_key="/etc/munge/munge.key",
                 image=None, kernel=None, mem="256M", stop_timeout=30.0,
                 node_user=nodeexec.DEFAULT_USER):
        self.dir = Path(state_dir)
        self.callback_url = callback_url
        self.bridge = bridge
        self.net = bridge_network(bridge)
        self.conf_server = conf_server or f"{self.net.ip}:6817"
        self.munge_key = Path(munge_key)
        if not os.access(self.munge_key, os.R_OK):
            raise ConfigError(f"cannot read the munge key {str(munge_key)!r}",
                              hint="the nodes need the cluster's key; run as "
                              "root or give --munge-key")
        self.user = nodeexec.node_user(node_user)
        self.image = Path(image) if image else node_image()
        if not self.image.exists():
            raise ConfigError(f"node image not found: {str(self.image)!r}",
                              hint="build it: apppot-orchestrator image")
        if not readable_by(self.image, self.user):
            raise ConfigError(f"node image {str(self.image)!r} is not "
                              f"readable by the node user {node_user!r}",
                              hint="make it world-readable (0644), as "
                              "apppot-orchestrator image does")
        self.kernel, self.mem = kernel, mem
        self.stop_timeout = stop_timeout
        self._procs = {}  # nodeid → Popen (our children: reaped here)
        (self.dir / "nodes").mkdir(parents=True, exist_ok=True, mode=0o700)

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
        """nodeexec (root: the packet socket, then the drop to the node
        user) running apppot-start: the socket as fd 3, seccomp off (in
        seccomp mode guest processes can reach the UML kernel's host
        process), no job dir (no hostfs prefix at all), slurmd as guest
        root (the guest user has sudo; the host user stays unprivileged)."""
        _, guest_end = self.links(node)
        argv = [sys.executable, "-m", "apppot_mpi.orchestrator.nodeexec",
                "--user", self.user.pw_name, "--link", guest_end, "--",
                sys.executable, "-m", "apppot.start", "--image",
                str(self.image), "--id", node.name, "--mem", self.mem,
                "--seccomp", "off", "--no-job-dir", "--net",
                f"fd:{nodeexec.LINK_FD}:{node.address}/"
                f"{self.net.network.prefixlen}"]
        if self.kernel:
            argv += ["--kernel", str(self.kernel)]
        return argv + ["--", "sudo", "-n", "python3",
                       "/usr/lib/apppot/slurmnode.py", "-"]

    def prepare(self, node):
        """The node's links and config file; its appliance command and the
        config file (the command's stdin)."""
        if not node.address:
            raise ConfigError(f"{node.name}: no address for it in the batch "
                              "system", hint="declare NodeAddr= for the node")
        host_end, guest_end = self.links(node)
        ip("link", "del", host_end, check=False)  # a stale one from a crash
        ip("link", "add", guest_end, "type", "veth", "peer", "name", host_end)
        tx_checksum_off(host_end)
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
            proc = subprocess.Popen(argv, cwd="/", stdin=stdin, stdout=out,
                                    stderr=out, env=node_env(),
                                    start_new_session=True)
        self._procs[node.nodeid] = proc
        return self._record(node, {
            "pid": proc.pid, "since": psutil.Process(proc.pid).create_time(),
            "log": str(logf), "netns": this_netns()})

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
        where = node.data.get("netns")
        if where and where != this_netns():
            log.warning("%s: its link %s is in another network namespace "
                        "(%s): run shutdown where run ran (as "
                        "scripts/slurm-elastic.sh down does)", node.name,
                        self.links(node)[0], where)
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
    login-node`` or ``env SLURM_CONF=...``): it is given ``sh`` and the
    command as a script on stdin (see ``batch.via``).  ``job_prefix`` is put
    before the appliance command inside the job (e.g. entering the network
    namespace its link is in); the job must run as root there (nodeexec
    opens the packet socket, then drops to the node user)."""

    name = "batchjob"
    ID_KEY = "jobid"

    def __init__(self, state_dir, callback_url, *, submit_prefix=(),
                 job_prefix=(), **kwargs):
        super().__init__(state_dir, callback_url, **kwargs)
        self.submit_prefix = list(submit_prefix)
        self.job_prefix = list(job_prefix)

    def run(self, argv):
        """A batch command on the other system, through the prefix."""
        full, script = batchmod.via(self.submit_prefix, argv)
        return batchmod.run(full, input=script)

    def sbatch_argv(self, node, argv, cfg):
        out = self.dir / "nodes" / f"{node.name}.log"
        return ["sbatch", "--parsable", f"--job-name=apppot-node-{node.name}",
                f"--output={out}", "--chdir=/", "--wrap",
                shlex.join([*self.job_prefix, *argv]) + " < "
                + shlex.quote(str(cfg))]

    def start(self, node):
        argv, cfg = self.prepare(node)
        out = self.run(self.sbatch_argv(node, argv, cfg))
        jobid = out.strip().split(";")[0]
        if not jobid.isdigit():
            raise batchmod.BatchError(f"sbatch printed no job id: {out!r}")
        log.info("%s: submitted as job %s", node.name, jobid)
        return self._record(node, {"jobid": jobid})

    def _gone(self, node):
        jobid = node.data.get("jobid")
        if jobid is None:
            return "never submitted"
        try:
            state = self.run(["squeue", "-h", "-j", jobid, "-o",
                              "%T"]).strip()
        except batchmod.BatchError:
            state = ""  # finished jobs leave squeue (or make it fail)
        if state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return None
        return f"job {jobid} ended ({state or 'gone'})"

    def stop(self, node):
        if self._gone(node) is None:
            self.run(["scancel", node.data["jobid"]])
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
        try:
            cls = get_driver(getattr(LP, driver.upper()))
        except (AttributeError, ValueError, ImportError):
            raise ConfigError(f"libcloud: no driver {driver!r}", hint="a "
                              "name from libcloud.compute.types.Provider, "
                              "e.g. dummy, ec2, openstack") from None
        args = (key,) if secret is None else (key, secret)
        what = (f"driver {driver!r} (key {key!r}"
                + (", secret from $APPPOT_LIBCLOUD_SECRET)" if secret
                   is not None else ", no secret)"))
        try:  # any error of a third-party constructor: bad arguments
            self.driver = cls(*args, **extra)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"libcloud: cannot build {what}: {e}",
                              hint="give the key (--libcloud-key) and secret "
                              "($APPPOT_LIBCLOUD_SECRET; the dummy driver "
                              "takes none) this driver needs") from None
        self.driver_name = driver
        try:
            self.image = self._pick(self.driver.list_images(), image, "image")
            self.size = self._pick(self.driver.list_sizes(), size, "size")
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001  (network, credentials, API)
            raise ConfigError(f"libcloud: {what} cannot list images and "
                              f"sizes: {e}", hint="check the credentials "
                              "and the cloud's endpoint") from None
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
