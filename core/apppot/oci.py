"""apppot-image import: an OCI or Docker image as an AppPot user tree.

    apppot-image import ARCHIVE [--output IMG] [--ref NAME]
    apppot-image import docker://REGISTRY/NAME:TAG [--insecure-registry]

ARCHIVE is a ``docker save`` / ``podman save`` archive (docker-archive:
``manifest.json`` plus layer tars), or an OCI image layout (``oci-layout``,
``index.json``, ``blobs/``), as a directory or a tar (gzip-compressed
outer tars too).  A ``docker://`` reference is pulled from its registry
first, into an OCI layout in a private temporary directory, with
``skopeo copy`` (no daemon, no root needed for the pull; the registry's
credentials as skopeo finds them, e.g. ``$REGISTRY_AUTH_FILE``).
``--insecure-registry`` accepts plain HTTP or an unverified certificate
(a registry on localhost).  The layers are applied in order into an empty tree, with
the whiteouts of the OCI image spec (``.wh.NAME`` deletes NAME of the
layers below, ``.wh..wh..opq`` empties its directory of them), modes,
ownership, hard links, symlinks and file capabilities (xattrs) kept;
device nodes are skipped (the guest makes its own /dev).  Every digest is
checked.  The tree becomes an ext4 image with nothing of AppPot inside; its
config (Env, Entrypoint, Cmd, User, WorkingDir) and the MPI found in it go
into the stamp next to it (``IMG.json``), which apppot-start and
apppot-mpirun read: see ``apppot.runtime``.

Unsafe archives are refused with one line naming the layer and the path:
absolute names, ``..`` components, symlinks whose relative target climbs
above the tree, hard links to anything but a file already in the tree,
whiteouts of ``.`` or ``..``.  Writes through symlinks inside the tree are
resolved as in a chroot (``trust.resolve_in``), so nothing lands outside it.
"""

import gzip
import hashlib
import json
import os
import platform
import posixpath
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import BuildError, ConfigError
from .trust import resolve_in

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}
# where MPI launchers and libraries of Debian, Ubuntu, Fedora, Alpine and
# Spack-like /usr/local installs are found (detect_mpi)
MPI_MARKERS = {
    "openmpi": ("usr/bin/ompi_info", "usr/bin/orterun", "usr/bin/prterun",
                "usr/local/bin/ompi_info", "usr/lib64/openmpi/bin/ompi_info"),
    "mpich": ("usr/bin/mpiexec.hydra", "usr/local/bin/mpiexec.hydra",
              "usr/lib64/mpich/bin/mpiexec.hydra"),
}


class ImportError_(BuildError):  # noqa: N801  (not the builtin ImportError)
    """An image archive is malformed or unsafe."""


def unsafe(layer, path, why):
    return ImportError_(f"{layer}: unsafe path {path!r} ({why}); "
                        "nothing imported", hint="the archive is damaged or "
                        "hostile; rebuild the image with a trusted tool")


# ------------------------------------------------------------ reading archives
class Source:
    """Files of an image archive: a directory or a tar (read in place)."""

    def __init__(self, path):
        self.path = Path(path)
        self.tar = None
        self.members = {}
        if self.path.is_dir():
            return
        try:
            self.tar = tarfile.open(self.path, "r:*")  # noqa: SIM115
            for m in self.tar.getmembers():
                self.members[posixpath.normpath(m.name.lstrip("/"))] = m
        except (OSError, tarfile.TarError) as e:
            raise ImportError_(f"cannot read image archive {str(path)!r} "
                               f"({e})", hint="give a docker save / podman "
                               "save archive or an OCI image layout") from None

    def exists(self, name):
        if self.tar is None:
            return (self.path / name).is_file()
        return name in self.members

    def open(self, name):
        if self.tar is None:
            full = resolve_in(self.path, name)  # a layout dir is data too
            return open(full, "rb")
        m = self.members.get(posixpath.normpath(name))
        while m is not None and m.issym():  # docker save links equal layers
            target = posixpath.normpath(posixpath.join(
                posixpath.dirname(m.name), m.linkname))
            m = self.members.get(target)
        f = self.tar.extractfile(m) if m is not None else None
        if f is None:
            raise ImportError_(f"image archive {str(self.path)!r} has no "
                               f"file {name!r}", hint="the archive is "
                               "incomplete")
        return f

    def json(self, name, digest=None):
        with self.open(name) as f:
            data = f.read(64 << 20)
        if digest and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ImportError_(f"{name}: digest mismatch (want {digest})",
                               hint="the archive is damaged")
        try:
            return json.loads(data)
        except ValueError as e:
            raise ImportError_(f"{name}: not JSON ({e})",
                               hint="the archive is damaged") from None

    def close(self):
        if self.tar is not None:
            self.tar.close()


