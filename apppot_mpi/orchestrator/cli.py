"""apppot-orchestrator: grow a batch cluster with appliance compute nodes.

    apppot-orchestrator run [options]         the orchestrator loop + web page
    apppot-orchestrator simulate LOG [opts]   replay an accounting log
    apppot-orchestrator status [--json]       nodes and queue, from the state
    apppot-orchestrator shutdown              stop it and every node it started
    apppot-orchestrator image                 build the Slurm node image

Policies decide when to start and stop nodes.  The default: every pending
job in the partition is a candidate; start a node while candidates exceed
--ratio (2) x nodes, at most --max-delta per cycle and --max-nodes in all
(starts in flight count); stop a node idle for longer than --idle-time.
For anything else write a Python file and give --policy FILE[:CLASS]:

    from apppot_mpi.orchestrator.policy import Policy

    class BigJobsOnly(Policy):
        def is_candidate(self, job):      # which pending jobs count
            return job.cpus >= 2
        def new_node_needed(self):        # asked up to max-delta times
            return len(self.orch.candidates) > len(self.orch.alive_nodes())
        def can_stop(self, node):         # idle READY nodes only
            return node.idle_for(self.orch.now) > 120

Hooks before_cycle() and after_cycle() run around every cycle.
The same policy runs unchanged in 'simulate' (simulated time and nodes).
"""

import argparse
import fcntl
import json
import logging
import os
import secrets
import shlex
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from apppot import __version__
from apppot.config import common_cli, report_error, setup_logging
from apppot.errors import AppPotError, ConfigError

from . import batch as batchmod
from . import nodeexec
from . import providers as provmod
from .core import Orchestrator, read_checkpoint, write_checkpoint
from .model import DOWN, Node
from .policy import Policy, load_policy

log = logging.getLogger("apppot.orchestrator")
STATE_FILE = "orchestrator.json"
TOKEN_FILE = "web-token"  # noqa: S105  (a file name)
RUN_LOCK = "run.lock"
NODE_PACKAGES = "slurmd,munge"


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message, hint=f"see {self.prog} --help")


