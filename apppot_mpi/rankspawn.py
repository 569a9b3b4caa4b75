"""apppot-mpirun: run an MPI program with each rank in its own appliance.

    apppot-mpirun [options] [--] PROG [ARGS...]

Flow: detect the allocation (batchenv) → place ranks on its hosts → plan the
job's LAN (mcastnet) → build one appliance spec per rank → start them over
one shared base image → guest init configures eth0, /etc/hosts, the MPI
host file and an authenticated remote-start agent → rank 0's appliance runs
the image's own ``mpirun``/``mpiexec`` across the LAN → its status is ours
→ tear down.

Several nodes: run on the allocation's first node; a worker is started on
each other node through the batch system's remote start (srun, qrsh
-inherit, pbs_tmrsh, blaunch, else ssh; --launcher), multicast between the
nodes is probed before anything boots, and all appliances share one LAN
(TTL 1).  The job dir must be on a file system all nodes share.  Under
``srun -n N apppot-mpirun``, task 0 runs the whole step; the others exit 0.

The LAN: the hub transport authenticates frames between nodes (a counter
and a keyed tag; not encrypted) and keeps one node's frames off the
network.  --transport mcast puts every frame, unauthenticated, on a
multicast group anyone on the network (or host) can join, so it is refused
across nodes and without a private network namespace unless
--allow-open-lan is given.

Exit status (Open MPI's rule): 0 if every rank succeeded, else the status of
the lowest-numbered rank that failed (each rank's wrapper reports it; once
a rank has failed the job gets 2 s to end by itself, then is stopped); 124
on --timeout; 120/121 when an appliance fails to boot or crashes, or a
node's worker dies (with the rank or node named on stderr); 125 for bad
input, or when multicast does not reach between the nodes.
"""

import argparse
import hashlib
import logging
import os
import secrets
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from apppot import __version__, share
from apppot import status as st
from apppot.appliance import (
    Appliance,
    check_rundir_room,
    make_rundir,
    rank_statuses,
    wait_all,
    write_control_disk,
)
from apppot.config import (
    APPLIANCE_OPTIONS,
    Option,
    add_options,
    cli_main,
    common_cli,
)
from apppot.errors import ConfigError
from apppot.runtime import TREE_DEVICE, Disks, ImageRuntime, system_disk
from apppot.spec import ApplianceSpec, GuestSpec, parse_env_args, slirp_net
from apppot.start import (
    ArgumentParser,
    Interrupts,
    caller_identity,
    check_memory,
    prepare_common,
    seccomp_args,
    uml_env,
)
from apppot.watchdog import Watchdog

from . import batchenv, hub, mcastnet, remote, worker

log = logging.getLogger(__name__)

RSH = "/usr/lib/apppot/apppot-rsh"
RANKWRAP = "/usr/lib/apppot/rankwrap"
HOSTFILE = "/run/apppot/mpi/hostfile"
# seconds a job with a failed rank gets to end by itself, so that ranks
# failing at about the same time all report before it is stopped
RANK_GRACE = 2.0
MPI_OPTIONS = tuple(
    o for o in APPLIANCE_OPTIONS
    if o.dest not in ("net", "log", "boot_timeout")  # per-rank: --log-dir
) + (
    Option("boot_timeout", ("--boot-timeout",),
           "seconds allowed for all appliances to boot (default: 120)"),
    Option("timeout", ("--timeout",), "end the job after SECONDS (status 124)"),
    Option("subnet", ("--subnet",),
           f"IPv4 network of the job's LAN (default: {mcastnet.DEFAULT_SUBNET})"),
    Option("log_dir", ("--log-dir",), "write each rank's boot log here"),
    Option("transport", ("--transport",),
           "the job LAN: hub (UML's vector driver to a hub process per "
           "node; MTU 9000; any current kernel), mcast (UML's legacy "
           "multicast transport, kernels before 6.16; MTU 1500; open to "
           "anyone who joins its group, so refused across nodes and "
           "without a private network namespace unless --allow-open-lan), "
           "or auto = hub where the kernel has the vector driver (default: "
           "auto)",
           kwargs=(("choices", ("auto", "hub", "mcast")),)),
    Option("launcher", ("--launcher",),
           "how to start the worker on the other nodes of a multi-node "
           "allocation (default: the batch system's own: srun, qrsh, "
           "pbs_tmrsh, blaunch; else ssh; netns: simulated nodes)",
           kwargs=(("choices", tuple(remote.names())),)),
    Option("jobdir_fs", ("--jobdir-fs",),
           "how appliances share the job dir: 9p (coherent: one diod "
           "server on the host), hostfs (fast, but appliances writing one "
           "file can lose data), auto = 9p where diod and the kernel's 9p "
           "modules exist (default: auto)",
           kwargs=(("choices", ("auto", "9p", "hostfs")),)),
)


