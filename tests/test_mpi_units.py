"""Unit tests of apppot-mpirun's pure planning: batch systems, LAN, argv."""

import json
import os
import threading
import time

import pytest

from apppot import status as st
from apppot.appliance import wait_all
from apppot.errors import ApplianceError, ConfigError
from apppot_mpi import batchenv, mcastnet, rankspawn


# ------------------------------------------------------------- batchenv
@pytest.mark.parametrize(("text", "hosts"), [
    ("node[01-04,07],gpu[1-2]", ["node01", "node02", "node03", "node04",
                                 "node07", "gpu1", "gpu2"]),
    ("n1", ["n1"]),
    ("a,b,c", ["a", "b", "c"]),
    ("node64-[17-18]", ["node64-17", "node64-18"]),
    ("gnode[10,20,25]", ["gnode10", "gnode20", "gnode25"]),
    ("foo[2-4,12],bar,foobar[3-4]", ["foo2", "foo3", "foo4", "foo12", "bar",
                                     "foobar3", "foobar4"]),
    ("x[008-010]", ["x008", "x009", "x010"]),
])
def test_slurm_hostlist(text, hosts):
    assert batchenv.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["node[01-", "node]1[", "node[a-b]",
                                  "n[1-2][3]"])
def test_slurm_hostlist_malformed(text):
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        batchenv.expand_hostlist(text)


def test_slurm_counts():
    assert batchenv.expand_counts("2(x3),1") == [2, 2, 2, 1]
    assert batchenv.expand_counts("4") == [4]
    with pytest.raises(ConfigError, match="SLURM_TASKS_PER_NODE"):
        batchenv.expand_counts("2(x3")


def test_slurm_allocation():
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[1-3],gpu1",
           "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NTASKS": "7"}
    alloc = batchenv.detect(env)
    assert alloc.source == "slurm" and alloc.job_id == "77"
    assert alloc.hosts == (("node1", 2), ("node2", 2), ("node3", 2),
                           ("gpu1", 1))
    assert alloc.slots == 7


def test_slurm_step_variables_beat_the_jobs():
    # srun -n 2 inside sbatch -N 2 -n 8 (values as Slurm 22.05 sets them)
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS": "2",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "n1",
           "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_PROCID": "0"}
    assert batchenv.detect(env).hosts == (("n1", 2),)
    assert batchenv.follower(env) is None
    assert batchenv.follower({**env, "SLURM_PROCID": "1"}) == \
        "Slurm task 1 of step 0"
    batch = {k: v for k, v in env.items() if "STEP" not in k}
    assert batchenv.follower({**batch, "SLURM_PROCID": "0"}) is None
    assert batchenv.detect(batch).hosts == (("n1", 4), ("n2", 4))


def test_slurm_extra_counts_tolerated_and_missing_counts_refused():
    env = {"SLURM_JOBID": "1", "SLURM_NODELIST": "odin001",
           "SLURM_TASKS_PER_NODE": "4(x30)"}
    assert batchenv.detect(env).hosts == (("odin001", 4),)
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a,b",
           "SLURM_TASKS_PER_NODE": "1"}
    with pytest.raises(ConfigError, match="names 1 nodes"):
        batchenv.detect(env)


def test_grid_engine(tmp_path):
    pe = tmp_path / "pe_hostfile"
    pe.write_text("execution-3.c.internal 32 all.q@execution-3.c.internal "
                  "UNDEFINED\nb 2 q@b UNDEFINED\nexecution-3.c.internal 4 "
                  "other.q@execution-3.c.internal UNDEFINED\n\n")
    env = {"PE_HOSTFILE": str(pe), "JOB_ID": "9", "NSLOTS": "38",
           "SGE_ROOT": "/sge"}
    alloc = batchenv.detect(env)
    assert alloc.source == "sge"
    assert alloc.hosts == (("execution-3.c.internal", 36), ("b", 2))
    pe.write_text("host-only\n")
    with pytest.raises(ConfigError, match=r"pe_hostfile:1"):
        batchenv.detect(env)
    pe.write_text("h zero q UNDEFINED\n")
    with pytest.raises(ConfigError, match="not a positive slot count"):
        batchenv.detect(env)


def test_pbs(tmp_path):
    nf = tmp_path / "nodefile"
    nf.write_text("n1\nn1\nn2\nn1\n")
    alloc = batchenv.detect({"PBS_JOBID": "5.srv", "PBS_NODEFILE": str(nf),
                             "PBS_ENVIRONMENT": "PBS_BATCH"})
    assert alloc.hosts == (("n1", 3), ("n2", 1))
    with pytest.raises(ConfigError, match="PBS_NODEFILE"):
        batchenv.detect({"PBS_JOBID": "5", "PBS_NODEFILE": str(tmp_path / "x")})


