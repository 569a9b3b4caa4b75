#!/usr/bin/python3 -IB
"""Guest init of an AppPot appliance (PID 1 inside User-Mode Linux).

Standard library only: this file is copied into the image as
``/usr/lib/apppot/init.py`` and started by the kernel (``init=``).  The host
hands everything over on the read-only control disk ``/dev/ubdb`` (a tar with
``spec.json`` and optionally ``changes.tar.gz``), never on the kernel command
line, which every host user can read with ``ps``.

Channels to the host (set up by ``apppot.appliance``):

* ``/dev/console``  boot and init messages (the host's log file);
* ``/dev/ttyS0``    the program's stdout (raw), or the whole terminal when
                    the session is interactive;
* ``/dev/ttyS1``    the program's stderr (raw);
* ``/dev/ttyS2``    the program's stdin, framed (see ``FRAME``);
* ``/proc/mconsole`` short ``apppot:...`` notices to the launcher;
* ``/proc/exitcode`` the status UML returns to the host.

PID 1 must never exit (the kernel panics): every path ends in ``power_off``.
"""

import ctypes
import json
import os
import signal
import struct
import sys
import tarfile
import termios
import threading
import time
import traceback
import tty

LIB = "/usr/lib/apppot"
CONTROL_DISK = "/dev/ubdb"
RUN = "/run/apppot"
FRAME = struct.Struct("!I")  # stdin frames: length, then data; 0 means EOF
DRAIN_SECONDS = 2.0  # how long output of leftover daemons is awaited
EXIT_BOOT = 120  # mirrors apppot.status.BOOT_FAILED
T0 = time.monotonic()

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC = 4096, 16384
IMAGE_ROOT = "/run/apppot-root"  # an imported image's tree (its own disk)
SYSROOT = RUN + "/sysroot"  # the system disk, seen from inside that tree


class StepError(Exception):
    """An init step failed; reported to the host as ``apppot:fail``."""


def log(msg):
    """Boot log line on the console (the host's log file, never stdout)."""
    try:
        with open("/dev/console", "w") as con:
            con.write(f"apppot-init[{time.monotonic() - T0:6.3f}] {msg}\n")
    except OSError:
        pass


def notify(msg):
    """Tell the launcher something (``mconsole=notify:`` USER_NOTIFY)."""
    try:
        with open("/proc/mconsole", "w") as f:
            f.write(f"apppot:{msg}"[:500])
    except OSError:
        log(f"cannot notify host: {msg}")


def mount(source, target, fstype, flags=0, data=""):
    os.makedirs(target, exist_ok=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                  os.fsencode(data)) != 0:
        err = ctypes.get_errno()
        raise StepError(f"mount {fstype} on {target}: {os.strerror(err)}")


def bind(source, target, flags=0):
    """``mount --bind`` (MS_REC in ``flags`` for ``--rbind``); MS_RDONLY
    makes the bind read-only (a second, remount call)."""
    if libc.mount(source.encode(), target.encode(), None,
                  MS_BIND | (flags & MS_REC), None) != 0 or (
            flags & MS_RDONLY and libc.mount(
                None, target.encode(), None,
                MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0):
        err = ctypes.get_errno()
        raise StepError(f"bind {source} on {target}: {os.strerror(err)}")


def power_off(code):
    """Report ``code`` through /proc/exitcode and halt; never returns."""
    try:
        os.sync()
    except OSError:
        pass
    if not os.path.exists("/proc/exitcode"):  # failed before /proc was up
        libc.mount(b"proc", b"/proc", b"proc", 0, None)
    # clean file systems: no journal replay at the next boot of the image,
    # its COW, or an imported image's tree
    for fs in (IMAGE_ROOT, "/"):
        if (fs == "/" or os.path.ismount(fs)) and libc.mount(
                None, fs.encode(), None, MS_REMOUNT | MS_RDONLY, None) != 0:
            log(f"remount {fs} read-only: {os.strerror(ctypes.get_errno())}")
    for path, value in (("/proc/exitcode", f"{code}\n"),
                        ("/proc/sysrq-trigger", "o")):
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as e:
            log(f"cannot write {path}: {e}")
    time.sleep(5)  # sysrq power-off is asynchronous; if it did not happen:
    libc.reboot(0x4321FEDC)  # RB_POWER_OFF
    while True:  # PID 1 must not exit
        time.sleep(60)


# ---------------------------------------------------------------- the steps
def step_mount_basics(ctx):
    """1. Kernel file systems (/dev is devtmpfs, mounted by the kernel)."""
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
          "gid=5,mode=620,ptmxmode=666")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    os.makedirs(RUN, mode=0o755, exist_ok=True)


