"""Building a recipe (``apppot-image build RECIPE.toml``) and printing what
an image was built from (``apppot-image inspect IMG``).

Phases, each shown with the time since the start:

1. pip wheels, downloaded on the host for the image's Python and glibc;
2. the root file system (mmdebstrap from the machine's Debian mirror,
   cached by its inputs as for every image);
3. unpack, AppPot's guest side, the recipe's files, the wheels;
4. ``mkfs.ext4 -d``;
5. one boot of the new image: as guest root, pip installs into the venv
   and the post commands run, then init records the base state;
6. the stamp next to the image: inputs, runtime, recipe and provenance.

Recipe commands never run on the host: a site that builds users' recipes
gives them root only inside an appliance, which has the builder's host
rights like any appliance (see README, Security), not a chroot as host root.
"""

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import __version__, imagebuild, recipe
from .config import apppot_home
from .errors import BuildError, ImageError
from .spec import GuestSpec
from .trust import check_cache_home, resolve_in

PHASES = 6
BUILD_MEM = 768 << 20  # compilers and pip in the build boot
BUILD_TIMEOUT = 3600.0


class Phases:
    """``[n/6 12.3 s] text`` lines on stderr."""

    def __init__(self):
        self.t0 = time.monotonic()

    def __call__(self, n, text):
        print(f"[{n}/{PHASES} {time.monotonic() - self.t0:5.1f} s] {text}",
              file=sys.stderr, flush=True)

    @property
    def elapsed(self):
        return time.monotonic() - self.t0


def sources_for(suite, cache):
    """apt sources for ``suite`` on the machine's own Debian mirror (the
    host's sources name it for the host's suite): (path, text)."""
    if suite == imagebuild.SUITE:
        return imagebuild.host_sources()
    _, host = imagebuild.host_sources()
    uri = next((line.split()[1] for line in host.splitlines()
                if line.startswith("URIs:") and "security" not in line),
               "http://deb.debian.org/debian")
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    text = (f"Types: deb\nURIs: {uri}\nSuites: {suite} {suite}-updates\n"
            f"Components: main\nSigned-By: {keyring}\n\n"
            f"Types: deb\nURIs: {uri}-security\nSuites: {suite}-security\n"
            f"Components: main\nSigned-By: {keyring}\n")
    path = cache / "rootfs" / f"{suite}.sources"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return str(path), text


def platforms(glibc):
    """pip's --platform tags an image's glibc can load."""
    machine = platform.machine()
    tags = [f"manylinux_2_{minor}_{machine}"
            for minor in range(glibc[1], 16, -1)]
    return [*tags, f"manylinux2014_{machine}", f"linux_{machine}"]


def fetch_wheels(rec, dest):
    """Download the recipe's pip requirements and their dependencies as
    wheels for the image's Python (on the host: the guest has no network)."""
    _, py, glibc = recipe.BASES[rec.base]
    argv = [sys.executable, "-m", "pip", "download", "--only-binary=:all:",
            "--disable-pip-version-check", "--python-version", py,
            "--implementation", "cp", "-d", dest]
    for tag in platforms(glibc):
        argv += ["--platform", tag]
    imagebuild.run_cmd([*argv, *rec.pip], stdout=sys.stderr)
    return sorted(Path(dest).glob("*.whl"))


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def installed_packages(root):
    """{package: version} from the tree's dpkg status."""
    out, name, version, ok = {}, None, None, False
    status = resolve_in(root, "var/lib/dpkg/status")
    for line in [*status.read_text(errors="replace").splitlines(), ""]:
        if line.startswith("Package: "):
            name = line[9:]
        elif line.startswith("Version: "):
            version = line[9:]
        elif line.startswith("Status: "):
            ok = line.endswith(" installed")
        elif not line:
            if name and ok:
                out[name] = version
            name, version, ok = None, None, False
    return out


def copy_files(rec, root):
    """The recipe's files into the tree, as root:root, each path resolved
    inside the tree (a link in the image never leads a copy out of it)."""
    count = 0
    for f in rec.files:
        dest = resolve_in(root, f.dest)
        if f.src.is_dir():
            for src in sorted([f.src, *f.src.rglob("*")]):
                rel = src.relative_to(f.src)
                target = resolve_in(root, f"{f.dest}/{rel}") if str(
                    rel) != "." else dest
                count += _copy_one(src, target, f.mode)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            count += _copy_one(f.src, dest, f.mode)
    return count


def _copy_one(src, dest, mode):
    if src.is_symlink():  # replaced, never written through
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        os.symlink(os.readlink(src), dest)
        os.lchown(dest, 0, 0)
        return 1
    if src.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        os.chown(dest, 0, 0)
        os.chmod(dest, 0o755)
        return 0
    imagebuild.copy_into(src, dest, mode if mode is not None else
                         src.stat().st_mode & 0o7777)
    os.chown(dest, 0, 0)
    return 1