def test_lsf(tmp_path):
    alloc = batchenv.detect({"LSB_JOBID": "3", "LSB_MCPU_HOSTS": "hostA 2 hostB 4"})
    assert alloc.hosts == (("hostA", 2), ("hostB", 4))
    f = tmp_path / "djob"
    f.write_text("hostA\nhostA\nhostB\n")
    alloc = batchenv.detect({"LSB_JOBID": "3", "LSB_DJOB_HOSTFILE": str(f)})
    assert alloc.hosts == (("hostA", 2), ("hostB", 1))
    with pytest.raises(ConfigError, match="LSB_MCPU_HOSTS"):
        batchenv.detect({"LSB_JOBID": "3", "LSB_MCPU_HOSTS": "hostA 2 hostB"})


def test_hostfile_forms(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("# comment\nnode01 slots=4\nnode02\nnode03:2  # hydra\n"
                  "node01 slots=2 max_slots=8\n")
    alloc = batchenv.detect({}, hostfile=str(hf))
    assert alloc.hosts == (("node01", 6), ("node02", 1), ("node03", 2))
    hf.write_text("node01 slot=4\n")
    with pytest.raises(ConfigError, match=r"hosts:1: unknown field"):
        batchenv.detect({}, hostfile=str(hf))


def test_explicit_beats_environment_and_pe_forces(tmp_path):
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a",
           "SLURM_TASKS_PER_NODE": "1"}
    assert batchenv.detect(env, hosts="x,x,y:3").hosts == (("x", 2), ("y", 3))
    assert batchenv.detect(env, pe="local", nprocs=3).hosts[0][1] == 3
    with pytest.raises(ConfigError, match="no such batch system"):
        batchenv.detect(env, pe="loadleveler")
    assert batchenv.detect({}).source == "local"
    assert batchenv.detect({}).slots == os.cpu_count()


# Host names that would become options or paths on a remote start's
# command line (ssh -oProxyCommand runs a command), or shell/JSON noise.
ATTACK_HOSTS = ["-oProxyCommand=touch${IFS}/tmp/pwned", "-lroot", "--",
                "../../run/netns/x", "a/b", "$(id)", "a;b", "`id`", ".hidden",
                "n\u00f6de", "x" * 254]


@pytest.mark.parametrize("bad", ATTACK_HOSTS)
def test_every_allocation_source_refuses_a_bad_host_name(tmp_path, bad):
    """Each source names itself (variable or file:line) and the name."""
    quoted = repr(bad)

    def refused(where, **kw):
        with pytest.raises(ConfigError) as e:
            batchenv.detect(**kw)
        assert str(e.value) == f"{where}: not a host name: {quoted}"
        assert "letters, digits" in e.value.hint

    f = tmp_path / "hosts"
    f.write_text(f"good1 slots=1\n{bad} slots=2\n")
    refused(f"--hostfile {f}:2", environ={}, hostfile=str(f))
    refused("-H", environ={}, hosts=f"good1,{bad}:2")
    if "," not in bad and "[" not in bad:
        slurm = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": f"n1,{bad}",
                 "SLURM_TASKS_PER_NODE": "1(x2)"}
        refused("SLURM_JOB_NODELIST", environ=slurm)
        refused("SLURM_STEP_NODELIST", environ={
            **slurm, "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": bad,
            "SLURM_STEP_TASKS_PER_NODE": "1"})
        refused("SLURM_NODELIST", environ={"SLURM_JOBID": "1",
                                           "SLURM_NODELIST": bad})
    f.write_text(f"good1 2 q@good1 UNDEFINED\n{bad} 2 q UNDEFINED\n")
    refused(f"PE_HOSTFILE {f}:2", environ={"PE_HOSTFILE": str(f),
                                            "JOB_ID": "9"})
    f.write_text(f"good1\n\n{bad}\n")
    refused(f"PBS_NODEFILE {f}:3", environ={"PBS_JOBID": "5",
                                             "PBS_NODEFILE": str(f)})
    refused(f"LSB_DJOB_HOSTFILE {f}:3", environ={
        "LSB_JOBID": "3", "LSB_DJOB_HOSTFILE": str(f)})
    refused("LSB_MCPU_HOSTS", environ={"LSB_JOBID": "3",
                                       "LSB_MCPU_HOSTS": f"good1 2 {bad} 2"})


def test_ordinary_host_names_pass():
    hosts = "node01,n-2.cluster.example,gpu_3,10.1.2.3,A" + "b" * 200
    assert [h for h, _ in batchenv.detect({}, hosts=hosts).hosts] == \
        hosts.split(",")