def build_parser():
    parser = ArgumentParser(
        prog="apppot-mpirun", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    parser.add_argument("-n", "-np", dest="n", type=int,
                        help="number of ranks (default: the allocation's "
                        "slots; without a batch system: the number of cores)")
    parser.add_argument("--hostfile", "--machinefile", dest="hostfile",
                        help="hosts: 'host slots=N' or 'host:N' lines")
    parser.add_argument("-H", "--host", dest="hosts",
                        help="comma-separated hosts, host:N for N slots")
    parser.add_argument("--pe", choices=batchenv.names() + ["local"],
                        help="use this batch system's allocation")
    parser.add_argument("-x", dest="export", action="append",
                        metavar="VAR[=VAL]", help="export VAR to all ranks")
    parser.add_argument("--tag-output", action="store_true",
                        help="prefix each output line with its rank")
    parser.add_argument("--output-filename", metavar="DIR",
                        help="write each rank's output to files in DIR")
    parser.add_argument("--per", choices=("node", "rank", "auto"),
                        help="one appliance per node (its ranks share the "
                        "appliance's vCPUs and memory; needs an SMP kernel) "
                        "or per rank; auto = per node where the kernel is SMP "
                        "(default: auto)")
    parser.add_argument("--ranks-per-appliance", type=int, metavar="N",
                        help="pack N ranks into each appliance (per node)")
    parser.add_argument("--oversubscribe", action="store_true",
                        help="allow more ranks than slots")
    parser.add_argument("--no-netns", action="store_true",
                        help="use the host network (TTL 0) even where a "
                        "private network namespace is possible")
    parser.add_argument("--allow-open-lan", action="store_true",
                        help="accept --transport mcast across nodes or "
                        "without a private network namespace, where anyone "
                        "who joins the job's multicast group can read and "
                        "inject its MPI traffic (refused otherwise)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and the appliances' argv, start "
                        "nothing")
    add_options(parser, MPI_OPTIONS)
    common_cli(parser)
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__}")
    parser.add_argument("prog", nargs=argparse.REMAINDER,
                        help="MPI program and its arguments")
    return parser


# ------------------------------------------------------------- planning
def image_flavour(image, requested=None):
    """The image's MPI (from the build or import stamp next to it), or
    --mpi.  An imported image may hold both MPIs (``mpi_found``)."""
    rt = ImageRuntime.load(image)
    found = rt.mpi
    if rt.on_system_disk:
        return imported_flavour(rt, requested)
    if requested and found and requested != found:
        raise ConfigError(f"--mpi {requested} but image {str(image)!r} has "
                          f"{found}", hint="drop --mpi or pick another image")
    flavour = requested or found or "openmpi"
    if flavour == "none":
        raise ConfigError(f"image {str(image)!r} has no MPI",
                          hint="build one with apppot-image build --mpi openmpi")
    return flavour


def imported_flavour(rt, requested):
    """An imported image runs its own MPI launcher in its own tree."""
    where = f"imported image {str(rt.image)!r}"
    if not rt.mpi_found:
        raise ConfigError(f"{where} has no MPI (neither Open MPI's ompi_info "
                          "nor MPICH's mpiexec.hydra found in it)",
                          hint="install openmpi-bin or mpich in the image, or "
                          "run it with apppot-start")
    if requested and requested not in rt.mpi_found:
        raise ConfigError(f"--mpi {requested} but {where} has "
                          f"{', '.join(rt.mpi_found)}", hint="drop --mpi")
    if not rt.shell:
        raise ConfigError(f"{where} has MPI but no /bin/sh (the MPI "
                          "launchers' remote start needs one)",
                          hint="add a shell to the image")
    return requested or rt.mpi_found[0]


