"""The orchestrator loop: read the queue, ask the policy, start and stop
nodes through a provider, account idle time, checkpoint.

One cycle (``Orchestrator.step``):

1. read jobs and our nodes' state from the batch system (outside the lock:
   slow commands);
2. let the provider report nodes that went away;
3. collect finished provider calls (starts and stops run in a thread pool,
   so a slow cloud API never stalls the loop);
4. account busy and idle time per node; candidates = pending jobs the
   policy accepts (re-evaluated every cycle);
5. time out starts (the state changes first, so a stop is issued once);
6. start nodes: at most ``max_delta`` per cycle, while the policy asks and
   fewer than ``max_nodes`` are alive, counting starts in flight; a node
   being drained is resumed before a new one is started;
7. stop nodes: drain idle READY nodes the policy lets go (at most
   ``max_delta`` per cycle), stop drained ones that have no job left;
8. checkpoint atomically (nodes with the providers' data, counters,
   decisions), so a restarted orchestrator resumes with the same nodes.

READY comes only from the node itself (``node_ready``, the web callback),
never from a provider.
"""

import collections
import hmac
import json
import logging
import os
import threading
import time
from pathlib import Path

from apppot.errors import ConfigError

from .model import (
    ALIVE,
    DOWN,
    DRAINING,
    PENDING,
    READY,
    RUNNING,
    STARTING,
    STOPPING,
    Node,
)

log = logging.getLogger("apppot.orchestrator")

CHECKPOINT_VERSION = 1
BACKOFF_FIRST, BACKOFF_MAX = 30.0, 900.0


def bad_checkpoint(path, why):
    return ConfigError(f"checkpoint {str(path)!r} is damaged: {why}",
                       hint="restore it, or move it away to start afresh "
                       "(then stop the nodes it lists by hand)")


