"""How apppot-mpirun starts its worker on the other nodes of an allocation.

One small class per remote-start mechanism, keyed by name, each turning
(host, command) into an argv (pure data, unit-tested without starting
anything).  The batch system's own launcher comes first, so the batch system
accounts for, and kills, the worker and its appliances: Slurm ``srun``, Grid
Engine ``qrsh -inherit``, PBS ``pbs_tmrsh``/``pbsdsh``, LSF ``blaunch``;
``ssh`` is the last resort.  ``netns`` runs each "host" in a network namespace
of that name on this machine (simulated clusters, tests).

The worker's plan (including the job's agent secret) travels on the
worker's stdin, never on a command line; its reports come back on stdout.

Host names come from the allocation, which batchenv has already checked
(no leading '-', no shell or path characters); where the tool takes
``--`` (ssh, srun: checked) it also ends the options before the host or
command.  qrsh (``qrsh [options] [command]``), pbs_tmrsh (any other
``-`` argument is an error) and blaunch have no ``--``.
"""

import os
import shutil

from apppot.errors import ConfigError

_REGISTRY = {}


def register(cls):
    _REGISTRY[cls.name] = cls
    return cls


def names():
    return list(_REGISTRY)


class RemoteStart:
    """Start ``command`` on ``host``; stdin and stdout must be forwarded."""

    name = ""
    program = ""  # what must be on PATH (or found by ``find``)
    batch = ""  # the batchenv source this belongs to, if any

    def __init__(self, environ=None):
        self.environ = os.environ if environ is None else environ

    def find(self):
        return shutil.which(self.program, path=self.environ.get("PATH"))

    def argv(self, host, command):
        raise NotImplementedError


@register
class Srun(RemoteStart):
    """One single-task step per node; ``--overlap`` because our own step
    (or the batch step) already holds the node's CPUs."""

    name, program, batch = "srun", "srun", "slurm"

    def argv(self, host, command):
        return [self.find() or "srun", "--nodes=1", "--ntasks=1",
                f"--nodelist={host}", "--overlap", "--kill-on-bad-exit=1",
                "--cpu-bind=none", "--export=ALL", "--input=all",
                "--job-name=apppot-worker", "--", *command]


@register
class Qrsh(RemoteStart):
    """Grid Engine tight integration (the PE needs ``control_slaves TRUE``)."""

    name, program, batch = "qrsh", "qrsh", "sge"

    def find(self):
        root, arch = self.environ.get("SGE_ROOT"), self.environ.get("ARC")
        if root and arch and os.access(f"{root}/bin/{arch}/qrsh", os.X_OK):
            return f"{root}/bin/{arch}/qrsh"
        return super().find()

    def argv(self, host, command):
        return [self.find() or "qrsh", "-inherit", "-V", host, *command]


@register
class PbsTmrsh(RemoteStart):
    """PBS's TM-based rsh replacement (task accounted to the job)."""

    name, program, batch = "pbs_tmrsh", "pbs_tmrsh", "pbs"

    def argv(self, host, command):
        return [self.find() or "pbs_tmrsh", host, *command]


@register
class Blaunch(RemoteStart):
    name, program, batch = "blaunch", "blaunch", "lsf"

    def find(self):
        bindir = self.environ.get("LSF_BINDIR")
        if bindir and os.access(f"{bindir}/blaunch", os.X_OK):
            return f"{bindir}/blaunch"
        return super().find()

    def argv(self, host, command):
        return [self.find() or "blaunch", "-no-shell", host, *command]


@register
class Ssh(RemoteStart):
    """Last resort: no batch accounting; the worker ends when its stdin
    (the ssh connection) closes."""

    name, program = "ssh", "ssh"

    def argv(self, host, command):
        import shlex

        # ssh joins its arguments into one shell line: quote them
        return [self.find() or "ssh", "-x", "-o", "BatchMode=yes", "--",
                host, shlex.join(command)]


@register
class Netns(RemoteStart):
    """Simulated nodes: host H is the network namespace ``$APPPOT_NETNS_PREFIX
    + H`` on this machine (``ip netns exec``, needs root)."""

    name, program = "netns", "ip"

    def argv(self, host, command):
        prefix = self.environ.get("APPPOT_NETNS_PREFIX", "")
        return [self.find() or "ip", "netns", "exec", f"{prefix}{host}",
                *command]


def choose(name, source, environ=None):
    """The remote-start class for ``--launcher NAME`` or, by default, for
    the allocation's batch system (ssh for host files and -H)."""
    if name:
        if name not in _REGISTRY:
            raise ConfigError(f"--launcher: unknown remote start {name!r}",
                              hint=f"use one of {', '.join(names())}")
        cls = _REGISTRY[name]
    else:
        cls = next((c for c in _REGISTRY.values() if c.batch == source), Ssh)
    starter = cls(environ)
    if not starter.find():
        raise ConfigError(f"remote start {cls.name!r}: {cls.program} not found",
                          hint="multi-node jobs start a worker on each node; "
                          "pick another with --launcher "
                          f"({', '.join(names())})")
    return starter
