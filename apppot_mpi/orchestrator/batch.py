"""Batch-system back ends: read the queue, manage the nodes we add.

Each back end is a small class keyed by name (``BACKENDS``); commands are
built as argv lists (data, testable without a batch system) and run through
one ``run`` function that logs them.  Parsing is pure.
"""

import json
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


def via(prefix, argv):
    """``argv`` run through a command ``prefix`` that reaches another
    system: ``(argv to run, its stdin)``.  The prefix gets ``sh`` and the
    command as a one-line script on stdin, so the quoting survives both an
    exec-style prefix (``env SLURM_CONF=...``: argv as given) and a remote
    shell (``ssh login1``: ssh joins its arguments with spaces and has the
    remote shell split them again)."""
    if not prefix:
        return list(argv), None
    return [*prefix, "sh"], shlex.join(argv) + "\n"


def run(argv, timeout=30, input=None):  # noqa: A002  (subprocess's name)
    """Run a batch command (with ``input`` as its stdin); its stdout, or
    BatchError naming it."""
    if input is None:
        log.debug("executing: %s", shlex.join(argv))
    else:
        log.debug("executing: %s <<< %s", shlex.join(argv), input.strip())
    try:
        proc = subprocess.run(argv, capture_output=True, text=True,
                              timeout=timeout, check=False, input=input,
                              stdin=None if input is not None else
                              subprocess.DEVNULL)
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
# Without --json: no job name (%j), the one field users choose freely: it
# may hold '|' or a newline and so forge queue lines.  The rest are ids,
# states, numbers, times, partitions, user and node names.
SQUEUE_FORMAT = "%i|%T|%C|%V|%S|%P|%u|%N"
SQUEUE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING",
                 "SUSPENDED")
SLURM_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"}
# sinfo states (flags like '*' for not responding stripped) in which a
# predeclared node has no slurmd behind it and may get a new appliance
SLURM_FREE = {"down", "drained", "unknown", "future", "idle~", "down~",
              "powered_down", "drained~"}


def slurm_job(jobid, state, cpus, submitted, started, partition, user,
              nodes, name=""):
    kind = (PENDING if state == "PENDING" else
            RUNNING if state in SLURM_RUNNING else OTHER)
    return Job(jobid=str(jobid), state=kind, name=name, partition=partition,
               user=user, cpus=int(cpus or 1), submitted_at=submitted or 0.0,
               started_at=started if kind == RUNNING else None,
               nodes=tuple(expand_hostlist(nodes)) if kind == RUNNING and
               nodes else ())


def parse_squeue(text):
    """``squeue -h -o SQUEUE_FORMAT`` → jobs; a line that does not parse
    is skipped with a warning (one odd job must not stop every cycle)."""
    jobs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        f = line.split("|")
        try:
            if len(f) != 8 or not f[0].strip():
                raise ValueError(f"{len(f)} fields")
            jobid, state, cpus, submit, start, part, user, nodes = f
            jobs.append(slurm_job(jobid, state, cpus, parse_time(submit),
                                  parse_time(start), part, user, nodes))
        except (ValueError, AppPotError) as e:
            log.warning("squeue: skipped a line that does not parse (%s): "
                        "%r", e, line[:200])
    return jobs


def parse_squeue_json(text, partition=None):
    """``squeue --json`` (Slurm 21.08+) → jobs in ``partition`` in the
    states SQUEUE_STATES (22.05 ignores -p and -t with --json); a record
    that does not parse is skipped with a warning."""
    try:
        records = json.loads(text)["jobs"]
        if not isinstance(records, list):
            raise TypeError("'jobs' is not a list")
    except (ValueError, KeyError, TypeError) as e:
        raise BatchError(f"squeue --json: cannot parse its output: {e}",
                         hint="check the Slurm version (21.08+)") from None
    jobs = []
    for rec in records:
        try:
            state = rec["job_state"]
            if state not in SQUEUE_STATES or (
                    partition and partition not in
                    str(rec.get("partition", "")).split(",")):
                continue
            name = rec.get("name") or ""
            jobs.append(slurm_job(
                int(rec["job_id"]), state, rec.get("cpus"),
                float(rec.get("submit_time") or 0),
                float(rec.get("start_time") or 0) or None,
                str(rec.get("partition", "")), str(rec.get("user_name", "")),
                str(rec.get("nodes") or ""),
                name if isinstance(name, str) else ""))
        except (KeyError, TypeError, ValueError, AppPotError) as e:
            log.warning("squeue --json: skipped a job record that does not "
                        "parse (%s): %.200r", e, rec)
    return jobs


def parse_sinfo(text):
    """``sinfo -h -N -o %N|%o|%T`` → {name: (address, state)}."""
    out = {}
    for line in text.splitlines():
        f = line.strip().split("|")
        if len(f) == 3:
            out[f[0]] = (f[1], f[2].rstrip("*$#@^-!").lower())
        elif line.strip():
            log.warning("sinfo: skipped a line that does not parse: %r",
                        line[:200])
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
        self.json = None  # does squeue --json work here? (None: not tried)

    def squeue_argv(self, as_json=True):
        argv = ["squeue", "-a", "-t", ",".join(SQUEUE_STATES), "-p",
                self.partition]
        return argv + (["--json"] if as_json else ["-h", "-o",
                                                   SQUEUE_FORMAT])

    def sinfo_argv(self):
        return ["sinfo", "-h", "-N", "-p", self.partition, "-o", "%N|%o|%T"]

    def update_argv(self, name, state, reason=None):
        argv = ["scontrol", "update", f"nodename={name}", f"state={state}"]
        if reason:
            argv.append(f"reason={reason}")
        return argv

    def jobs(self):
        if self.json is not False:
            try:
                jobs = parse_squeue_json(self.run(self.squeue_argv()),
                                         self.partition)
                self.json = True
                return jobs
            except BatchError as e:
                if self.json:  # it worked before: a real failure
                    raise
                log.warning("%s; reading the queue without job names", e)
                self.json = False
        return parse_squeue(self.run(self.squeue_argv(as_json=False)))

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
