"""apppot-image: build appliance images from Debian's packages, find them.

    apppot-image build [--mpi openmpi|mpich|none] [--packages a,b] [--output IMG]
    apppot-image build RECIPE.toml [--output IMG]
    apppot-image import ARCHIVE [--output IMG] [--ref NAME]
    apppot-image inspect IMG
    apppot-image path [--mpi X]

A recipe (TOML) names a base, an MPI, Debian and pip packages, files from
the build context, post-install commands (run as root inside one boot of
the new appliance, never on the host), environment, working directory,
default command and labels: see apppot.recipe.  ``import`` turns a docker
save / podman save archive or an OCI image layout into an image that boots
on AppPot's system disk (``build --mpi none``): see apppot.oci.

A build has two cached layers, each reused while its inputs are unchanged:
1. the root file system from Debian's packages (mmdebstrap, a tar);
2. the image: that tree plus AppPot's guest side, ``mkfs.ext4 -d``, then one
   boot of the new appliance that records the base state for apppot-snap.
The finished image is made read-only: COW files record its mtime.
"""

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from . import __version__, kernel
from .appliance import Appliance, write_control_disk
from .config import apppot_home, common_cli, report_error, setup_logging
from .errors import AppPotError, BuildError, ConfigError
from .images import default_image
from .spec import ApplianceSpec, GuestSpec
from .trust import check_cache_home, check_trusted, resolve_in
from .watchdog import Watchdog

log = logging.getLogger(__name__)

SUITE = "bookworm"
BASE_PACKAGES = ("python3", "iproute2", "sudo", "procps", "less")
MPI_PACKAGES = {
    "openmpi": ("openmpi-bin", "python3-mpi4py"),
    "mpich": ("mpich",),
    "none": (),
}
# Debian's python3-mpi4py is built for Open MPI only; the MPICH image gets
# mpi4py's PyPI wheel, which carries an MPICH-ABI build (libmpi.so.12).
MPICH_MPI4PY = "mpi4py==4.1.2"
GUEST_FILES = ("init.py", "snap.py")
HERE = Path(__file__).parent
SOURCES = ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list")
LOADERS = {"x86_64": "ld-linux-x86-64.so.2", "aarch64": "ld-linux-aarch64.so.1"}


def progress(step, total, text):
    print(f"[{step}/{total}] {text}", file=sys.stderr, flush=True)


def host_sources():
    """The machine's own apt sources (its mirror or proxy), if Debian's."""
    for path in SOURCES:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        if SUITE in text:
            return path, text
    return None, ""


def rootfs_inputs(mpi, packages, suite=SUITE, sources=None):
    """What the root file system depends on (its cache key); ``sources``:
    (path, text) of the apt sources for a suite other than the host's."""
    sources_path, sources = sources or host_sources()
    return {
        "suite": suite,
        "variant": "minbase",
        "packages": sorted(set(BASE_PACKAGES) | set(MPI_PACKAGES[mpi])
                           | set(packages)),
        "sources": hashlib.sha256(sources.encode()).hexdigest(),
        "sources_path": sources_path,
        "mpi4py_wheel": MPICH_MPI4PY if mpi == "mpich" else None,
    }


def extra_guest_files():
    """Guest-side files of add-ons (apppot_mpi's hook and agent)."""
    spec = importlib.util.find_spec("apppot_mpi.guest")
    if spec is None or not spec.submodule_search_locations:
        return []
    where = Path(next(iter(spec.submodule_search_locations)))
    return sorted(p for p in [*where.glob("*.py"), *where.glob("*.sh"),
                              *where.glob("*.c")] if p.name != "__init__.py")


def image_inputs(rootfs_key, mpi):
    guest = hashlib.sha256()
    for path in [HERE / n for n in GUEST_FILES + ("imagebuild.py",)] + \
            extra_guest_files():
        guest.update(path.read_bytes())
    return {"rootfs": rootfs_key, "mpi": mpi, "guest": guest.hexdigest(),
            "apppot": __version__}


def key_of(inputs):
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()
                          ).hexdigest()[:20]


def run_cmd(argv, **kwargs):
    log.debug("executing: %s", shlex.join(str(a) for a in argv))
    proc = subprocess.run([str(a) for a in argv], check=False, **kwargs)
    if proc.returncode != 0:
        raise BuildError(f"{Path(str(argv[0])).name} failed with status "
                         f"{proc.returncode}", hint="see its output above",
                         details=getattr(proc, "stderr", None))
    return proc


