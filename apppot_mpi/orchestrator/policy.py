"""Policies: when to start and when to stop compute nodes.

Subclass :class:`Policy` and override the hooks you need; the orchestrator
sets ``self.orch`` before the first cycle, so a hook can look at
``self.orch.candidates`` (pending jobs that a new node could run),
``self.orch.nodes`` (the nodes it started), ``self.orch.jobs`` and
``self.orch.now``.  Example (a file given with ``--policy FILE``)::

    from apppot_mpi.orchestrator.policy import Policy

    class Policy(Policy):
        def is_candidate(self, job):          # only the cloud partition
            return job.partition == "cloud" and job.cpus <= 4

        def new_node_needed(self):            # one node per 3 waiting jobs
            return len(self.orch.candidates) > 3 * len(self.orch.alive_nodes())

        def can_stop(self, node):             # keep nodes 5 minutes idle
            return node.idle_for(self.orch.now) > 300
"""

import importlib.util
import inspect
from pathlib import Path

from apppot.errors import ConfigError

from .model import PENDING


class Policy:
    """The default policy: every pending job is a candidate; start a node
    while candidates exceed ``ratio`` × nodes (starting ones included); stop
    a node that has been idle for longer than ``idle_time`` seconds."""

    def __init__(self, ratio=2.0, idle_time=600.0):
        self.ratio = float(ratio)
        self.idle_time = float(idle_time)
        self.orch = None

    def is_candidate(self, job):
        """May a new node run this pending job?  (Called every cycle.)"""
        return job.state == PENDING

    def new_node_needed(self):
        """Start one more node now?  (Asked up to max_delta times a cycle,
        with the nodes just started already counted.)"""
        return len(self.orch.candidates) > self.ratio * len(
            self.orch.alive_nodes())

    def can_stop(self, node):
        """May this idle READY node be drained and stopped?"""
        return node.idle_for(self.orch.now) > self.idle_time

    def before_cycle(self):
        """Called at the start of every cycle (e.g. to read a config)."""

    def after_cycle(self):
        """Called at the end of every cycle, before the checkpoint."""

    def describe(self):
        cls = type(self)
        if cls is Policy:
            return (f"Policy(start while candidates > {self.ratio:g} x nodes;"
                    f" stop after {self.idle_time:g} s idle)")
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        return f"{cls.__name__}({doc.rstrip('.') or 'custom'})"


def load_policy(spec, **kwargs):
    """``FILE.py`` or ``FILE.py:CLASS``: the Policy subclass defined there
    (the last one defined, if CLASS is not given)."""
    path, _, cls_name = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"policy file not found: {path!r}",
                          hint="give a Python file defining a Policy subclass")
    mod_spec = importlib.util.spec_from_file_location(
        f"apppot_policy_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"policy file {path!r} failed to load: {e}",
                          hint="run it with python3 to see the error") from e
    classes = [c for c in vars(module).values()  # in definition order
               if inspect.isclass(c) and issubclass(c, Policy)
               and c.__module__ == module.__name__]
    if cls_name:
        classes = [c for c in classes if c.__name__ == cls_name]
    if not classes:
        raise ConfigError(f"no Policy subclass {cls_name or ''} in {path!r}"
                          .replace("  ", " "),
                          hint="define: class MyPolicy(Policy): ... (from "
                          "apppot_mpi.orchestrator.policy import Policy)")
    return classes[-1](**kwargs)
