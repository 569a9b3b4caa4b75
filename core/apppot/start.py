"""apppot-start: boot one appliance and run a program in it.

    apppot-start [options] [--] PROG [ARGS...]

The current directory (the job dir) appears in the appliance at the same
path; PROG runs there as a guest user with your uid/gid, gets exactly ARGS,
and its exit status becomes apppot-start's.  With --no-job-dir the
appliance sees no host directory at all and PROG runs in the guest user's
home.
"""

import argparse
import grp
import ipaddress
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import sys
import termios
import threading
import tty
from dataclasses import dataclass
from pathlib import Path

from . import __version__, kernel, runtime, status
from .appliance import (
    Appliance,
    check_max_map_count,
    check_memdir,
    check_rundir_room,
    make_rundir,
    write_control_disk,
)
from .config import (
    APPLIANCE_OPTIONS,
    START_OPTIONS,
    add_options,
    cli_main,
    common_cli,
    parse_seconds,
    parse_size,
)
from .errors import ConfigError
from .images import check_changes, check_cow, check_image, parse_image_arg
from .process import readable
from .runtime import ImageRuntime
from .spec import ApplianceSpec, GuestSpec, parse_env_args, slirp_net
from .watchdog import Watchdog

log = logging.getLogger(__name__)

DESCRIPTION = __doc__.split("\n\n")[0]
# Job dirs that would hide part of the appliance if mounted over it.
SYSTEM_DIRS = {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc",
               "/root", "/run", "/sbin", "/sys", "/usr", "/var", "/home",
               "/usr/lib", "/usr/bin", "/usr/local", "/var/lib"}
OPTIONS = APPLIANCE_OPTIONS + START_OPTIONS


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but errors are AppPotErrors (one line, hint, status 125)."""

    def error(self, message):
        raise ConfigError(message, hint=f"see {self.prog} --help")


def build_parser():
    parser = ArgumentParser(
        prog="apppot-start", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without PROG, the image's default command (a recipe's "
        "command, an imported image's Entrypoint + Cmd, run in its "
        "WorkingDir) runs, else ./apppot-run in the job dir if it is "
        "executable, else a shell.\nstdin and stdout on a terminal give an "
        "interactive session; else stdin (a pipe or file) is the program's "
        "stdin.\n\n"
        + status.help_text())
    add_options(parser, OPTIONS)
    parser.add_argument("--env", action="append", metavar="VAR[=VAL]",
                        help="set VAR in the appliance (repeatable; VAR alone "
                        "copies it from here)")
    common_cli(parser)
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__}")
    parser.add_argument("prog", nargs=argparse.REMAINDER,
                        help="program and arguments to run in the appliance")
    return parser


def check_jobdir(path):
    path = Path(path)
    if str(path) in SYSTEM_DIRS:
        raise ConfigError(f"job directory {str(path)!r} would hide the "
                          "appliance's own files", hint="run from a "
                          "subdirectory, e.g. a directory per job")
    if "," in str(path):
        raise ConfigError(f"job directory path contains ',': {str(path)!r}",
                          hint="UML's hostfs= option splits at commas")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"job directory {str(path)!r} is not writable",
                          hint="run from a directory you can write to")
    return path


def check_umid(value):
    """``--id``: UML's umid names a directory under the run directory."""
    ok = value and len(value) <= 63 and value[0].isalnum() and all(
        c.isalnum() or c in "._-" for c in value)
    if not ok:
        raise ConfigError(f"--id: bad appliance id {value!r}", hint="at most "
                          "63 letters, digits, '.', '_', '-', starting with a "
                          "letter or digit")
    return value


def caller_identity():
    uid, gid = os.getuid(), os.getgid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = "apppot"
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = "apppot"
    return uid, gid, user, group