def test_hostfile_with_an_ssh_option_starts_nothing(tmp_path, capsys,
                                                   monkeypatch):
    """The whole CLI: one line naming the file and line, a hint, 125;
    the fake ssh first on PATH is never run."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ssh").write_text(f"#!/bin/sh\ntouch {tmp_path}/ssh-ran\n")
    (fake / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    hf = tmp_path / "hosts"
    hf.write_text("localhost slots=1\n-oProxyCommand=touch${IFS}pwned "
                  "slots=2\n")
    before = sorted(os.listdir(tmp_path))
    code = rankspawn.main(["--hostfile", str(hf), "-n", "3", "true"])
    err = capsys.readouterr().err.splitlines()
    assert code == 125
    assert err == [f"apppot-mpirun: error: --hostfile {hf}:2: not a host "
                   "name: '-oProxyCommand=touch${IFS}pwned'",
                   "hint: host names are letters, digits, '.', '-' and '_', "
                   "starting with a letter, digit or '_'"]
    assert sorted(os.listdir(tmp_path)) == before


# ------------------------------------------------------------- mcastnet
def test_lan_plan_is_deterministic_per_key_and_distinct_per_job():
    k1 = mcastnet.job_key("42", "alice", salt="s")
    assert mcastnet.plan_lan(k1, 2) == mcastnet.plan_lan(k1, 2)
    plans = {(p.group, p.port) for p in (
        mcastnet.plan_lan(mcastnet.job_key("42", "alice"), 2)
        for _ in range(50))}
    assert len(plans) == 50  # same job id and user: randomness separates


def test_lan_plan_contents():
    plan = mcastnet.plan_lan(mcastnet.job_key("1", "u", salt="x"), 3,
                             subnet="10.9.0.0/24")
    import ipaddress
    assert ipaddress.ip_address(plan.group) in mcastnet.GROUP_NET
    assert 20000 <= plan.port < 60000
    assert [r.ip for r in plan.ranks] == ["10.9.0.1", "10.9.0.2", "10.9.0.3"]
    macs = [r.mac for r in plan.ranks]
    assert len(set(macs)) == 3
    assert all(int(m.split(":")[0], 16) & 0b11 == 0b10 for m in macs)
    assert mcastnet.McastTransport().uml_args(plan, 1) == (
        f"eth0=mcast,{macs[1]},{plan.group},{plan.port},0",)
    assert plan.hostfile("openmpi") == ("10.9.0.1 slots=1\n10.9.0.2 slots=1\n"
                                        "10.9.0.3 slots=1\n")
    assert plan.hostfile("mpich").splitlines()[0] == "10.9.0.1:1"
    assert plan.hostfile("mpich", [2, 2, 1]) == ("10.9.0.1:2\n10.9.0.2:2\n"
                                                 "10.9.0.3:1\n")
    assert plan.guest_net(1) == {"device": "eth0", "address": "10.9.0.2/24"}


def test_lan_plan_bad_subnet():
    key = mcastnet.job_key("1", "u")
    with pytest.raises(ConfigError, match="--subnet"):
        mcastnet.plan_lan(key, 2, subnet="10.0.0.1/33")
    with pytest.raises(ConfigError, match="no room"):
        mcastnet.plan_lan(key, 5, subnet="10.0.0.0/30")


def test_interface_lookup_has_loopback():
    addrs = mcastnet.interface_addresses()
    assert any("127.0.0.1" in a for a in addrs.values())


# ------------------------------------------------------------- launchers
def test_openmpi_launcher_argv():
    argv = rankspawn.launcher_argv(
        "openmpi", 4, ["python3", "-c", "x", "-n", "9"], exports=[("A", "1")],
        tag_output=True, output_dir="/j/out", as_root=True)
    assert argv[:5] == ["mpirun", "--hostfile", rankspawn.HOSTFILE, "-n", "4"]
    assert "--allow-run-as-root" in argv and "--tag-output" in argv
    assert argv[argv.index("-x") + 1] == "A"
    assert argv[argv.index("plm_rsh_agent") + 1] == rankspawn.RSH
    assert argv[-6:] == [rankspawn.RANKWRAP, "python3", "-c", "x", "-n", "9"]
    assert argv[argv.index("--output-filename") + 1] == "/j/out"
    # a rank's non-zero exit after MPI_Finalize does not kill the others
    assert argv[argv.index("orte_abort_on_non_zero_status") + 1] == "0"


def test_mpich_launcher_argv():
    argv = rankspawn.launcher_argv("mpich", 2, ["prog"], exports=[("A", "1")],
                                   tag_output=True)
    assert argv[0] == "mpiexec.hydra" and argv[-2:] == [rankspawn.RANKWRAP, "prog"]
    genv = [argv[i + 1:i + 3] for i, a in enumerate(argv) if a == "-genv"]
    assert ["A", "1"] in genv and ["UCX_NET_DEVICES", "eth0"] in genv
    assert "-prepend-rank" in argv
    assert argv[argv.index("-launcher-exec") + 1] == rankspawn.RSH


def test_ranks_pack_into_appliances_per_node():
    hosts = [("a", [0, 1, 2]), ("b", [3, 4])]
    assert rankspawn.pack(hosts, 1) == [("a", (0,)), ("a", (1,)), ("a", (2,)),
                                        ("b", (3,)), ("b", (4,))]
    assert rankspawn.pack(hosts, 3) == [("a", (0, 1, 2)), ("b", (3, 4))]
    assert rankspawn.pack(hosts, 2) == [("a", (0, 1)), ("a", (2,)),
                                        ("b", (3, 4))]

    class Args:
        per, ranks_per_appliance = None, None

    class Kern:
        version = "6.1"

        def __init__(self, smp):
            self.smp = smp

        def has(self, f):
            return f == "smp" and self.smp

    assert rankspawn.ranks_per_appliance(Args, Kern(True), hosts) == 3
    assert rankspawn.ranks_per_appliance(Args, Kern(False), hosts) == 1
    Args.per = "rank"
    assert rankspawn.ranks_per_appliance(Args, Kern(True), hosts) == 1
    Args.per, Args.ranks_per_appliance = "auto", 2
    with pytest.raises(ConfigError, match="need an SMP kernel"):
        rankspawn.ranks_per_appliance(Args, Kern(False), hosts)
    assert rankspawn.default_mem(1) == 256 << 20
    assert rankspawn.default_mem(8) == 832 << 20


def test_shared_memory_between_ranks_of_one_appliance():
    argv = rankspawn.launcher_argv("openmpi", 4, ["p"], shared_memory=True)
    assert argv[argv.index("btl") + 1] == "tcp,vader,self"
    argv = rankspawn.launcher_argv("openmpi", 4, ["p"])
    assert argv[argv.index("btl") + 1] == "tcp,self"


def test_lowest_failed_rank_rule():
    assert st.lowest_failed({0: 0, 1: 5, 2: 3}) == 5
    assert st.lowest_failed({0: 143, 1: 0, 2: 3}) == 3  # 143: aborted
    assert st.lowest_failed({0: 0, 1: 137}) == 137
    assert st.lowest_failed({0: 0, 1: 0}) == 0
    assert st.lowest_failed({}) == 0
    assert st.lowest_failed_rank({0: 143, 1: 0, 2: 3}) == 2
    assert st.lowest_failed_rank({0: 0}) is None


class FakeProc:
    def __init__(self, exit_after=None):
        self.end = None if exit_after is None else time.monotonic() + exit_after

    def poll(self):
        return 0 if self.end and time.monotonic() > self.end else None


class FakeAppliance:
    """What appliance.wait_all watches, with statuses its guest reported."""

    def __init__(self, rank_status, exit_after=None):
        self.rank_status = rank_status
        self.proc = FakeProc(exit_after)
        self.name = "fake"
        self.started_at = self.ready_at = time.monotonic()
        self.exit_code = self.failure = None
        self._r, self._w = os.pipe()  # never readable: select just waits

    def fileno(self):
        return self._r

    def poll_notices(self, timeout):
        pass

    def result(self):
        return 0


@pytest.mark.parametrize(("statuses", "rank", "code"), [
    ([{0: 0, 2: 9}, {1: 5}], 1, 5),  # failing together: the lowest counts
    ([{0: 143}, {2: 9}], 2, 9),  # 143: killed by the job's abort
])
def test_job_with_a_failed_rank_ends_after_the_grace(statuses, rank, code):
    apps = [FakeAppliance(s) for s in statuses]
    t0 = time.monotonic()
    with pytest.raises(ApplianceError) as err:
        wait_all(apps, boot_timeout=10, timeout=10, rank_grace=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2
    assert err.value.status == code
    assert str(err.value).startswith(f"rank {rank} failed (status {code})")


def test_timeout_names_the_ranks_that_had_exited():
    apps = [FakeAppliance({0: 0}), FakeAppliance({2: 0})]
    with pytest.raises(ApplianceError) as err:
        wait_all(apps, boot_timeout=10, timeout=0.2, rank_grace=2)
    assert err.value.status == 124
    assert str(err.value) == ("timeout after 0.2 s; ranks exited: 0 (status "
                              "0), 2 (status 0)")


def test_job_that_ends_within_the_grace_keeps_its_status():
    apps = [FakeAppliance({0: 0}, exit_after=0.2), FakeAppliance({1: 5})]
    assert wait_all(apps, boot_timeout=10, timeout=10, rank_grace=1) == 0
    # the launcher has exited: the appliance is powering off, not stuck
    apps = [FakeAppliance({0: 0}, exit_after=0.8), FakeAppliance({1: 5})]
    apps[0].exit_code = 5
    assert wait_all(apps, boot_timeout=10, timeout=10, rank_grace=0.2) == 0
    assert rankspawn.job_status(apps, 0, nranks=2) == 5
    # without a grace (apppot-start) a failed rank does not end the wait
    apps = [FakeAppliance({0: 3}, exit_after=0.5)]
    assert wait_all(apps, boot_timeout=10, timeout=10) == 0


def test_rank_plans_keep_secret_off_uml_argv():
    lan = mcastnet.plan_lan(mcastnet.job_key("1", "u"), 3)
    plans = rankspawn.plan_ranks(
        lan, "openmpi", ["mpirun", "prog"], uid=1000, gid=100, user="u",
        group="g", jobdir="/j", secret="ab" * 32, env={b"A": b"1"},
        boot_timeout=60)
    assert [p.index for p in plans] == [0, 1, 2]
    for p in plans:
        assert not any("ab" * 32 in a for a in p.net_args)
        data = json.loads(p.guest.to_json())
        assert data["mpi"]["secret"] == "ab" * 32
        assert data["hooks"] == ["mpihook"]
        assert data["mpi"]["peers"] == [r.ip for r in lan.ranks]
    rank0 = json.loads(plans[0].guest.to_json())
    assert [bytes.fromhex(a) for a in rank0["argv"]] == [b"mpirun", b"prog"]
    other = json.loads(plans[1].guest.to_json())
    assert [bytes.fromhex(a) for a in other["argv"]] == [b"sleep", b"infinity"]


def test_too_many_ranks_needs_oversubscribe():
    alloc = batchenv.Allocation("sge", (("h", 2),))

    class Args:
        n, oversubscribe = 3, False
    with pytest.raises(ConfigError, match="exceeds the 2 slots"):
        rankspawn.choose_ranks(Args, alloc)
    Args.oversubscribe = True
    assert rankspawn.choose_ranks(Args, alloc) == 3


@pytest.mark.parametrize("hosts,count,want", [
    ((("a", 2), ("b", 2)), 4, [("a", [0, 1]), ("b", [2, 3])]),
    ((("a", 2), ("b", 2)), 2, [("a", [0, 1])]),  # fits on the first node
    ((("a", 1), ("b", 3)), 3, [("a", [0]), ("b", [1, 2])]),
    ((("a", 1), ("b", 1)), 5, [("a", [0, 2, 4]), ("b", [1, 3])]),
])
def test_place_fills_slots_in_allocation_order(hosts, count, want):
    assert rankspawn.place(hosts, count) == want


def test_remote_start_argv_is_data():
    from apppot_mpi import remote

    cmd = ["/venv/bin/python", "-m", "apppot_mpi.worker"]
    env = {"PATH": "/nonexistent", "APPPOT_NETNS_PREFIX": "t1-"}
    srun = remote.Srun(env).argv("node7", cmd)
    assert srun[0] == "srun" and srun[-4:] == ["--", *cmd]
    assert "--nodelist=node7" in srun and "--overlap" in srun
    assert "--ntasks=1" in srun and "--kill-on-bad-exit=1" in srun
    assert remote.Qrsh({**env, "SGE_ROOT": "/nonexistent"}).argv(
        "n1", cmd) == ["qrsh", "-inherit", "-V", "n1", *cmd]
    assert remote.Blaunch(env).argv("n1", cmd) == ["blaunch", "-no-shell",
                                                   "n1", *cmd]
    assert remote.PbsTmrsh(env).argv("n1", cmd) == ["pbs_tmrsh", "n1", *cmd]
    ssh = remote.Ssh(env).argv("n1", ["p y", "-m", "x"])
    # "--" ends ssh's options: a host can never be one; one shell line
    assert ssh == ["ssh", "-x", "-o", "BatchMode=yes", "--", "n1",
                   "'p y' -m x"]
    assert remote.Netns(env).argv("node0", cmd) == [
        "ip", "netns", "exec", "t1-node0", *cmd]


def test_remote_start_follows_the_batch_system():
    from apppot_mpi import remote

    env = {"PATH": os.environ["PATH"]}
    assert remote.choose("netns", "sge", env).name == "netns"  # ip exists
    with pytest.raises(ConfigError, match="'ssh': ssh not found"):
        remote.choose(None, "hostfile", {"PATH": "/nonexistent"})
    with pytest.raises(ConfigError, match="unknown remote start"):
        remote.choose("rsh", "slurm", env)
    with pytest.raises(ConfigError, match="srun not found"):
        remote.choose(None, "slurm", {"PATH": "/nonexistent"})


KEY = b"k" * 32


def test_probe_state_needs_a_full_mesh():
    from apppot_mpi.mcastnet import ProbeState, probe_failures

    a, b, c = (ProbeState("n1", k, 3, KEY) for k in range(3))
    other_job = ProbeState("n2", 1, 3, KEY)
    a.receive(other_job.message(0.0), 0.0)
    assert a.received == 0  # another start's nonce is ignored
    a.receive(ProbeState("n1", 1, 3, b"j" * 32).message(0.0), 0.0)
    assert a.received == 0  # so is another job's key
    a.receive(a.message(0.0), 0.0)
    assert a.received == 0  # and our own looped-back datagram
    for t in (1.0, 2.0):
        ma, mb = a.message(t), b.message(t)
        for x, m in ((b, ma), (a, mb)):
            x.receive(m, t + 0.001)
    assert not a.done()  # c is silent
    assert a.rtts[1] and abs(a.rtts[1][0] - 0.002) < 1e-9  # 2 × 1 ms
    reps = [s.report(1.0) for s in (a, b, c)]
    assert probe_failures(reps, ["x", "y", "z"]) == [
        "x did not hear z", "y did not hear z", "z did not hear x",
        "z did not hear y"]
    for t in (3.0, 4.0):
        msgs = [s.message(t) for s in (a, b, c)]
        for s in (a, b, c):
            for m in msgs:
                s.receive(m, t)
    assert a.done() and b.done() and c.done()
    assert probe_failures([s.report(1.0) for s in (a, b, c)], "xyz") == []


def _signed(body, key=KEY):
    from apppot_mpi import mcastnet

    return mcastnet.PROBE_MAGIC + mcastnet._probe_tag(key, body) + body


def probe_junk(nonce, key=KEY):
    """Datagrams an attacker (or a broken peer) could send to the probe:
    unsigned, signed with the wrong key, and signed but malformed."""
    deep = b"[" * 30000 + b"]" * 30000  # RecursionError in json.loads
    plain = [deep, b"", b"{}", b"null", b"\xff\xfe\x00", b"A" * 65000,
             json.dumps({"n": nonce, "k": 1}).encode(),  # missing keys
             json.dumps({"n": nonce, "k": 1, "t": 1, "heard": [0],
                         "echo": {"0": [1, 2]}}).encode(),  # unsigned
             b"APPR" + b"\0" * 16 + b"{}", b"APPR"]
    malformed = [b"[" * 400 + b"]" * 400, b"{}", b"[]", b'"x"', b"1e999",
                 b"\xff", json.dumps({"n": nonce}).encode(),
                 *(json.dumps({"n": nonce, "k": 1, "t": 5.0, "heard": [],
                               "echo": {}, **bad}).encode() for bad in (
                     {"k": "1"}, {"k": True}, {"k": 7}, {"k": -1},
                     {"t": "5"}, {"t": None}, {"heard": "0"},
                     {"heard": None}, {"echo": []},
                     {"echo": {"0": 5}}, {"echo": {"0": [1]}},
                     {"echo": {"0": ["a", "b"]}},
                     {"echo": {"0": [[[[]]], 1]}}))]
    return plain + [_signed(m, b"j" * 32) for m in malformed[:3]] + [
        _signed(m, key) for m in malformed]


def test_probe_survives_forged_and_malformed_datagrams():
    """Nothing an outsider sends is parsed; nothing malformed counts (the
    old probe died of RecursionError or KeyError on one datagram)."""
    from apppot_mpi.mcastnet import ProbeState

    a, b = ProbeState("n1", 0, 2, KEY), ProbeState("n1", 1, 2, KEY)
    junk = probe_junk("n1")
    for d in junk:
        a.receive(d, 1.0)
    assert a.rejected == len(junk) and a.received == 0
    assert not a.heard_at and not a.last and not a.rtts
    first = b.message(2.0)
    a.receive(first, 2.1)
    assert a.received == 1 and a.heard_at == {1: 2.1}
    a.receive(first, 2.2)  # captured and replayed
    a.receive(b.message(1.5), 2.3)  # older than what a has from b
    assert a.received == 1 and a.rejected == len(junk) + 2
    assert a.last[1] == (2.0, 2.1)
    a.receive(b.message(3.0), 3.1)
    assert a.received == 2


def test_probe_reports_that_are_empty_or_malformed_are_failures():
    from apppot_mpi.mcastnet import ProbeState, probe_failures

    good = [ProbeState("n", k, 2, KEY) for k in range(2)]
    for t in (1.0, 2.0):
        m0, m1 = good[0].message(t), good[1].message(t)
        good[0].receive(m1, t)
        good[1].receive(m0, t)
    reps = [g.report(1.0) for g in good]
    assert probe_failures(reps, ["a", "b"]) == []
    for bad in ({}, None, [], "x", {**reps[1], "node": 0},
                {**reps[1], "heard": [0, "1"]}, {**reps[1], "heard": [9]},
                {**reps[1], "rtt_ms": {"0": "x"}}, {**reps[1], "sent": None},
                {k: v for k, v in reps[1].items() if k != "elapsed_ms"}):
        assert probe_failures([reps[0], bad], ["a", "b"]) == [
            "b: no usable probe report"]
    err = {**reps[1], "error": "joining 239.1.1.1 port 5: No such device"}
    assert probe_failures([reps[0], err], ["a", "b"]) == [
        "b could not probe: joining 239.1.1.1 port 5: No such device"]
    assert probe_failures([{}, {}], ["a", "b"]) == [
        "a: no usable probe report", "b: no usable probe report"]


PROBE_FLOOD = """\
import json, socket, sys, threading, time
sys.path[:0] = sys.argv[1:2]
from test_mpi_units import probe_junk, KEY
from apppot_mpi import mcastnet
assert mcastnet._make_private_netns() == 0
group, port = "239.193.7.9", 40001
junk = probe_junk("n1")
stop = threading.Event()
def flood():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
    sent = 0
    while not stop.is_set():
        for d in junk:
            try:
                s.sendto(d, (group, port))
                sent += 1
            except OSError:  # EMSGSIZE for the largest
                pass
        time.sleep(0.001)
    print(sent, file=sys.stderr)