def apply_image(plans, rt):
    """The image's Env (never its User: ranks run as you) for rank 0's
    launcher and for the commands the agents start; an imported image's
    tree as every rank's root."""
    env = rt.env_bytes(with_user=False)
    for p in plans:
        p.guest.env = {**env, **p.guest.env}
        mpi = p.guest.extra["mpi"]
        mpi["agent_env"] = {**{k.decode(): v.decode("utf-8", "surrogateescape")
                               for k, v in env.items()}, **mpi["agent_env"]}
        if rt.on_system_disk:
            p.guest.extra["image_root"] = {"device": TREE_DEVICE}
    return plans


def launcher_argv(flavour, nranks, prog, *, exports=(), tag_output=False,
                  output_dir=None, as_root=False, shared_memory=False):
    """The in-guest MPI launcher command rank 0's appliance runs (data)."""
    if flavour == "mpich":
        argv = ["mpiexec.hydra", "-f", HOSTFILE, "-n", str(nranks),
                "-launcher", "rsh", "-launcher-exec", RSH, "-iface", "eth0",
                # ranks talk on the job LAN only (vec0, if any, is the
                # private link to the job dir server, same address everywhere)
                "-genv", "UCX_NET_DEVICES", "eth0"]
        for name, value in exports:
            argv += ["-genv", name, value]
        if tag_output:
            argv.append("-prepend-rank")
        if output_dir:
            argv += ["-outfile-pattern", f"{output_dir}/rank.%r.stdout",
                     "-errfile-pattern", f"{output_dir}/rank.%r.stderr"]
        return [*argv, RANKWRAP, *prog]
    argv = ["mpirun", "--hostfile", HOSTFILE, "-n", str(nranks),
            "--mca", "plm_rsh_agent", RSH, "--mca", "plm_rsh_no_tree_spawn", "1",
            # ranks in one appliance talk through shared memory (vader)
            "--mca", "pml", "ob1", "--mca", "btl",
            "tcp,vader,self" if shared_memory else "tcp,self",
            "--mca", "btl_tcp_if_include", "eth0",
            "--mca", "oob_tcp_if_include", "eth0",
            # abort only for ranks that die before MPI_Finalize, as Hydra
            # does: a non-zero exit after it must not kill ranks that are
            # exiting with their own status (RANK_GRACE ends the job then)
            "--mca", "orte_abort_on_non_zero_status", "0",
            # session dirs and PMIx's shared-memory store on the guest's
            # tmpfs, whatever TMPDIR says: they are per appliance, and the
            # job dir may not allow shared mappings (share.cache_options)
            "--mca", "orte_tmpdir_base", "/tmp"]
    if as_root:
        argv.append("--allow-run-as-root")
    for name, _ in exports:
        argv += ["-x", name]
    if tag_output:
        argv.append("--tag-output")
    if output_dir:
        argv += ["--output-filename", output_dir]
    return [*argv, RANKWRAP, *prog]


def pack(rank_hosts, per):
    """Appliances as (host, ranks), in rank order: each host's ranks in
    chunks of ``per`` (1: one appliance per rank; a host's slot count: one
    appliance per node, its ranks sharing memory inside)."""
    out = []
    for host, ranks in rank_hosts:
        for i in range(0, len(ranks), per):
            out.append((host, tuple(ranks[i:i + per])))
    return out


def ranks_per_appliance(args, kern, rank_hosts):
    """--per node|rank / --ranks-per-appliance N; auto: a node's ranks share
    one appliance where the kernel is SMP (measured faster: see README)."""
    per = args.per or "auto"
    if args.ranks_per_appliance is not None:
        n = int(args.ranks_per_appliance)
        if n < 1:
            raise ConfigError(f"--ranks-per-appliance: need at least 1, got {n}",
                              hint="e.g. --ranks-per-appliance 2")
    elif per == "rank" or (per == "auto" and not kern.has("smp")):
        n = 1
    else:
        n = max(len(r) for _, r in rank_hosts)
    if n > 1 and not kern.has("smp"):
        raise ConfigError(f"{n} ranks per appliance need an SMP kernel; UML "
                          f"{kern.version} is uniprocessor", hint="build one "
                          "(apppot-kernel build), or use --per rank")
    return n


def default_mem(ranks):
    """Guest memory for an appliance holding ``ranks`` ranks."""
    return max(256, 96 * ranks + 64) << 20