def step_read_control(ctx):
    """2. Read spec.json (and the changes archive) from the control disk."""
    try:
        with tarfile.open(CONTROL_DISK, "r:") as tar:
            for member in tar:
                if member.name == "spec.json":
                    ctx["spec"] = json.load(tar.extractfile(member))
                elif member.name.startswith("modules/") and member.isfile():
                    os.makedirs(os.path.join(RUN, "modules"), exist_ok=True)
                    copy_member(tar, member, os.path.join(
                        RUN, "modules", os.path.basename(member.name)))
                elif member.name == "changes.tar.gz":
                    ctx["changes"] = copy_member(
                        tar, member, os.path.join(RUN, "changes.tar.gz"))
    except (OSError, tarfile.TarError, ValueError) as e:
        raise StepError(f"cannot read control disk {CONTROL_DISK}: {e}") from e
    if "spec" not in ctx:
        raise StepError(f"no spec.json on control disk {CONTROL_DISK}")
    notify("booted")


def step_hostname(ctx):
    """3. Host name, /etc/hosts and the loopback interface."""
    spec = ctx["spec"]
    name = spec.get("hostname") or "apppot"
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(name)
    lan = spec.get("hosts", [])
    hosts = ["127.0.0.1\tlocalhost"]
    if name not in {host for _, host in lan}:  # on a LAN: its own address
        hosts.append(f"127.0.1.1\t{name}")
    hosts += [f"{ip}\t{host}" for ip, host in lan]
    write_file("/etc/hosts", "\n".join(hosts) + "\n")
    write_file("/etc/hostname", name + "\n")
    link_up("lo")


def step_merge_changes(ctx):
    """4. Merge a changes archive before users are mapped (it may hold
    /etc/passwd)."""
    if "changes" not in ctx:
        return
    import snap  # noqa: PLC0415  (sibling module in /usr/lib/apppot)

    try:
        stats = snap.merge(ctx["changes"])
    except (OSError, snap.SnapError, tarfile.TarError) as e:
        raise StepError(f"cannot merge changes archive: {e}") from e
    log(f"merged changes: {stats}")


def step_map_user(ctx):
    """5. A guest user with the caller's uid/gid (hostfs files keep host
    ids, so the job dir is writable and new files belong to the caller)."""
    spec = ctx["spec"]
    uid, gid = int(spec["uid"]), int(spec["gid"])
    ctx["user"] = map_user(uid, gid, spec.get("user") or "apppot",
                           spec.get("group") or "apppot")


def step_network(ctx):
    """6. Network: none, slirp (user-mode NAT to the host's loopback), or a
    plan of addresses the launcher computed (the MPI LAN)."""
    for dev in ctx["spec"].get("net", []):
        if dev.get("name"):  # vec0 of the hub transport becomes eth0
            rename_link(dev["device"], dev["name"])
        name = dev.get("name") or dev["device"]
        set_address(name, dev["address"])
        link_up(name)
        if dev.get("gateway"):
            add_default_route(dev["gateway"])
        if dev.get("resolv"):
            write_file("/etc/resolv.conf", dev["resolv"])


def step_mount_jobdir(ctx):
    """7. The job dir at its host path: through hostfs (the kernel's
    ``hostfs=`` prefix already points at it, so the mount names no path), or
    over 9P from the launcher's server when several appliances share it."""
    spec = ctx["spec"]
    jobdir = spec.get("jobdir")
    share = spec.get("jobdir_fs") or {"type": "hostfs"}
    if not jobdir:
        return
    if share["type"] == "9p":
        for name in share["modules"]:
            load_module(os.path.join(RUN, "modules", name))
        mount(share["server"], jobdir, "9p", MS_NODEV, share["options"])
    else:
        mount("none", jobdir, "hostfs", MS_NODEV)


