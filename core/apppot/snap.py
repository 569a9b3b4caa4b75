#!/usr/bin/python3 -IB
"""apppot-snap: record an appliance's base state, pack the changes since, merge.

Runs inside the appliance, as root, with the standard library only (it is
copied into the image as ``/usr/lib/apppot/snap.py``)::

    sudo apppot-snap base                 # done once at image build time
    sudo apppot-snap changes -o my.changes.tar.gz
    sudo apppot-snap merge my.changes.tar.gz

The base state is a manifest of every path on the root file system (type,
mode, owner, size, mtime, ctime, link target).  ``changes`` compares the live
tree with it: a path is changed when any of those differ; ctime catches edits
that restored mtime.  The archive is a gzip tar whose first member,
``.apppot-changes.json``, lists deleted paths, so a merge replays deletions.
Entries that init adds at every boot (the job user in /etc/passwd...) are left
out, so an archive only carries what the user did.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import sys
import tarfile
import time

STATE_DIR = "/var/lib/apppot"
BASE = os.path.join(STATE_DIR, "base.json.gz")
ADDED = "/run/apppot/added.json"  # written by init: lines/paths it added
META = ".apppot-changes.json"
FORMAT = 1
# Never part of a changes archive: kernel and scratch file systems, caches,
# files init rewrites at every boot, AppPot itself.
EXCLUDE = (
    "/dev", "/proc", "/sys", "/run", "/tmp", "/mnt", "/media", "/lost+found",
    "/var/tmp", "/var/log", "/var/cache/apt", "/var/lib/apt/lists",
    "/var/lib/apppot", "/usr/lib/apppot", "/etc/hostname", "/etc/hosts",
    "/etc/mtab", "/etc/resolv.conf", "/etc/sudoers.d/apppot",
    "/root/.bash_history", "/root/.python_history",
)
# Files init edits by appending lines; they are compared without those lines.
ACCOUNT_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")


class SnapError(Exception):
    """A user-facing failure: one line, plus a hint."""

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.hint = hint


# ------------------------------------------------------------ pure helpers
def excluded(path, exclude=EXCLUDE):
    return any(path == e or path.startswith(e + "/") for e in exclude)


def entry_of(path, st):
    """The manifest record of one path (a list, so it round-trips JSON)."""
    kind = stat.S_IFMT(st.st_mode)
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    size = st.st_size if stat.S_ISREG(st.st_mode) else 0
    return [kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size,
            st.st_mtime_ns, st.st_ctime_ns, link]


def diff(base, now):
    """Compare two manifests: (added_or_changed, deleted), both sorted.

    A deleted directory hides its deleted children: one rmtree replays them.
    """
    changed = sorted(p for p, e in now.items() if base.get(p) != e)
    gone = sorted(p for p in base if p not in now)
    deleted, last = [], None
    for p in gone:
        if last is not None and p.startswith(last + "/"):
            continue
        deleted.append(p)
        last = p
    return changed, deleted


def without_lines(text, lines):
    drop = set(lines)
    return "".join(line for line in text.splitlines(keepends=True)
                   if line.rstrip("\n") not in drop)


def safe_member_name(name):
    """Archive member name → absolute path, refusing escapes."""
    norm = os.path.normpath("/" + name.lstrip("./"))
    if name.startswith("/") or ".." in name.split("/") or norm == "/":
        raise SnapError(f"unsafe path in changes archive: {name!r}",
                        "only archives made by apppot-snap can be merged")
    return norm


# ------------------------------------------------------------ file system
def scan(root="/", exclude=EXCLUDE):
    """Manifest of the root file system (one file system only)."""
    root_dev = os.lstat(root).st_dev
    manifest = {}
    stack = [root]
    while stack:
        top = stack.pop()
        try:
            names = os.listdir(top)
        except OSError:
            continue
        for name in names:
            path = os.path.join(top, name)
            if excluded(path, exclude):
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if st.st_dev != root_dev:  # a mount point (hostfs job dir...)
                continue
            manifest[path] = entry_of(path, st)
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
    return manifest


def account_digests(added):
    """sha256 of the account files as they are without init's additions."""
    out = {}
    for path in ACCOUNT_FILES:
        try:
            with open(path) as f:
                text = without_lines(f.read(), added.get(path, []))
        except FileNotFoundError:
            continue
        out[path] = hashlib.sha256(text.encode()).hexdigest()
    return out


def load_added():
    try:
        with open(ADDED) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def record_base(path=BASE):
    manifest = scan()
    data = {"format": FORMAT, "created": time.time(), "manifest": manifest,
            "accounts": account_digests({})}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with gzip.open(tmp, "wt") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    return len(manifest)