@dataclass
class RankPlan:
    index: int  # the appliance's
    guest: GuestSpec
    net_args: tuple
    ranks: tuple = (0,)  # the MPI ranks it holds


def plan_ranks(lan, flavour, launcher, *, uid, gid, user, group, jobdir,
               secret, env, boot_timeout, transport=None, ranks=None):
    """One GuestSpec per appliance; appliance i holds the MPI ranks
    ``ranks[i]`` (default: rank i), and the host file gives it as many
    slots."""
    ranks = ranks or [(r.rank,) for r in lan.ranks]
    slots = [len(rs) for rs in ranks]
    transport = transport or mcastnet.McastTransport()
    peers = [r.ip for r in lan.ranks]
    root_env = {b"OMPI_ALLOW_RUN_AS_ROOT": b"1",
                b"OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": b"1"} if uid == 0 else {}
    plans = []
    for r in lan.ranks:
        argv = launcher if r.rank == 0 else ["sleep", "infinity"]
        guest = GuestSpec(
            uid=uid, gid=gid, user=user, group=group, jobdir=str(jobdir),
            argv=[os.fsencode(a) for a in argv],
            env={**root_env, **env} if r.rank == 0 else dict(root_env),
            hostname=r.hostname,
            net=[transport.guest_net(lan, r.rank)],
            hosts=lan.hosts(), hooks=["mpihook"],
            extra={"mpi": {"rank": r.rank, "size": len(lan.ranks), "ip": r.ip,
                           "peers": peers, "secret": secret,
                           "hostfile": lan.hostfile(flavour, slots),
                           "flavour": flavour, "wait": boot_timeout,
                           "agent_env": {k.decode(): v.decode()
                                         for k, v in root_env.items()}}})
        plans.append(RankPlan(r.rank, guest, transport.uml_args(lan, r.rank),
                              tuple(ranks[r.rank])))
    return plans


def choose_ranks(args, alloc):
    n = args.n
    if n is not None and not 1 <= n <= batchenv.MAX_SLOTS:
        raise ConfigError(f"-n: need 1 to {batchenv.MAX_SLOTS} ranks, got {n}",
                          hint="e.g. -n 4")
    if n is None:
        n = alloc.slots
    if n > alloc.slots and not args.oversubscribe:
        raise ConfigError(f"-n {n} exceeds the {alloc.slots} slots of the "
                          f"{alloc.source} allocation",
                          hint="request more slots, or add --oversubscribe")
    if n > (os.cpu_count() or 1):
        log.warning("%d ranks on %d cores: appliances will share cores", n,
                    os.cpu_count() or 1)
    return n


# ---------------------------------------------------------------- running
def job_status(apps, launcher_status, settle=1.0, nranks=None):
    """The job's status from the ranks' own reports (which can trail the
    launcher's exit by a poll interval), else the launcher's."""
    deadline = time.monotonic() + settle
    nranks = nranks or len(apps)  # one rank per appliance
    while True:
        for app in apps:
            app.poll_notices(0)
        statuses = rank_statuses(apps)
        if len(statuses) >= nranks or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return st.lowest_failed(statuses) or launcher_status