class Interrupts:
    """Record SIGINT/SIGTERM/SIGHUP; the wait loop tears down and exits."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, _frame):
        self.signum = self.signum or signum

    def __call__(self):
        return self.signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass(frozen=True)
class Prepared:
    """What the checks shared by apppot-start and apppot-mpirun found."""

    mem: int
    timeout: float | None
    boot_timeout: float
    kernel: kernel.Kernel
    image: Path
    cow: Path | None
    changes: Path | None
    jobdir: Path | None
    kernel_args: tuple = ()  # e.g. seccomp=auto


def prepare_common(args, environ, *, count=1, boot_default=60.0, needs=(),
                   check_mem=True, with_jobdir=True):
    """Validate the appliance options for ``count`` appliances before
    anything starts (bad input: one-line errors, status 125).  With
    ``check_mem=False`` the caller checks memory (``check_memory``) once it
    knows the size of its appliances.  Without ``with_jobdir`` the appliance
    gets no job dir (and no hostfs prefix)."""
    mem = parse_size(args.mem or "256M")
    timeout = parse_seconds(args.timeout) if args.timeout else None
    boot_timeout = parse_seconds(args.boot_timeout or boot_default,
                                 "--boot-timeout")
    kern = kernel.find_kernel(args.kernel, needs)
    choice = parse_image_arg(args.image, args.mpi or "openmpi")
    image = check_image(choice.base)
    if choice.cow:
        if count > 1:
            raise ConfigError("--image COW:IMG: one COW file cannot serve "
                              f"{count} appliances", hint="give the image "
                              "alone; each appliance gets its own COW file")
        check_cow(choice.cow, image)
    changes = check_changes(args.changes) if args.changes else None
    jobdir = check_jobdir(Path.cwd()) if with_jobdir else None
    if check_mem:
        check_memory(mem, count, environ)
    return Prepared(mem, timeout, boot_timeout, kern, image, choice.cow,
                    changes, jobdir, seccomp_args(kern, args.seccomp))


def check_memory(mem, count, environ):
    """Room for ``count`` guests of ``mem`` bytes in the guest memory
    directory; a warning when one guest process could hit the host's
    mapping limit."""
    check_memdir(mem * count, environ)
    check_max_map_count(mem)


def seccomp_args(kern, mode):
    """UML's ``seccomp=`` where the kernel has the mode (see --seccomp)."""
    mode = mode or "auto"
    if kern.has("seccomp"):
        return (f"seccomp={mode}",)
    if mode == "on":
        raise ConfigError(f"--seccomp on: UML kernel {kern.version} has no "
                          "seccomp mode", hint="build one with apppot-kernel "
                          "build, or use --seccomp auto")
    return ()


TAP_OOPS_FROM = (7, 0)  # 7.2 oopses in vector_net_open (no mmsg queues)


@dataclass(frozen=True)
class HostLink:
    """``--net tap:IFNAME:ADDR/PREFIX``: the guest's eth0 on a tap device;
    ``raw:IFNAME:ADDR/PREFIX``: on a host interface through a packet socket
    UML opens (e.g. one end of a veth pair; needs CAP_NET_RAW);
    ``fd:FD:ADDR/PREFIX``: on a socket inherited as FD (e.g. a packet socket
    a privileged parent opened and bound for us: no capability needed
    here).  AppPot's 7.2 kernel oopses on tap (no multi-packet queues; see
    TAP_OOPS_FROM); raw and fd work on 6.1 and 7.2."""

    kind: str
    ifname: str | None
    address: str
    fd: int | None = None

    def uml_args(self):
        if self.kind == "fd":  # frames as they are: no header, mmsg calls
            return (f"vec0:transport=fd,fd={self.fd}",)
        return (f"vec0:transport={self.kind},ifname={self.ifname}",)

    def fds(self):
        return () if self.fd is None else (self.fd,)

    def guest_net(self):
        return [{"device": "vec0", "name": "eth0", "address": self.address}]