def build_rootfs(inputs, cache):
    """Layer 1: mmdebstrap → tar (cached by its inputs)."""
    key = key_of(inputs)
    tar = cache / "rootfs" / f"{key}.tar"
    if tar.exists():  # extracted as root: only from a safe place
        check_trusted(tar, "cached root file system", error=BuildError)
        log.info("reusing root file system %s", tar)
        return tar, key
    if not shutil.which("mmdebstrap"):
        raise BuildError("mmdebstrap is not installed",
                         hint="apt-get install mmdebstrap")
    tar.parent.mkdir(parents=True, exist_ok=True)
    tmp = tar.with_suffix(".tmp.tar")
    argv = ["mmdebstrap", "--variant=minbase", "--mode=root",
            "--include=" + ",".join(inputs["packages"]),
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/locale/locale.alias",
            inputs["suite"], tmp]
    if inputs["sources_path"]:
        argv.append(inputs["sources_path"])
    run_cmd(argv)
    os.replace(tmp, tar)
    return tar, key


def install_guest(root, mpi, wheel_dir):
    """AppPot's guest side, and the MPICH mpi4py wheel.  Every path is
    resolved inside the tree (``resolve_in``): a symlink in the root file
    system, such as ``etc -> /etc``, cannot lead a write out of it."""
    def at(rel):
        return resolve_in(root, rel)

    at("usr/lib/apppot").mkdir(parents=True, exist_ok=True)
    for name in GUEST_FILES:
        copy_into(HERE / name, at(f"usr/lib/apppot/{name}"))
    for path in extra_guest_files():
        if path.suffix == ".c":  # a preload library (host and guest: Debian 12)
            kernel.compile_shared(path, at(f"usr/lib/apppot/{path.stem}.so"),
                                  ["-Wall", "-Werror"], error=BuildError,
                                  what=path.name,
                                  hint="apt-get install gcc libc6-dev")
            continue
        name = path.stem if path.suffix == ".sh" else path.name
        copy_into(path, at(f"usr/lib/apppot/{name}"))
    # the MPI launchers' remote start (agent.py), and apppot-snap
    write_into(at("usr/lib/apppot/apppot-rsh"), rsh_script(), 0o755)
    at("usr/local/bin").mkdir(parents=True, exist_ok=True)
    write_into(at("usr/local/bin/apppot-snap"), "#!/bin/sh\nexec "
               "/usr/bin/python3 -IB /usr/lib/apppot/snap.py \"$@\"\n", 0o755)
    at("var/lib/apppot").mkdir(parents=True, exist_ok=True)
    if mpi == "mpich":
        wheels = list(Path(wheel_dir).glob("mpi4py-*.whl"))
        if not wheels:
            raise BuildError("mpi4py wheel missing", hint="check pip's output")
        site = at("usr/local/lib/python3.11/dist-packages")
        site.mkdir(parents=True, exist_ok=True)
        site = at("usr/local/lib/python3.11/dist-packages")
        with zipfile.ZipFile(wheels[0]) as whl:
            for member in whl.namelist():  # names checked like any tar's
                if member.startswith("/") or ".." in member.split("/"):
                    raise BuildError(f"unsafe name in the mpi4py wheel: "
                                     f"{member!r}", hint="check the wheel")
            whl.extractall(site)
        # the MPICH ABI name the wheel links against, next to libmpich (a
        # default search directory, so no ld.so.cache entry is needed)
        link = at(f"usr/lib/{platform.machine()}-linux-gnu") / "libmpi.so.12"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("libmpich.so.12")
        run_cmd(["ldconfig", "-r", root])
    # leave no package caches or machine identity in the image
    for base, pattern in (("var/cache/apt", "*.bin"),
                          ("var/cache/apt/archives", "*.deb"),
                          ("var/lib/apt/lists", "*_Packages"),
                          ("var/log", "*.log")):
        for p in at(base).glob(pattern):
            p.unlink()  # unlinking a symlink never follows it
    write_into(at("etc/machine-id"), "")
    write_into(at("etc/fstab"), "# mounts are made by apppot-init\n")


