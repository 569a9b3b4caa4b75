"""What an appliance run is, as data: the UML argv and the guest's spec.json.

Pure code: nothing here starts processes or touches files, so every argv can
be checked in unit tests and printed with ``-v``.
"""

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

GUEST_INIT = "/usr/lib/apppot/init.py"
NO_HOSTFS = "/dev/null/apppot-no-host-files"  # hostfs= without a job dir
SPEC_VERSION = 1


@dataclass(frozen=True)
class Channels:
    """Host file descriptors UML inherits (see init.py for the guest side)."""

    console: int  # kernel and init messages → log
    stdout: int | None = None  # program stdout (raw)
    stderr: int | None = None  # program stderr (raw)
    stdin: int | None = None  # framed program stdin
    terminal: int | None = None  # interactive: pty slave for all three

    def fds(self):
        return tuple(fd for fd in (self.console, self.stdout, self.stderr,
                                   self.stdin, self.terminal) if fd is not None)

    def args(self):
        args = ["con=null", "ssl=null", f"con0=null,fd:{self.console}"]
        if self.terminal is not None:
            args.append(f"ssl0=fd:{self.terminal},fd:{self.terminal}")
        else:
            args += [f"ssl0=null,fd:{self.stdout}", f"ssl1=null,fd:{self.stderr}",
                     f"ssl2=fd:{self.stdin},null"]
        return args


@dataclass(frozen=True)
class ApplianceSpec:
    """Everything needed to boot one appliance; ``argv()`` is the command."""

    kernel: Path
    umid: str
    uml_dir: Path
    mem_bytes: int
    image: Path
    cow: Path | None  # None: boot the image itself read-write (image builds)
    control: Path
    notify: Path
    channels: Channels
    hostfs: Path | None = None
    net_args: tuple = ()
    net_fds: tuple = ()  # host fds the network transport needs inherited
    quiet: bool = True
    extra_args: tuple = ()

    def fds(self):
        return self.channels.fds() + tuple(self.net_fds)

    def argv(self):
        return [
            str(self.kernel),
            f"umid={self.umid}",
            f"uml_dir={self.uml_dir}/",
            f"mem={self.mem_bytes >> 20}M",
            f"ubd0={self.cow},{self.image}" if self.cow else f"ubd0={self.image}",
            f"ubd1r={self.control}",
            "root=/dev/ubda",
            "rw",
            f"init={GUEST_INIT}",
            f"mconsole=notify:{self.notify}",
            # hostfs: only the job dir; without it the guest could mount
            # any host path the user can read.  No job dir: a prefix below
            # a file, so every path under it (".." too) fails on the host
            # with ENOTDIR, whatever anyone creates (/nonexistent can be).
            f"hostfs={self.hostfs}" if self.hostfs else f"hostfs={NO_HOSTFS}",
            *self.channels.args(),
            *self.net_args,
            "noreboot",  # a guest reboot ends the run instead of re-exec
            "lsm=yama",  # no SELinux chatter in the log
            *(["quiet"] if self.quiet else []),
            *self.extra_args,
        ]


@dataclass
class GuestSpec:
    """The guest's instructions (spec.json on the control disk)."""

    uid: int
    gid: int
    user: str
    group: str
    jobdir: str | None
    argv: list = field(default_factory=list)  # bytes
    env: dict = field(default_factory=dict)  # bytes → bytes
    hostname: str = "apppot"
    interactive: bool = False
    winsize: tuple | None = None
    net: list = field(default_factory=list)
    hosts: list = field(default_factory=list)
    hooks: list = field(default_factory=list)
    action: str = "run"
    extra: dict = field(default_factory=dict)

    def to_json(self):
        # argv and env travel as hex so any byte string survives exactly
        # (non-UTF-8 names, newlines, empty strings).
        data = {
            "version": SPEC_VERSION,
            "action": self.action,
            "uid": self.uid,
            "gid": self.gid,
            "user": self.user,
            "group": self.group,
            "jobdir": self.jobdir,
            "argv": [bytes(a).hex() for a in self.argv],
            "env": {bytes(k).hex(): bytes(v).hex() for k, v in self.env.items()},
            "hostname": self.hostname,
            "interactive": self.interactive,
            "winsize": list(self.winsize) if self.winsize else None,
            "net": self.net,
            "hosts": self.hosts,
            "hooks": self.hooks,
            **self.extra,
        }
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, text):
        """The inverse of ``to_json`` (apppot-mpirun's workers get their
        appliances' specs this way)."""
        data = json.loads(text)
        data.pop("version", None)
        names = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: data.pop(k) for k in list(data) if k in names}
        kw["argv"] = [bytes.fromhex(a) for a in kw.get("argv", ())]
        kw["env"] = {bytes.fromhex(k): bytes.fromhex(v)
                     for k, v in kw.get("env", {}).items()}
        if kw.get("winsize"):
            kw["winsize"] = tuple(kw["winsize"])
        return cls(**kw, extra=data)


SLIRP_HOST = "10.0.2.2"  # the host's loopback as seen through libslirp
SLIRP_GUEST = "10.0.2.15/24"


def slirp_net(fd, *, default_route=True, index=0):
    """UML args and the guest's interface for user-mode NAT via libslirp.

    The guest's ``vec0`` talks raw Ethernet over an inherited datagram
    socket (fd) to ``libslirp-helper``.  ``default_route=False`` gives a
    private link to the host's loopback only (the MPI job dir share).
    """
    link = {"device": f"vec{index}", "address": SLIRP_GUEST}
    if default_route:
        link.update(gateway=SLIRP_HOST, resolv="nameserver 10.0.2.3\n")
    return (f"vec{index}:transport=fd,fd={fd}",), [link]


def parse_env_args(items, environ):
    """``--env VAR=VAL`` or ``--env VAR`` (copied from the caller) → bytes."""
    from .errors import ConfigError  # noqa: PLC0415

    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not name or not (name[0].isalpha() or name[0] == "_") or not all(
                c.isalnum() or c == "_" for c in name):
            raise ConfigError(f"--env: bad variable name {name!r}",
                              hint="use --env NAME=VALUE or --env NAME")
        if not sep:
            if name not in environ:
                raise ConfigError(f"--env {name}: not set in this environment",
                                  hint=f"use --env {name}=VALUE")
            value = environ[name]
        out[name.encode()] = value.encode("utf-8", "surrogateescape")
    return out