def build(path, output=None, verbose=False, force=False):
    """Build (or reuse) the image of the recipe at ``path``."""
    rec = recipe.load(path)
    imagebuild.require_root()
    home = check_cache_home(apppot_home())
    out = Path(output).absolute() if output else \
        Path.cwd() / (rec.path.stem + ".img")
    sources = sources_for(rec.suite, home)
    rinputs = imagebuild.rootfs_inputs(rec.mpi, rec.debian_packages(),
                                       rec.suite, sources)
    guest_key = imagebuild.image_inputs(imagebuild.key_of(rinputs), rec.mpi)
    inputs = recipe.inputs(rec, imagebuild.key_of(rinputs), guest_key)
    stamp = out.with_name(out.name + ".json")
    if not force and imagebuild.up_to_date(out, stamp, inputs):
        print(f"image up to date: {out}", file=sys.stderr)
        return out
    phase = Phases()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="apppot-recipe-", dir=out.parent))
    try:
        wheels = []
        if rec.pip:
            phase(1, f"pip: downloading {len(rec.pip)} requirement(s) and "
                  f"their dependencies for Python {rec.python}")
            wheels = fetch_wheels(rec, work / "wheels")
            phase(1, f"pip: {len(wheels)} wheels")
        else:
            phase(1, "pip: nothing to download")
        phase(2, f"root file system: {rec.base} ({rec.suite}), "
              f"{len(rinputs['packages'])} packages requested")
        tar, _ = imagebuild.build_rootfs(rinputs, home)
        root = work / "root"
        root.mkdir()
        imagebuild.run_cmd(["tar", "--numeric-owner", "-xpf", tar, "-C", root])
        packages = installed_packages(root)
        phase(3, f"{len(packages)} packages installed; AppPot's guest side, "
              f"{len(rec.files)} file entries from {rec.context}")
        if rec.mpi == "mpich":
            imagebuild.fetch_wheel(work)
        imagebuild.install_guest(root, rec.mpi, work)
        copied = copy_files(rec, root)
        if wheels:
            wheel_dir = resolve_in(root, recipe.WHEELS)
            wheel_dir.mkdir(parents=True, exist_ok=True)
            for w in wheels:
                imagebuild.copy_into(w, wheel_dir / w.name, 0o644)
        provenance = {
            "recipe": {"path": str(rec.path), "sha256": inputs["recipe"]},
            "files": inputs["files"], "suite": rec.suite,
            "apt_sources": {"path": sources[0], "sha256": rinputs["sources"]},
            "rootfs": imagebuild.key_of(rinputs), "packages": packages,
            "wheels": {w.name: sha256_of(w) for w in wheels},
            "mmdebstrap": _version(["mmdebstrap", "--version"]),
            "apppot": __version__,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        meta = {"kind": "recipe", "mpi": rec.mpi, "suite": rec.suite,
                "packages": rinputs["packages"], "built": provenance["built"],
                "apppot": __version__, "runtime": rec.runtime(),
                "recipe": {"path": str(rec.path), "text": rec.text,
                           "manifest": recipe.manifest(rec)},
                "provenance": provenance}
        imagebuild.write_into(resolve_in(root, "usr/lib/apppot/image.json"),
                              json.dumps(meta))
        phase(4, f"{copied} files copied; making the ext4 image")
        tmp_img = work / "image.img"
        imagebuild.mkfs(root, tmp_img)
        shutil.rmtree(root)
        phase(5, f"build boot as guest root: {'pip install, ' if wheels else ''}"
              f"{len(rec.post)} post command(s), base state")
        guest = GuestSpec(uid=0, gid=0, user="root", group="root",
                          jobdir=None, action="build",
                          argv=[b"/bin/sh", b"-c",
                                recipe.build_script(rec).encode()])
        code = imagebuild.boot_once(tmp_img, guest, verbose, mem=BUILD_MEM,
                                    timeout=BUILD_TIMEOUT)
        if code != 0:
            step = recipe.failed_step(rec, code)
            raise BuildError(f"{step} failed" if step else
                             f"build boot failed (status {code})",
                             hint="its output is above; rerun with -vv for "
                             "the boot log")
        imagebuild.publish(tmp_img, out)
        stamp.write_text(json.dumps({"inputs": inputs, **meta}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    used = out.stat().st_blocks * 512 >> 20
    phase(6, f"built {out} ({used} MiB used) in {phase.elapsed:.0f} s")
    return out


def _version(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return None


def stamp_of(image):
    """The stamp next to ``image``, else the copy a recipe build left
    inside it (read with debugfs, nothing mounted)."""
    image = Path(image)
    if not image.exists():
        raise ImageError(f"image not found: {str(image)!r}",
                         hint="give the path of an image file")
    stamp = Path(str(image) + ".json")
    if stamp.exists():
        return json.loads(stamp.read_text()), str(stamp)
    proc = subprocess.run(["debugfs", "-R", "cat /usr/lib/apppot/image.json",
                           str(image)], capture_output=True, check=False)
    try:
        return json.loads(proc.stdout), f"{image}:/usr/lib/apppot/image.json"
    except ValueError:
        raise ImageError(f"{str(image)!r} has no build stamp",
                         hint="images from apppot-image build or import "
                         "have one (IMG.json)") from None


def inspect(image, out=sys.stdout):
    """Print what ``image`` was built or imported from."""
    data, where = stamp_of(image)
    kind = data.get("kind", "apppot")
    print(f"image: {image}", file=out)
    print(f"stamp: {where}", file=out)
    print(f"kind: {kind}" + (" (boots on AppPot's system disk)"
                             if kind == "oci" else ""), file=out)
    print(f"mpi: {data.get('mpi')}", file=out)
    runtime = data.get("runtime")
    if runtime:
        print("runtime:", recipe.dumps(runtime), sep="\n", file=out)
    rec = data.get("recipe")
    if rec:
        print(f"recipe ({rec['path']}):", file=out)
        print(rec["text"].rstrip("\n"), file=out)
    prov = data.get("provenance") or {k: data[k] for k in (
        "suite", "packages", "built", "apppot") if k in data}
    print("provenance:", recipe.dumps(prov), sep="\n", file=out)
    return 0
