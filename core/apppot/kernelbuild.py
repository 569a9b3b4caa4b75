"""apppot-kernel: build AppPot's own UML kernel from Debian's sources; list
the kernels the tools can use.

    apppot-kernel build [--series 7.2] [--jobs N] [--force] [--unpatched]
    apppot-kernel list [-v]
    apppot-kernel path

``build`` fetches Debian's ``linux-source-SERIES`` package with apt through a
private sources list and state directory under the cache (the machine's apt
configuration is never touched), configures ``make ARCH=um defconfig`` plus
the project's fragment (``kconfig/uml.config``: everything built in, SMP,
the vector network driver, 9P, no RAID6/XOR boot benchmarks, no SELinux),
applies AppPot's patch series (``kpatches/SERIES/series``, in order; a
patch that does not apply stops the build, naming it), checks that every
option it asks for took effect, builds ``linux``, and caches it in
$APPPOT_HOME/kernels/ keyed by series, configuration and patches.  A later
build with the same inputs reuses it; ``--unpatched`` builds the plain
kernel beside it (for comparisons), and ``list -v`` names each kernel's
patches.  Debian 12's own
``/usr/bin/linux.uml`` (6.1) stays supported; see ``kernel.find_kernel``
for how the tools choose.
"""

import argparse
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import kernel
from .config import apppot_home, common_cli, report_error, setup_logging
from .errors import AppPotError, BuildError, ConfigError
from .images import cache_homes
from .trust import check_cache_home

log = logging.getLogger(__name__)

DEFAULT_SERIES = "7.2"
FRAGMENT = Path(__file__).with_name("kconfig") / "uml.config"
PATCH_ROOT = Path(__file__).with_name("kpatches")
MIRROR = "http://deb.debian.org/debian"
SUITE = "unstable"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
BUILD_TOOLS = ("make", "gcc", "bc", "bison", "flex", "dpkg-deb", "apt-get",
               "patch")


def progress(step, total, text):
    print(f"[{step}/{total}] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ planning
def fragment_options(text):
    """{CONFIG_X: 'y' | 'n' | value} asked for by a config fragment."""
    want = {}
    for line in text.splitlines():
        m = re.fullmatch(r"# (CONFIG_\w+) is not set", line.strip())
        if m:
            want[m.group(1)] = "n"
            continue
        m = re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip())
        if m:
            want[m.group(1)] = m.group(2)
    return want


def unmet_options(want, config_text):
    """Options of ``want`` the final .config does not have."""
    have = dict(re.findall(r"^(CONFIG_\w+)=(.*)$", config_text, re.M))
    bad = []
    for opt, value in want.items():
        got = have.get(opt, "n")
        if got != value:
            bad.append(f"{opt}={value} (got {got})")
    return bad


@dataclass(frozen=True)
class Patch:
    """One patch of the series: its file name and text (a ``-p1`` diff
    after a header saying what it does, why, and what it measured)."""

    name: str
    text: str

    @property
    def sha256(self):
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def subject(self):
        """The header's ``Subject:`` line, else the file name."""
        m = re.search(r"^Subject: (?:\[PATCH[^]]*\] )?(.+)$", self.text, re.M)
        return m.group(1).strip() if m else self.name


def patch_series(series, root=None):
    """The patches of ``series`` in the order of ``root/SERIES/series``
    (one file name a line, ``#`` comments); () when the series has none.
    A listed file that is missing, or a ``.patch`` file that is not
    listed, is an error: the series must say exactly what is applied."""
    folder = Path(root or PATCH_ROOT) / series
    listing = folder / "series"
    present = {p.name for p in folder.glob("*.patch")}
    if not listing.exists():
        if present:
            raise BuildError(f"{folder} has patches but no series file",
                             hint="list the patches in order in "
                             f"{listing}")
        return ()
    names = [line.split("#", 1)[0].strip()
             for line in listing.read_text().splitlines()]
    names = [n for n in names if n]
    for name in names:
        if names.count(name) > 1:
            raise BuildError(f"{listing}: {name} is listed twice",
                             hint="each patch is applied once")
        if name not in present:
            raise BuildError(f"{listing}: {name} does not exist",
                             hint=f"add {folder / name} or drop the line")
    unlisted = sorted(present - set(names))
    if unlisted:
        raise BuildError(f"{folder / unlisted[0]} is not in {listing}",
                         hint="list it (in order) or delete it")
    return tuple(Patch(n, (folder / n).read_text()) for n in names)


