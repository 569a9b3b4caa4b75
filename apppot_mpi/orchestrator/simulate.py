"""Simulation: replay an accounting log through the same orchestrator and
policy code, with simulated time, a simulated scheduler and simulated
nodes; nothing is started.

Answers "with C own nodes and up to N nodes started on demand under this
policy, how long would these jobs have waited, and how many node-hours
would the extra nodes have cost?"

What the 2012 simulator got wrong, and what this one does instead:
* own (cluster) nodes never count against ``max_nodes``;
* a job ends at its start + run time (not submit + run time), so queue
  waits are real;
* jobs start in submission order (FIFO, ties by job id), a job takes as
  many slots as it had CPUs, spread over nodes if it needs more than one;
* the start-up delay is in seconds, whatever the cycle length.

Between cycles the scheduler works event by event (arrivals and
completions at their own times); the orchestrator acts at cycle times.
"""

import csv
import heapq
import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from apppot.errors import ConfigError

from .batch import Backend, parse_time
from .core import Orchestrator
from .model import PENDING, RUNNING, Job
from .policy import Policy
from .providers import Provider

log = logging.getLogger("apppot.orchestrator")


@dataclass
class Record:
    """One job of an accounting log."""

    jobid: str
    submit: float
    duration: float
    cpus: int
    name: str = ""


