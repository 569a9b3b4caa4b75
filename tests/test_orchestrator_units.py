"""Unit tests of the orchestrator's pure logic: the cycle, policies,
checkpoints, parsers, simulation.  (Real Slurm, real appliances and a real
browser are in test_orchestrator_slurm.py and test_orchestrator_web.py.)"""

import json
import os
import shlex
import stat
import textwrap
from pathlib import Path

import pytest

from apppot.errors import ConfigError
from apppot_mpi.orchestrator import batch as batchmod
from apppot_mpi.orchestrator import simulate as sim
from apppot_mpi.orchestrator.core import Orchestrator
from apppot_mpi.orchestrator.model import (
    DOWN,
    DRAINING,
    PENDING,
    READY,
    RUNNING,
    STARTING,
    STOPPING,
    Job,
)
from apppot_mpi.orchestrator.policy import Policy, load_policy
from apppot_mpi.orchestrator.providers import Provider
from apppot_mpi.orchestrator.web import render_status


class FakeBatch(batchmod.Backend):
    name = "fake"

    def __init__(self):
        super().__init__(runner=None)
        self.queue, self.calls = [], []

    def jobs(self):
        return list(self.queue)

    def free_node_name(self, used, next_id):
        names = [f"n{i}" for i in range(1, 9)]
        return next((n for n in names if n not in used), None)

    def node_address(self, name):
        return f"10.0.0.{name[1:]}"

    def node_join(self, name):
        self.calls.append(("join", name))

    def node_resume(self, name):
        self.calls.append(("resume", name))

    def node_drain(self, name, reason):
        self.calls.append(("drain", name))

    def node_down(self, name, reason):
        self.calls.append(("down", name))


class FakeProvider(Provider):
    name = "fake"

    def __init__(self):
        self.started, self.stopped, self.gone = [], [], {}
        self.adopted = []
        self.fail_start = self.fail_stop = 0

    def start(self, node):
        if self.fail_start:
            self.fail_start -= 1
            raise RuntimeError("quota exceeded")
        self.started.append(node.name)
        return {"pid": 1000 + int(node.nodeid)}

    def update(self, nodes):
        return {n.nodeid: r for n in nodes for nid, r in self.gone.items()
                if n.nodeid == nid}

    def stop(self, node):
        if self.fail_stop:
            self.fail_stop -= 1
            raise RuntimeError("api timeout")
        self.stopped.append(node.name)
        self.gone[node.nodeid] = "stopped"

    def adopt(self, nodes):
        self.adopted = [n.name for n in nodes]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def pending(n, start=0):
    return [Job(str(start + i), PENDING, cpus=1, submitted_at=1.0)
            for i in range(n)]


def make(tmp_path=None, **kw):
    b, p, c = FakeBatch(), FakeProvider(), Clock()
    policy = kw.pop("policy", None) or Policy(ratio=2, idle_time=100)
    o = Orchestrator(b, p, policy, clock=c, state_file=(
        tmp_path / "state.json" if tmp_path else None), **kw)
    return o, b, p, c


def test_starts_while_candidates_exceed_twice_the_nodes_capped_per_cycle():
    o, b, p, c = make(max_nodes=10, max_delta=2)
    b.queue = pending(7)
    o.step()
    assert p.started == ["n1", "n2"]  # max_delta per cycle
    o.step()
    assert p.started == ["n1", "n2", "n3", "n4"]  # 7 > 2*3 still
    o.step()
    assert len(p.started) == 4  # 7 > 2*4 is false


def test_max_nodes_counts_starts_in_flight():
    o, b, p, c = make(max_nodes=3, max_delta=5)
    b.queue = pending(50)
    for _ in range(4):
        o.step()
    assert len(p.started) == 3  # none READY yet, all counted
    assert all(n.state == STARTING for n in o.nodes.values())


def test_ready_callback_needs_the_nodes_token_and_join_follows():
    o, b, p, c = make()
    b.queue = pending(3)
    o.step()
    node = next(iter(o.nodes.values()))
    assert not o.node_ready("n1", "wrong")
    assert not o.node_ready("n2", node.token)
    assert node.state == STARTING
    assert o.node_ready("n1", node.token)
    assert node.state == READY
    assert not o.node_ready("n1", node.token)  # only once
    o.step()
    assert ("join", "n1") in b.calls
    status = json.dumps(o.status())
    assert node.token not in status