def positive(kind):
    def conv(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") \
                from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value
    return conv


def policy_options(p):
    g = p.add_argument_group("policy")
    g.add_argument("--policy", metavar="FILE[:CLASS]",
                   help="a Python file with a Policy subclass (default: the "
                   "built-in policy below)")
    g.add_argument("--ratio", type=positive(float), default=2.0,
                   help="default policy: start while candidates > RATIO x "
                   "nodes (default: %(default)s)")
    g.add_argument("--idle-time", type=positive(float), default=600.0,
                   help="default policy: stop nodes idle for longer than "
                   "SECONDS (default: %(default)s)")
    g.add_argument("--max-nodes", type=positive(int), default=4,
                   help="nodes alive at once, starting ones included "
                   "(default: %(default)s)")
    g.add_argument("--max-delta", type=positive(int), default=1,
                   help="nodes started, and nodes drained, per cycle "
                   "(default: %(default)s)")


def build_parser():
    parser = ArgumentParser(
        prog="apppot-orchestrator", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True,
                                parser_class=ArgumentParser)
    fmt = argparse.RawDescriptionHelpFormatter

    r = sub.add_parser("run", help="run the orchestrator loop and web page",
                       formatter_class=fmt, epilog=__doc__.split("\n\n", 2)[2])
    r.add_argument("--state-dir", required=True,
                   help="checkpoint, web token, node files and logs")
    r.add_argument("--batch", choices=sorted(batchmod.BACKENDS),
                   default="slurm", help="batch system (default: slurm)")
    r.add_argument("--partition", default="cloud",
                   help="Slurm partition (Grid Engine queue) whose jobs and "
                   "predeclared nodes are ours (default: %(default)s)")
    r.add_argument("--provider", choices=sorted(provmod.PROVIDERS),
                   default="local", help="how nodes start (default: local)")
    r.add_argument("--cycle", type=positive(float), default=30.0,
                   help="seconds between cycles (default: %(default)s)")
    r.add_argument("--start-timeout", type=positive(float), default=600.0,
                   help="stop a node not ready after SECONDS "
                   "(default: %(default)s)")
    r.add_argument("--max-cycles", type=int, default=0,
                   help="stop after N cycles (default: run until signalled)")
    r.add_argument("--listen", default="127.0.0.1:8470", metavar="HOST:PORT",
                   help="web page and ready callback (default: %(default)s)")
    r.add_argument("--callback-url",
                   help="URL nodes post to when ready (default: "
                   "http://HOST:PORT/x/ready from --listen)")
    policy_options(r)
    lo = r.add_argument_group("local and batchjob providers")
    lo.add_argument("--bridge", default="br0",
                    help="bridge the nodes' links join (default: br0)")
    lo.add_argument("--image", help="node image (default: the one "
                    "'apppot-orchestrator image' builds)")
    lo.add_argument("--kernel", help="UML kernel (default: $APPPOT_KERNEL, "
                    "else the one apppot-start picks)")
    lo.add_argument("--mem", default="256M", help="memory per node")
    lo.add_argument("--munge-key", default="/etc/munge/munge.key")
    lo.add_argument("--conf-server", metavar="HOST[:PORT]",
                    help="slurmctld for configless slurmd (default: the "
                    "bridge's address, port 6817)")
    lo.add_argument("--node-user", default=nodeexec.DEFAULT_USER,
                    help="unprivileged user the node appliances run as, "
                    "never root (default: %(default)s, made by "
                    "scripts/setup.sh)")
    lo.add_argument("--submit-prefix", default="",
                    help="batchjob: command prefix that reaches the other "
                    "batch system and runs 'sh' there with the commands on "
                    "stdin, e.g. 'ssh login1' or 'env SLURM_CONF=...'")
    lo.add_argument("--job-prefix", default="",
                    help="batchjob: prefix of the appliance command in the job")
    lc = r.add_argument_group("libcloud provider")
    lc.add_argument("--libcloud-driver", default="dummy",
                    help="libcloud driver name (default: dummy)")
    lc.add_argument("--libcloud-key", default="0")
    lc.add_argument("--libcloud-image")
    lc.add_argument("--libcloud-size")
    common_cli(r)

    s = sub.add_parser("simulate", help="replay an accounting log",
                       formatter_class=fmt,
                       epilog=__doc__.split("\n\n", 2)[2],
                       description="Replay a Slurm 'sacct --parsable2' log or "
                       "a Grid Engine accounting file through the policy; "
                       "writes workload.csv, workload.png and summary.json "
                       "(with the own-nodes-only baseline).")
    s.add_argument("log", help="the accounting log")
    s.add_argument("--format", choices=("auto", "sacct", "sge"),
                   default="auto")
    s.add_argument("--own-nodes", type=int, default=1,
                   help="nodes the cluster always has (default: 1)")
    s.add_argument("--node-slots", type=positive(int), default=4,
                   help="slots (CPUs) per node, own and started (default: 4)")
    s.add_argument("--cycle", type=positive(float), default=60.0,
                   help="simulated seconds per cycle (default: 60)")
    s.add_argument("--startup-delay", type=float, default=60.0,
                   help="seconds from start to ready (default: 60)")
    s.add_argument("--out", default="simulation",
                   help="output directory (default: ./simulation)")
    policy_options(s)
    common_cli(s)

    for name, text in (("status", "nodes and queue from the checkpoint"),
                       ("shutdown", "stop every node the orchestrator started "
                        "(a run still going on the state dir is stopped "
                        "first); run it where run ran")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state-dir", required=True)
        if name == "status":
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("--partition", default="cloud")
            p.add_argument("--submit-prefix", default="")
            p.add_argument("--batch", choices=sorted(batchmod.BACKENDS),
                           default="slurm")
        common_cli(p)
    i = sub.add_parser("image", help="build the Slurm node image (root)")
    common_cli(i)
    return parser


def make_policy(args):
    kw = {"ratio": args.ratio, "idle_time": args.idle_time}
    return load_policy(args.policy, **kw) if args.policy else Policy(**kw)


MIN_TOKEN = 16  # characters of an admin token written by hand


def admin_token(state_dir):
    """The admin token from STATE_DIR/web-token, made (0600) if missing;
    an empty or short one is refused, never accepted as a password."""
    path = Path(state_dir) / TOKEN_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
    token = path.read_text().strip()
    if len(token) < MIN_TOKEN:
        raise ConfigError(f"admin token file {str(path)!r} holds "
                          f"{'no token' if not token else 'a short token'}",
                          hint=f"delete it to have a new one made, or write "
                          f"a token of {MIN_TOKEN}+ characters into it")
    return token


def check_state_dir(state):
    """An existing STATE_DIR must be ours: it holds node tokens and the
    munge key, and root writes there."""
    try:
        st = os.lstat(state)
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid():
        raise ConfigError(f"--state-dir {str(state)!r} belongs to uid "
                          f"{st.st_uid}, not to us (uid {os.geteuid()})",
                          hint="give a directory of your own (or a new "
                          "path)")


def run_lock(state):
    """Held while 'run' runs on STATE_DIR (the file holds its pid): a second
    'run' is refused, and 'shutdown' stops this one first.  Close-on-exec:
    the node appliances must not inherit it."""
    fd = os.open(state / RUN_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise ConfigError(f"another apppot-orchestrator (pid {pid}) runs on "
                          f"{str(state)!r}", hint="stop it first, or give "
                          "another --state-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def stop_running(state, timeout=60.0):
    """Take the run lock, stopping (SIGTERM) a 'run' that holds it and
    waiting until it has written its last checkpoint and exited."""
    try:
        fd = os.open(state / RUN_LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    deadline, pid = time.monotonic() + timeout, None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        if pid is None:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            pid = int(text) if text.isdigit() else 0
            print(f"apppot-orchestrator: stopping the orchestrator running "
                  f"on this state dir (pid {pid}) first", file=sys.stderr)
            if pid > 1:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if time.monotonic() > deadline:
            os.close(fd)
            raise ConfigError(f"the orchestrator (pid {pid}) on "
                              f"{str(state)!r} did not stop within "
                              f"{timeout:.0f} s", hint="stop it, then run "
                              "shutdown again")
        time.sleep(0.2)


def private_state_dir(state):
    """STATE_DIR made, or its mode fixed, 0700."""
    check_state_dir(state)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state, 0o700)
    return state


def make_batch(args):
    if args.batch == "slurm":
        return batchmod.Slurm(args.partition)
    if args.batch == "gridengine":
        return batchmod.GridEngine(args.partition)
    return batchmod.NoBatch()


def make_provider(args, state, callback):
    if args.provider == "libcloud":
        return provmod.LibcloudNodes(
            args.libcloud_driver, args.libcloud_key,
            os.environ.get("APPPOT_LIBCLOUD_SECRET"), args.libcloud_image,
            args.libcloud_size, callback_url=callback)
    kw = {"bridge": args.bridge, "conf_server": args.conf_server,
          "munge_key": args.munge_key, "image": args.image,
          "kernel": args.kernel or os.environ.get("APPPOT_KERNEL"),
          "mem": args.mem,
          "node_user": args.node_user}
    if args.provider == "batchjob":
        return provmod.BatchJobAppliances(
            state, callback, submit_prefix=shlex.split(args.submit_prefix),
            job_prefix=shlex.split(args.job_prefix), **kw)
    return provmod.LocalAppliances(state, callback, **kw)


def cmd_run(args):
    from .web import WebServer

    state = Path(args.state_dir).absolute()
    check_state_dir(state)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--listen: cannot parse {args.listen!r}",
                          hint="give HOST:PORT, e.g. 10.254.0.1:8470")
    callback = args.callback_url or f"http://{host}:{port}/x/ready"
    policy = make_policy(args)
    batch = make_batch(args)
    provider = make_provider(args, state, callback)
    private_state_dir(state)
    token = admin_token(state)
    lock = run_lock(state)
    try:
        orch = Orchestrator(batch, provider, policy, max_nodes=args.max_nodes,
                            max_delta=args.max_delta,
                            start_timeout=args.start_timeout,
                            state_file=state / STATE_FILE,
                            executor=ThreadPoolExecutor(8, "provider"))
        try:
            web = WebServer(orch, host, int(port), token).start()
        except OSError as e:
            raise ConfigError(f"--listen {args.listen}: {e.strerror}",
                              hint="pick another port or address") from None
        print(f"apppot-orchestrator: status page {web.url} (admin token in "
              f"{state / TOKEN_FILE}); {policy.describe()}", file=sys.stderr,
              flush=True)
        stop = threading.Event()
        old = {sig: signal.signal(sig, lambda *_: stop.set())
               for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            orch.run(args.cycle, args.max_cycles, stop)
        finally:
            web.close()
            orch.close(wait=True)  # and checkpoint
            for sig, handler in old.items():
                signal.signal(sig, handler)
    finally:
        os.close(lock)
    return 0


def cmd_simulate(args):
    from .simulate import run_and_report

    summary = run_and_report(
        args.log, make_policy(args), args.out, fmt=args.format,
        own_nodes=args.own_nodes, slots=args.node_slots,
        max_nodes=args.max_nodes, max_delta=args.max_delta, cycle=args.cycle,
        startup_delay=args.startup_delay)
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        print(f"{k:<{width}}  {v}")
    print(f"wrote {args.out}/workload.csv, workload.png, summary.json",
          file=sys.stderr)
    return 0


def load_state(state_dir):
    return read_checkpoint(Path(state_dir) / STATE_FILE)


def cmd_status(args):
    st = load_state(args.state_dir)
    if args.json:
        for n in st["nodes"] + st["history"]:
            n.pop("token", None)
        print(json.dumps(st, indent=1))
        return 0
    when = time.strftime("%H:%M:%S", time.localtime(
        st.get("last_cycle_at") or 0))
    q = st.get("sample") or {}
    print(f"cycle {st['cycle']} at {when}: {q.get('pending', 0)} pending, "
          f"{q.get('running', 0)} running; started {st['started']}, "
          f"stopped {st['stopped']}")
    print(f"{'id':>4}  {'name':<14} {'state':<9} {'address':<15} jobs")
    for n in map(Node.from_dict, st["nodes"]):
        print(f"{n.nodeid:>4}  {n.name:<14} {n.state:<9} "
              f"{n.address or '-':<15} {','.join(n.jobs) or '-'}")
    return 0


def cmd_shutdown(args):
    """Stop a 'run' on the state dir, then every node in its checkpoint."""
    lock = stop_running(Path(args.state_dir))  # noqa: F841  (held)
    st = load_state(args.state_dir)
    batch = make_batch(args)
    failed = 0
    nodes = [Node.from_dict(d) for d in st["nodes"]]
    # a start the checkpoint missed (the orchestrator died or was stopped
    # before taking in its result) left a start record with the pid
    provmod.LocalAppliances.for_shutdown(args.state_dir).adopt(nodes)
    for d, node in zip(st["nodes"], nodes, strict=True):
        d["data"] = node.data
        try:
            if "pid" in node.data:
                provmod.LocalAppliances.for_shutdown(args.state_dir).stop(node)
            elif "jobid" in node.data:
                stopper = provmod.BatchJobAppliances.for_shutdown(
                    args.state_dir)
                stopper.submit_prefix = shlex.split(args.submit_prefix)
                stopper.stop(node)
            elif "instance" in node.data:
                raise ConfigError(f"cloud server {node.data['instance']} "
                                  "must be destroyed with the cloud's tools")
            batch.node_down(node.name, "apppot-orchestrator shutdown")
            d["state"] = DOWN
            print(f"stopped {node.name}")
        except (AppPotError, OSError, RuntimeError) as e:
            failed += 1
            print(f"apppot-orchestrator: {node.name}: {e}", file=sys.stderr)
    st["history"] = st["history"] + [d for d in st["nodes"]
                                     if d["state"] == DOWN]
    st["nodes"] = [d for d in st["nodes"] if d["state"] != DOWN]
    write_checkpoint(Path(args.state_dir) / STATE_FILE, st)
    return 1 if failed else 0


def cmd_image(args):
    from apppot import imagebuild

    out = provmod.node_image()
    imagebuild.build("openmpi", NODE_PACKAGES.split(","), out,
                     verbose=args.verbose >= 2)
    print(out)
    return 0


COMMANDS = {"run": cmd_run, "simulate": cmd_simulate, "status": cmd_status,
            "shutdown": cmd_shutdown, "image": cmd_image}


def main(argv=None):
    parser = build_parser()
    debug = False
    try:
        args = parser.parse_args(argv)
        debug = args.debug
        setup_logging(args.verbose, args.debug)
        return COMMANDS[args.cmd](args)
    except AppPotError as e:
        if debug:
            raise
        return report_error(parser.prog, e, status=e.status)


if __name__ == "__main__":
    sys.exit(main())