@dataclass(frozen=True)
class Layer:
    name: str  # file in the archive
    digest: str | None  # of the blob as stored (OCI), if known
    diff_id: str | None  # of the uncompressed tar (the config's rootfs)
    label: str  # for messages: "layer 2 (sha256:abcd...)"


@dataclass(frozen=True)
class ImageRef:
    config: dict
    layers: tuple
    format: str  # docker-archive | oci-layout
    tags: tuple = ()
    manifest_digest: str | None = None


def _blob(digest):
    algo, _, hexd = str(digest).partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(
            c in "0123456789abcdef" for c in hexd):
        raise ImportError_(f"unsupported or malformed digest {digest!r}",
                           hint="only sha256 digests are supported")
    return f"blobs/sha256/{hexd}"


def _short(digest):
    return (digest or "")[:19]


def read_image(src, ref=None):
    """The image's config and layers, from a docker-archive or OCI layout."""
    if src.exists("manifest.json"):
        return _read_docker(src, ref)
    if src.exists("index.json"):
        return _read_oci(src, ref)
    raise ImportError_(f"{str(src.path)!r} is neither a docker save archive "
                       "nor an OCI image layout (no manifest.json or "
                       "index.json)", hint="docker save IMG -o x.tar, podman "
                       "save IMG -o x.tar, or an OCI layout (skopeo copy ... "
                       "oci:DIR)")


def _pick(entries, ref, name_of, what):
    if ref is not None:
        entries = [e for e in entries if ref in name_of(e)]
    if len(entries) == 1:
        return entries[0]
    names = sorted({n for e in entries for n in name_of(e)}) or ["(untagged)"]
    if not entries:
        raise ImportError_(f"no image {ref!r} in the {what}",
                           hint=f"images in it: {', '.join(names)}")
    raise ImportError_(f"the {what} holds {len(entries)} images",
                       hint=f"pick one with --ref: {', '.join(names)}")


def _read_docker(src, ref):
    manifest = src.json("manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ImportError_("manifest.json: not a docker save manifest",
                           hint="the archive is damaged")
    entry = _pick(manifest, ref, lambda e: tuple(e.get("RepoTags") or ()),
                  "docker archive")
    config_name = entry.get("Config")
    config = src.json(config_name)
    digest = None
    if config_name.startswith("blobs/sha256/"):  # docker 25+: OCI inside
        digest = "sha256:" + config_name.rsplit("/", 1)[1]
    elif config_name.endswith(".json") and len(config_name) == 69:
        digest = "sha256:" + config_name[:-5]
    if digest:
        src.json(config_name, digest)  # check it
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    names = entry.get("Layers") or []
    if len(diff_ids) != len(names):
        raise ImportError_(f"{config_name}: {len(diff_ids)} diff_ids for "
                           f"{len(names)} layers", hint="the archive is "
                           "damaged")
    layers = tuple(Layer(n, None, d, f"layer {i + 1} ({_short(d)})")
                   for i, (n, d) in enumerate(zip(names, diff_ids,
                                                  strict=True)))
    return ImageRef(config, layers, "docker-archive",
                    tuple(entry.get("RepoTags") or ()))


