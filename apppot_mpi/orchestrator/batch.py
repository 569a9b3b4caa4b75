"""Batch-system back ends: read the queue, manage the nodes we add.

Each back end is a small class keyed by name (``BACKENDS``); commands are
built as argv lists (data, testable without a batch system) and run through
one ``run`` function that logs them.  Parsing is pure.
"""

import logging
import re
import shlex
import subprocess
import time
import xml.etree.ElementTree as ET  # noqa: S405  (qstat's own output)

from apppot.errors import AppPotError
from apppot_mpi.batchenv import expand_hostlist

from .model import OTHER, PENDING, RUNNING, Job

log = logging.getLogger("apppot.orchestrator")
BACKENDS = {}


class BatchError(AppPotError):
    status = 1


def register(cls):
    BACKENDS[cls.name] = cls
    return cls


def run(argv, timeout=30):
    """Run a batch command; its stdout, or BatchError naming it."""
    log.debug("executing: %s", shlex.join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BatchError(f"{argv[0]} failed: {e}",
                         hint="is the batch system's client installed and "
                         "its controller up?") from e
    if proc.returncode != 0:
        raise BatchError(f"{shlex.join(argv[:3])} failed with status "
                         f"{proc.returncode}: {proc.stderr.strip()[:200]}",
                         hint="check the batch system's configuration")
    return proc.stdout


def parse_time(text):
    """Slurm/SGE local time stamp → epoch seconds; None if unknown."""
    if not text or text in ("N/A", "Unknown", "None", "0"):
        return None
    return time.mktime(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))


class Backend:
    name = "?"

    def __init__(self, runner=run):
        self.run = runner

    def jobs(self):
        raise NotImplementedError

    def free_node_name(self, used, next_id):
        """A name for a new node, not in ``used``; None if none is left."""
        return f"apppot-{next_id}"

    def node_address(self, name):
        return ""

    def node_join(self, name):
        """A new node is up: let the scheduler use it."""

    def node_resume(self, name):
        """Undo a drain."""

    def node_drain(self, name, reason):
        """No new jobs on this node."""

    def node_down(self, name, reason):
        """The node is going away (or went away)."""

    def describe(self):
        return self.name


# ---------------------------------------------------------------- Slurm
SQUEUE_FORMAT = "%i|%T|%C|%V|%S|%P|%u|%N|%j"
SLURM_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"}
# sinfo states (flags like '*' for not responding stripped) in which a
# predeclared node has no slurmd behind it and may get a new appliance
SLURM_FREE = {"down", "drained", "unknown", "future", "idle~", "down~",
              "powered_down", "drained~"}


def parse_squeue(text):
    jobs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        f = line.split("|", 8)
        if len(f) != 9:
            raise BatchError(f"squeue: cannot parse line {line!r}",
                             hint=f"expected the format {SQUEUE_FORMAT}")
        jobid, state, cpus, submit, start, part, user, nodes, name = f
        kind = (PENDING if state == "PENDING" else
                RUNNING if state in SLURM_RUNNING else OTHER)
        jobs.append(Job(
            jobid=jobid, state=kind, name=name, partition=part, user=user,
            cpus=int(cpus or 1), submitted_at=parse_time(submit) or 0.0,
            started_at=parse_time(start) if kind == RUNNING else None,
            nodes=tuple(expand_hostlist(nodes)) if kind == RUNNING and
            nodes else ()))
    return jobs


def parse_sinfo(text):
    """``sinfo -h -N -o %N|%o|%T`` → {name: (address, state)}."""
    out = {}
    for line in text.splitlines():
        if line.strip():
            name, addr, state = line.strip().split("|")
            out[name] = (addr, state.rstrip("*$#@^-!").lower())
    return out


