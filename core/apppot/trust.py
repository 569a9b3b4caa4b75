"""What AppPot may execute, preload or write through.

A cached kernel, library or root file system is only as trustworthy as the
directories it lives in: anyone who can write one of them can swap it.  So
before a cached binary is executed or preloaded, it and every directory
above it must belong to root or to the caller and be writable by nobody
else (a root-owned sticky directory such as /tmp is fine: others cannot
replace what is ours in it).  Root trusts only what root owns.

Image trees are written as a chroot would see them: ``resolve_in`` follows
symlinks inside the tree, so a link such as ``etc -> /etc`` in an image can
never make a build write to the host.
"""

import os
import stat
from pathlib import Path, PurePosixPath

from .errors import ConfigError

MAX_LINKS = 40  # as the kernel's path walk


def _owners(euid):
    return {0} if euid == 0 else {0, euid}


def _why_unsafe(path, euid):
    """None if ``path`` (not following a final symlink) is safe, else why."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"cannot stat {str(path)!r} ({e.strerror})"
    if st.st_uid not in _owners(euid):
        return f"{str(path)!r} belongs to uid {st.st_uid}"
    sticky_root = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX \
        and st.st_uid == 0
    if st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode) and not sticky_root:
        return f"{str(path)!r} is writable by group or others"
    return None


def unsafe_reason(path, euid=None):
    """Why ``path`` must not be trusted (see the module docstring), or None.
    Both the path as given and its real location are checked, with every
    directory above them."""
    euid = os.geteuid() if euid is None else euid
    path = Path(os.path.abspath(path))
    for p in dict.fromkeys((path, Path(os.path.realpath(path)))):
        for part in (p, *p.parents):
            why = _why_unsafe(part, euid)
            if why:
                return why
    return None


def check_trusted(path, what, euid=None, error=ConfigError):
    """Raise ``error`` unless ``path`` may be executed or preloaded."""
    why = unsafe_reason(path, euid)
    if why:
        raise error(f"{what} {str(path)!r} is not safe to use: {why}",
                          hint="keep caches in directories only you (or "
                          "root) can write; as root, only root-owned ones")
    return Path(path)


def check_cache_home(home, euid=None):
    """As root, a cache home (kernels, images, root file systems) must be
    root's alone: an image or kernel from a user's cache would run with
    root's rights.  Homes that do not exist yet are fine."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0 or not os.path.lexists(home):
        return home
    return check_trusted(home, "as root, cache directory", euid)


def resolve_in(root, rel):
    """Where ``rel`` (a path inside the image tree ``root``) leads, with
    symlinks resolved as inside a chroot at ``root``: absolute targets start
    at ``root`` and ``..`` stops there.  Missing components are taken as
    they are (the caller creates them)."""
    root = Path(root)
    todo = [p for p in PurePosixPath(rel).parts if p not in ("/", "", ".")]
    done, links = [], 0
    while todo:
        name = todo.pop(0)
        if name in (".", ""):
            continue
        if name == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, name)
        if here.is_symlink():
            links += 1
            if links > MAX_LINKS:
                raise ConfigError(f"too many symbolic links under "
                                  f"{str(root)!r} at {rel!r}",
                                  hint="the image tree is damaged; rebuild it")
            target = PurePosixPath(os.readlink(here))
            if target.is_absolute():
                done = []
            todo = [p for p in target.parts if p != "/"] + todo
            continue
        done.append(name)
    return root.joinpath(*done)