def _read_oci(src, ref):
    if src.exists("oci-layout"):
        version = src.json("oci-layout").get("imageLayoutVersion")
        if version != "1.0.0":
            raise ImportError_(f"oci-layout: version {version!r}",
                               hint="only OCI image layout 1.0.0 is known")
    index = src.json("index.json")
    arch = GOARCH.get(platform.machine(), platform.machine())
    for _ in range(4):  # nested indexes (multi-platform images)
        manifests = [m for m in index.get("manifests", []) if (
            m.get("platform") or {}).get("architecture", arch) == arch]
        desc = _pick(manifests, ref, lambda m: tuple(filter(None, [
            (m.get("annotations") or {}).get("org.opencontainers.image."
                                             "ref.name")])), "OCI layout")
        body = src.json(_blob(desc["digest"]), desc["digest"])
        if desc.get("mediaType") in INDEX_TYPES or "manifests" in body:
            index, ref = body, None
            continue
        break
    else:
        raise ImportError_("OCI layout: indexes nested too deep",
                           hint="the archive is damaged")
    config = src.json(_blob(body["config"]["digest"]), body["config"]["digest"])
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    descs = body.get("layers", [])
    if len(diff_ids) != len(descs):
        raise ImportError_(f"manifest {_short(desc['digest'])}: "
                           f"{len(diff_ids)} diff_ids for {len(descs)} layers",
                           hint="the archive is damaged")
    layers = tuple(Layer(_blob(d["digest"]), d["digest"], i_d,
                         f"layer {i + 1} ({_short(d['digest'])})")
                   for i, (d, i_d) in enumerate(zip(descs, diff_ids,
                                                    strict=True)))
    tag = (desc.get("annotations") or {}).get(
        "org.opencontainers.image.ref.name")
    return ImageRef(config, layers, "oci-layout", (tag,) if tag else (),
                    desc["digest"])


