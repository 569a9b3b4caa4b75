"""Options declared once: each one gives an argparse flag and an APPPOT_* default.

Layers, lowest first: built-in default, ``$APPPOT_<NAME>``, command line.
"""

import argparse
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text, what="--mem"):
    """'512M', '2G', '256' (MiB) → bytes."""
    m = SIZE_RE.match(str(text))
    if not m or int(m.group(1)) == 0 or len(m.group(1)) > 12:
        raise ConfigError(f"{what}: cannot parse size {text!r}",
                          hint="use a number with K, M or G, e.g. 512M")
    return int(m.group(1)) * UNITS[m.group(2).lower()]


MAX_SECONDS = 366 * 86400  # a year: beyond any batch job's limit


def parse_seconds(text, what="--timeout"):
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 < value <= MAX_SECONDS:  # also nan and inf
        raise ConfigError(f"{what}: not a positive number of seconds: {text!r}",
                          hint="e.g. --timeout 600")
    return value


@dataclass(frozen=True)
class Option:
    """One option: flags, environment variable and argparse keywords."""

    dest: str
    flags: tuple
    help: str
    env: bool = True
    kwargs: tuple = ()

    @property
    def envvar(self):
        return "APPPOT_" + self.dest.upper()


# Options shared by apppot-start and apppot-mpirun (the appliance options).
APPLIANCE_OPTIONS = (
    Option("image", ("--image",),
           "appliance image IMG, or COW:IMG to keep changes in COW "
           "(default: the cached image for --mpi)"),
    Option("mpi", ("--mpi",),
           "which default image: openmpi, mpich or none (default: openmpi)",
           kwargs=(("choices", ("openmpi", "mpich", "none")),)),
    Option("kernel", ("--kernel",),
           "UML kernel (default: linux.uml on PATH, then /usr/bin/linux.uml)"),
    Option("mem", ("--mem",), "guest memory, e.g. 256M or 1G (default: 256M)"),
    Option("changes", ("--changes",),
           "merge this apppot-snap changes archive at boot"),
    Option("net", ("--net",),
           "guest network: none; slirp (user-mode NAT; the host is "
           "10.0.2.2); tap:IFNAME:ADDR/PREFIX (an existing tap device); "
           "raw:IFNAME:ADDR/PREFIX (a host interface, e.g. a veth end, "
           "through a packet socket; needs CAP_NET_RAW); or "
           "fd:FD:ADDR/PREFIX (an inherited socket, e.g. a packet socket a "
           "privileged parent bound) (default: none)"),
    Option("boot_timeout", ("--boot-timeout",),
           "seconds allowed for booting (default: 60)"),
    Option("keep", ("--keep",), "keep the run directory (COW file, logs)",
           kwargs=(("action", "store_const"), ("const", "1"))),
    Option("log", ("--log",), "also write the boot log to this file"),
    Option("seccomp", ("--seccomp",),
           "UML's seccomp mode (kernels 6.16+): guest system calls trapped "
           "by a seccomp filter instead of ptrace, much faster; the guest's "
           "processes can then reach the UML kernel's host process, which "
           "has only your own rights (hostfs confinement becomes advisory). "
           "auto = where the kernel and host allow it (default: auto)",
           kwargs=(("choices", ("auto", "on", "off")),)),
)

START_OPTIONS = (
    Option("id", ("--id",), "appliance id (UML umid; default: apppot-<pid>)"),
    Option("timeout", ("--timeout",), "kill the appliance after SECONDS"),
    Option("no_job_dir", ("--no-job-dir",),
           "give the appliance no host directory at all (no hostfs prefix): "
           "PROG runs in the guest user's home", env=False,
           kwargs=(("action", "store_true"),)),
)


def add_options(parser, options):
    for opt in options:
        kwargs = dict(opt.kwargs)
        kwargs.setdefault("default", None)
        env = f" [${opt.envvar}]" if opt.env else ""
        parser.add_argument(*opt.flags, dest=opt.dest, help=opt.help + env,
                            **kwargs)


def apply_env(args, options, environ=None):
    """Fill options not given on the command line from APPPOT_* variables."""
    environ = os.environ if environ is None else environ
    for opt in options:
        if getattr(args, opt.dest, None) is None and opt.env:
            value = environ.get(opt.envvar)
            if value:
                setattr(args, opt.dest, value)
    return args


KNOWN_ENV = {"APPPOT_HOME", "APPPOT_DEBUG", "APPPOT_XSTATE_SHIM",
             "APPPOT_TEST_SCOPE", "APPPOT_NETNS_PREFIX"}


def warn_unknown_env(options, environ=None):
    environ = os.environ if environ is None else environ
    known = KNOWN_ENV | {o.envvar for o in options}
    for name in sorted(environ):
        if name.startswith("APPPOT_") and name not in known:
            log.warning("unknown environment variable %s ignored", name)


def apppot_home(environ=None):
    """Per-user cache of images and helpers ($APPPOT_HOME)."""
    environ = os.environ if environ is None else environ
    if environ.get("APPPOT_HOME"):
        return Path(environ["APPPOT_HOME"])
    base = environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    return Path(base) / "apppot"


def common_cli(parser):
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: the plan and timings; -vv: also the boot log")
    parser.add_argument("--debug", action="store_true",
                        help=argparse.SUPPRESS)


def cli_main(parser, options, run, argv=None):
    """The CLI boundary: parse, layer APPPOT_* defaults, run, and turn an
    AppPotError into ``<prog>: error: ...`` + ``hint: ...`` and its status."""
    import signal  # noqa: PLC0415

    from .errors import AppPotError  # noqa: PLC0415

    debug = False
    try:
        args = parser.parse_args(argv)
        debug = args.debug
        setup_logging(args.verbose, args.debug)
        warn_unknown_env(options)
        apply_env(args, options)
        return run(args)
    except AppPotError as e:
        if debug:
            raise
        return report_error(parser.prog, e)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def report_error(prog, e, status=None):
    """``PROG: error: ...`` and ``hint: ...`` on stderr; the exit status."""
    import sys  # noqa: PLC0415

    print(f"{prog}: error: {e}", file=sys.stderr)
    if e.hint:
        print(f"hint: {e.hint}", file=sys.stderr)
    if e.details and logging.getLogger().isEnabledFor(logging.INFO):
        print(e.details, file=sys.stderr)
    return e.status if status is None else status


def setup_logging(verbose, debug=False):
    level = logging.DEBUG if debug or os.environ.get("APPPOT_DEBUG") else (
        logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="apppot: %(message)s")