def parse_net(value):
    """``none``, ``slirp``, ``tap:IFNAME:ADDR/PREFIX``,
    ``raw:IFNAME:ADDR/PREFIX`` or ``fd:FD:ADDR/PREFIX`` (checked, pure)."""
    value = value or "none"
    if value in ("none", "slirp"):
        return value
    kind, _, rest = value.partition(":")
    ifname, _, cidr = rest.partition(":")
    hint = ("use --net none, slirp, tap:IFNAME:ADDR/PREFIX, raw:IFNAME:... "
            "or fd:FD:...")
    if kind not in ("tap", "raw", "fd") or not ifname or not cidr:
        raise ConfigError(f"--net: cannot parse {value!r}", hint=hint)
    fd = None
    if kind == "fd":
        if not ifname.isdigit() or int(ifname) < 3:
            raise ConfigError(f"--net: bad file descriptor {ifname!r}",
                              hint="give an inherited socket's number, 3 or "
                              "more (0-2 are stdin, stdout, stderr)")
        fd, ifname = int(ifname), None
    elif len(ifname) > 15 or not all(c.isalnum() or c in "-_."
                                     for c in ifname):
        raise ConfigError(f"--net: bad interface name {ifname!r}",
                          hint="at most 15 letters, digits, '-', '_', '.'")
    try:
        ipaddress.IPv4Interface(cidr)
    except ValueError:
        raise ConfigError(f"--net: bad address {cidr!r}",
                          hint="give ADDR/PREFIX, e.g. 10.254.0.11/24") from None
    if "/" not in cidr:
        raise ConfigError(f"--net: address {cidr!r} has no prefix length",
                          hint="give ADDR/PREFIX, e.g. 10.254.0.11/24")
    return HostLink(kind, ifname, cidr, fd)


def check_link(net):
    """The link --net names exists here: an interface in this process's
    network namespace (/sys may show another), or an inherited socket."""
    if net.kind == "fd":
        try:
            is_socket = stat.S_ISSOCK(os.fstat(net.fd).st_mode)
        except OSError:
            is_socket = False
        if not is_socket:
            raise ConfigError(f"--net fd:{net.fd}: file descriptor {net.fd} "
                              "is not an open socket", hint="start "
                              "apppot-start with the socket inherited as that "
                              "descriptor (e.g. a packet socket bound to a "
                              "veth end)")
        return
    try:
        socket.if_nametoindex(net.ifname)
    except OSError:
        raise ConfigError(f"--net: no network interface {net.ifname!r} "
                          "here", hint="create it first: ip tuntap add dev "
                          f"{net.ifname} mode tap user $USER") from None


def prepare(args, environ):
    """apppot-start's checks: the shared ones, the network, --env."""
    net = parse_net(args.net)
    common = prepare_common(args, environ, with_jobdir=not args.no_job_dir)
    link = None  # the libslirp-helper path, or a HostLink
    if net == "slirp":
        common.kernel.require("vector")
        link = shutil.which("libslirp-helper")
        if not link:
            raise ConfigError("--net slirp: libslirp-helper is not installed",
                              hint="install Debian's libslirp-helper package")
    elif isinstance(net, HostLink):
        common.kernel.require("vector")
        if net.kind == "tap" and common.kernel.version_tuple >= TAP_OOPS_FROM:
            raise ConfigError(f"--net tap: UML {common.kernel.version}'s "
                              "vector driver crashes on tap devices",
                              hint="use raw:IFNAME:ADDR with one end of a veth "
                              "pair, or --kernel /usr/bin/linux.uml")
        check_link(net)
        link = net
    return common, link, parse_env_args(args.env, environ)


def guest_env(environ, interactive, extra):
    env = {}
    if interactive and environ.get("TERM"):
        env[b"TERM"] = environ["TERM"].encode()
    env.update(extra)
    return env


def uml_env(environ, kern=None):
    """UML's own environment: where guest RAM lives, the xstate shim."""
    env = dict(environ)
    shim = kernel.xstate_shim(kern=kern)
    if shim:
        env["LD_PRELOAD"] = str(shim)
    return env