def run(args, environ=None):
    environ = os.environ if environ is None else environ
    if not args.prog or args.prog == ["--"]:
        raise ConfigError("no MPI program given",
                          hint="apppot-mpirun -n 4 python3 prog.py")
    prog = args.prog[1:] if args.prog[0] == "--" else args.prog
    follower = None if (args.hostfile or args.hosts or args.pe) else \
        batchenv.follower(environ)
    if follower:
        log.info("%s: task 0 runs the appliances for the whole step",
                 follower)
        return 0
    alloc = batchenv.detect(environ, pe=args.pe, hostfile=args.hostfile,
                            hosts=args.hosts, nprocs=args.n)
    nranks = choose_ranks(args, alloc)
    rank_hosts = place(alloc.hosts, nranks)
    multi = len(rank_hosts) > 1
    common = prepare_common(args, environ, boot_default=120.0, check_mem=False)
    if common.cow:
        raise ConfigError("--image COW:IMG: one COW file cannot serve the "
                          "appliances of an MPI job", hint="give the image "
                          "alone; each appliance gets its own COW file")
    kern, jobdir = common.kernel, common.jobdir
    per = ranks_per_appliance(args, kern, rank_hosts)
    appliances = pack(rank_hosts, per)  # [(host, ranks)]
    placement = [(h, [i for i, (ah, _) in enumerate(appliances) if ah == h])
                 for h, _ in rank_hosts]
    if per > 1 and not args.mem:
        common = replace(common, mem=default_mem(per))
    check_node_room(len(placement[0][1]))
    last = len(appliances) - 1  # the longest run directory and umid
    check_rundir_room(f"r{last}", f"apppot-r{last}-")
    check_memory(common.mem, len(placement[0][1]), environ)
    transport = mcastnet.choose_transport(args.transport, kern)
    flavour = image_flavour(common.image, args.mpi)
    # a private network namespace: for the job dir server always, and on
    # one node for the whole LAN (unless --no-netns)
    netns, no_netns_why = (True, "") if args.dry_run else \
        mcastnet.private_netns_possible()
    lan_netns = netns and not (args.no_netns or multi)
    mcastnet.check_open_lan(transport, multi=multi, private=lan_netns,
                            allowed=args.allow_open_lan)
    share_modules = choose_jobdir_fs(args.jobdir_fs or "auto", kern,
                                     no_netns_why)
    if not netns and not multi and not args.no_netns:
        log.info("no private network namespace (%s): the LAN uses this one",
                 no_netns_why)
    starter = remote.choose(args.launcher, alloc.source, environ) \
        if multi else None
    exports = parse_env_args(args.export, environ)
    output_dir = check_output_dir(args.output_filename, jobdir) \
        if args.output_filename else None
    identity = caller_identity()
    uid, gid, user, group = identity
    launcher = launcher_argv(
        flavour, nranks, prog, shared_memory=per > 1,
        exports=[(k.decode(), v.decode("utf-8", "surrogateescape"))
                 for k, v in exports.items()],
        tag_output=args.tag_output, output_dir=output_dir, as_root=uid == 0)
    job_id = alloc.job_id or str(os.getpid())
    # one node: TTL 0 keeps the LAN on this host; several: TTL 1 crosses
    # the cluster network's switches but no router
    lan = mcastnet.plan_lan(mcastnet.job_key(job_id, user), len(appliances),
                            subnet=args.subnet or mcastnet.DEFAULT_SUBNET,
                            ttl=1 if multi else 0)
    secret = secrets.token_hex(32)
    plans = plan_ranks(lan, flavour, launcher, uid=uid, gid=gid, user=user,
                       group=group, jobdir=jobdir, secret=secret,
                       env=exports, boot_timeout=common.boot_timeout,
                       transport=transport, ranks=[r for _, r in appliances])
    image_rt = ImageRuntime.load(common.image)
    apply_image(plans, image_rt)
    tree = str(common.image) if image_rt.on_system_disk else None
    settings = NodeSettings(
        kernel=str(kern.path), mem=common.mem, tree=tree,
        image=str(system_disk()) if tree else str(common.image),
        changes=str(common.changes) if common.changes else None,
        jobdir=str(jobdir), uid=uid, gid=gid, user=user,
        keep=bool(args.keep), verbose=args.verbose,
        log_dir=str(Path(args.log_dir).absolute()) if args.log_dir else None,
        boot_timeout=common.boot_timeout, seccomp=args.seccomp or "auto",
        jobdir_fs="hostfs" if share_modules is None else "9p",
        lan_netns=lan_netns, transport=transport.name,
        hub=hub_config(lan, placement, secret, multi) if transport.hub
        else None)
    log.info("%s allocation: %s; %d ranks, %s image %s", alloc.source,
             ", ".join(f"{h}:{s}" for h, s in alloc.hosts), nranks, flavour,
             common.image)
    log.info("%d appliance%s, %d rank%s each%s (mem %d MiB)", len(appliances),
             "s" * (len(appliances) > 1), per, "s" * (per > 1),
             " (shared memory inside)" if per > 1 else "", common.mem >> 20)
    if multi:
        log.info("nodes: %s (remote start: %s)", "; ".join(
            f"{h}: appliances {','.join(map(str, ix))}" for h, ix in placement),
            starter.name)
    log.info("LAN transport %s; %s", transport.name, lan.describe())
    log.info("host file:\n%s", plans[0].guest.extra["mpi"]["hostfile"].rstrip())
    log.info("rank 0 runs: %s", shlex.join(launcher))
    cluster = worker.Cluster(placement, plans, settings, starter, lan,
                             environ) if multi else None
    if args.dry_run:
        for p in plans:
            print(f"rank {p.index}: {shlex.join(p.net_args)}")
        if cluster:
            for host, argv in cluster.commands():
                print(f"node {host}: {shlex.join(argv)}")
        print(f"rank 0 runs: {shlex.join(launcher)}")
        print(lan.describe())
        return 0
    if transport.hub and not multi:
        log.info("LAN: the hub joins the appliances; no multicast%s",
                 " (private network namespace)" if lan_netns else "")
    elif lan_netns:
        log.info("LAN carried by lo in a private network namespace")
    else:
        source, iface = mcastnet.multicast_route(lan.group, lan.port)
        log.info("LAN carried by %s (%s)", iface, source)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)  # all checks passed
    return launch(plans, common, settings, environ, share_modules, cluster)


