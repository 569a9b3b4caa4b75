"""Which hosts and slots does this job have?  One small class per batch system.

Pure code: every class reads only the environment mapping (and files it
names) it is given, so each is unit-tested on real-format samples.  The
result is always an ``Allocation``: an ordered list of (host, slots) with
duplicate hosts merged, first host first.

Precedence: an explicit ``--hostfile``/``-H`` beats the environment;
``--pe NAME`` forces one system; otherwise the first that detects itself in
the order Slurm, Grid Engine, PBS/Torque, LSF, then the local machine.
"""

import os
import re
from dataclasses import dataclass, field

from apppot.errors import ConfigError

_REGISTRY = {}
# Bounds on what an allocation may say: far beyond any real job, small
# enough that a typo or a hostile variable cannot make us loop or fill memory.
MAX_HOSTS = 1 << 16
MAX_SLOTS = 1 << 16  # per host


def register(cls):
    if cls.name in _REGISTRY:
        raise ValueError(f"batch system {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def names():
    return list(_REGISTRY)


@dataclass(frozen=True)
class Allocation:
    """Hosts and slots granted to the job, in the batch system's order."""

    source: str
    hosts: tuple  # ((host, slots), ...)
    job_id: str = ""
    notes: tuple = field(default=())

    @property
    def slots(self):
        return sum(s for _, s in self.hosts)


def merge_hosts(pairs):
    """Sum slots of repeated hosts, keeping first-seen order."""
    out = {}
    for host, slots in pairs:
        out[host] = out.get(host, 0) + slots
    return tuple(out.items())


class BatchSystem:
    """A source of hosts and slots.  Subclasses set ``name``."""

    name = ""

    @staticmethod
    def detect(environ):
        return False

    def allocation(self, environ):
        raise NotImplementedError

    @staticmethod
    def follower(environ):
        """Why this process is one of several copies the batch system
        started, of which only the first launches (None: we launch)."""
        del environ


def _need(environ, var, system):
    value = environ.get(var)
    if not value:
        raise ConfigError(f"{system}: {var} is not set",
                          hint=f"run inside a {system} job, or pass -n/-H")
    return value


def _int(text, where):
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = -1
    if value < 1 or value > MAX_SLOTS:
        raise ConfigError(f"{where}: not a positive slot count (at most "
                          f"{MAX_SLOTS}): {text!r}", hint="check the batch "
                          "system's allocation")
    return value


# A host name: letters, digits, '.', '-', '_' (RFC 1123 plus the underscore
# some batch systems allow), never starting with '-' or '.': every remote
# start puts it on a command line (ssh, qrsh, pbs_tmrsh, blaunch, ip netns),
# where '-oProxyCommand=...' would be an option and '../x' a path.
HOST_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")


def _host(name, where):
    if not HOST_NAME.fullmatch(name):
        raise ConfigError(f"{where}: not a host name: {name!r}",
                          hint="host names are letters, digits, '.', '-' "
                          "and '_', starting with a letter, digit or '_'")
    return name


def _read_lines(path, var):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"{var}: cannot read {path!r}",
                          hint="is this the job's own host file?") from e


# ----------------------------------------------------------------- Slurm
def expand_hostlist(text, var="SLURM_JOB_NODELIST"):
    """Slurm's compressed host list: ``node[01-04,07],gpu[1-2],login``."""
    hosts, item, depth = [], "", 0
    for ch in text.strip() + ",":
        if ch == "," and depth == 0:
            if item:
                hosts.extend(_host(h, var) for h in _expand_item(
                    item, text, var, MAX_HOSTS - len(hosts)))
            item = ""
            continue
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            raise ConfigError(f"{var}: unbalanced brackets in {text!r}",
                              hint="scontrol show hostnames")
        item += ch
    if depth:
        raise ConfigError(f"{var}: unbalanced brackets in {text!r}",
                          hint="scontrol show hostnames")
    if not hosts:
        raise ConfigError(f"{var}: no hosts in {text!r}",
                          hint="scontrol show hostnames")
    return hosts


def _expand_item(item, whole, var, room=MAX_HOSTS):
    m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", item)
    if not m:
        if "[" in item or "]" in item:
            raise ConfigError(f"{var}: cannot parse {item!r} in "
                              f"{whole!r}", hint="scontrol show hostnames")
        return [item]
    prefix, ranges, suffix = m.groups()
    out = []
    for part in ranges.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(f"{var}: bad range {part!r} in "
                              f"{whole!r}", hint="scontrol show hostnames")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise ConfigError(f"{var}: empty range {part!r} in "
                              f"{whole!r}", hint="scontrol show hostnames")
        if last - first + 1 > room - len(out):
            raise ConfigError(f"{var}: more than {MAX_HOSTS} "
                              f"hosts in {whole!r}", hint="scontrol show "
                              "hostnames")
        width = len(lo)
        for n in range(first, last + 1):
            out.append(f"{prefix}{n:0{width}d}{suffix}")
    return out