f = threading.Thread(target=flood)
f.start()
time.sleep(0.3)  # the flood is under way before the probe starts
reports = [None, None]
def probe(k):
    reports[k] = mcastnet.run_probe(group, port, "n1", k, 2, key=KEY, ttl=0,
                                    timeout=8)
ts = [threading.Thread(target=probe, args=(k,)) for k in range(2)]
for t in ts:
    t.start()
for t in ts:
    t.join()
stop.set()
f.join()
print(json.dumps(reports))
"""


def test_probe_under_a_flood_of_junk_on_real_sockets(tmp_path):
    """Two probes on one group in a private network namespace while a
    sender floods it with the junk above: both complete."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "flood.py"
    script.write_text(PROBE_FLOOD)
    r = subprocess.run([sys.executable, str(script),
                        str(Path(__file__).parent)], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    reports = json.loads(r.stdout)
    for rep in reports:
        assert rep["complete"] and not rep["error"], rep
        assert rep["rejected"] > 0 and rep["received"] > 0, rep
    assert mcastnet.probe_failures(reports, ["a", "b"]) == []


def test_guest_spec_survives_the_wire():
    from apppot.spec import GuestSpec

    g = GuestSpec(uid=5, gid=6, user="u", group="g", jobdir="/j",
                  argv=[b"a b", b"\xff", b""], env={b"K": b"\n"},
                  hostname="r1", net=[{"device": "eth0"}], hosts=[["1", "r"]],
                  hooks=["mpihook"], extra={"mpi": {"rank": 1}})
    assert GuestSpec.from_json(g.to_json()) == g


def test_agent_macs_depend_on_secret_nonce_and_request():
    from apppot_mpi.guest import agent

    k, n, ln = b"k" * 32, b"n" * 32, b"\0\0\0\x0f"
    head = agent.head_mac(k, n, ln)
    assert head not in (agent.head_mac(b"j" * 32, n, ln),
                        agent.head_mac(k, b"m" * 32, ln),
                        agent.head_mac(k, n, b"\0\0\0\x10"))
    body = agent.body_mac(k, n, ln, b'{"cmd": "true"}')
    assert body != agent.body_mac(k, n, ln, b'{"cmd": "id!!"}')
    assert body != agent.body_mac(k, b"m" * 32, ln, b'{"cmd": "true"}')
    assert head != agent.body_mac(k, n, ln, b"")  # head and body differ


def test_dry_run_starts_nothing(tmp_path, capsys, monkeypatch, image):
    monkeypatch.chdir(tmp_path)
    code = rankspawn.main(["--dry-run", "--kernel", "/usr/bin/linux.uml",
                           "-n", "2", "python3", "x.py"])
    out = capsys.readouterr().out
    assert code == 0
    assert "rank 1: 'vec0:transport=fd,fd={fd},mac=" in out
    assert "rank 0 runs: mpirun" in out
    code = rankspawn.main(["--dry-run", "--kernel", "/usr/bin/linux.uml",
                           "--transport", "mcast", "-n", "2", "true"])
    assert "rank 1: eth0=mcast," in capsys.readouterr().out


def test_open_lan_check():
    mcast, hubt = mcastnet.McastTransport(), mcastnet.HubTransport()
    for multi, private in ((False, True), (True, True), (True, False),
                           (False, False)):
        mcastnet.check_open_lan(hubt, multi=multi, private=private,
                                allowed=False)
        mcastnet.check_open_lan(mcast, multi=multi, private=private,
                                allowed=True)
    mcastnet.check_open_lan(mcast, multi=False, private=True, allowed=False)
    with pytest.raises(ConfigError) as e:
        mcastnet.check_open_lan(mcast, multi=True, private=True,
                                allowed=False)
    assert str(e.value) == (
        "LAN transport mcast across nodes: the job's LAN (MPI data, "
        "launcher control) would be open to anyone on the cluster network "
        "who joins its multicast group")
    assert e.value.hint == ("use --transport hub (frames between nodes are "
                            "authenticated); --allow-open-lan accepts the "
                            "open LAN")
    with pytest.raises(ConfigError, match="without a private network "
                       "namespace: .* anyone on this host") as e:
        mcastnet.check_open_lan(mcast, multi=False, private=False,
                                allowed=False)
    assert "no --no-netns" in e.value.hint


@pytest.mark.parametrize("how", ["no-netns", "no user namespaces",
                                 "two nodes"])
def test_open_mcast_lan_is_refused_before_anything_starts(
        tmp_path, capsys, monkeypatch, image, how):
    """One line and a hint, status 125, the job dir untouched (not even
    --output-filename's directory), no namespace, worker or appliance."""
    monkeypatch.chdir(tmp_path)
    probed = []
    monkeypatch.setattr(mcastnet, "private_netns_possible",
                        lambda: probed.append(1) or (
                            how != "no user namespaces", "not allowed here"))
    started = []
    monkeypatch.setattr(rankspawn, "launch", lambda *a: started.append(a))
    args = {"no-netns": ["--no-netns", "-n", "2"],
            "no user namespaces": ["-n", "2"],
            "two nodes": ["-H", "node0,node1", "--launcher", "netns"]}[how]
    argv = ["--kernel", "/usr/bin/linux.uml", "--transport", "mcast",
            "--output-filename", "out", *args, "python3", "x.py"]
    code = rankspawn.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert code == 125 and len(err) == 2, err
    assert err[0].startswith("apppot-mpirun: error: LAN transport mcast ")
    assert err[1].startswith("hint: use --transport hub")
    assert os.listdir(tmp_path) == [] and not started
    assert probed  # a forked probe, nothing of this process changed
    # the opt-in: accepted, and the launch is reached
    assert rankspawn.main(["--allow-open-lan", *argv]) is None
    assert len(started) == 1


def test_agent_forwards_statuses_still_queued_when_stopped(tmp_path):
    # init ends the launcher's appliance with SIGTERM as soon as the MPI
    # launcher exits: statuses still in the FIFO must be forwarded first
    from apppot_mpi.guest import agent
    fifo = tmp_path / "status"
    os.mkfifo(fifo)
    got, stop = [], threading.Event()
    t = threading.Thread(target=agent.report_statuses,
                         args=(stop, str(fifo), got.append))
    t.start()
    time.sleep(0.1)  # the reporter is waiting in select
    with open(fifo, "w") as w:
        w.write("0 0\n")
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == ["apppot:rank 0 0"]  # forwarded as it comes
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.write(fd, b"2 9\nnoise\n1 5\n")  # the last ranks, then at once:
    stop.set()
    t.join(5)
    os.close(fd)
    assert not t.is_alive()
    assert got == ["apppot:rank 0 0", "apppot:rank 2 9", "apppot:rank 1 5"]


def test_ptrace_mode_appliances_get_one_vcpu():
    """UML refuses SMP in ptrace mode: --seccomp off packs the ranks into a
    one-vCPU appliance instead of one that cannot boot."""
    from types import SimpleNamespace

    class Kern:
        max_cpus = 8

        def has(self, feature):
            return feature == "seccomp"

    def args(mode):
        node = SimpleNamespace(kern=Kern(), s=SimpleNamespace(seccomp=mode))
        return rankspawn.NodeRun.kernel_args(node, 4)

    cpus = min(4, os.cpu_count() or 1)
    assert args("on") == ("seccomp=on",) + ((f"ncpus={cpus}",) if cpus > 1
                                             else ())
    assert args("off") == ("seccomp=off",)