def rsh_script(machine=None):
    """apppot-rsh: agent.py's client.  Inside an imported image's tree
    (which may have no Python, or another one) it runs the system disk's
    Python, mounted there by init, through the system disk's own dynamic
    loader and libraries."""
    machine = machine or platform.machine()
    arch = f"{machine}-linux-gnu"
    loader = LOADERS.get(machine, "ld-linux-x86-64.so.2")
    sysroot = "/run/apppot/sysroot"
    return (
        "#!/bin/sh\n"
        f"S={sysroot}\n"
        "if [ -e $S/usr/lib/apppot/agent.py ]; then\n"
        f"    exec $S/usr/lib/{arch}/{loader} --library-path "
        f"$S/usr/lib/{arch} $S/usr/bin/python3 -IB "
        "$S/usr/lib/apppot/agent.py rsh \"$@\"\n"
        "fi\n"
        "exec /usr/bin/python3 -IB /usr/lib/apppot/agent.py rsh \"$@\"\n")


def copy_into(src, dest, mode=0o755):
    """Copy a file to ``dest`` (resolved in the tree), never through a
    symlink at ``dest`` itself."""
    write_into(dest, Path(src).read_bytes(), mode)


def write_into(dest, data, mode=0o644):
    if isinstance(data, str):
        data = data.encode()
    if dest.is_symlink():
        dest.unlink()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                 mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(dest, mode)


def fetch_wheel(dest):
    machine = platform.machine()
    argv = [sys.executable, "-m", "pip", "download", "--no-deps",
            "--only-binary=:all:", "--python-version", "3.11",
            "--implementation", "cp", "--platform",
            f"manylinux2014_{machine}", "-d", dest, MPICH_MPI4PY]
    run_cmd(argv)


def mkfs(root, out):
    used = int(subprocess.run(["du", "-sb", str(root)], capture_output=True,
                              text=True, check=True).stdout.split()[0])
    # room for what users install in a session (the file is sparse)
    size_mib = (int(used * 1.3) >> 20) + 1024
    run_cmd(["mkfs.ext4", "-q", "-F", "-L", "apppot", "-d", root, out,
             f"{size_mib}M"])


def boot_once(image, guest, verbose, *, mem=256 << 20, timeout=600):
    """Boot ``image`` itself (no COW) once as guest root with ``guest``'s
    action; its output goes to our stderr.  Returns the guest's status."""
    kern = kernel.find_kernel(os.environ.get("APPPOT_KERNEL"))
    rundir = Path(tempfile.mkdtemp(prefix="apppot-build-"))
    with Watchdog() as dog, Appliance(rundir, name=f"image-{guest.action}",
                                      verbose=verbose, watchdog=dog) as app:
        control = rundir / "control.tar"
        write_control_disk(control, guest.to_json())
        spec = ApplianceSpec(
            kernel=kern.path, umid=guest.action, uml_dir=rundir,
            mem_bytes=mem, image=image, cow=None, control=control,
            notify=rundir / "notify", channels=app.make_channels())
        env = dict(os.environ)
        shim = kernel.xstate_shim()
        if shim:
            env["LD_PRELOAD"] = str(shim)
        app.start(spec, env, stdout_fd=2, stderr_fd=2)
        return app.wait(boot_timeout=180, timeout=timeout)


def finalize(image, verbose):
    """Boot the new image once: init records the base state (apppot-snap)."""
    guest = GuestSpec(uid=0, gid=0, user="root", group="root", jobdir=None,
                      action="finalize")
    code = boot_once(image, guest, verbose)
    if code != 0:
        raise BuildError(f"first boot of the new image failed (status {code})",
                         hint="rerun with -v to see the boot log")


def require_root(command="build", why="Debian's packages install files "
                 "owned by root"):
    if os.geteuid() != 0:
        raise BuildError(f"apppot-image {command} needs root ({why})",
                         hint="run it with sudo; any user can then use the "
                         "image (--output puts it where they can read it)")