def run(args, environ=None):
    environ = os.environ if environ is None else environ
    plan, link, guest_vars = prepare(args, environ)
    interactive = os.isatty(0) and os.isatty(1)
    uid, gid, user, group = caller_identity()
    argv = [os.fsencode(a) for a in args.prog]
    if argv and argv[0] == b"--":
        argv = argv[1:]
    winsize = None
    if interactive:
        size = os.get_terminal_size(0)
        winsize = (size.lines, size.columns)
    umid = check_umid(args.id) if args.id else f"apppot-{os.getpid()}"
    check_rundir_room(umid)
    guest = GuestSpec(uid=uid, gid=gid, user=user, group=group,
                      jobdir=str(plan.jobdir) if plan.jobdir else None,
                      argv=argv,
                      env=guest_env(environ, interactive, guest_vars),
                      hostname=umid[:63], interactive=interactive,
                      winsize=winsize)
    image_rt = ImageRuntime.load(plan.image)
    image_rt.apply(guest)
    system = runtime.system_disk() if image_rt.on_system_disk else None
    rundir = make_rundir()
    keep = bool(args.keep)
    with Watchdog() as dog, Appliance(rundir, name=umid, keep=keep,
                                      verbose=args.verbose >= 2,
                                      log_path=args.log,
                                      watchdog=dog) as app, \
            Interrupts() as interrupted:
        control = rundir / "control.tar"
        master = slave = None
        if interactive:
            master, slave = os.openpty()
            tty.setraw(slave)
        channels = app.make_channels(interactive, slave)
        net_args, net_fds = (), ()
        if isinstance(link, HostLink):
            net_args, net_fds = link.uml_args(), link.fds()
            guest.net = link.guest_net()
        elif link:
            fd = app.start_slirp(link)
            net_fds = (fd,)
            net_args, guest.net = slirp_net(fd)
        write_control_disk(control, guest.to_json(), plan.changes)
        notify = rundir / "notify"
        disks = runtime.disks(image_rt, rundir, plan.cow, system)
        spec = ApplianceSpec(
            kernel=plan.kernel.path, umid=umid, uml_dir=rundir,
            mem_bytes=plan.mem, image=disks.image, cow=disks.cow,
            control=control, notify=notify, channels=channels,
            hostfs=plan.jobdir, net_args=net_args, net_fds=net_fds,
            quiet=args.verbose < 2,
            extra_args=plan.kernel_args + disks.extra_args())
        log.info("kernel %s (%s), image %s, mem %d MiB, run dir %s",
                 spec.kernel, plan.kernel.version, spec.image,
                 spec.mem_bytes >> 20, rundir)
        app.start(spec, uml_env(environ, plan.kernel), stdin_fd=0,
                  interactive=interactive)
        relay = None
        if interactive:
            relay = TerminalRelay(master, app)
            relay.start()
        try:
            code = app.wait(boot_timeout=plan.boot_timeout,
                            timeout=plan.timeout, interrupted=interrupted)
        finally:
            if relay:
                relay.stop()
        report_timing(app)
        if keep:
            log.warning("run directory kept: %s", rundir)
        return code


def report_timing(app):
    if app.ready_at is None:
        return
    kernel_up = (app.booted_at or app.ready_at) - app.started_at
    log.info("launch to payload %.2f s (kernel up %.2f s)",
             app.ready_at - app.started_at, kernel_up)


class TerminalRelay:
    """Interactive session: our terminal (raw) <-> the guest's ttyS0."""

    def __init__(self, master, app):
        self.master = master
        self.app = app
        self.stopping = threading.Event()
        self.saved = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.saved = termios.tcgetattr(0)
        tty.setraw(0)
        self.thread.start()

    def _run(self):
        fds = [0, self.master]
        while not self.stopping.is_set():
            for fd in readable(fds, 0.2):
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    fds.remove(fd)
                    continue
                os.write(self.master if fd == 0 else 1, data)
            if self.master not in fds:
                return

    def stop(self):
        self.stopping.set()
        self.thread.join(1.0)
        if self.saved:
            termios.tcsetattr(0, termios.TCSADRAIN, self.saved)
        os.close(self.master)


def main(argv=None):
    return cli_main(build_parser(), OPTIONS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