def build_key(series, fragment_text, patches=()):
    """Cache key: series, configuration and every patch (name and text).
    Without patches it is the key unpatched builds always had."""
    text = f"{series}\0{fragment_text}"
    for p in patches:
        text += f"\0{p.name}\0{p.text}"
    h = hashlib.sha256(text.encode()).hexdigest()
    return f"uml-{series}-{h[:12]}"


def apt_options(aptdir):
    """apt-get options for a private, unprivileged view of Debian ``SUITE``."""
    return ["-o", f"Dir::State={aptdir}/state",
            "-o", f"Dir::State::status={aptdir}/state/status",
            "-o", f"Dir::Cache={aptdir}/cache",
            "-o", f"Dir::Etc::SourceList={aptdir}/sources.list",
            "-o", f"Dir::Etc::SourceParts={aptdir}/empty",
            "-o", f"Dir::Etc::Preferences={aptdir}/empty/preferences",
            "-o", f"Dir::Etc::PreferencesParts={aptdir}/empty",
            # root: no _apt sandbox user for a cache it cannot read
            *(["-o", "APT::Sandbox::User=root"] if os.getuid() == 0 else [])]


def kernels_dir(home=None):
    return check_cache_home(Path(home or apppot_home())) / "kernels"


def built_kernels(home=None):
    """Cached builds, newest version first, a patched build before the
    unpatched one of the same version: [(path, build.json data)]."""
    out = []
    for stamp in kernels_dir(home).glob("uml-*/build.json"):
        try:
            meta = json.loads(stamp.read_text())
        except (OSError, ValueError):
            continue
        binary = stamp.parent / "linux"
        if binary.exists():
            out.append((binary, meta))
    return sorted(out, key=lambda x: (_vtuple(x[1].get("version", "")),
                                      bool(x[1].get("patches"))),
                  reverse=True)


def cached_builds(homes=None):
    """``built_kernels`` of every cache home the tools look in
    (``images.cache_homes``), in that order."""
    homes = cache_homes() if homes is None else homes
    return [k for home in homes for k in built_kernels(home)]


def prune(kdir, series, keep):
    """Delete the earlier builds of ``series`` that ``keep`` replaces: those
    with the same patched-ness (the unpatched build stays beside the
    patched one, for comparisons, and vice versa)."""
    for old in Path(kdir).glob(f"uml-{series}-*"):
        if old != keep and _is_patched(old) == _is_patched(keep):
            shutil.rmtree(old, ignore_errors=True)


def _is_patched(build_dir):
    try:
        meta = json.loads((Path(build_dir) / "build.json").read_text())
    except (OSError, ValueError):
        return False  # unfinished or pre-series builds had no patches
    return bool(meta.get("patches"))


def _vtuple(text):
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


# -------------------------------------------------------------- side effects
def _run(argv, **kw):
    log.debug("executing: %s", shlex.join(str(a) for a in argv))
    return subprocess.run(argv, check=True, **kw)


def fetch_source(series, aptdir):
    """Download linux-source-SERIES's .deb; returns (path, version)."""
    aptdir.mkdir(parents=True, exist_ok=True)
    for d in ("state/lists/partial", "cache/archives/partial", "empty"):
        (aptdir / d).mkdir(parents=True, exist_ok=True)
    (aptdir / "state/status").touch()
    (aptdir / "sources.list").write_text(
        f"deb [signed-by={KEYRING}] {MIRROR} {SUITE} main\n")
    opts = apt_options(aptdir)
    _run(["apt-get", *opts, "-qq", "update"])
    pkg = f"linux-source-{series}"
    show = subprocess.run(["apt-cache", *opts, "show", pkg],
                          capture_output=True, text=True, check=False)
    versions = re.findall(r"^Version: (\S+)", show.stdout, re.M)
    if not versions:
        raise BuildError(f"Debian {SUITE} has no {pkg}",
                         hint="pick a series it has (apt-cache search "
                         "linux-source) with --series")
    _run(["apt-get", *opts, "-qq", "download", pkg], cwd=aptdir)
    debs = sorted(aptdir.glob(f"{pkg}_*.deb"), key=os.path.getmtime)
    if not debs:
        raise BuildError(f"apt-get download {pkg} produced no file",
                         hint=f"see {aptdir}")
    return debs[-1], versions[0]