class Hashing:
    """A read-only stream that hashes what passes through."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()

    def read(self, n=-1):
        data = self.raw.read(n)
        self.sha.update(data)
        return data

    def drain(self):
        while self.read(1 << 20):
            pass
        return "sha256:" + self.sha.hexdigest()


def open_layer(src, layer):
    """(tar stream, outer hasher, inner hasher) of a layer blob."""
    raw = src.open(layer.name)
    outer = Hashing(raw)
    head = raw.peek(4)[:4]  # files and tar members are BufferedReaders
    if head.startswith(ZSTD_MAGIC):
        raise ImportError_(f"{layer.label}: zstd-compressed layers are not "
                           "supported", hint="save the image with gzip "
                           "layers (docker save, skopeo copy --dest-compress"
                           "-format gzip)")
    inner = Hashing(gzip.GzipFile(fileobj=outer)) if head.startswith(
        GZIP_MAGIC) else outer
    return tarfile.open(fileobj=inner, mode="r|"), outer, inner


# ------------------------------------------------------------ applying layers
@dataclass
class Stats:
    files: int = 0
    dirs: int = 0
    links: int = 0
    whiteouts: int = 0
    devices: int = 0
    bytes: int = 0
    skipped: list = field(default_factory=list)


def clean_name(layer, name):
    """The member's path relative to the root, or an ``unsafe`` error."""
    if name.startswith("/"):
        raise unsafe(layer, name, "absolute name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise unsafe(layer, name, "'..' component")
    return "/".join(parts)


def link_leaves(rel, target):
    """Does a symlink at ``rel`` with a relative ``target`` climb above the
    root (lexically, as the kernel would before reaching a chroot's /)?"""
    if target.startswith("/"):
        return False  # absolute: the image's own root at run time
    depth = len(rel.split("/")) - 1
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()


def _prune(directory, keep, rel):
    """Opaque directory: remove what lower layers put under ``directory``,
    keeping what this layer wrote (``keep``: relative paths)."""
    for entry in list(directory.iterdir()):
        sub = f"{rel}/{entry.name}" if rel else entry.name
        if sub in keep:
            if entry.is_dir() and not entry.is_symlink():
                _prune(entry, keep, sub)
            continue
        remove(entry)


def apply_layer(root, tar, label, stats=None):
    """Apply one layer (a tarfile in stream mode) onto ``root``."""
    root = Path(root)
    stats = stats or Stats()
    written = set()  # paths this layer created: whiteouts spare them
    dirs = []  # (path, member): times and modes once the layer is done
    for m in tar:
        rel = clean_name(label, m.name)
        if not rel:
            continue  # the root itself: keep ours (root:root 0755)
        parent_rel, _, base = rel.rpartition("/")
        parent = _resolve(root, parent_rel, label, m)
        if base.startswith(WHITEOUT):
            stats.whiteouts += 1
            if base == OPAQUE:
                if parent.is_dir():
                    _prune(parent, written, parent_rel)
                continue
            victim = base[len(WHITEOUT):]
            if victim in ("", ".", "..") or "/" in victim:
                raise unsafe(label, m.name, "whiteout of '.' or '..'")
            target = f"{parent_rel}/{victim}" if parent_rel else victim
            if target not in written:
                remove(parent / victim)
            continue
        if m.ischr() or m.isblk():
            stats.devices += 1
            stats.skipped.append(rel)
            continue
        if m.issym() and link_leaves(rel, m.linkname):
            raise unsafe(label, m.name, f"symlink to {m.linkname!r} leaves "
                         "the tree")
        if not (m.isfile() or m.isdir() or m.issym() or m.islnk()
                or m.isfifo()):
            raise unsafe(label, m.name, f"unknown entry type {m.type!r}")
        parent.mkdir(parents=True, exist_ok=True)
        dest = parent / base
        if m.isdir():
            if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
                remove(dest)
            dest.mkdir(exist_ok=True)
            dirs.append((dest, m))
            stats.dirs += 1
            written.add(rel)
            continue
        if m.islnk():
            src = _hardlink_source(root, label, m)
            remove(dest)
            os.link(src, dest, follow_symlinks=False)
            stats.links += 1
            written.add(rel)
            continue
        remove(dest)
        if m.issym():
            os.symlink(m.linkname, dest)
            stats.links += 1
        elif m.isfifo():
            os.mkfifo(dest, 0o600)
        else:
            _write_file(dest, tar.extractfile(m), m)
            stats.files += 1
            stats.bytes += m.size
        _set_meta(dest, m)
        written.add(rel)
    for dest, m in reversed(dirs):  # after their contents: mtime, then mode
        _set_meta(dest, m)
    return stats


def _hardlink_source(root, label, m):
    try:
        rel = clean_name(label, m.linkname)
    except ImportError_ as e:
        why = str(e).split(" (", 1)[1].split(");", 1)[0]
        raise unsafe(label, m.name, f"hard link to {m.linkname!r}: {why}"
                     ) from None
    parent_rel, _, base = rel.rpartition("/")
    src = _resolve(root, parent_rel, label, m) / base
    if src.is_symlink() or not src.is_file():
        raise unsafe(label, m.name, f"hard link to {m.linkname!r}, not a file "
                     "already in the tree")
    return src


def _resolve(root, rel, label, m):
    """``trust.resolve_in``, its errors (a symlink loop) named by layer."""
    try:
        return resolve_in(root, rel)
    except ConfigError:
        raise unsafe(label, m.name, "symlink loop") from None


def _write_file(dest, data, m):
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                 0o600)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(data, out, 1 << 20)


def _set_meta(dest, m):
    """Owner, then mode (chown clears setuid bits), xattrs, mtime."""
    os.chown(dest, m.uid, m.gid, follow_symlinks=False)
    if not m.issym():
        os.chmod(dest, stat.S_IMODE(m.mode))
        for key, value in (m.pax_headers or {}).items():
            if key.startswith("SCHILY.xattr.") and not key.endswith(
                    ".selinux"):
                os.setxattr(dest, key[len("SCHILY.xattr."):],
                            value.encode("utf-8", "surrogateescape"),
                            follow_symlinks=False)
    os.utime(dest, (m.mtime, m.mtime), follow_symlinks=False)


