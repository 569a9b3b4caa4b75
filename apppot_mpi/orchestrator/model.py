"""The orchestrator's records: jobs as the batch system reports them, and
the compute nodes it starts (their states, timings and idle accounting)."""

import secrets
from dataclasses import asdict, dataclass, field

# Job states, as far as the orchestrator cares.
PENDING, RUNNING, OTHER = "PENDING", "RUNNING", "OTHER"

# Node life cycle: STARTING → READY (ready callback) → DRAINING (no new jobs)
# → STOPPING (provider asked to stop) → DOWN (gone).  A READY or DRAINING
# node may also go DOWN on its own (crash), STARTING may time out.
STARTING, READY, DRAINING, STOPPING, DOWN = (
    "STARTING", "READY", "DRAINING", "STOPPING", "DOWN")
NODE_STATES = (STARTING, READY, DRAINING, STOPPING, DOWN)
ALIVE = (STARTING, READY, DRAINING, STOPPING)  # count against max_nodes


@dataclass
class Job:
    """One batch job.  ``nodes`` are the hosts it runs on (RUNNING only)."""

    jobid: str
    state: str
    name: str = ""
    partition: str = ""
    user: str = ""
    cpus: int = 1
    submitted_at: float = 0.0
    started_at: float | None = None
    nodes: tuple = ()

    def __post_init__(self):
        if self.state not in (PENDING, RUNNING, OTHER):
            raise ValueError(f"job {self.jobid}: bad state {self.state!r}")


@dataclass
class Node:
    """A compute node the orchestrator started.

    ``name`` is the batch system's name for it; ``token`` authenticates its
    ready callback and is never shown; ``data`` is the provider's (a pid,
    a cloud node id, a batch job id) and is checkpointed with the rest.
    """

    nodeid: str
    name: str
    state: str = STARTING
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    address: str = ""
    created_at: float = 0.0
    ready_at: float | None = None
    stopped_at: float | None = None
    idle_since: float | None = None  # None while it runs jobs
    idle_total: float = 0.0
    busy_total: float = 0.0
    jobs: list = field(default_factory=list)
    reason: str = ""
    data: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.state not in NODE_STATES:
            raise ValueError(f"node {self.nodeid}: bad state {self.state!r}")

    @property
    def alive(self):
        return self.state in ALIVE

    def idle_for(self, now):
        return 0.0 if self.idle_since is None else now - self.idle_since

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["jobs"] = list(d.get("jobs", ()))
        return cls(**d)

    def public(self, now):
        """What the status page and ``status`` may show (no token)."""
        d = self.to_dict()
        del d["token"]
        d["data"] = {k: v for k, v in self.data.items() if k in
                     ("pid", "instance", "jobid", "tap", "image")}
        d["idle_for"] = round(self.idle_for(now), 1)
        return d