def unpack_source(deb, series, work):
    """The kernel tree from the .deb (tar.xz inside /usr/src)."""
    tarball = work / f"linux-source-{series}.tar.xz"
    with open(tarball, "wb") as out:
        dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                stdout=subprocess.PIPE)
        _run(["tar", "-xO", f"./usr/src/linux-source-{series}.tar.xz"],
             stdin=dpkg.stdout, stdout=out)
        dpkg.wait()
    _run(["tar", "-xJf", str(tarball), "-C", str(work)])
    tarball.unlink()
    return work / f"linux-source-{series}"


def apply_patches(tree, patches, source, listing):
    """Apply the series in order; the first patch that does not apply
    exactly (no fuzz) stops the build, naming it: never a silently
    unpatched kernel.  ``source`` names the tree, ``listing`` the series
    file, in the message."""
    for p in patches:
        base = ["patch", "-p1", "--forward", "--batch", "--fuzz=0",
                "--no-backup-if-mismatch", "--reject-file=-"]
        for extra in (["--dry-run"], []):
            argv = [*base, *extra]
            log.debug("executing: %s < %s", shlex.join(argv), p.name)
            proc = subprocess.run(argv, cwd=tree, input=p.text, text=True,
                                  capture_output=True, check=False)
            if proc.returncode != 0:
                raise BuildError(
                    f"kernel patch {p.name} does not apply to {source}",
                    hint=f"refresh it against {source} or drop it from "
                    f"{listing}", details=proc.stdout + proc.stderr)


def configure(tree, fragment_text):
    frag = tree / "apppot.config"
    frag.write_text(fragment_text)
    _run(["make", "-s", "ARCH=um", "defconfig"], cwd=tree,
         stdout=subprocess.DEVNULL)
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config",
          "apppot.config"], cwd=tree, stdout=subprocess.DEVNULL)
    _run(["make", "-s", "ARCH=um", "olddefconfig"], cwd=tree,
         stdout=subprocess.DEVNULL)
    bad = unmet_options(fragment_options(fragment_text),
                        (tree / ".config").read_text())
    if bad:
        raise BuildError("kernel configuration lacks " + ", ".join(bad),
                         hint=f"this source tree cannot provide them; edit "
                         f"{FRAGMENT} or pick another --series")


PROGRESS_EVERY = 15.0  # seconds between progress lines while compiling
EXPECTED_FILES = 940  # compiled by this configuration (7.2: 938 objects)