def build(mpi="openmpi", packages=(), output=None, verbose=False, force=False):
    require_root()
    home = check_cache_home(apppot_home())
    out = Path(output).absolute() if output else default_image(mpi, home)
    rinputs = rootfs_inputs(mpi, packages)
    inputs = image_inputs(key_of(rinputs), mpi)
    stamp = out.with_name(out.name + ".json")
    if not force and up_to_date(out, stamp, inputs):
        progress(1, 1, f"image up to date: {out}")
        return out
    t0 = time.monotonic()
    progress(1, 4, f"root file system from Debian {SUITE} "
             f"({', '.join(rinputs['packages'])})")
    tar, _ = build_rootfs(rinputs, home)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="apppot-image-", dir=out.parent))
    try:
        root = work / "root"
        root.mkdir()
        progress(2, 4, "unpacking and installing AppPot's guest side")
        run_cmd(["tar", "--numeric-owner", "-xpf", tar, "-C", root])
        if mpi == "mpich":
            fetch_wheel(work)
        install_guest(root, mpi, work)
        meta = {"mpi": mpi, "packages": rinputs["packages"], "suite": SUITE,
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "apppot": __version__}
        write_into(resolve_in(root, "usr/lib/apppot/image.json"),
                   json.dumps(meta))
        progress(3, 4, "making the ext4 image")
        tmp_img = work / "image.img"
        mkfs(root, tmp_img)
        shutil.rmtree(root)
        progress(4, 4, "first boot: recording the base state")
        finalize(tmp_img, verbose)
        publish(tmp_img, out)
        stamp.write_text(json.dumps({"inputs": inputs, **meta}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = out.stat().st_blocks * 512
    print(f"built {out} ({size >> 20} MiB used) in "
          f"{time.monotonic() - t0:.0f} s", file=sys.stderr)
    return out


def recipe_help():
    from . import recipe  # noqa: PLC0415

    return "Recipes:\n" + recipe.__doc__.split("\n\n", 1)[1]


def oci_help():
    from . import oci  # noqa: PLC0415

    return oci.__doc__


def up_to_date(out, stamp, inputs):
    """Was ``out`` built from ``inputs`` (its stamp says so)?"""
    if not (out.exists() and stamp.exists()):
        return False
    try:
        return json.loads(stamp.read_text()).get("inputs") == inputs
    except (OSError, ValueError):
        return False


def publish(tmp_img, out):
    """A finished image becomes read-only (COW files record its mtime) and
    replaces ``out``."""
    os.chmod(tmp_img, 0o444)
    if out.exists():
        os.chmod(out, 0o644)
    os.replace(tmp_img, out)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="apppot-image", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser(
        "build", help="build (or reuse) an appliance image",
        description="Build the default image for --mpi, or the image of a "
        "recipe.", epilog=recipe_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("recipe", nargs="?", help="a recipe file (TOML); its "
                   "directory is the build context")
    p = sub.add_parser("path", help="print where the default image is")
    i = sub.add_parser(
        "import", help="import a docker save / podman save archive, an "
        "OCI image layout, or a registry image", description=oci_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("archive", help="archive (tar, tar.gz), OCI layout dir, "
                   "or docker://REGISTRY/NAME:TAG (pulled with skopeo)")
    i.add_argument("--insecure-registry", action="store_true",
                   help="pull over plain HTTP or with an unverified "
                   "certificate (a registry on localhost)")
    i.add_argument("--output", help="the image to write (default: ./NAME.img "
                   "from the image's tag)")
    i.add_argument("--ref", help="which image of an archive holding several "
                   "(a tag such as busybox:latest)")
    common_cli(i)
    n = sub.add_parser("inspect", help="print the recipe or archive and the "
                       "provenance an image was built from")
    n.add_argument("image")
    common_cli(n)
    for sp in (b, p):
        sp.add_argument("--mpi", choices=("openmpi", "mpich", "none"),
                        default=os.environ.get("APPPOT_MPI") or "openmpi",
                        help="MPI inside the image (default: %(default)s)")
        common_cli(sp)
    b.add_argument("--packages", default="",
                   help="extra Debian packages, comma separated")
    b.add_argument("--output", help="write the image here instead of the cache")
    b.add_argument("--force", action="store_true",
                   help="rebuild even if the inputs did not change")
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.debug)
    try:
        if args.cmd == "path":
            print(default_image(args.mpi))
            return 0
        if args.cmd == "inspect":
            from .recipebuild import inspect  # noqa: PLC0415

            return inspect(args.image)
        if args.cmd == "import":
            from .oci import import_image  # noqa: PLC0415

            import_image(args.archive, args.output, args.ref,
                         args.insecure_registry)
            return 0
        if args.recipe:
            from .recipebuild import build as build_recipe  # noqa: PLC0415

            if args.packages:
                raise ConfigError("--packages with a recipe", hint="list "
                                  "packages in the recipe's packages = [...]")
            build_recipe(args.recipe, args.output, verbose=args.verbose >= 2,
                         force=args.force)
            return 0
        packages = [p.strip() for p in args.packages.split(",") if p.strip()]
        for p in packages:
            if not all(c.isalnum() or c in "+-.:" for c in p):
                raise ConfigError(f"--packages: bad package name {p!r}",
                                  hint="comma-separated Debian package names")
        build(args.mpi, packages, args.output, verbose=args.verbose >= 2,
              force=args.force)
        return 0
    except AppPotError as e:
        if args.debug:
            raise
        return report_error(parser.prog, e, status=1)


if __name__ == "__main__":
    sys.exit(main())