def test_idle_node_is_drained_then_stopped_busy_node_is_not():
    o, b, p, c = make(max_nodes=2)
    b.queue = pending(5)
    o.step()
    o.step()
    n1, n2 = o.nodes["1"], o.nodes["2"]
    o.node_ready("n1", n1.token)
    o.node_ready("n2", n2.token)
    b.queue = [Job("9", RUNNING, nodes=("n2",))]
    c.t += 50
    o.step()
    assert n1.state == READY and n2.jobs == ["9"]
    c.t += 101
    o.step()
    assert n1.state == DRAINING and ("drain", "n1") in b.calls
    assert n2.state == READY  # busy
    c.t += 10
    o.step()  # a cycle later, still no job on it: stop
    assert "n1" in p.stopped and ("down", "n1") in b.calls
    c.t += 10
    o.step()
    assert "1" not in o.nodes and o.history[-1].state == DOWN
    assert o.history[-1].idle_total > 100


def test_draining_node_is_resumed_when_demand_returns():
    o, b, p, c = make(max_nodes=1)
    b.queue = pending(3)
    o.step()
    n1 = o.nodes["1"]
    o.node_ready("n1", n1.token)
    b.queue = []
    c.t += 200
    o.step()
    assert n1.state == DRAINING
    b.queue = pending(3)
    c.t += 10
    o.step()
    assert n1.state == READY and ("resume", "n1") in b.calls
    assert p.started == ["n1"] and not p.stopped


def test_start_timeout_stops_once():
    o, b, p, c = make(start_timeout=60, max_nodes=1)
    b.queue = pending(3)
    o.step()
    p.gone = {}  # the provider never reports it gone
    stop_calls = []
    p.stop = lambda node: stop_calls.append(node.name)
    for _ in range(5):
        c.t += 61
        o.step()
    assert stop_calls == ["n1"]
    assert o.nodes["1"].state == STOPPING
    assert "not ready after 60 s" in o.nodes["1"].reason


def test_failed_start_goes_down_and_failed_stop_is_retried():
    o, b, p, c = make(max_nodes=1)
    p.fail_start = 1
    b.queue = pending(3)
    o.step()
    assert o.history[-1].reason.startswith("start failed: quota")
    c.t += 29
    o.step()
    assert not o.nodes  # backing off for 30 s
    c.t += 2
    o.step()
    node = o.nodes["2"]
    o.node_ready("n1", node.token)
    b.queue = []
    p.fail_stop = 1
    for _ in range(4):
        c.t += 200
        o.step()
    assert p.stopped == ["n1"]  # the second try
    assert "2" not in o.nodes


def test_vanished_ready_node_is_marked_down_in_the_batch_system():
    o, b, p, c = make()
    b.queue = pending(3)
    o.step()
    o.node_ready("n1", o.nodes["1"].token)
    p.gone = {"1": "appliance exited (121)"}
    o.step()
    assert ("down", "n1") in b.calls
    assert o.history[-1].reason == "appliance exited (121)"


def test_checkpoint_restores_nodes_without_duplicating(tmp_path):
    o, b, p, c = make(tmp_path, max_nodes=3, max_delta=3)
    b.queue = pending(9)
    o.step()
    o.node_ready("n2", o.nodes["2"].token)
    data = json.loads((tmp_path / "state.json").read_text())
    assert [n["state"] for n in data["nodes"]] == [STARTING, READY, STARTING]
    assert not list(tmp_path.glob("*.tmp"))
    # "killed" here; a new orchestrator on the same file
    o2, b2, p2, c2 = make(tmp_path, max_nodes=3, max_delta=3)
    assert p2.adopted == ["n1", "n2", "n3"]
    assert o2.nodes["2"].state == READY
    b2.queue = pending(9)
    o2.step()
    assert p2.started == []  # max_nodes already reached by restored ones
    assert o2.node_ready("n1", o.nodes["1"].token)  # tokens survive
    assert o2._next_id == 4