def compile_kernel(tree, jobs, expected=EXPECTED_FILES):
    """make ARCH=um linux, printing a progress line every PROGRESS_EVERY
    seconds (files compiled, of about how many, elapsed); returns the
    binary and the number of files compiled."""
    argv = ["make", f"-j{jobs}", "ARCH=um", "linux"]
    log.debug("executing: %s", shlex.join(argv))
    proc = subprocess.Popen(argv, cwd=tree, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tail, count, t0 = [], 0, time.monotonic()
    shown = t0
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        if line.lstrip().startswith("CC"):
            count += 1
        now = time.monotonic()
        if now - shown >= PROGRESS_EVERY:
            shown = now
            print(f"      {count} of ~{max(expected, count)} files compiled "
                  f"({now - t0:.0f} s)", file=sys.stderr, flush=True)
    if proc.wait() != 0:
        raise BuildError("make ARCH=um linux failed:\n" + "\n".join(tail),
                         hint="see the lines above")
    return tree / "linux", count


def build(series=DEFAULT_SERIES, jobs=None, force=False, home=None,
          patched=True):
    missing = [t for t in BUILD_TOOLS if not shutil.which(t)]
    if missing:
        raise BuildError(f"missing build tools: {', '.join(missing)}",
                         hint="apt-get install build-essential bc bison "
                         "flex patch")
    fragment_text = FRAGMENT.read_text()
    patches = patch_series(series) if patched else ()
    key = build_key(series, fragment_text, patches)
    dest = kernels_dir(home) / key
    if (dest / "linux").exists() and not force:
        progress(1, 1, f"kernel up to date: {dest / 'linux'}")
        return dest / "linux"
    jobs = jobs or os.cpu_count() or 1
    t0 = time.monotonic()
    kernels_dir(home).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=kernels_dir(home)))
    try:
        progress(1, 5, f"fetching linux-source-{series} from Debian {SUITE}")
        deb, version = fetch_source(series, kernels_dir(home) / "apt")
        progress(2, 5, f"unpacking {deb.name}")
        tree = unpack_source(deb, series, work)
        progress(3, 5, f"applying {len(patches)} patches (kpatches/{series})"
                 if patches else "no patches (unpatched build)")
        apply_patches(tree, patches, f"linux-source-{series} {version}",
                      PATCH_ROOT / series / "series")
        progress(4, 5, "configuring (defconfig + kconfig/uml.config)")
        configure(tree, fragment_text)
        progress(5, 5, f"compiling with {jobs} jobs (several minutes)")
        binary, files = compile_kernel(tree, jobs)
        _run(["strip", "--strip-debug", str(binary)])
        staging = work / key
        staging.mkdir()
        shutil.copy2(binary, staging / "linux")
        shutil.copy2(tree / ".config", staging / "config")
        os.chmod(staging / "linux", 0o755)
        loaded = kernel.load_kernel(staging / "linux")  # it is a UML kernel
        (staging / "build.json").write_text(json.dumps({
            "series": series, "source": f"linux-source-{series} {version}",
            "version": loaded.version, "key": key, "files": files,
            "patches": [{"name": p.name, "sha256": p.sha256,
                         "subject": p.subject} for p in patches],
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.monotonic() - t0)}, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
        os.chmod(dest, 0o755)
        prune(kernels_dir(home), series, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"built {dest / 'linux'} ({loaded.version}) in "
          f"{time.monotonic() - t0:.0f} s", file=sys.stderr)
    return dest / "linux"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="apppot-kernel", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) AppPot's UML kernel")
    b.add_argument("--series", default=DEFAULT_SERIES,
                   help="Debian linux-source series (default: %(default)s)")
    b.add_argument("--jobs", type=int, help="make -j (default: all cores)")
    b.add_argument("--force", action="store_true",
                   help="rebuild even if the inputs did not change")
    b.add_argument("--unpatched", action="store_true",
                   help="build without AppPot's patch series (kept beside "
                   "the patched build; for comparisons)")
    ls = sub.add_parser("list", help="the kernels found, best first")
    p = sub.add_parser("path", help="print the kernel apppot-start would use")
    for sp in (b, ls, p):
        common_cli(sp)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.debug)
    try:
        if args.cmd == "build":
            if not re.fullmatch(r"\d+\.\d+", args.series):
                raise ConfigError(f"--series: not a kernel series: "
                                  f"{args.series!r}", hint="e.g. --series 7.2")
            build(args.series, args.jobs, args.force,
                  patched=not args.unpatched)
        elif args.cmd == "path":
            print(kernel.find_kernel().path)
        else:
            for k in kernel.candidates():
                feats = ", ".join(f for f in sorted(kernel.ALL_FEATURES)
                                  if k.has(f))
                print(f"{k.path}  UML {k.version}  [{feats}]")
                if args.verbose:
                    for name in k.patches:
                        print(f"    patch {name}")
        return 0
    except AppPotError as e:
        if args.debug:
            raise
        return report_error(parser.prog, e, status=1)


if __name__ == "__main__":
    sys.exit(main())
