"""apppot-orchestrator: grow a batch cluster with appliance compute nodes.

    apppot-orchestrator run [options]         the orchestrator loop + web page
    apppot-orchestrator simulate LOG [opts]   replay an accounting log
    apppot-orchestrator status [--json]       nodes and queue, from the state
    apppot-orchestrator shutdown              stop every node it started
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
from . import providers as provmod
from .core import Orchestrator
from .policy import Policy, load_policy

log = logging.getLogger("apppot.orchestrator")
STATE_FILE = "orchestrator.json"
TOKEN_FILE = "web-token"  # noqa: S105  (a file name)
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
    lo.add_argument("--kernel", help="UML kernel (default: the best one)")
    lo.add_argument("--mem", default="256M", help="memory per node")
    lo.add_argument("--munge-key", default="/etc/munge/munge.key")
    lo.add_argument("--conf-server", metavar="HOST[:PORT]",
                    help="slurmctld for configless slurmd (default: the "
                    "bridge's address, port 6817)")
    lo.add_argument("--shared-dir", help="directory every node mounts at the "
                    "same path, for job files (default: STATE_DIR/shared)")
    lo.add_argument("--submit-prefix", default="",
                    help="batchjob: command prefix that reaches the other "
                    "batch system, e.g. 'ssh login1'")
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
                        "(after stopping the orchestrator)")):
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


def admin_token(state_dir):
    path = Path(state_dir) / TOKEN_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()


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
          "kernel": args.kernel, "mem": args.mem,
          "shared_dir": args.shared_dir}
    if args.provider == "batchjob":
        return provmod.BatchJobAppliances(
            state, callback, submit_prefix=shlex.split(args.submit_prefix),
            job_prefix=shlex.split(args.job_prefix), **kw)
    return provmod.LocalAppliances(state, callback, **kw)


def cmd_run(args):
    from .web import WebServer

    state = Path(args.state_dir).absolute()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--listen: cannot parse {args.listen!r}",
                          hint="give HOST:PORT, e.g. 10.254.0.1:8470")
    callback = args.callback_url or f"http://{host}:{port}/x/ready"
    policy = make_policy(args)
    batch = make_batch(args)
    provider = make_provider(args, state, callback)
    orch = Orchestrator(batch, provider, policy, max_nodes=args.max_nodes,
                        max_delta=args.max_delta,
                        start_timeout=args.start_timeout,
                        state_file=state / STATE_FILE,
                        executor=ThreadPoolExecutor(8, "provider"))
    try:
        web = WebServer(orch, host, int(port), admin_token(state)).start()
    except OSError as e:
        raise ConfigError(f"--listen {args.listen}: {e.strerror}",
                          hint="pick another port or address") from None
    print(f"apppot-orchestrator: status page {web.url} (admin token in "
          f"{state / TOKEN_FILE}); {policy.describe()}", file=sys.stderr,
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        orch.run(args.cycle, args.max_cycles, stop)
    finally:
        web.close()
        orch.close(wait=True)
        orch.checkpoint()
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
    path = Path(state_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no checkpoint in {str(state_dir)!r}",
                          hint="give the --state-dir of 'run'") from None


def cmd_status(args):
    st = load_state(args.state_dir)
    if args.json:
        for n in st["nodes"] + st["history"]:
            n.pop("token", None)
        print(json.dumps(st, indent=1))
        return 0
    when = time.strftime("%H:%M:%S", time.localtime(st["last_cycle_at"] or 0))
    q = st.get("sample") or {}
    print(f"cycle {st['cycle']} at {when}: {q.get('pending', 0)} pending, "
          f"{q.get('running', 0)} running; started {st['started']}, "
          f"stopped {st['stopped']}")
    print(f"{'id':>4}  {'name':<14} {'state':<9} {'address':<15} jobs")
    for n in st["nodes"]:
        print(f"{n['nodeid']:>4}  {n['name']:<14} {n['state']:<9} "
              f"{n['address'] or '-':<15} {','.join(n['jobs']) or '-'}")
    return 0


def cmd_shutdown(args):
    """Stop every node in the checkpoint (the orchestrator must not run)."""
    from .model import DOWN, Node

    st = load_state(args.state_dir)
    batch = make_batch(args)
    failed = 0
    for d in st["nodes"]:
        node = Node.from_dict(d)
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
        except (AppPotError, OSError) as e:
            failed += 1
            print(f"apppot-orchestrator: {node.name}: {e}", file=sys.stderr)
    st["history"] = st["history"] + [d for d in st["nodes"]
                                     if d["state"] == DOWN]
    st["nodes"] = [d for d in st["nodes"] if d["state"] != DOWN]
    path = Path(args.state_dir) / STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(st, indent=1))
    os.replace(tmp, path)
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