def load_base(path=BASE):
    try:
        with gzip.open(path, "rt") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SnapError(f"no base state at {path}",
                        "run 'apppot-snap base' first (image builds do)") from None
    raw = json.dumps(data["manifest"], sort_keys=True).encode()
    data["id"] = hashlib.sha256(raw).hexdigest()[:16]
    return data


def pack(out, base_path=BASE, dry_run=False):
    """Write every change since the base into ``out``; return a summary."""
    base = load_base(base_path)
    added = load_added()
    skip = set(added.get("created", []))
    now = {p: e for p, e in scan().items() if p not in skip}
    digests = account_digests(added)
    for path in ACCOUNT_FILES:  # init's own lines do not count as a change
        if (path in now and path in base["manifest"]
                and digests.get(path) == base["accounts"].get(path)):
            now[path] = base["manifest"][path]
    out_abs = os.path.abspath(out)
    changed, deleted = diff(base["manifest"], now)
    changed = [p for p in changed if p not in (out_abs, out_abs + ".tmp")]
    summary = {"changed": len(changed), "deleted": len(deleted)}
    if dry_run:
        for p in changed:
            print(f"changed {p}")
        for p in deleted:
            print(f"deleted {p}")
        return summary
    meta = json.dumps({"format": FORMAT, "base": base["id"],
                       "deleted": [p.lstrip("/") for p in deleted],
                       "created": time.time()}).encode()
    tmp = out_abs + ".tmp"
    try:
        with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(META)
            info.size, info.mtime = len(meta), int(time.time())
            tar.addfile(info, io.BytesIO(meta))
            for path in changed:
                add_path(tar, path, added)
        os.replace(tmp, out_abs)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return summary


def add_path(tar, path, added):
    info = tar.gettarinfo(path, arcname=path.lstrip("/"))
    if path in ACCOUNT_FILES and added.get(path):
        with open(path) as f:
            data = without_lines(f.read(), added[path]).encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    elif info.isreg():
        with open(path, "rb") as f:
            tar.addfile(info, f)
    else:
        tar.addfile(info)


def remove(path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def merge(archive):
    """Replay a changes archive onto the live root: deletions, then files."""
    with tarfile.open(archive, "r:*") as tar:
        first = tar.next()
        if first is None or first.name != META:
            raise SnapError(f"{archive!r} is not an apppot-snap changes archive",
                            "make one with 'apppot-snap changes'")
        meta = json.load(tar.extractfile(first))
        if meta.get("format") != FORMAT:
            raise SnapError(f"unsupported changes format {meta.get('format')!r}")
        for path in meta["deleted"]:
            remove(safe_member_name(path))
        count, dirs = 0, []
        for member in tar:
            target = safe_member_name(member.name)
            try:
                st = os.lstat(target)
                if member.isdir() != stat.S_ISDIR(st.st_mode) or (
                        not member.isdir()):
                    remove(target)  # type changed, or a file to replace
            except FileNotFoundError:
                pass
            tar.extract(member, "/", set_attrs=True, numeric_owner=True,
                        **extract_filter())
            if member.isdir():
                dirs.append(member)
            count += 1
        for member in reversed(dirs):  # children changed the mtimes
            os.utime(safe_member_name(member.name), ns=(
                int(member.mtime * 1e9), int(member.mtime * 1e9)))
    return {"extracted": count, "deleted": len(meta["deleted"])}


def extract_filter():
    # Python >= 3.12 (and security updates of older ones) warn without a
    # filter; names are already checked by safe_member_name.
    return {"filter": "fully_trusted"} if hasattr(
        tarfile, "fully_trusted_filter") else {}


# --------------------------------------------------------------------- CLI
def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="apppot-snap",
        description="Record the appliance's base state, pack the changes "
        "made since into one archive, or merge such an archive.")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="list what 'changes' would pack, write nothing")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("base", help="record the current state as the base")
    ch = sub.add_parser("changes", help="pack all changes since the base")
    ch.add_argument("-o", "--output", default="apppot.changes.tar.gz",
                    help="archive to write (default: %(default)s in the "
                    "current directory)")
    mg = sub.add_parser("merge", help="apply a changes archive")
    mg.add_argument("archive")
    args = parser.parse_args(argv)
    try:
        if os.geteuid() != 0:
            raise SnapError("apppot-snap must run as root in the appliance",
                            f"use: sudo apppot-snap {args.action}")
        if args.action == "base":
            print(f"base state recorded: {record_base()} paths")
        elif args.action == "changes":
            s = pack(args.output, dry_run=args.dry_run)
            if not args.dry_run:
                print(f"saved {s['changed']} changed and {s['deleted']} "
                      f"deleted paths to {args.output}")
        else:
            s = merge(args.archive)
            print(f"merged {s['extracted']} paths, deleted {s['deleted']}")
    except SnapError as e:
        print(f"apppot-snap: error: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    except (OSError, tarfile.TarError) as e:
        print(f"apppot-snap: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