def natural(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@register
class Slurm(Backend):
    """Slurm: nodes are predeclared in a partition (``NodeName=... State=
    DOWN``) and an appliance running slurmd joins as one of them."""

    name = "slurm"

    def __init__(self, partition="cloud", runner=run):
        super().__init__(runner)
        self.partition = partition

    def squeue_argv(self):
        return ["squeue", "-h", "-a", "-t", "PENDING,RUNNING,CONFIGURING,"
                "COMPLETING,SUSPENDED", "-p", self.partition,
                "-o", SQUEUE_FORMAT]

    def sinfo_argv(self):
        return ["sinfo", "-h", "-N", "-p", self.partition, "-o", "%N|%o|%T"]

    def update_argv(self, name, state, reason=None):
        argv = ["scontrol", "update", f"nodename={name}", f"state={state}"]
        if reason:
            argv.append(f"reason={reason}")
        return argv

    def jobs(self):
        return parse_squeue(self.run(self.squeue_argv()))

    def nodes(self):
        return parse_sinfo(self.run(self.sinfo_argv()))

    def free_node_name(self, used, next_id):
        nodes = self.nodes()
        for name in sorted(nodes, key=natural):
            if name not in used and nodes[name][1] in SLURM_FREE:
                return name
        return None

    def node_address(self, name):
        return self.nodes().get(name, ("", ""))[0]

    def node_join(self, name):
        state = self.nodes().get(name, ("", ""))[1]
        if state not in ("idle", "mixed", "allocated", "completing"):
            self.run(self.update_argv(name, "resume"))

    def node_resume(self, name):
        self.run(self.update_argv(name, "resume"))

    def node_drain(self, name, reason):
        self.run(self.update_argv(name, "drain", reason))

    def node_down(self, name, reason):
        try:
            self.run(self.update_argv(name, "down", reason))
        except BatchError as e:  # e.g. already down: not worth failing for
            log.warning("%s", e)

    def describe(self):
        return f"slurm (partition {self.partition})"


# ----------------------------------------------------------- Grid Engine
def parse_qstat_xml(text):
    """``qstat -u '*' -xml`` → jobs.  State letters: q = pending, r/t =
    running; held, error, suspended or deleted jobs are OTHER."""
    jobs = []
    root = ET.fromstring(text)  # noqa: S314
    for jl in root.iter("job_list"):
        def get(tag, jl=jl):
            el = jl.find(tag)
            return el.text if el is not None and el.text else ""
        letters = get("state")
        if set(letters) & set("EhTsSd"):
            kind = OTHER
        elif "q" in letters:
            kind = PENDING
        elif set(letters) & set("rt"):
            kind = RUNNING
        else:
            kind = OTHER
        queue = get("queue_name")
        host = queue.partition("@")[2] if "@" in queue else ""
        jobs.append(Job(
            jobid=get("JB_job_number"), state=kind, name=get("JB_name"),
            partition=queue.partition("@")[0], user=get("JB_owner"),
            cpus=int(get("slots") or 1),
            submitted_at=parse_time(get("JB_submission_time")) or 0.0,
            started_at=parse_time(get("JAT_start_time")),
            nodes=(host,) if host and kind == RUNNING else ()))
    return jobs


@register
class GridEngine(Backend):
    """Grid Engine: queue from ``qstat -xml``; a node is enabled and
    disabled with ``qmod`` (adding the exec host itself is the admin's
    ``qconf -ae`` template, outside the orchestrator)."""

    name = "gridengine"

    def __init__(self, queue="cloud.q", runner=run):
        super().__init__(runner)
        self.queue = queue

    def jobs(self):
        return parse_qstat_xml(self.run(["qstat", "-u", "*", "-xml"]))

    def qmod_argv(self, name, enable):
        return ["qmod", "-e" if enable else "-d", f"{self.queue}@{name}"]

    def node_join(self, name):
        self.run(self.qmod_argv(name, True))

    node_resume = node_join

    def node_drain(self, name, reason):
        self.run(self.qmod_argv(name, False))

    def node_down(self, name, reason):
        try:
            self.run(self.qmod_argv(name, False))
        except BatchError as e:
            log.warning("%s", e)

    def describe(self):
        return f"gridengine (queue {self.queue})"


@register
class NoBatch(Backend):
    """No batch system: an empty queue (a provider demo, the web test)."""

    name = "none"

    def __init__(self, runner=run):
        super().__init__(runner)
        self.queue = []

    def jobs(self):
        return list(self.queue)