# ------------------------------------------------------------ log formats
def parse_sacct(text, where="sacct log"):
    """``sacct --parsable2`` output with its header line (the columns
    JobID, Submit, Start, End and AllocCPUS or NCPUS are needed).  Job steps
    (ids with a dot) and jobs that never started are left out; returns
    (records, skipped)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(f"{where}: empty", hint="give sacct --parsable2 "
                          "output with its header")
    head = lines[0].split("|")
    cpus_col = "AllocCPUS" if "AllocCPUS" in head else "NCPUS"
    need = ("JobID", "Submit", "Start", "End", cpus_col)
    missing = [c for c in need if c not in head]
    if missing:
        raise ConfigError(f"{where}: no column {missing[0]} in the header",
                          hint="run sacct --parsable2 --format=JobID,JobName,"
                          "Submit,Start,End,AllocCPUS,State")
    col = {c: head.index(c) for c in head}
    out, skipped = [], 0
    for n, line in enumerate(lines[1:], 2):
        f = line.split("|")
        if len(f) != len(head):
            raise ConfigError(f"{where}:{n}: {len(f)} fields, header has "
                              f"{len(head)}", hint="is it --parsable2 output?")
        if "." in f[col["JobID"]]:
            continue
        try:
            submit, start, end = (parse_time(f[col[c]]) for c in
                                  ("Submit", "Start", "End"))
            cpus = int(f[col[cpus_col]] or 0)
        except ValueError as e:
            raise ConfigError(f"{where}:{n}: {e}", hint="times must be "
                              "YYYY-MM-DDTHH:MM:SS") from None
        if submit is None or start is None or end is None or cpus == 0:
            skipped += 1  # never ran (cancelled while pending)
            continue
        out.append(Record(f[col["JobID"]], submit, max(0.0, end - start),
                          cpus, f[col["JobName"]] if "JobName" in col else ""))
    return out, skipped


# accounting(5): qname:hostname:group:owner:job_name:job_number:account:
# priority:submission_time:start_time:end_time:failed:exit_status:... with
# slots at field 34, task_number 35, pe_taskid 41
SGE_FIELDS = 42


def parse_sge_accounting(text, where="accounting file"):
    """Grid Engine's accounting file.  Array tasks are separate jobs
    (job.task); per-task records of parallel jobs (pe_taskid set) and jobs
    that never started are left out; times in ms (newer releases) are
    recognised."""
    out, skipped = [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        f = line.split(":")
        if len(f) < SGE_FIELDS:
            raise ConfigError(f"{where}:{n}: {len(f)} fields, expected at "
                              f"least {SGE_FIELDS}", hint="give Grid Engine's "
                              "accounting file ($SGE_ROOT/<cell>/common/"
                              "accounting)")
        if f[41] not in ("NONE", ""):
            continue
        try:
            submit, start, end = (float(f[i]) for i in (8, 9, 10))
            slots = int(f[34])
        except ValueError as e:
            raise ConfigError(f"{where}:{n}: {e}",
                              hint="times and slots must be numbers") from None
        if submit > 1e11:  # milliseconds
            submit, start, end = submit / 1000, start / 1000, end / 1000
        if start <= 0 or end < start:
            skipped += 1
            continue
        task = f[35]
        jobid = f[5] if task in ("0", "") else f"{f[5]}.{task}"
        out.append(Record(jobid, submit, end - start, max(1, slots), f[4]))
    return out, skipped


FORMATS = {"sacct": parse_sacct, "sge": parse_sge_accounting}


def load_log(path, fmt="auto"):
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read accounting log {str(path)!r}: "
                          f"{getattr(e, 'strerror', None) or e}",
                          hint="give sacct --parsable2 output or Grid "
                          "Engine's accounting file") from None
    if fmt == "auto":
        first = text.lstrip().split("\n", 1)[0]
        fmt = "sacct" if first.startswith("JobID") else "sge"
    if fmt not in FORMATS:
        raise ConfigError(f"unknown log format {fmt!r}",
                          hint=f"use one of: auto, {', '.join(FORMATS)}")
    records, skipped = FORMATS[fmt](text, str(path))
    if not records:
        raise ConfigError(f"{path}: no job that ran", hint="check the log")
    records.sort(key=lambda r: (r.submit, r.jobid))
    return records, skipped


# ------------------------------------------------------------ simulated world
class SimCluster(Backend):
    """A FIFO scheduler over own nodes and the nodes the orchestrator adds."""

    name = "simulated"

    def __init__(self, records, own_nodes, slots):
        super().__init__(runner=None)
        self.slots = slots
        self.free = {f"own-{i + 1}": slots for i in range(own_nodes)}
        self.own = set(self.free)
        self.draining = set()
        self.arrivals = list(records)  # sorted by submit
        self.queue = []  # (submit, jobid, record) FIFO
        self.running = {}  # jobid → (record, start, {node: slots})
        self.ends = []  # heap of (end, jobid)
        self.waits = {}  # jobid → wait
        self.busy = {"own": 0.0, "cloud": 0.0}  # slot-seconds
        self.now = None

    def _try_start(self, t):
        while self.queue:
            rec = self.queue[0]
            usable = {n: s for n, s in self.free.items()
                      if s > 0 and n not in self.draining}
            if sum(usable.values()) < rec.cpus:
                return  # strict FIFO: the head waits, so does everyone
            take, need = {}, rec.cpus
            # fewest nodes first: the emptiest nodes, in name order
            for n in sorted(usable, key=lambda n: (-usable[n], n)):
                k = min(need, usable[n])
                take[n], need = k, need - k
                if not need:
                    break
            for n, k in take.items():
                self.free[n] -= k
            self.queue.pop(0)
            self.running[rec.jobid] = (rec, t, take)
            self.waits[rec.jobid] = t - rec.submit
            heapq.heappush(self.ends, (t + rec.duration, rec.jobid))

    def _finish(self, jobid, t):
        rec, start, take = self.running.pop(jobid)
        for n, k in take.items():
            if n in self.free:
                self.free[n] += k
            kind = "own" if n in self.own else "cloud"
            self.busy[kind] += k * (t - start)

    def advance(self, now):
        """Process arrivals and completions up to ``now``, in time order."""
        while True:
            t_arr = self.arrivals[0].submit if self.arrivals else math.inf
            t_end = self.ends[0][0] if self.ends else math.inf
            t = min(t_arr, t_end)
            if t > now:
                break
            if t_end <= t_arr:
                _, jobid = heapq.heappop(self.ends)
                self._finish(jobid, t)
            else:
                self.queue.append(self.arrivals.pop(0))
            self._try_start(t)
        self.now = now

    def jobs(self):
        out = [Job(r.jobid, PENDING, r.name, cpus=r.cpus,
                   submitted_at=r.submit) for r in self.queue]
        out += [Job(r.jobid, RUNNING, r.name, cpus=r.cpus,
                    submitted_at=r.submit, started_at=s, nodes=tuple(take))
                for r, s, take in self.running.values()]
        return out

    def done(self):
        return not (self.arrivals or self.queue or self.running)

    def free_node_name(self, used, next_id):
        return f"cloud-{next_id}"

    def node_join(self, name):
        self.free.setdefault(name, self.slots)
        self._try_start(self.now)

    def node_drain(self, name, reason):
        self.draining.add(name)

    def node_resume(self, name):
        self.draining.discard(name)
        self._try_start(self.now)

    def node_down(self, name, reason):
        self.draining.discard(name)
        self.free.pop(name, None)

    def describe(self):
        return (f"simulated FIFO scheduler, {len(self.own)} own nodes x "
                f"{self.slots} slots")


class SimNodes(Provider):
    """Nodes that call back ``delay`` seconds after they were started."""

    name = "simulated"

    def __init__(self, delay):
        self.delay = delay
        self.orch = None
        self.stopped = set()

    def start(self, node):
        return {}

    def update(self, nodes):
        for node in nodes:
            if node.state == "STARTING" and \
                    self.orch.now >= node.created_at + self.delay:
                self.orch.node_ready(node.name, node.token)
        gone = {n.nodeid: "stopped" for n in nodes if n.nodeid in self.stopped}
        self.stopped -= set(gone)
        return gone

    def stop(self, node):
        self.stopped.add(node.nodeid)

    def describe(self):
        return f"simulated nodes (ready {self.delay:g} s after start)"


class NoBurst(Policy):
    """Never start a node (the baseline: own nodes only)."""

    def new_node_needed(self):
        return False

    def describe(self):
        return "NoBurst (own nodes only)"


# ------------------------------------------------------------- the runner
def simulate(records, policy, *, own_nodes=1, slots=4, max_nodes=4,
             max_delta=1, cycle=60.0, startup_delay=60.0, start_timeout=None):
    """Replay ``records``; returns (rows, summary)."""
    cluster = SimCluster(records, own_nodes, slots)
    nodes = SimNodes(startup_delay)
    t = records[0].submit - cycle
    orch = Orchestrator(cluster, nodes, policy, max_nodes=max_nodes,
                        max_delta=max_delta, clock=lambda: t,
                        start_timeout=start_timeout or max(
                            10 * startup_delay, 10 * cycle))
    nodes.orch = orch
    t0 = records[0].submit
    biggest = max(r.cpus for r in records)
    if biggest > slots * (own_nodes + max_nodes):
        raise ConfigError(f"a job needs {biggest} slots, more than "
                          f"{own_nodes + max_nodes} nodes x {slots} have",
                          hint="raise --node-slots, --own-nodes or "
                          "--max-nodes")
    rows, cloud_time, peak = [], 0.0, 0
    # every job one after the other, plus slack: a run past this is stuck
    give_up = records[-1].submit + sum(r.duration for r in records) + \
        100 * (cycle + startup_delay) + 10 * getattr(policy, "idle_time", 3600.0)
    while True:
        if t > give_up:
            raise ConfigError("simulation did not finish: jobs never start",
                              hint="the policy may never start a node while "
                              "--own-nodes cannot run the jobs")
        cluster.advance(t)
        s = orch.step()
        alive = len(orch.alive_nodes())
        peak = max(peak, alive)
        own_busy = sum(cluster.slots - cluster.free[n] for n in cluster.own)
        rows.append({"time": round(t - t0, 3), "pending": s["pending"],
                     "running": s["running"], "starting": s["starting"],
                     "ready": s["ready"] + s["draining"],
                     "idle": s["idle"], "nodes": alive,
                     "own_busy_slots": own_busy,
                     "cloud_busy_slots": sum(
                         cluster.slots - f for n, f in cluster.free.items()
                         if n not in cluster.own)})
        if cluster.done() and not orch.alive_nodes():
            break
        t += cycle
        cloud_time += alive * cycle
    waits = list(cluster.waits.values())
    makespan = max(rows[-1]["time"], 0.0)
    summary = {
        "jobs": len(records), "policy": policy.describe(),
        "own_nodes": own_nodes, "slots_per_node": slots,
        "max_nodes": max_nodes, "cycle_s": cycle,
        "startup_delay_s": startup_delay,
        "mean_wait_s": round(statistics.fmean(waits), 1),
        "median_wait_s": round(statistics.median(waits), 1),
        "max_wait_s": round(max(waits), 1),
        "makespan_s": round(makespan, 1),
        "nodes_started": orch.started,
        "peak_nodes": peak,
        "node_hours": round(cloud_time / 3600, 3),
        "own_cpu_hours": round(cluster.busy["own"] / 3600, 3),
        "rented_cpu_hours": round(cluster.busy["cloud"] / 3600, 3),
    }
    used = summary["own_cpu_hours"] + summary["rented_cpu_hours"]
    summary["rented_share"] = round(summary["rented_cpu_hours"] / used, 3) \
        if used else 0.0
    summary["rented_utilisation"] = round(
        summary["rented_cpu_hours"] / (summary["node_hours"] * slots), 3) \
        if summary["node_hours"] else 0.0
    return rows, summary


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(rows, path, title, baseline=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["time"] / 60 for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.step(t, [r["pending"] for r in rows], where="post", label="pending")
    ax1.step(t, [r["running"] for r in rows], where="post", label="running")
    if baseline:
        ax1.step([r["time"] / 60 for r in baseline],
                 [r["pending"] for r in baseline], where="post",
                 linestyle=":", color="grey", label="pending, own nodes only")
    ax1.set_ylabel("jobs")
    ax1.legend(loc="upper right")
    ax1.set_title(title)
    ax2.step(t, [r["nodes"] for r in rows], where="post",
             label="started nodes (alive)")
    ax2.step(t, [r["ready"] for r in rows], where="post", label="ready")
    ax2.step(t, [r["idle"] for r in rows], where="post", label="idle")
    ax2.set_ylabel("nodes")
    ax2.set_xlabel("minutes since the first submission")
    ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_and_report(log_path, policy, out_dir, *, fmt="auto", **kwargs):
    """The ``simulate`` command: CSV, PNG and summary.json in ``out_dir``,
    with the own-nodes-only baseline beside the policy's run."""
    records, skipped = load_log(log_path, fmt)
    rows, summary = simulate(records, policy, **kwargs)
    base_rows, base = simulate(records, NoBurst(), **kwargs)
    summary["skipped_never_started"] = skipped
    summary["baseline_mean_wait_s"] = base["mean_wait_s"]
    summary["baseline_max_wait_s"] = base["max_wait_s"]
    summary["baseline_makespan_s"] = base["makespan_s"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "workload.csv")
    plot(rows, out / "workload.png",
         f"{Path(log_path).name}: {len(records)} jobs, {policy.describe()}",
         baseline=base_rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