def apply_layers(src, image, root, progress=None):
    """Every layer of ``image`` in order, each checked against its digest
    and its diff_id."""
    stats = Stats()
    for i, layer in enumerate(image.layers):
        if progress:
            progress(f"{layer.label}: applying")
        tar, outer, inner = open_layer(src, layer)
        with tar:
            apply_layer(root, tar, layer.label, stats)
        inner_id = inner.drain()
        outer_id = outer.drain() if inner is not outer else inner_id
        if layer.digest and outer_id != layer.digest:
            raise ImportError_(f"{layer.label}: blob digest mismatch",
                               hint="the archive is damaged")
        if layer.diff_id and inner_id != layer.diff_id:
            raise ImportError_(f"{layer.label}: content does not match "
                               f"diff_id {i + 1} of the config",
                               hint="the archive is damaged")
    return stats


# ------------------------------------------------------------ what is inside
def _in_tree(root, rel):
    path = resolve_in(root, rel)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def detect_mpi(root):
    """The MPI flavours found in a tree (by their launchers)."""
    found = []
    for flavour, markers in MPI_MARKERS.items():
        if any(_in_tree(root, m) for m in markers):
            found.append(flavour)
    return found


def resolve_user(root, user):
    """Docker's ``User`` (``name``, ``uid``, ``name:group``, ``uid:gid``) →
    uid, gid, name, home, from the tree's /etc/passwd and /etc/group."""
    if not user:
        return None
    name, _, group = str(user).partition(":")
    passwd = _db(root, "etc/passwd")
    groups = _db(root, "etc/group")
    entry = next((e for e in passwd if name in (e[0], e[2:3] and e[2])), None)
    if entry is None and not name.isdigit():
        raise ImportError_(f"image User {user!r}: no such user in the "
                           "image's /etc/passwd", hint="the image's config "
                           "is inconsistent")
    uid = int(entry[2]) if entry else int(name)
    gid = int(entry[3]) if entry and len(entry) > 3 else uid
    if group:
        g = next((e for e in groups if group in (e[0], e[2:3] and e[2])),
                 None)
        if g is None and not group.isdigit():
            raise ImportError_(f"image User {user!r}: no such group in the "
                               "image's /etc/group", hint="the image's "
                               "config is inconsistent")
        gid = int(g[2]) if g else int(group)
    return {"uid": uid, "gid": gid,
            "name": entry[0] if entry else f"u{uid}",
            "home": entry[5] if entry and len(entry) > 5 else "/"}


def _db(root, rel):
    path = resolve_in(root, rel)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.split(":") for line in lines if line and line[0] != "#"]


def runtime_config(config, root):
    """The parts of an OCI config AppPot honours (see apppot.runtime)."""
    c = config.get("config") or {}
    return {
        "env": list(c.get("Env") or []),
        "entrypoint": list(c.get("Entrypoint") or []),
        "cmd": list(c.get("Cmd") or []),
        "workdir": c.get("WorkingDir") or "",
        "user": resolve_user(root, c.get("User")),
        "shell": _in_tree(root, "bin/sh") is not None,
        "labels": dict(c.get("Labels") or {}),
    }


# ------------------------------------------------------------ the command
def progress(text, t0=None):
    t = f"[{time.monotonic() - t0:5.1f} s] " if t0 is not None else ""
    print(f"{t}{text}", file=sys.stderr, flush=True)


def image_file_name(base):
    """./BASE.img with BASE made safe ("debian:12" -> debian-12.img)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_"
                   for c in base.replace(":", "-"))
    return Path.cwd() / f"{safe}.img"


def default_output(archive, image):
    tag = (image.tags or ("",))[0].rsplit("/", 1)[-1]
    return image_file_name(tag or Path(archive).name.split(".")[0])


PULL_SCHEME = "docker://"
PULLED_TAG = "apppot-pulled"


def pull_argv(reference, layout, insecure=False):
    """skopeo's command line that copies ``reference`` into the OCI layout
    directory ``layout`` (tagged PULLED_TAG)."""
    return ["skopeo", "copy", "--quiet",
            *(["--src-tls-verify=false"] if insecure else []),
            reference, f"oci:{layout}:{PULLED_TAG}"]


def check_reference(reference):
    """NAME of docker://NAME, or a one-line error."""
    name = reference[len(PULL_SCHEME):]
    if not name or name.startswith("-") or any(
            c.isspace() or not c.isprintable() for c in name):
        raise ConfigError(f"registry reference {reference!r} is malformed",
                          hint="docker://REGISTRY/NAME:TAG, e.g. "
                          "docker://docker.io/library/debian:12")
    return name