def expand_counts(text, var="SLURM_TASKS_PER_NODE"):
    """``2(x3),1`` → [2, 2, 2, 1]."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ConfigError(f"{var}: cannot parse {part!r} in {text!r}",
                              hint="expected counts like 2(x3),1")
        repeat = int(m.group(2) or 1)
        if not 1 <= repeat <= MAX_HOSTS - len(out):
            raise ConfigError(f"{var}: repeat count out of range in {text!r}",
                              hint=f"at most {MAX_HOSTS} nodes")
        out += [_int(m.group(1), var)] * repeat
    return out


@register
class Slurm(BatchSystem):
    name = "slurm"

    @staticmethod
    def detect(environ):
        return bool(environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID"))

    @staticmethod
    def follower(environ):
        """Under ``srun -n N apppot-mpirun``, every task runs us: task 0
        launches the whole step, the others have nothing to do."""
        procid = environ.get("SLURM_PROCID", "0")
        if environ.get("SLURM_STEP_ID") is not None and procid != "0":
            return f"Slurm task {procid} of step {environ['SLURM_STEP_ID']}"
        return None

    def allocation(self, environ):
        # Inside a step (srun), the step's nodes and tasks, not the job's.
        step = "SLURM_STEP_NODELIST" in environ
        names = ("SLURM_STEP_NODELIST",) * step + ("SLURM_JOB_NODELIST",
                                                    "SLURM_NODELIST")
        listvar = next((v for v in names if environ.get(v)), names[-1])
        hosts = expand_hostlist(_need(environ, listvar, "Slurm"), listvar)
        var = "SLURM_STEP_TASKS_PER_NODE" if step else "SLURM_TASKS_PER_NODE"
        tasks = environ.get(var) or environ.get("SLURM_TASKS_PER_NODE")
        if tasks:
            counts = expand_counts(tasks, var)
            if len(counts) < len(hosts):
                raise ConfigError(
                    f"{var} {tasks!r} names {len(counts)} nodes "
                    f"but the node list has {len(hosts)}",
                    hint="check the job's Slurm variables")
            counts = counts[:len(hosts)]  # srun -w tolerates extra counts
        else:
            counts = [1] * len(hosts)
        pairs = list(zip(hosts, counts, strict=True))
        ntasks = (environ.get("SLURM_STEP_NUM_TASKS") if step else None) or \
            environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS")
        notes = ()
        if ntasks and _int(ntasks, "SLURM_NTASKS") < sum(counts):
            notes = (f"SLURM_NTASKS={ntasks}",)
        return Allocation(self.name, merge_hosts(pairs),
                          environ.get("SLURM_JOB_ID") or environ.get(
                              "SLURM_JOBID", ""), notes)


# ----------------------------------------------------------- Grid Engine
@register
class GridEngine(BatchSystem):
    name = "sge"

    @staticmethod
    def detect(environ):
        return bool(environ.get("PE_HOSTFILE") and environ.get("JOB_ID"))

    def allocation(self, environ):
        path = _need(environ, "PE_HOSTFILE", "Grid Engine")
        pairs = []
        for n, line in enumerate(_read_lines(path, "PE_HOSTFILE"), 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) < 2:
                raise ConfigError(f"PE_HOSTFILE {path}:{n}: expected "
                                  f"'host slots queue processors': {line!r}",
                                  hint="is this a Grid Engine PE host file?")
            where = f"PE_HOSTFILE {path}:{n}"
            pairs.append((_host(fields[0], where), _int(fields[1], where)))
        if not pairs:
            raise ConfigError(f"PE_HOSTFILE {path} lists no hosts",
                              hint="request a parallel environment (qsub -pe)")
        return Allocation(self.name, merge_hosts(pairs), environ.get("JOB_ID"))


# ------------------------------------------------------------ PBS/Torque
@register
class PBS(BatchSystem):
    name = "pbs"

    @staticmethod
    def detect(environ):
        return bool(environ.get("PBS_JOBID") and environ.get("PBS_NODEFILE"))

    def allocation(self, environ):
        path = _need(environ, "PBS_NODEFILE", "PBS")
        hosts = [_host(line.strip(), f"PBS_NODEFILE {path}:{n}") for n, line
                 in enumerate(_read_lines(path, "PBS_NODEFILE"), 1)
                 if line.strip()]
        if not hosts:
            raise ConfigError(f"PBS_NODEFILE {path} lists no hosts",
                              hint="check the job's resource request")
        return Allocation(self.name, merge_hosts((h, 1) for h in hosts),
                          environ.get("PBS_JOBID", ""))


# ------------------------------------------------------------------- LSF
@register
class LSF(BatchSystem):
    name = "lsf"

    @staticmethod
    def detect(environ):
        return bool(environ.get("LSB_JOBID") and (
            environ.get("LSB_MCPU_HOSTS") or environ.get("LSB_DJOB_HOSTFILE")))

    def allocation(self, environ):
        mcpu = environ.get("LSB_MCPU_HOSTS")
        if mcpu:
            fields = mcpu.split()
            if len(fields) % 2:
                raise ConfigError(f"LSB_MCPU_HOSTS: expected 'host count' pairs:"
                                  f" {mcpu!r}", hint="check the LSF job")
            pairs = [(_host(fields[i], "LSB_MCPU_HOSTS"),
                      _int(fields[i + 1], "LSB_MCPU_HOSTS"))
                     for i in range(0, len(fields), 2)]
        else:
            path = environ["LSB_DJOB_HOSTFILE"]
            pairs = [(_host(h.strip(), f"LSB_DJOB_HOSTFILE {path}:{n}"), 1)
                     for n, h in enumerate(_read_lines(
                         path, "LSB_DJOB_HOSTFILE"), 1) if h.strip()]
        if not pairs:
            raise ConfigError("LSF: the allocation lists no hosts",
                              hint="check LSB_MCPU_HOSTS / LSB_DJOB_HOSTFILE")
        return Allocation(self.name, merge_hosts(pairs),
                          environ.get("LSB_JOBID", ""))


# ------------------------------------------------------ explicit and local
def parse_hostfile(path):
    """Open MPI (``host slots=N``, ``host``) or Hydra (``host:N``) host file."""
    pairs = []
    for n, raw in enumerate(_read_lines(path, "--hostfile"), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"--hostfile {path}:{n}"
        fields = line.split()
        host = fields[0]
        slots = 1
        if ":" in host:
            host, count = host.split(":", 1)
            slots = _int(count, where)
        for opt in fields[1:]:
            key, _, value = opt.partition("=")
            if key == "slots":
                slots = _int(value, where)
            elif key not in ("max_slots", "max-slots"):
                raise ConfigError(f"{where}: unknown field {opt!r}",
                                  hint="use 'host slots=N' or 'host:N'")
        if not host:
            raise ConfigError(f"{where}: no host name: {raw!r}",
                              hint="use 'host slots=N' or 'host:N'")
        pairs.append((_host(host, where), slots))
    if not pairs:
        raise ConfigError(f"--hostfile {path} lists no hosts",
                          hint="one host per line")
    return Allocation("hostfile", merge_hosts(pairs))


def parse_hostlist(text):
    """``-H a,b,a`` or ``-H a:2,b`` (repeats add slots)."""
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ConfigError(f"-H: empty host name in {text!r}",
                              hint="use -H host1,host2:2")
        host, _, count = item.partition(":")
        pairs.append((_host(host, "-H"), _int(count, f"-H {item}")
                      if count else 1))
    return Allocation("hostlist", merge_hosts(pairs))


def local_allocation(nprocs=None, hostname="localhost"):
    return Allocation("local", ((hostname, nprocs or os.cpu_count() or 1),))


def follower(environ=None):
    """Are we a secondary copy (see ``BatchSystem.follower``)?"""
    environ = os.environ if environ is None else environ
    for cls in _REGISTRY.values():
        if cls.detect(environ):
            return cls.follower(environ)
    return None


def detect(environ=None, *, pe=None, hostfile=None, hosts=None, nprocs=None):
    """The job's allocation (see the module docstring for precedence)."""
    environ = os.environ if environ is None else environ
    if hostfile:
        return parse_hostfile(hostfile)
    if hosts:
        return parse_hostlist(hosts)
    if pe:
        if pe == "local":
            return local_allocation(nprocs)
        if pe not in _REGISTRY:
            raise ConfigError(f"no such batch system: {pe!r}",
                              hint=f"use one of {', '.join(names())}, local")
        return _REGISTRY[pe]().allocation(environ)
    for cls in _REGISTRY.values():
        if cls.detect(environ):
            return cls().allocation(environ)
    return local_allocation(nprocs)
