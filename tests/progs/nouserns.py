"""Run a command as UID:GID on a host "without user namespaces".

    python3 nouserns.py UID GID COMMAND...   (as root)

The command runs in a user namespace that maps root and UID/GID to
themselves and forbids creating further user namespaces
(user.max_user_namespaces = 0 there, a per-namespace limit), as on clusters
where unprivileged user namespaces are disabled.  Everything else (the
file system, the network namespace) is the host's.
"""

import ctypes
import os
import sys

CLONE_NEWUSER = 0x10000000


def main():
    uid, gid, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    ready_r, ready_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(mapped_w)
        if libc.unshare(CLONE_NEWUSER) != 0:
            os._exit(90)
        os.write(ready_w, b"x")
        os.read(mapped_r, 1)  # the parent wrote our maps
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        os.execvp(argv[0], argv)
    os.close(ready_w)
    os.close(mapped_r)
    os.read(ready_r, 1)
    for name, ident in (("uid_map", uid), ("gid_map", gid)):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 0 1\n{ident} {ident} 1\n")
    os.write(mapped_w, b"x")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
