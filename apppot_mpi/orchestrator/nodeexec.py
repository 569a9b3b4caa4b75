"""Start a node appliance with no more rights than a compute node's.

    python -m apppot_mpi.orchestrator.nodeexec --user USER --link IFNAME \\
        -- CMD [ARGS...]

Run as root, by the local provider (or inside the batch job of the
batchjob provider).  Root does only what needs privilege: it opens an
AF_PACKET socket bound to IFNAME (the guest end of the node's veth pair;
what UML's ``raw`` transport would need CAP_NET_RAW for) as file
descriptor 3.  Then it drops to USER for good (its uid and gid, no
supplementary groups, no capabilities, no_new_privs), sets a small clean
environment, changes to ``/`` and executes CMD, the appliance command,
which takes the socket with ``apppot-start --net fd:3:ADDR/PREFIX``.
stdin (the node's munge key and token, opened by root), stdout and stderr
pass through unchanged.  The process keeps its pid (exec), so the provider
tracks and signals the appliance by the pid it started.
"""

import argparse
import ctypes
import os
import pwd
import socket
import sys

from apppot.config import report_error
from apppot.errors import AppPotError, ConfigError

LINK_FD = 3  # where CMD finds the socket
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23  # frames the host itself sends on the guest end
PR_SET_NO_NEW_PRIVS = 38
# what the appliance inherits from the caller's environment
KEEP_ENV = ("APPPOT_HOME", "APPPOT_DEBUG", "APPPOT_XSTATE_SHIM", "LANG")
DEFAULT_USER = "apppot-node"


def node_user(name):
    """The pwd entry of the unprivileged user nodes run as (never root)."""
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"node user {name!r} does not exist",
                          hint="scripts/setup.sh creates 'apppot-node' "
                          "(useradd --system); or name another user with "
                          "--node-user") from None
    if user.pw_uid == 0 or user.pw_gid == 0:
        raise ConfigError(f"node user {name!r} is root (uid {user.pw_uid}, "
                          f"gid {user.pw_gid}): nodes never run as root",
                          hint="give an unprivileged user with --node-user")
    return user


def packet_socket(ifname):
    """A packet socket bound to ``ifname`` that sees every frame arriving
    there (and none the host sends from it), on LINK_FD, inheritable."""
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                          socket.htons(ETH_P_ALL))
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        s.bind((ifname, ETH_P_ALL))
    except OSError as e:
        raise ConfigError(f"cannot open a packet socket on {ifname!r}: "
                          f"{e.strerror}", hint="run as root in the network "
                          "namespace that holds the node's link") from None
    fd = s.detach()
    if fd != LINK_FD:
        os.dup2(fd, LINK_FD)  # inheritable
        os.close(fd)
    else:
        os.set_inheritable(fd, True)
    return LINK_FD


def clean_env(user, environ):
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
           "HOME": user.pw_dir if os.path.isdir(user.pw_dir) else "/",
           "USER": user.pw_name, "LOGNAME": user.pw_name}
    env.update({k: environ[k] for k in KEEP_ENV if environ.get(k)})
    return env


def drop_to(user):
    """For good: real, effective and saved ids, no groups, no way back."""
    os.setgroups([])
    os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
    os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise ConfigError("cannot set no_new_privs",
                          hint=os.strerror(ctypes.get_errno()))
    if os.getuid() != user.pw_uid or os.geteuid() != user.pw_uid:
        raise ConfigError(f"could not drop to user {user.pw_name!r}")


def build_parser():
    p = argparse.ArgumentParser(
        prog="apppot-nodeexec", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--user", default=DEFAULT_USER,
                   help="run the appliance as this user (default: "
                   "%(default)s)")
    p.add_argument("--link", required=True,
                   help="network interface to bind the packet socket to")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    return p


def main(argv=None, environ=None):
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    try:
        if not cmd:
            raise ConfigError("no command to run", hint="give -- CMD ...")
        if os.geteuid() != 0:
            raise ConfigError("must run as root (it opens the node's packet "
                              "socket, then drops to the node user)",
                              hint="the orchestrator runs it")
        user = node_user(args.user)
        packet_socket(args.link)
        drop_to(user)
        os.chdir("/")
        os.execvpe(cmd[0], cmd, clean_env(user, environ))
    except OSError as e:
        return report_error(parser.prog, ConfigError(
            f"cannot execute {cmd[0]!r}: {e.strerror}"))
    except AppPotError as e:
        return report_error(parser.prog, e)


if __name__ == "__main__":
    sys.exit(main())