def pull(reference, work, insecure=False):
    """Pull ``reference`` (docker://..., checked by ``check_reference``)
    into an OCI layout under ``work``."""
    if not shutil.which("skopeo"):
        raise ConfigError("skopeo not found: it pulls registry images",
                          hint="apt-get install skopeo, or pull elsewhere "
                          "(skopeo copy docker://... oci:DIR) and import DIR")
    layout = Path(work) / "layout"
    argv = pull_argv(reference, layout, insecure)
    progress(f"pulling {reference}: {shlex.join(argv)}")
    r = subprocess.run(argv, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, check=False)
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        if ' msg="' in why:  # skopeo's logrus line: the message alone
            why = why.split(' msg="', 1)[1].rstrip('"').replace('\\"', '"')
        raise BuildError(f"cannot pull {reference}: {why[:300]}",
                         hint="check the name and tag, the registry's "
                         "reachability and credentials; --insecure-registry "
                         "for plain HTTP")
    return layout


def import_image(archive, output=None, ref=None, insecure=False):
    """Import ``archive`` (or pull a ``docker://`` reference and import
    it) into an ext4 image; returns its path."""
    from .imagebuild import require_root  # noqa: PLC0415

    require_root("import", "the image's files keep their owners")
    if not str(archive).startswith(PULL_SCHEME):
        return _import(archive, output, ref)
    if ref:
        raise ConfigError("--ref with a registry reference",
                          hint="name the tag in docker://REGISTRY/NAME:TAG")
    name = check_reference(archive)
    output = Path(output or image_file_name(name.rsplit("/", 1)[-1])
                  ).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    # beside the image, like the import's own tree: not in a memory tmpfs
    work = Path(tempfile.mkdtemp(prefix="apppot-pull-", dir=output.parent))
    try:
        return _import(pull(archive, work, insecure), output, PULLED_TAG,
                       pulled=archive)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _import(archive, output=None, ref=None, pulled=None):
    from .imagebuild import mkfs, publish  # noqa: PLC0415

    t0 = time.monotonic()
    src = Source(archive)
    try:
        image = read_image(src, ref)
        out = Path(output).absolute() if output else default_output(
            archive, image)
        progress(f"{image.format} {', '.join(image.tags) or '(untagged)'}: "
                 f"{len(image.layers)} layers -> {out}", t0)
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="apppot-import-", dir=out.parent))
        try:
            root = work / "root"
            root.mkdir(mode=0o755)
            stats = apply_layers(src, image, root,
                                 lambda text: progress(text, t0))
            found = detect_mpi(root)
            runtime = runtime_config(image.config, root)
            progress(f"{stats.files} files, {stats.dirs} directories, "
                     f"{stats.links} links, {stats.whiteouts} whiteouts, "
                     f"{stats.devices} device nodes skipped; MPI: "
                     f"{', '.join(found) or 'none'}; making the ext4 image",
                     t0)
            tmp = work / "image.img"
            mkfs(root, tmp)
            publish(tmp, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        src.close()
    stamp = {
        "kind": "oci", "mpi": found[0] if found else "none",
        "mpi_found": found, "runtime": runtime,
        "provenance": {
            **({"pulled": pulled} if pulled else {
                "archive": str(Path(archive).absolute())}),
            "format": image.format,
            "tags": list(image.tags), "manifest": image.manifest_digest,
            "layers": [la.diff_id for la in image.layers],
            "created": image.config.get("created"),
            "architecture": image.config.get("architecture"),
            "imported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "apppot": __version__},
        "stats": {"files": stats.files, "bytes": stats.bytes,
                  "devices_skipped": stats.skipped[:50]},
    }
    out.with_name(out.name + ".json").write_text(json.dumps(stamp, indent=1))
    progress(f"imported {out} ({out.stat().st_blocks * 512 >> 20} MiB used) "
             f"in {time.monotonic() - t0:.1f} s", None)
    return out