def test_policy_file(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text(textwrap.dedent("""
        from apppot_mpi.orchestrator.policy import Policy

        class Helper(Policy):
            pass

        class BigOnly(Policy):
            def is_candidate(self, job):
                return job.cpus >= 4

            def new_node_needed(self):
                return len(self.orch.candidates) > len(self.orch.alive_nodes())
    """))
    pol = load_policy(str(f), idle_time=5)
    assert type(pol).__name__ == "BigOnly" and pol.idle_time == 5
    assert type(load_policy(f"{f}:Helper")).__name__ == "Helper"
    o, b, p, c = make(policy=pol, max_nodes=5, max_delta=5)
    b.queue = pending(3) + [Job("big", PENDING, cpus=4)]
    o.step()
    assert [j.jobid for j in o.candidates] == ["big"] and p.started == ["n1"]
    with pytest.raises(ConfigError, match="not found"):
        load_policy(str(tmp_path / "nope.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no Policy subclass"):
        load_policy(str(tmp_path / "empty.py"))
    (tmp_path / "broken.py").write_text("def (\n")
    with pytest.raises(ConfigError, match="failed to load"):
        load_policy(str(tmp_path / "broken.py"))


# ------------------------------------------------------------- parsers
# squeue -o '%i|%T|%C|%V|%S|%P|%u|%N' as Slurm 22.05 printed it here
SQUEUE = """\
7|RUNNING|1|2026-11-26T09:01:02|2026-11-26T09:01:40|cloud|root|apppot-n1
8|PENDING|2|2026-11-26T09:01:03|N/A|cloud|root|
x|y
9|RUNNING|2|2026-11-26T09:01:03|2026-11-26T09:02:00|cloud|root|apppot-n[2-3]
10|RUNNING|2|2026-11-26T09:01:03|2026-11-26T09:02:00|cloud|root|n[1-
"""


def test_parse_squeue_skips_lines_that_do_not_parse(caplog):
    jobs = batchmod.parse_squeue(SQUEUE)
    assert [(j.jobid, j.state) for j in jobs] == [
        ("7", RUNNING), ("8", PENDING), ("9", RUNNING)]
    assert jobs[1].cpus == 2 and jobs[1].nodes == ()
    assert jobs[2].nodes == ("apppot-n2", "apppot-n3")
    assert all(j.name == "" for j in jobs)  # never read from this format
    assert "skipped a line" in caplog.text and "'x|y'" in caplog.text
    assert "n[1-" in caplog.text


def squeue_json(*records):
    return json.dumps({"meta": {}, "errors": [], "jobs": list(records)})


def rec(jobid, state="PENDING", name="j", partition="cloud", **kw):
    return {"job_id": jobid, "job_state": state, "name": name,
            "partition": partition, "user_name": "alice", "cpus": 1,
            "submit_time": 1700000000, "start_time": 0, "nodes": "", **kw}


def test_parse_squeue_json_keeps_any_name_and_skips_bad_records(caplog):
    evil = "x\n99|PENDING|64|N/A|N/A|cloud|root||fake|job"
    jobs = batchmod.parse_squeue_json(squeue_json(
        rec(5, name=evil, cpus=4),
        rec(6, "RUNNING", start_time=1700000100, nodes="apppot-n[1-2]"),
        rec(7, "COMPLETED"), rec(8, partition="debug"),
        rec(9, partition="debug,cloud"),
        {"job_id": "nan?", "job_state": "PENDING", "partition": "cloud"},
        rec(11, cpus="many"), rec(12, "RUNNING", nodes="n[1-"), "junk"),
        "cloud")
    assert [j.jobid for j in jobs] == ["5", "6", "9"]
    assert jobs[0].name == evil and jobs[0].cpus == 4
    assert jobs[0].submitted_at == 1700000000 and jobs[0].user == "alice"
    assert jobs[1].state == RUNNING and jobs[1].started_at == 1700000100
    assert jobs[1].nodes == ("apppot-n1", "apppot-n2")
    assert caplog.text.count("skipped a job record") == 4
    with pytest.raises(batchmod.BatchError, match="cannot parse"):
        batchmod.parse_squeue_json("squeue: unrecognized option '--json'")


def test_slurm_reads_the_queue_as_json_else_without_names(caplog):
    def runner_for(json_works):
        calls = []

        def runner(argv):
            calls.append(argv)
            if "--json" in argv:
                if not json_works:
                    raise batchmod.BatchError("squeue: unrecognized option "
                                              "'--json'")
                return squeue_json(rec(5, name="a|b\nc"))
            return "5|PENDING|1|N/A|N/A|cloud|alice|\n"
        return runner, calls

    runner, calls = runner_for(True)
    s = batchmod.Slurm("cloud", runner=runner)
    assert [j.name for j in s.jobs()] == ["a|b\nc"]
    assert calls == [["squeue", "-a", "-t", "PENDING,RUNNING,CONFIGURING,"
                      "COMPLETING,SUSPENDED", "-p", "cloud", "--json"]]
    runner, calls = runner_for(False)
    s = batchmod.Slurm("cloud", runner=runner)
    assert [(j.jobid, j.name) for j in s.jobs()] == [("5", "")]
    assert [(j.jobid, j.name) for j in s.jobs()] == [("5", "")]
    assert [c[-1] for c in calls] == ["--json", "%i|%T|%C|%V|%S|%P|%u|%N",
                                      "%i|%T|%C|%V|%S|%P|%u|%N"]
    assert caplog.text.count("without job names") == 1


def test_slurm_backend_argv_and_free_names():
    out = {"sinfo": "apppot-n10|10.254.0.20|down*\napppot-n2|10.254.0.12|"
           "idle\napppot-n3|10.254.0.13|down\n"}
    calls = []

    def runner(argv):
        calls.append(argv)
        return out.get(argv[0], "")

    s = batchmod.Slurm("cloud", runner=runner)
    assert s.free_node_name({"apppot-n3"}, 1) == "apppot-n10"
    assert s.free_node_name(set(), 1) == "apppot-n3"  # natural order
    assert s.node_address("apppot-n2") == "10.254.0.12"
    s.node_drain("apppot-n2", "idle")
    assert calls[-1] == ["scontrol", "update", "nodename=apppot-n2",
                         "state=drain", "reason=idle"]
    s.node_join("apppot-n2")  # idle already: nothing to resume
    assert calls[-1][0] == "sinfo"
    s.node_join("apppot-n3")
    assert calls[-1][-1] == "state=resume"


QSTAT_XML = """<?xml version='1.0'?>
<job_info  xmlns:xsd="http://arc.liv.ac.uk/repos/darcs/sge/source/dist/util/resources/schemas/qstat/qstat.xsd">
  <queue_info>
    <job_list state="running">
      <JB_job_number>4242</JB_job_number>
      <JAT_prio>0.55500</JAT_prio>
      <JB_name>omssa</JB_name>
      <JB_owner>bfabric</JB_owner>
      <state>r</state>
      <JAT_start_time>2012-03-01T10:00:05</JAT_start_time>
      <queue_name>cloud.q@vm-3</queue_name>
      <slots>1</slots>
    </job_list>
  </queue_info>
  <job_info>
    <job_list state="pending">
      <JB_job_number>4243</JB_job_number>
      <JAT_prio>0.50500</JAT_prio>
      <JB_name>omssa-2</JB_name>
      <JB_owner>bfabric</JB_owner>
      <state>qw</state>
      <JB_submission_time>2012-03-01T10:00:01</JB_submission_time>
      <queue_name></queue_name>
      <slots>4</slots>
    </job_list>
    <job_list state="pending">
      <JB_job_number>4244</JB_job_number>
      <JB_name>held</JB_name>
      <JB_owner>bfabric</JB_owner>
      <state>hqw</state>
      <JB_submission_time>2012-03-01T10:00:02</JB_submission_time>
      <slots>1</slots>
    </job_list>
  </job_info>
</job_info>
"""


def test_parse_qstat_xml_and_qmod_argv():
    jobs = batchmod.parse_qstat_xml(QSTAT_XML)
    assert [(j.jobid, j.state) for j in jobs] == [
        ("4242", RUNNING), ("4243", PENDING), ("4244", "OTHER")]
    assert jobs[0].nodes == ("vm-3",) and jobs[0].partition == "cloud.q"
    assert jobs[1].cpus == 4 and jobs[1].nodes == ()
    ge = batchmod.GridEngine("cloud.q", runner=lambda a: "")
    assert ge.qmod_argv("vm-3", False) == ["qmod", "-d", "cloud.q@vm-3"]


def test_render_status_escapes_and_hides_tokens():
    o, b, p, c = make()
    b.queue = pending(3)
    o.step()
    o.nodes["1"].reason = "<script>alert(1)</script>"
    page = render_status(o.status())
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert o.nodes["1"].token not in page


# ---------------------------------------------------------- simulation
SACCT = """\
JobID|JobName|Partition|User|Submit|Start|End|Elapsed|AllocCPUS|NNodes|State|ExitCode|Timelimit
1|a|batch|root|2026-11-26T09:00:00|2026-11-26T09:00:00|2026-11-26T09:10:00|00:10:00|4|1|COMPLETED|0:0|UNLIMITED
2|b|batch|root|2026-11-26T09:00:10|2026-11-26T09:10:00|2026-11-26T09:15:00|00:05:00|4|1|COMPLETED|0:0|UNLIMITED
2.batch|batch||root|2026-11-26T09:10:00|2026-11-26T09:10:00|2026-11-26T09:15:00|00:05:00|4|1|COMPLETED|0:0|
3|c|batch|root|2026-11-26T09:00:20|2026-11-26T09:15:00|2026-11-26T09:16:00|00:01:00|1|1|COMPLETED|0:0|UNLIMITED
4|d|batch|root|2026-11-26T09:00:30|None|2026-11-26T09:01:00|00:00:00|0|0|CANCELLED by 0|0:0|UNLIMITED
"""  # noqa: E501


def test_parse_sacct_skips_steps_and_never_started():
    recs, skipped = sim.parse_sacct(SACCT)
    assert [(r.jobid, r.duration, r.cpus) for r in recs] == [
        ("1", 600, 4), ("2", 300, 4), ("3", 60, 1)]
    assert skipped == 1
    with pytest.raises(ConfigError, match="no column Submit"):
        sim.parse_sacct("JobID|Start|End|AllocCPUS\n")
    with pytest.raises(ConfigError, match=r":2: 3 fields"):
        sim.parse_sacct("JobID|Submit|Start|End|AllocCPUS\n1|2|3\n")


def sge_line(job, task, submit, start, end, slots, pe_taskid="NONE"):
    f = ["all.q", "node1", "grp", "user", f"job{job}", str(job), "sge", "0",
         str(submit), str(start), str(end), "0", "0", str(end - start)]
    f += ["0"] * (34 - len(f))
    f += [str(slots), str(task)] + ["0"] * 5 + [pe_taskid, "0", "0", "0"]
    return ":".join(f)


def test_parse_sge_accounting():
    text = "\n".join([
        "# Version: 8.1.9",
        sge_line(10, 0, 100, 110, 170, 2),
        sge_line(11, 1, 100, 120, 130, 1),
        sge_line(11, 2, 100, 125, 145, 1),
        sge_line(12, 0, 100, 0, 0, 1),  # never started
        sge_line(13, 0, 100, 110, 170, 1, pe_taskid="1.node1"),
        sge_line(14, 0, 100_000_000_000_0, 100_000_000_500_0,
                 100_000_001_000_0, 1),  # milliseconds
    ])
    recs, skipped = sim.parse_sge_accounting(text)
    assert [(r.jobid, r.duration, r.cpus) for r in recs] == [
        ("10", 60, 2), ("11.1", 10, 1), ("11.2", 20, 1), ("14", 5, 1)]
    assert skipped == 1
    with pytest.raises(ConfigError, match="expected at least 42"):
        sim.parse_sge_accounting("a:b:c\n")


def records(*specs):
    return [sim.Record(str(i), submit, dur, cpus)
            for i, (submit, dur, cpus) in enumerate(specs, 1)]


def test_simulated_scheduler_is_fifo_and_ends_jobs_at_start_plus_duration():
    recs = records((0, 100, 4), (1, 50, 1), (2, 10, 4))
    rows, s = sim.simulate(recs, sim.NoBurst(), own_nodes=1, slots=4,
                           cycle=10, max_nodes=1)
    # job 2 waits for job 1 (FIFO, 4 slots); job 3 waits behind job 2 even
    # though it arrived later; each ends at its start + run time
    assert s["max_wait_s"] == 148 and s["makespan_s"] >= 160
    assert s["nodes_started"] == 0 and s["rented_cpu_hours"] == 0


def test_simulation_own_nodes_do_not_count_against_max_nodes():
    recs = records(*[(i, 600, 1) for i in range(12)])
    # 2012's bug: cluster nodes >= max VMs meant no VM was ever started
    rows, s = sim.simulate(recs, Policy(ratio=2, idle_time=60), own_nodes=3,
                           slots=1, max_nodes=2, max_delta=1, cycle=30,
                           startup_delay=90)
    assert s["nodes_started"] == 2 and s["peak_nodes"] == 2
    assert s["rented_cpu_hours"] > 0


def test_simulation_startup_delay_is_in_seconds_and_reproducible():
    recs = records(*[(i, 300, 1) for i in range(6)])
    kw = {"own_nodes": 0, "slots": 1, "max_nodes": 6, "max_delta": 6,
          "cycle": 10}
    _, fast = sim.simulate(recs, Policy(ratio=0.5, idle_time=30),
                           startup_delay=20, **kw)
    rows, slow = sim.simulate(recs, Policy(ratio=0.5, idle_time=30),
                              startup_delay=200, **kw)
    assert slow["mean_wait_s"] - fast["mean_wait_s"] == pytest.approx(
        180, abs=10)
    rows2, slow2 = sim.simulate(recs, Policy(ratio=0.5, idle_time=30),
                                startup_delay=200, **kw)
    assert rows == rows2 and slow == slow2


SAMPLE = Path(sim.__file__).parent / "samples" / "slurm-sacct.txt"


def test_simulate_the_shipped_sacct_sample_reproducibly(tmp_path, capsys):
    """The sample is a real Slurm run's sacct output (scripts/
    make-sacct-sample.sh); the same inputs give the same outputs."""
    from apppot_mpi.orchestrator.cli import main

    records, skipped = sim.load_log(SAMPLE)
    assert len(records) >= 50 and skipped >= 1
    args = ["simulate", str(SAMPLE), "--own-nodes", "1", "--node-slots", "4",
            "--max-nodes", "3", "--cycle", "10", "--startup-delay", "20",
            "--idle-time", "60"]
    outs = []
    for run in ("a", "b"):
        assert main([*args, "--out", str(tmp_path / run)]) == 0
        outs.append({f: (tmp_path / run / f).read_text() for f in
                     ("workload.csv", "summary.json")})
    assert outs[0] == outs[1]
    png = (tmp_path / "a" / "workload.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    head = outs[0]["workload.csv"].splitlines()[0].split(",")
    assert head == ["time", "pending", "running", "starting", "ready", "idle",
                    "nodes", "own_busy_slots", "cloud_busy_slots"]
    s = json.loads(outs[0]["summary.json"])
    assert s["jobs"] == len(records)
    assert 0 < s["peak_nodes"] <= 3 and s["node_hours"] > 0
    assert s["mean_wait_s"] < s["baseline_mean_wait_s"]
    assert "mean_wait_s" in capsys.readouterr().out
    assert main(["simulate", str(tmp_path / "nope.txt")]) == 125


def test_simulation_that_cannot_finish_says_so():
    recs = records((0, 10, 1))
    with pytest.raises(ConfigError, match="did not finish"):
        sim.simulate(recs, sim.NoBurst(), own_nodes=0, slots=1, max_nodes=1,
                     cycle=10, startup_delay=10)
    with pytest.raises(ConfigError, match="needs 9 slots"):
        sim.simulate(records((0, 10, 9)), Policy(), own_nodes=1, slots=4,
                     max_nodes=1)


def test_restart_reissues_a_stop_that_died_with_the_orchestrator(tmp_path):
    o, b, p, c = make(tmp_path, max_nodes=1)
    b.queue = pending(3)
    o.step()
    o.node_ready("n1", o.nodes["1"].token)
    p.stop = lambda node: None  # the stop "hangs": nothing reported gone
    b.queue = []
    for _ in range(3):
        c.t += 200
        o.step()
    assert o.nodes["1"].state == STOPPING
    o2, b2, p2, c2 = make(tmp_path, max_nodes=1)
    o2.step()
    assert p2.stopped == ["n1"]  # stopped again after the restart
    o2.step()
    assert not o2.nodes


def test_local_provider_adopts_a_start_the_checkpoint_missed(tmp_path):
    from apppot_mpi.orchestrator.model import Node
    from apppot_mpi.orchestrator.providers import LocalAppliances

    (tmp_path / "nodes").mkdir()
    prov = LocalAppliances.for_shutdown(tmp_path)
    node = Node("7", "apppot-n2")
    prov._record(node, {"pid": 4242, "since": 1.5})
    restored = Node("7", "apppot-n2")  # from a checkpoint written before
    other = Node("8", "apppot-n2")     # a later node of the same name
    prov.adopt([restored, other])
    assert restored.data == {"pid": 4242, "since": 1.5}
    assert other.data == {}
    assert prov._gone(restored) == "appliance exited"  # no such process


def test_policy_cycle_hooks_and_cli_errors(capsys):
    from apppot_mpi.orchestrator.cli import main

    calls = []

    class Hooked(Policy):
        def before_cycle(self):
            calls.append(("before", self.orch.cycle))

        def after_cycle(self):
            calls.append(("after", self.orch.cycle))

    o, b, p, c = make(policy=Hooked())
    o.step()
    o.step()
    assert calls == [("before", 0), ("after", 0), ("before", 1), ("after", 1)]
    assert main(["simulate", "x.txt", "--node-slots", "0"]) == 125
    err = capsys.readouterr().err
    assert "must be positive" in err and "hint:" in err
    assert main(["status", "--state-dir", "/nonexistent"]) == 125
    assert "no checkpoint" in capsys.readouterr().err


# ------------------------------------------ node command lines, exact strings
def bare_provider(cls, tmp_path, **attrs):
    """A provider object without its checks (no bridge, key or image)."""
    import ipaddress
    import pwd

    from apppot_mpi.orchestrator.providers import LocalAppliances

    prov = cls.for_shutdown(tmp_path) if issubclass(cls, LocalAppliances) \
        else cls.__new__(cls)
    prov.image, prov.mem, prov.kernel = Path("/c/images/node.img"), "256M", None
    prov.net = ipaddress.IPv4Interface("10.254.0.1/24")
    prov.user = pwd.getpwnam("nobody")
    for k, v in attrs.items():
        setattr(prov, k, v)
    return prov


def test_node_appliance_runs_unprivileged_without_job_dir_or_seccomp(
        tmp_path):
    import sys

    from apppot_mpi.orchestrator.model import Node
    from apppot_mpi.orchestrator.providers import LocalAppliances

    prov = bare_provider(LocalAppliances, tmp_path)
    node = Node("4", "apppot-n2", address="10.254.0.12")
    py = sys.executable
    assert shlex.join(prov.appliance_argv(node)) == (
        f"{py} -m apppot_mpi.orchestrator.nodeexec --user nobody --link "
        f"apo4g -- {py} -m apppot.start --image /c/images/node.img --id "
        "apppot-n2 --mem 256M --seccomp off --no-job-dir --net "
        "fd:3:10.254.0.12/24 -- sudo -n python3 /usr/lib/apppot/slurmnode.py "
        "-")


def test_batch_commands_reach_another_system_through_sh_on_stdin(tmp_path):
    from apppot_mpi.orchestrator.model import Node
    from apppot_mpi.orchestrator.providers import BatchJobAppliances

    assert batchmod.via([], ["squeue", "-j", "5"]) == (
        ["squeue", "-j", "5"], None)
    assert batchmod.via(["ssh", "login 1"], ["scancel", "5 6", "it's"]) == (
        ["ssh", "login 1", "sh"], "scancel '5 6' 'it'\"'\"'s'\n")
    state = tmp_path / "st ate'"
    prov = bare_provider(BatchJobAppliances, state,
                         job_prefix=["nsenter", "--net=/run/netns/a b"],
                         submit_prefix=["ssh", "login1"])
    node = Node("2", "apppot-n1", address="10.254.0.11")
    argv = prov.sbatch_argv(node, ["prog", "a b", "c'd"], state / "n.json")
    full, script = batchmod.via(prov.submit_prefix, argv)
    assert full == ["ssh", "login1", "sh"]
    # the remote shell parses the script once: exactly argv again
    assert shlex.split(script) == argv == [
        "sbatch", "--parsable", "--job-name=apppot-node-apppot-n1",
        f"--output={state}/nodes/apppot-n1.log", "--chdir=/", "--wrap",
        "nsenter '--net=/run/netns/a b' prog 'a b' 'c'\"'\"'d' < "
        f"{shlex.quote(str(state / 'n.json'))}"]


def test_nodeexec_refuses_root_unknown_users_and_non_root_callers(capsys):
    from apppot_mpi.orchestrator import nodeexec

    with pytest.raises(ConfigError, match="never run as root"):
        nodeexec.node_user("root")
    with pytest.raises(ConfigError, match="does not exist"):
        nodeexec.node_user("no-such-user-here")
    assert nodeexec.node_user("nobody").pw_name == "nobody"
    env = nodeexec.clean_env(nodeexec.node_user("nobody"), {
        "APPPOT_HOME": "/c", "LD_PRELOAD": "/tmp/x.so", "PATH": "/tmp",
        "APPPOT_KERNEL": "/tmp/k"})
    assert env == {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                   "HOME": "/", "USER": "nobody", "LOGNAME": "nobody",
                   "APPPOT_HOME": "/c"}
    assert nodeexec.main(["--link", "lo"]) == 125
    assert "no command" in capsys.readouterr().err


# -------------------------------------------------- checkpoints, admin token
def test_damaged_checkpoints_are_one_line_errors(tmp_path, capsys):
    from apppot_mpi.orchestrator.cli import main

    ckpt = tmp_path / "orchestrator.json"
    good = {"version": 1, "cycle": 1, "next_id": 2, "started": 1,
            "stopped": 0, "last_cycle_at": None, "nodes": [], "history": [],
            "decisions": []}
    for content, why in (
            (b"{", "not JSON"), (b"\xff\xfe", "not JSON"),
            (b"[]", "not a JSON object"), (b'{"version": 7}', "version 7"),
            (json.dumps({**good, "cycle": "x"}).encode(), "'cycle'"),
            (json.dumps({**good, "nodes": {}}).encode(), "'nodes'"),
            (json.dumps({**good, "nodes": [{"nodeid": "1"}]}).encode(),
             "bad record"),
            (json.dumps({**good, "nodes": [{"nodeid": "1", "name": "n",
                                            "state": "HAPPY"}]}).encode(),
             "bad record"),
            (json.dumps({**good, "decisions": [[1]]}).encode(),
             "bad record")):
        ckpt.write_bytes(content)
        for cmd in (["status"], ["shutdown"]):
            assert main([*cmd, "--state-dir", str(tmp_path)]) == 125
            err = capsys.readouterr().err
            assert "is damaged" in err and why in err, err
            assert err.count("\n") == 2 and "Traceback" not in err
    ckpt.write_bytes(b"{")
    before = ckpt.read_bytes()
    assert main(["run", "--state-dir", str(tmp_path), "--batch", "none",
                 "--provider", "libcloud", "--listen", "127.0.0.1:0",
                 "--max-cycles", "1"]) == 125
    assert "is damaged" in capsys.readouterr().err
    assert ckpt.read_bytes() == before  # left for the admin to look at


def test_checkpoints_are_0600_whatever_the_umask_or_a_stale_temp(tmp_path):
    from apppot_mpi.orchestrator.core import write_checkpoint

    path = tmp_path / "orchestrator.json"
    tmp = tmp_path / "orchestrator.json.tmp"
    tmp.write_text("stale")
    tmp.chmod(0o644)
    old = os.umask(0)
    try:
        write_checkpoint(path, {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"x": 1} and not tmp.exists()


def test_shutdown_keeps_the_checkpoint_private_and_run_fixes_the_state_dir(
        tmp_path, capsys):
    from apppot_mpi.orchestrator.cli import main

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    old = os.umask(0o022)
    try:
        assert main(["run", "--state-dir", str(state), "--batch", "none",
                     "--provider", "libcloud", "--listen", "127.0.0.1:0",
                     "--max-cycles", "1", "--cycle", "0.1"]) == 0
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        ckpt = state / "orchestrator.json"
        assert stat.S_IMODE(ckpt.stat().st_mode) == 0o600
        assert main(["shutdown", "--state-dir", str(state),
                     "--batch", "none"]) == 0
        assert stat.S_IMODE(ckpt.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    capsys.readouterr()


@pytest.mark.parametrize("content", ["", "\n", "  \n", "short"])
def test_an_empty_or_short_web_token_file_is_refused(tmp_path, capsys,
                                                    content):
    from apppot_mpi.orchestrator.cli import main

    state = tmp_path / "state"
    state.mkdir()
    (state / "web-token").write_text(content)
    assert main(["run", "--state-dir", str(state), "--batch", "none",
                 "--provider", "libcloud", "--listen", "127.0.0.1:0",
                 "--max-cycles", "1"]) == 125
    err = capsys.readouterr().err
    assert "admin token file" in err and "hint:" in err
    assert err.count("\n") == 2
    assert not (state / "orchestrator.json").exists()


def test_libcloud_driver_that_cannot_be_built_is_one_line(capsys,
                                                         monkeypatch,
                                                         tmp_path):
    from apppot_mpi.orchestrator.cli import main

    monkeypatch.setenv("APPPOT_LIBCLOUD_SECRET", "s3cret")
    state = tmp_path / "state"
    for driver, msg in (("dummy", "cannot build driver 'dummy' (key '0', "
                         "secret from $APPPOT_LIBCLOUD_SECRET)"),
                        ("nosuchcloud", "no driver 'nosuchcloud'")):
        assert main(["run", "--state-dir", str(state), "--batch",
                     "none", "--provider", "libcloud", "--libcloud-driver",
                     driver, "--libcloud-key", "0"]) == 125
        err = capsys.readouterr().err
        assert msg in err and "hint:" in err and err.count("\n") == 2, err
        assert "s3cret" not in err
        assert not state.exists()  # nothing made


# ------------------------------------ stopping leaves no node unaccounted for
def test_a_start_that_returns_after_the_last_cycle_reaches_the_checkpoint(
        tmp_path):
    """README quick start: the orchestrator was stopped before the cycle
    that takes in a start's result; its final checkpoint must still hold
    the node's pid, or no shutdown can find the appliance."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release = threading.Event()
    o, b, p, c = make(tmp_path, executor=ThreadPoolExecutor(2))
    real_start = p.start
    p.start = lambda node: (release.wait(5), real_start(node))[1]
    b.queue = pending(1)
    o.step()
    assert json.loads((tmp_path / "state.json").read_text())["nodes"][0][
        "data"] == {}
    release.set()
    o.close(wait=True)
    saved = json.loads((tmp_path / "state.json").read_text())["nodes"]
    assert [n["data"] for n in saved] == [{"pid": 1001}]


def test_shutdown_finds_a_node_the_checkpoint_missed_by_its_start_record(
        tmp_path, capsys):
    import subprocess

    import psutil

    from apppot_mpi.orchestrator.cli import main
    from apppot_mpi.orchestrator.core import write_checkpoint

    (tmp_path / "nodes").mkdir()
    node = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        since = psutil.Process(node.pid).create_time()
        (tmp_path / "nodes" / "apppot-n1.started").write_text(json.dumps(
            {"nodeid": "1", "pid": node.pid, "since": since}))
        write_checkpoint(tmp_path / "orchestrator.json", {
            "version": 1, "cycle": 1, "next_id": 2, "started": 1,
            "stopped": 0, "last_cycle_at": None, "decisions": [],
            "history": [], "nodes": [{"nodeid": "1", "name": "apppot-n1",
                                      "state": "READY", "data": {}}]})
        assert main(["shutdown", "--state-dir", str(tmp_path), "--batch",
                     "none"]) == 0
        assert node.wait(5) == -15  # SIGTERM to its process group
        assert "stopped apppot-n1" in capsys.readouterr().out
        st = json.loads((tmp_path / "orchestrator.json").read_text())
        assert st["nodes"] == [] and st["history"][0]["data"]["pid"] == \
            node.pid
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