def read_checkpoint(path):
    """The checkpoint's state dict, its shape checked (one-line errors)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"no checkpoint in {str(Path(path).parent)!r}",
                          hint="give the --state-dir of 'run'") from None
    except OSError as e:
        raise ConfigError(f"cannot read checkpoint {str(path)!r}: "
                          f"{e.strerror}", hint="run as the orchestrator's "
                          "user") from None
    except ValueError as e:  # JSON syntax, or bytes that are not UTF-8
        raise bad_checkpoint(path, f"not JSON ({e})") from None
    if not isinstance(data, dict):
        raise bad_checkpoint(path, "not a JSON object")
    if data.get("version") != CHECKPOINT_VERSION:
        raise bad_checkpoint(path, f"unknown version {data.get('version')!r}")
    for key in ("cycle", "next_id", "started", "stopped"):
        if not isinstance(data.get(key), int):
            raise bad_checkpoint(path, f"{key!r} is not a number")
    for key in ("nodes", "history", "decisions"):
        if not isinstance(data.get(key), list):
            raise bad_checkpoint(path, f"{key!r} is not a list")
    try:
        for d in data["nodes"] + data["history"]:
            Node.from_dict(d)
        for t, text in data["decisions"]:
            float(t), str(text)
    except (TypeError, ValueError, AttributeError) as e:
        raise bad_checkpoint(path, f"a bad record ({e})") from None
    return data


def write_checkpoint(path, data):
    """Write ``data`` atomically and private (0600: it holds the nodes'
    tokens): a reader, or a restart after a crash at any instant, sees the
    old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a stale one keeps its old mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, json.dumps(data, indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Inline:
    """An executor that runs calls at once (simulation, tests)."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        fut = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001  (reported like a thread's)
            fut.set_exception(e)
        return fut

    def shutdown(self, wait=True):
        pass


class Orchestrator:
    def __init__(self, batch, provider, policy, *, max_nodes=4, max_delta=1,
                 start_timeout=600.0, state_file=None, clock=time.time,
                 executor=None, history=20):
        if max_nodes < 1 or max_delta < 1:
            raise ValueError("max_nodes and max_delta must be at least 1")
        self.batch, self.provider, self.policy = batch, provider, policy
        self.max_nodes, self.max_delta = max_nodes, max_delta
        self.start_timeout = start_timeout
        self.state_file = Path(state_file) if state_file else None
        self.clock = clock
        self.executor = executor or Inline()
        self.lock = threading.RLock()
        self.nodes = {}  # nodeid → Node, alive ones and those going away
        self.history = collections.deque(maxlen=history)  # DOWN nodes
        self.decisions = collections.deque(maxlen=50)  # (time, text)
        self.jobs = {}
        self.candidates = []
        self.cycle = 0
        self.now = clock()
        self.started = self.stopped = 0
        self.last_cycle_at = None
        self.last_cycle_seconds = 0.0
        self.sample = {}
        self._next_id = 1
        self._calls = {}  # nodeid → (what, Future)
        self.failures = 0  # starts that failed in a row
        self.hold_until = 0.0  # no new start before (back-off)
        policy.orch = self
        if self.state_file and self.state_file.exists():
            self.restore()

    # ------------------------------------------------------------ queries
    def alive_nodes(self):
        return [n for n in self.nodes.values() if n.state in ALIVE]

    def by_state(self, *states):
        return [n for n in self.nodes.values() if n.state in states]

    def decide(self, text):
        self.decisions.append((self.now, text))
        log.info("cycle %d: %s", self.cycle, text)

    # ------------------------------------------------------------ the cycle
    def step(self):
        t0 = time.monotonic()
        now = self.clock()
        self.policy.before_cycle()
        jobs = self.batch.jobs()
        gone = self.provider.update(self._snapshot())  # nodeid → reason
        with self.lock:
            self.now = now
            elapsed = now - self.last_cycle_at if self.last_cycle_at else 0.0
            self.jobs = {j.jobid: j for j in jobs}
            self._collect_calls()
            self._vanished(gone)
            self._account(elapsed)
            self.candidates = [j for j in jobs if j.state == PENDING
                               and self.policy.is_candidate(j)]
            self._join_ready()
            self._timeouts()
            self._starts()
            self._stops()
            self._retire()
            self.policy.after_cycle()
            self.cycle += 1
            self.last_cycle_at = now
            self.last_cycle_seconds = time.monotonic() - t0
            self.sample = self._sample()
            self.checkpoint()
        return self.sample

    def run(self, delay=30.0, max_cycles=0, stop=None):
        """Cycle every ``delay`` seconds until ``stop`` (an Event) is set or
        ``max_cycles`` cycles ran (0: forever)."""
        stop = stop or threading.Event()
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                self.step()
            except Exception as e:  # one bad cycle must not end the loop
                log.exception("cycle %d failed: %s", self.cycle, e)
                self.decisions.append((self.clock(), f"cycle failed: {e}"))
            if max_cycles and self.cycle >= max_cycles:
                break
            took = time.monotonic() - t0
            if took > delay:
                log.warning("cycle %d took %.1f s, longer than the %.1f s "
                            "delay", self.cycle, took, delay)
            stop.wait(max(0.0, delay - took))

    def _snapshot(self):
        with self.lock:
            return [n for n in self.nodes.values() if n.state in ALIVE]

    def _collect_calls(self):
        for nodeid, (what, fut) in list(self._calls.items()):
            if not fut.done():
                continue
            del self._calls[nodeid]
            node = self.nodes.get(nodeid)
            if node is None:
                continue
            err = fut.exception()
            if what == "start":
                if err is not None:
                    node.state, node.reason = DOWN, f"start failed: {err}"
                    node.stopped_at = self.now
                    self.decide(f"{node.name}: start failed: {err}")
                    self.batch.node_down(node.name, "start failed")
                    self._failed_start()
                else:
                    node.data.update(fut.result() or {})
            elif err is not None:  # a failed stop is retried: never pay on
                node.reason = f"stop failed: {err}"
                node.data["stop_tries"] = node.data.get("stop_tries", 0) + 1
                node.data["stop_again"] = True
                self.decide(f"{node.name}: stop failed ({err}); will retry")

    def _vanished(self, gone):
        for nodeid, reason in gone.items():
            node = self.nodes.get(nodeid)
            if node is None or node.state == DOWN:
                continue
            if nodeid in self._calls and self._calls[nodeid][0] == "start":
                continue  # the provider has not even finished starting it
            if node.state != STOPPING:
                self.decide(f"{node.name}: went away while {node.state} "
                            f"({reason})")
                self.batch.node_down(node.name, reason)
                if node.state == STARTING:
                    self._failed_start()
            node.state, node.stopped_at = DOWN, self.now
            node.reason = node.reason or reason
            node.idle_since = None

    def _failed_start(self):
        """Back off after nodes fail to come up: 30 s, doubling, at most
        15 min, so a broken image or network does not start nodes in a loop
        (the first READY node resets it)."""
        self.failures += 1
        hold = min(BACKOFF_FIRST * 2 ** (self.failures - 1), BACKOFF_MAX)
        self.hold_until = self.now + hold
        self.decide(f"{self.failures} failed start(s) in a row; no new node "
                    f"for {hold:g} s")

    def _account(self, elapsed):
        on = collections.defaultdict(list)
        for job in self.jobs.values():
            if job.state == RUNNING:
                for host in job.nodes:
                    on[host].append(job.jobid)
        for node in self.nodes.values():
            node.jobs = sorted(on.get(node.name, ()))
            if node.state not in (READY, DRAINING):
                continue
            if node.jobs:
                node.busy_total += elapsed
                node.idle_since = None
            elif node.idle_since is None:
                node.idle_since = self.now
            else:
                node.idle_total += elapsed

    def _join_ready(self):
        for node in self.by_state(READY):
            if not node.data.get("joined"):
                self.batch.node_join(node.name)
                node.data["joined"] = True

    def _timeouts(self):
        for node in self.by_state(STARTING):
            if self.now - node.created_at > self.start_timeout:
                node.state = STOPPING  # first, so the stop is issued once
                node.reason = f"not ready after {self.start_timeout:g} s"
                self.decide(f"{node.name}: {node.reason}; stopping it")
                self._call("stop", node, self.provider.stop)

    def _starts(self):
        if self.now < self.hold_until:
            return
        for _ in range(self.max_delta):
            if not self.policy.new_node_needed():
                break
            draining = sorted(self.by_state(DRAINING), key=lambda n: n.nodeid)
            if draining:
                node = draining[0]
                self.batch.node_resume(node.name)
                node.state, node.reason = READY, ""
                node.idle_since = self.now  # a fresh chance to get work
                node.data.pop("drained_at_cycle", None)
                self.decide(f"{node.name}: demand is back; resumed instead "
                            "of starting a new node")
                continue
            if len(self.alive_nodes()) >= self.max_nodes:
                break
            used = {n.name for n in self.alive_nodes()}
            name = self.batch.free_node_name(used, self._next_id)
            if name is None:
                self.decide("no free node name left in the batch system")
                break
            node = Node(nodeid=str(self._next_id), name=name,
                        created_at=self.now)
            node.address = self.batch.node_address(name)
            self._next_id += 1
            self.nodes[node.nodeid] = node
            self.started += 1
            self.decide(f"starting {name} ({len(self.candidates)} candidate "
                        f"jobs, {len(self.alive_nodes())} nodes incl. this)")
            self._call("start", node, self.provider.start)

    def _stops(self):
        drains = 0
        idle = sorted((n for n in self.by_state(READY) if not n.jobs),
                      key=lambda n: n.idle_since or self.now)
        for node in idle:
            if drains >= self.max_delta:
                break
            if self.policy.can_stop(node):
                self.batch.node_drain(node.name, "idle; apppot-orchestrator "
                                      "stops it")
                node.state = DRAINING
                node.data["drained_at_cycle"] = self.cycle
                drains += 1
                self.decide(f"{node.name}: idle for "
                            f"{node.idle_for(self.now):.0f} s; draining")
        for node in self.by_state(DRAINING):
            # drained in an earlier cycle and still no job: nothing can
            # have been placed on it since
            if not node.jobs and node.data.get("drained_at_cycle",
                                               self.cycle) < self.cycle:
                node.state = STOPPING
                self.stopped += 1
                self.decide(f"{node.name}: drained; stopping")
                self.batch.node_down(node.name, "stopped by "
                                     "apppot-orchestrator")
                self._call("stop", node, self.provider.stop)
        for node in self.by_state(STOPPING):  # retry failed stops
            if node.nodeid not in self._calls and node.data.pop("stop_again",
                                                                 False):
                self._call("stop", node, self.provider.stop)

    def _retire(self):
        for nodeid, node in list(self.nodes.items()):
            if node.state == DOWN and nodeid not in self._calls:
                del self.nodes[nodeid]
                self.history.append(node)
                if node.stopped_at is None:
                    node.stopped_at = self.now

    def _call(self, what, node, fn):
        if what == "stop":
            node.data.pop("drained_at_cycle", None)
        self._calls[node.nodeid] = (what, self.executor.submit(fn, node))
        if isinstance(self.executor, Inline):
            self._collect_calls()

    def _sample(self):
        pending = sum(1 for j in self.jobs.values() if j.state == PENDING)
        running = sum(1 for j in self.jobs.values() if j.state == RUNNING)
        count = collections.Counter(n.state for n in self.nodes.values())
        idle = sum(1 for n in self.by_state(READY) if not n.jobs)
        return {"time": self.now, "cycle": self.cycle, "pending": pending,
                "candidates": len(self.candidates), "running": running,
                **{s.lower(): count.get(s, 0)
                   for s in (STARTING, READY, DRAINING, STOPPING)},
                "idle": idle}

    # ------------------------------------------------------- the callback
    def node_ready(self, name, token):
        """A node says it is up (web callback).  True if accepted."""
        with self.lock:
            for node in self.nodes.values():
                if node.name == name and node.state == STARTING:
                    if not hmac.compare_digest(node.token.encode(),
                                               str(token).encode()):
                        break
                    node.state = READY
                    node.ready_at = self.clock()
                    self.failures, self.hold_until = 0, 0.0
                    node.idle_since = node.ready_at
                    self.decide(f"{name}: ready after "
                                f"{node.ready_at - node.created_at:.1f} s")
                    self.checkpoint()
                    return True
            log.warning("rejected ready callback for %r", name)
            return False

    # ------------------------------------------------------- checkpoints
    def state(self):
        return {"version": CHECKPOINT_VERSION, "cycle": self.cycle,
                "next_id": self._next_id, "started": self.started,
                "stopped": self.stopped, "last_cycle_at": self.last_cycle_at,
                "failures": self.failures, "hold_until": self.hold_until,
                "nodes": [n.to_dict() for n in self.nodes.values()],
                "history": [n.to_dict() for n in self.history],
                "decisions": list(self.decisions), "sample": self.sample}

    def checkpoint(self):
        if self.state_file:
            write_checkpoint(self.state_file, self.state())

    def restore(self):
        data = read_checkpoint(self.state_file)
        try:
            self.cycle = int(data["cycle"])
            self._next_id = int(data["next_id"])
            self.started = int(data["started"])
            self.stopped = int(data["stopped"])
            self.last_cycle_at = data["last_cycle_at"]
            self.failures = int(data.get("failures", 0))
            self.hold_until = float(data.get("hold_until", 0.0))
            nodes = [Node.from_dict(d) for d in data["nodes"]]
            history = [Node.from_dict(d) for d in data["history"]]
            decisions = [(float(t), str(text))
                         for t, text in data["decisions"]]
        except (KeyError, TypeError, ValueError) as e:
            raise bad_checkpoint(self.state_file, e) from None
        self.nodes = {n.nodeid: n for n in nodes}
        self.history.extend(history)
        self.decisions.extend(decisions)
        self.sample = data.get("sample") or {}
        for node in self.by_state(STOPPING):  # its stop died with us
            node.data["stop_again"] = True
        self.provider.adopt(list(self.nodes.values()))
        self.decide(f"resumed from {self.state_file}: "
                    f"{len(self.alive_nodes())} nodes")

    # ----------------------------------------------------------- status
    def status(self):
        """Everything the status page and ``status`` show; no secrets."""
        with self.lock:
            now = self.clock()
            return {
                "cycle": self.cycle, "now": now,
                "last_cycle_at": self.last_cycle_at,
                "last_cycle_seconds": round(self.last_cycle_seconds, 3),
                "policy": self.policy.describe(),
                "provider": self.provider.describe(),
                "batch": self.batch.describe(),
                "max_nodes": self.max_nodes, "max_delta": self.max_delta,
                "started": self.started, "stopped": self.stopped,
                "queue": self.sample,
                "nodes": [n.public(now) for n in sorted(
                    self.nodes.values(), key=lambda n: int(n.nodeid))],
                "history": [n.public(now) for n in self.history],
                "decisions": list(self.decisions)[-20:],
            }

    def close(self, wait=True):
        """Stop the thread pool.  With ``wait``, take in what its last calls
        did and checkpoint: a start that returned after the last cycle
        brought the node's pid, without which no shutdown finds it."""
        self.executor.shutdown(wait=wait)
        if wait:
            with self.lock:
                self._collect_calls()
                self.checkpoint()