def check_output_dir(value, jobdir):
    """``--output-filename DIR``: a directory inside the job dir (the
    appliances see nothing else); created only once every check passed."""
    path = os.path.normpath(os.path.abspath(value))
    if not path.startswith(str(jobdir) + "/"):
        raise ConfigError(f"--output-filename {value!r} is outside the job "
                          "dir", hint="the appliances see only the job dir; "
                          "use a subdirectory of it")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"--output-filename {value!r} exists and is not a "
                          "directory", hint="name a new or existing directory")
    return path


FDS_PER_APPLIANCE = 10  # the launcher's: pipes, sockets, logs, hub pair


def check_node_room(count):
    """Raise this process's open-file limit to what ``count`` appliances
    need (up to the hard limit), or say why the node cannot hold them."""
    import resource  # noqa: PLC0415

    need = 64 + FDS_PER_APPLIANCE * count
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need <= soft:
        return
    if hard != resource.RLIM_INFINITY and need > hard:
        raise ConfigError(f"{count} appliances on one node need about {need} "
                          f"open files; the limit (ulimit -Hn) is {hard}",
                          hint="use fewer appliances per node (--per node, "
                          "--ranks-per-appliance N) or ask for a higher limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def hub_config(lan, placement, secret, multi):
    """What every node's hub needs: which node each MAC lives on, and for
    several nodes the group, TTL and the per-job frame key (plain data)."""
    node_of = {i: k for k, (_, ix) in enumerate(placement) for i in ix}
    return {"macs": [[r.mac, node_of[r.rank]] for r in lan.ranks],  # by index
            "group": lan.group, "port": lan.port, "ttl": lan.ttl,
            "multi": multi,
            "key": hashlib.sha256(b"apppot-hub\0" + secret.encode()
                                  ).hexdigest()}


def place(hosts, count):
    """Appliance indexes per host, filling each host's slots in allocation
    order (Open MPI's --map-by slot); beyond the slots (oversubscribed), one
    more per host in turn.  Hosts that get none are left out."""
    out = [(h, []) for h, _ in hosts]
    i = 0
    for (_, slots), (_, got) in zip(hosts, out, strict=True):
        take = min(slots, count - i)
        got.extend(range(i, i + take))
        i += take
    while i < count:
        for _, got in out:
            if i < count:
                got.append(i)
                i += 1
    return [(h, ix) for h, ix in out if ix]


def choose_jobdir_fs(mode, kern, no_netns_why=""):
    """9P modules to hand the guests, or None for hostfs.  The 9P server
    must run in a private network namespace (``no_netns_why``: why there
    is none here)."""
    if mode == "hostfs":
        return None
    modules = share.module_paths(kern)
    missing = [what for what, ok in (
        ("diod", share.find_diod()),
        ("libslirp-helper", shutil.which("libslirp-helper")),
        (f"9p modules for kernel {kern.version}", modules is not None),
        ("the vector network driver", kern.has("vector")),
        (f"a private network namespace ({no_netns_why})", not no_netns_why))
        if not ok]
    if not missing:
        return modules
    if mode == "9p":
        raise ConfigError(f"--jobdir-fs 9p: missing {', '.join(missing)}",
                          hint="install diod and libslirp-helper (Debian), or "
                          "use --jobdir-fs hostfs")
    log.warning("job dir shared through hostfs (no %s): appliances writing "
                "the same file can lose data", ", ".join(missing))
    return None


@dataclass(frozen=True)
class NodeSettings:
    """What every node needs to start its share of the appliances (plain
    data: the head sends it to the other nodes' workers as JSON)."""

    kernel: str
    image: str
    mem: int
    changes: str | None
    jobdir: str
    uid: int
    gid: int
    user: str
    keep: bool = False
    verbose: int = 0
    log_dir: str | None = None
    boot_timeout: float = 120.0
    jobdir_fs: str = "auto"
    lan_netns: bool = False  # the LAN (UML) in the private netns too
    transport: str = "mcast"
    hub: dict | None = None  # hub_config(), for the hub transport
    seccomp: str = "auto"
    node: int = 0  # which node of the job this is (0: the head)
    tree: str | None = None  # an imported image (booted from image)

    def to_dict(self):
        return dict(self.__dict__)


class NodeRun:
    """This node's appliances and its job-dir server; ``close`` tears down
    whatever was started, on every path."""

    def __init__(self, settings, kern, dog, env, share_modules):
        self.s = settings
        self.kern = kern
        self.dog = dog
        self.env = env
        self.share_modules = share_modules
        self.apps = []
        self.server = None
        self.holder = None
        self.hub = None
        self.rundir = make_rundir(prefix="apppot-job-")
        dog.track_dir(self.rundir)  # gone with us, even after a SIGKILL

    def start(self, plans, *, stdin_fd=None):
        s = self.s
        log_dir = Path(s.log_dir) if s.log_dir else None
        if log_dir:
            log_dir.mkdir(parents=True, exist_ok=True)
        files, helper, enter = (), shutil.which("libslirp-helper"), None
        if self.share_modules is not None or s.lan_netns:
            self.holder = mcastnet.NetnsHolder(self.dog, self.rundir)
            enter = self.holder.enter
        if self.share_modules is not None:
            self.server = share.NinePServer(s.jobdir, s.uid,
                                            self.rundir / "diod.log",
                                            watchdog=self.dog, enter=enter)
            port = self.server.start()
            files = [(f"modules/{m.name}", m) for m in self.share_modules]
            shared = share.ShareSpec(s.jobdir, port, tuple(
                m.name for m in self.share_modules), s.uid, s.gid, s.user,
                cache=share.cache_options(self.kern.version_tuple,
                                          self.kern.patches)).guest()
            log.info("job dir shared over 9P (diod on port %d, private "
                     "network namespace)", port)
        link = 0  # the vec device number of the job dir link
        if s.transport == "hub":
            self.hub = self._start_hub([p.index for p in plans])
            link = 1
        for k, p in enumerate(plans):
            rundir = make_rundir(prefix=f"apppot-r{p.index}-")
            app = Appliance(rundir, name=f"rank {p.index}", keep=s.keep,
                            verbose=s.verbose >= 2 and p.index == 0,
                            log_path=log_dir / f"rank{p.index}.log"
                            if log_dir else None, watchdog=self.dog)
            self.apps.append(app)
            control = rundir / "control.tar"
            channels = app.make_channels()
            net_args, net_fds = p.net_args, ()
            if self.hub:
                fd = self.hub.uml_fds[k]
                net_args = tuple(a.replace("{fd}", str(fd)) for a in net_args)
                net_fds = (fd,)
            if self.share_modules is not None:  # link to the job dir server
                fd = app.start_slirp(helper, enter)
                link_args, link_net = slirp_net(fd, default_route=False,
                                                index=link)
                net_args += link_args
                net_fds += (fd,)
                p.guest.net = p.guest.net + link_net
                p.guest.extra["jobdir_fs"] = shared
            write_control_disk(control, p.guest.to_json(),
                               Path(s.changes) if s.changes else None, files)
            spec = ApplianceSpec(
                kernel=s.kernel, umid=f"r{p.index}", uml_dir=rundir,
                mem_bytes=s.mem, image=Path(s.image), cow=rundir / "root.cow",
                control=control, notify=rundir / "notify", channels=channels,
                # over 9P the guest needs no hostfs path at all
                hostfs=None if self.share_modules is not None else Path(
                    s.jobdir), net_args=net_args, net_fds=net_fds,
                quiet=s.verbose < 2, extra_args=self.kernel_args(len(p.ranks))
                + self.tree_args(rundir))
            lan_enter = enter if s.lan_netns else None
            if p.index == 0:
                app.start(spec, self.env, stdin_fd=stdin_fd, enter=lan_enter)
            else:
                app.start(spec, self.env, stdout_fd=_discard,
                          stderr_fd=_discard, enter=lan_enter)
        return self.apps

    def kernel_args(self, nranks):
        """seccomp mode, and one vCPU per rank up to this node's cores
        (in ptrace mode one: UML refuses SMP there, "SMP is not supported
        with PTRACE userspace")."""
        args = list(seccomp_args(self.kern, self.s.seccomp))
        ncpus = min(nranks, os.cpu_count() or 1, self.kern.max_cpus)
        if self.s.seccomp == "off":
            ncpus = 1
        if ncpus > 1:
            args.append(f"ncpus={ncpus}")
        return tuple(args)

    def tree_args(self, rundir):
        """An imported image's tree, with a COW file of this appliance."""
        if not self.s.tree:
            return ()
        return Disks(Path(self.s.image), rundir / "root.cow",
                     Path(self.s.tree), rundir / "tree.cow").extra_args()

    def _start_hub(self, indexes):
        h = self.s.hub
        local = {i: port for port, i in enumerate(indexes)}
        table = {mac: local[i] if node == self.s.node else hub.NET
                 for i, (mac, node) in enumerate(h["macs"])}
        net = ({"group": h["group"], "port": h["port"], "ttl": h["ttl"]}
               if h["multi"] else None)
        return hub.HubProcess(len(indexes), table, net=net, key=h["key"],
                              node=self.s.node, dog=self.dog,
                              rundir=self.rundir)

    def supervised(self):
        """What the wait loop watches besides the appliances."""
        return [h for h in (self.hub, self.server) if h]

    def kill_now(self):
        for app in self.apps:
            app.kill_now()

    def close(self):
        for app in self.apps:
            app.kill_now()
        for app in self.apps:
            app.close()
        if self.hub:
            stats = self.hub.close()
            if stats:
                log.info("hub: %s", ", ".join(f"{k} {v}" for k, v in
                                              stats.items()))
        if self.server:
            self.server.stop()
        if self.holder:
            self.holder.close()
        shutil.rmtree(self.rundir, ignore_errors=True)
        self.dog.untrack_dir(self.rundir)


def launch(plans, common, settings, environ, share_modules=None,
           cluster=None):
    """Start the appliances (here, and through ``cluster`` on the other
    nodes), supervise them, always tear them all down."""
    t0 = time.monotonic()
    with Watchdog() as dog, Interrupts() as interrupted:
        node = NodeRun(settings, common.kernel, dog,
                       uml_env(environ, common.kernel),
                       share_modules)
        remotes = []
        try:
            local = plans
            if cluster:
                remotes = cluster.start(interrupted)
                local = [p for p in plans if p.index in cluster.local]
            node.start(local, stdin_fd=0)
            code = job_status(node.apps + remotes, wait_all(
                node.apps + node.supervised() + remotes,
                boot_timeout=common.boot_timeout,
                timeout=common.timeout, interrupted=interrupted,
                rank_grace=RANK_GRACE),
                nranks=sum(len(p.ranks) for p in plans))
            t_end = time.monotonic()
            report(node.apps + remotes, t0, t_end)
            return code
        finally:
            t_down = time.monotonic()
            node.kill_now()
            for r in remotes:
                r.stop()
            node.close()
            for r in remotes:
                r.close()
            log.info("teardown %.2f s", time.monotonic() - t_down)


def _discard(_data):
    pass


def report(apps, t0, t_end):
    # rank 0's appliance is "ready" only once all peers answer: its own
    # boot is its mconsole coming up
    booted = [t for t in [getattr(apps[0], "booted_at", None)] + [
        a.ready_at for a in apps[1:]] if t] or [t0]
    ready0 = apps[0].ready_at or t_end
    log.info("timings: boot %.2f s (all appliances up), rank 0 launch at "
             "%.2f s, MPI run %.2f s, total %.2f s", max(booted) - t0,
             ready0 - t0, t_end - ready0, t_end - t0)


def main(argv=None):
    return cli_main(build_parser(), MPI_OPTIONS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