def load_module(path):
    """insmod without kmod in the image (finit_module)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(313, fd, b"", 0) != 0:  # SYS_finit_module (x86_64)
            err = ctypes.get_errno()
            if err != 17:  # EEXIST: already loaded
                raise StepError(f"loading {os.path.basename(path)}: "
                                f"{os.strerror(err)}")
    finally:
        os.close(fd)


def step_image_root(ctx):
    """7b. An imported image (its tree on the third disk) becomes the
    program's root: AppPot runs from this system disk and needs nothing of
    the image (no Python, no shell).  Into the tree, resolved as a chroot
    would (a link in the image never leads a mount out of it): /proc, /sys,
    /dev, a fresh /tmp, /run/apppot (MPI files; the system disk read-only
    under /run/apppot/sysroot for apppot-rsh), /usr/lib/apppot, /etc/hosts,
    /etc/resolv.conf, /etc/hostname and the job dir; the job user in its
    /etc/passwd and /etc/group."""
    spec = ctx["spec"]
    image = spec.get("image_root")
    if not image:
        return
    root = IMAGE_ROOT
    mount(image["device"], root, "ext4")

    def inside(rel):
        path = in_tree(root, rel)
        os.makedirs(path, exist_ok=True)
        return path

    mount("proc", inside("proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", inside("sys"), "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    bind("/dev", inside("dev"), MS_REC)
    mount("tmpfs", inside("tmp"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    os.makedirs(SYSROOT, exist_ok=True)
    bind("/", SYSROOT, MS_RDONLY)
    bind(RUN, inside("run/apppot"), MS_REC)
    bind(LIB, inside("usr/lib/apppot"), MS_RDONLY)
    for rel in ("etc/hosts", "etc/resolv.conf", "etc/hostname"):
        if os.path.exists("/" + rel):
            inside("etc")
            target = in_tree(root, rel)
            if not os.path.lexists(target):
                open(target, "w").close()
            if os.path.isfile(target):
                bind("/" + rel, target)
    if spec.get("jobdir"):
        bind(spec["jobdir"], inside(spec["jobdir"]), MS_REC)
    if spec.get("cwd"):  # the image's WorkingDir, made if missing (Docker)
        inside(spec["cwd"])
    user = ctx["user"]
    add_account(root, user)
    home = in_tree(root, user["home"])
    if not os.path.isdir(home):
        os.makedirs(home, mode=0o755)
        os.chown(home, user["uid"], user["gid"])
    ctx["root"] = root
    user["shell"] = "/bin/sh"


def in_tree(root, rel):
    """``rel`` inside the tree ``root``, symlinks resolved as in a chroot at
    ``root`` (absolute targets start at it, ``..`` stops there).  The host's
    ``apppot.trust.resolve_in``; init carries its own copy (standard library
    only, nothing of the host package is in the guest)."""
    todo = [p for p in rel.split("/") if p not in ("", ".")]
    done, links = [], 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            done = done[:-1]
            continue
        here = os.path.join(root, *done, name)
        if os.path.islink(here):
            links += 1
            if links > 40:
                raise StepError(f"too many symbolic links at {rel!r}")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        done.append(name)
    return os.path.join(root, *done)


def add_account(root, user):
    """The job user and group in the tree's own /etc/passwd and /etc/group
    (programs look their user up there), unless the ids are there."""
    for rel, key, line in (
            ("etc/group", user["gid"], f"{user['name']}:x:{user['gid']}:"),
            ("etc/passwd", user["uid"],
             f"{user['name']}:x:{user['uid']}:{user['gid']}:AppPot job "
             f"user:{user['home']}:/bin/sh")):
        path = in_tree(root, rel)
        if not os.path.isdir(os.path.dirname(path)) or os.path.islink(path):
            continue
        if not any(fields[2:3] == [str(key)] for fields in (
                entry.split(":") for entry in read_db(path))):
            append_line(path, line)


def step_hooks(ctx):
    """8. Extra steps named by the spec (e.g. the MPI guest side)."""
    for name in ctx["spec"].get("hooks", []):
        module = __import__(name)
        module.run(ctx["spec"], ctx["user"], log)


def step_run(ctx):
    """9. Run the program with its exact argv, relay stdio, wait for it."""
    ctx["status"] = run_program(ctx["spec"], ctx["user"], ctx.get("root"))


def step_build(ctx):
    """Image build from a recipe: its commands as root (step_run), then,
    if they succeeded, the base state for ``apppot-snap``."""
    step_run(ctx)
    if ctx["status"] == 0:
        step_finalize(ctx)


def step_finalize(ctx):
    """Image build only: record the base state for ``apppot-snap``."""
    import snap  # noqa: PLC0415

    snap.record_base()
    log("base state recorded")
    ctx["status"] = 0


STEPS = [step_mount_basics, step_read_control, step_hostname,
         step_merge_changes, step_map_user, step_network, step_mount_jobdir,
         step_image_root, step_hooks, step_run]
FINALIZE_STEPS = [step_mount_basics, step_read_control, step_finalize]
BUILD_STEPS = [step_mount_basics, step_read_control, step_hostname,
               step_map_user, step_build]


# ------------------------------------------------------------------ helpers
def copy_member(tar, member, dest):
    with open(dest, "wb") as out:
        src = tar.extractfile(member)
        while chunk := src.read(1 << 20):
            out.write(chunk)
    return dest


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file(path, text, mode=0o644):
    tmp = path + ".apppot-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# Interfaces are configured with ioctls, not `ip`: a fork+exec costs ~50 ms
# under UML, and every appliance boot would pay it per command.
SIOCADDRT, SIOCGIFFLAGS, SIOCSIFFLAGS = 0x890B, 0x8913, 0x8914
SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFNAME = 0x8916, 0x891C, 0x8923


def _ioctl(request, arg):
    import fcntl  # noqa: PLC0415
    import socket  # noqa: PLC0415

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s, request, arg)


def _sockaddr_in(ip):
    import socket  # noqa: PLC0415

    return struct.pack("=H2x4s8x", socket.AF_INET, socket.inet_aton(ip))


def link_up(ifname):
    """``ip link set IF up``."""
    req = struct.pack("16sH14x", ifname.encode(), 0)
    flags = struct.unpack_from("16sH", _ioctl(SIOCGIFFLAGS, req))[1]
    _ioctl(SIOCSIFFLAGS, struct.pack("16sH14x", ifname.encode(), flags | 1))


def rename_link(old, new):
    """``ip link set OLD name NEW`` (the link is still down)."""
    _ioctl(SIOCSIFNAME, struct.pack("16s16s8x", old.encode(), new.encode()))


def set_address(ifname, cidr):
    """``ip addr add A/N dev IF``."""
    ip, _, bits = cidr.partition("/")
    mask = (0xFFFFFFFF << (32 - int(bits))) & 0xFFFFFFFF
    name = ifname.encode().ljust(16, b"\0")
    _ioctl(SIOCSIFADDR, name + _sockaddr_in(ip))
    _ioctl(SIOCSIFNETMASK, name + _sockaddr_in(
        ".".join(str(mask >> s & 0xFF) for s in (24, 16, 8, 0))))


class _Sockaddr(ctypes.Structure):
    _fields_ = [("data", ctypes.c_ubyte * 16)]


class _Rtentry(ctypes.Structure):  # struct rtentry (linux/route.h)
    _fields_ = [("pad1", ctypes.c_ulong), ("dst", _Sockaddr),
                ("gateway", _Sockaddr), ("genmask", _Sockaddr),
                ("flags", ctypes.c_ushort), ("pad2", ctypes.c_short),
                ("pad3", ctypes.c_ulong), ("pad4", ctypes.c_void_p),
                ("metric", ctypes.c_short), ("dev", ctypes.c_char_p),
                ("mtu", ctypes.c_ulong), ("window", ctypes.c_ulong),
                ("irtt", ctypes.c_ushort)]


def add_default_route(gateway):
    """``ip route add default via GATEWAY``."""
    any_addr = _Sockaddr.from_buffer_copy(_sockaddr_in("0.0.0.0"))  # noqa: S104
    rt = _Rtentry(dst=any_addr, genmask=any_addr, flags=0x1 | 0x2,
                  gateway=_Sockaddr.from_buffer_copy(_sockaddr_in(gateway)))
    # flags: RTF_UP | RTF_GATEWAY
    _ioctl(SIOCADDRT, bytes(rt))


def read_db(path):
    try:
        with open(path) as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        return []


def map_user(uid, gid, name, group):
    """Ensure passwd/group entries for uid/gid; remember what we added so
    ``apppot-snap changes`` can leave it out."""
    added = {}
    groups = read_db("/etc/group")
    if not any(line.split(":")[2:3] == [str(gid)] for line in groups):
        taken = {line.split(":")[0] for line in groups}
        gname = group if group not in taken else f"g{gid}"
        line = f"{gname}:x:{gid}:"
        append_line("/etc/group", line)
        added["/etc/group"] = [line]
        if os.path.exists("/etc/gshadow"):
            append_line("/etc/gshadow", f"{gname}:!::")
            added["/etc/gshadow"] = [f"{gname}:!::"]
    passwd = read_db("/etc/passwd")
    entry = next((line.split(":") for line in passwd
                  if line.split(":")[2:3] == [str(uid)]), None)
    if entry is None:
        taken = {line.split(":")[0] for line in passwd}
        uname = name if name not in taken else f"u{uid}"
        home = f"/home/{uname}"
        entry = [uname, "x", str(uid), str(gid), "AppPot job user", home,
                 "/bin/bash"]
        append_line("/etc/passwd", ":".join(entry))
        added["/etc/passwd"] = [":".join(entry)]
        if os.path.exists("/etc/shadow"):
            append_line("/etc/shadow", f"{uname}:*:19000:0:99999:7:::")
            added["/etc/shadow"] = [f"{uname}:*:19000:0:99999:7:::"]
    uname, home = entry[0], entry[5]
    if not os.path.isdir(home):
        os.makedirs(home, mode=0o755)
        added["created"] = [home]  # not part of the user's changes
    if uid != 0:
        os.chown(home, uid, gid)
    if uid != 0 and os.path.isdir("/etc/sudoers.d"):
        write_file("/etc/sudoers.d/apppot", f"{uname} ALL=(ALL) NOPASSWD: ALL\n",
                   0o440)
    write_file(os.path.join(RUN, "added.json"), json.dumps(added))
    shell = entry[6]
    if not shell or shell.endswith(("nologin", "false")) or not os.path.exists(
            shell):  # system accounts (nobody) still get a working shell
        shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    return {"name": uname, "uid": uid, "gid": gid, "home": home,
            "shell": shell}


def append_line(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


def open_raw(path, flags):
    fd = os.open(path, flags | os.O_NOCTTY)
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return fd


def pump(src, dst, drain_tty=False):
    """Copy src to dst until EOF, then close dst (a thread per stream)."""
    try:
        while data := os.read(src, 65536):
            write_all(dst, data)
    except OSError:
        pass
    finally:
        if drain_tty:
            try:
                termios.tcdrain(dst)
            except termios.error:
                pass
        os.close(dst)


def unframe(src, dst):
    """Host stdin arrives framed so EOF is exact (a UML tty hangup would
    flush unread input)."""
    buf = b""
    try:
        while True:
            while len(buf) < FRAME.size:
                data = os.read(src, 65536)
                if not data:
                    return
                buf += data
            (size,) = FRAME.unpack_from(buf)
            if size == 0:
                return
            while len(buf) < FRAME.size + size:
                data = os.read(src, 65536)
                if not data:
                    return
                buf += data
            write_all(dst, memoryview(buf)[FRAME.size:FRAME.size + size])
            buf = buf[FRAME.size + size:]
    except OSError:
        pass  # the program closed its stdin: stop feeding it
    finally:
        os.close(dst)


def program_env(spec, user):
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        if user["uid"] == 0 else "/usr/local/bin:/usr/bin:/bin",
        "HOME": user["home"], "USER": user["name"], "LOGNAME": user["name"],
        "SHELL": user["shell"], "LANG": "C.UTF-8",
    }
    if spec.get("jobdir"):
        env["PWD"] = spec["jobdir"]
    raw = {bytes.fromhex(k): bytes.fromhex(v)
           for k, v in spec.get("env", {}).items()}
    out = {k.encode(): v.encode() for k, v in env.items()}
    out.update(raw)
    return out


def resolve_argv(spec, user):
    argv = [bytes.fromhex(a) for a in spec.get("argv", [])]
    if argv:
        return argv
    jobdir = spec.get("jobdir")
    script = os.path.join(jobdir, "apppot-run") if jobdir else None
    if script and os.access(script, os.X_OK):  # as in 2012: ./apppot-run
        return [script.encode()]
    return [user["shell"].encode(), b"-l"] if spec.get(
        "interactive") else [user["shell"].encode()]


def run_program(spec, user, root=None):
    interactive = bool(spec.get("interactive"))
    argv = resolve_argv(spec, user)
    env = program_env(spec, user)
    cwd = spec.get("cwd") or spec.get("jobdir") or user["home"]

    if interactive:
        term = open_tty_cooked("/dev/ttyS0", spec.get("winsize"))
        child_fds = (term, term, term)
        threads = []
    else:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe()
        tty_out = open_raw("/dev/ttyS0", os.O_WRONLY)
        tty_err = open_raw("/dev/ttyS1", os.O_WRONLY)
        tty_in = open_raw("/dev/ttyS2", os.O_RDONLY)
        threads = [
            threading.Thread(target=pump, args=(out_r, tty_out),
                             kwargs={"drain_tty": True}, daemon=True),
            threading.Thread(target=pump, args=(err_r, tty_err),
                             kwargs={"drain_tty": True}, daemon=True),
            threading.Thread(target=unframe, args=(tty_in, in_w), daemon=True),
        ]
        child_fds = (in_r, out_w, err_w)

    notify(f"ready {time.monotonic() - T0:.3f}")
    pid = os.fork()
    if pid == 0:  # the program: never returns
        exec_program(argv, env, cwd, user, child_fds, interactive, root)
    for fd in set(child_fds):
        os.close(fd)
    for t in threads:
        t.start()
    if not interactive:
        notify("stdin")  # tty open: the host may send stdin now

    status = wait_for(pid)
    deadline = time.monotonic() + DRAIN_SECONDS
    for t in threads[:2]:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads[:2]):
        stop_leftovers()  # a daemon still holds stdout: end it, then drain
        for t in threads[:2]:
            t.join(1.0)
    return status


def open_tty_cooked(path, winsize):
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    if winsize:
        import fcntl  # noqa: PLC0415

        fcntl.ioctl(fd, termios.TIOCSWINSZ,
                    struct.pack("HHHH", winsize[0], winsize[1], 0, 0))
    return fd


def exec_program(argv, env, cwd, user, fds, interactive, root=None):
    try:
        os.setsid()
        if interactive:
            import fcntl  # noqa: PLC0415

            fcntl.ioctl(fds[0], termios.TIOCSCTTY, 0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, 65536)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.initgroups(user["name"], user["gid"])  # from the system's files
        if root:  # an imported image: its tree is the program's /
            # os.execvpe imports warnings for its PATH search: import it
            # while this Python's library is still reachable
            import warnings  # noqa: F401, PLC0415
            os.chroot(root)
        os.setgid(user["gid"])
        os.setuid(user["uid"])
        try:
            os.chdir(cwd)
        except OSError as e:
            os.write(2, f"apppot: cannot enter {cwd!r}: {e.strerror}\n"
                     .encode())
            os._exit(126)
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        msg, code = "command not found", 127
    except PermissionError:
        msg, code = "permission denied", 126
    except OSError as e:
        msg, code = e.strerror, 126
    except BaseException as e:  # noqa: BLE001  never return into init's code
        msg, code = f"{type(e).__name__}: {e}", 126
    name = argv[0].decode(errors="replace")
    os.write(2, f"apppot: cannot run {name!r}: {msg}\n".encode())
    os._exit(code)


def wait_for(pid):
    """Reap every child (PID 1 adopts orphans) until ``pid`` exits."""
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code


def stop_leftovers():
    """SIGTERM then SIGKILL every process the job left (daemons)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(-1, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.05)
            except ChildProcessError:
                return


def main():
    ctx = {}
    steps = STEPS
    try:
        step_mount_basics(ctx)
        step_read_control(ctx)
        action = ctx["spec"].get("action")
        if action == "finalize":
            steps = FINALIZE_STEPS
        elif action == "build":
            steps = BUILD_STEPS
        for step in steps[2:]:
            log(step.__name__)
            step(ctx)
        code = ctx.get("status", 1)
    except Exception as e:  # noqa: BLE001  PID 1 must report, not die
        log("".join(traceback.format_exception(e)))
        notify(f"fail {e}")
        code = EXIT_BOOT
    else:
        notify(f"exit {code}")
    stop_leftovers()
    log(f"power off, status {code}")
    power_off(code)


if __name__ == "__main__":
    if os.getpid() != 1:
        sys.exit("apppot-init: must run as PID 1 inside an appliance")
    sys.path.insert(0, LIB)
    main()
