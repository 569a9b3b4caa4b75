"""Find the UML kernel, read its build configuration, check features.

Also builds (once, cached) the xstate compatibility shim that Debian 12's
UML 6.1 needs on hosts with AVX-512/AMX: see ``native/xstate_shim.c``.
"""

import functools
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import apppot_home
from .errors import KernelError
from .trust import check_cache_home, check_trusted

log = logging.getLogger(__name__)

DEFAULT_KERNELS = ("linux.uml", "/usr/bin/linux.uml")
SHIM_SOURCE = Path(__file__).with_name("native") / "xstate_shim.c"
# Features each use needs, with the Kconfig symbol that provides it.
FEATURES = {
    "ubd": "CONFIG_BLK_DEV_UBD",
    "hostfs": "CONFIG_HOSTFS",
    "ext4": "CONFIG_EXT4_FS",
    "mconsole": "CONFIG_MCONSOLE",
    "sysrq": "CONFIG_MAGIC_SYSRQ",
    "devtmpfs": "CONFIG_DEVTMPFS",
    "mcast": "CONFIG_UML_NET_MCAST",
    "slirp": "CONFIG_UML_NET_SLIRP",
    "vector": "CONFIG_UML_NET_VECTOR",
    "9p": "CONFIG_9P_FS",
    "smp": "CONFIG_SMP",
}
BASE_FEATURES = ("ubd", "hostfs", "ext4", "mconsole", "sysrq", "devtmpfs")
# Not Kconfig symbols: seccomp is a run-time mode (--help lists seccomp=),
# patched means built by apppot-kernel with its patch series (build.json).
ALL_FEATURES = (*FEATURES, "seccomp", "patched")


@dataclass(frozen=True)
class Kernel:
    """A checked UML kernel binary."""

    path: Path
    version: str
    config: dict = field(repr=False, compare=False)
    options: frozenset = field(default=frozenset(), repr=False, compare=False)
    patches: tuple = field(default=(), compare=False)  # names, in order

    def has(self, feature):
        if feature == "seccomp":  # a run-time mode, not a Kconfig symbol
            return "seccomp=" in self.options
        if feature == "patched":
            return bool(self.patches)
        return self.config.get(FEATURES[feature]) in ("y", "m")

    @property
    def own(self):
        """Built by apppot-kernel (cached under $APPPOT_HOME/kernels)?"""
        return self.path.name == "linux" and self.path.parent.name.startswith(
            "uml-")

    @property
    def max_cpus(self):
        return int(self.config.get("CONFIG_NR_CPUS", "1")) if self.has(
            "smp") else 1

    def describe(self):
        feats = [f for f in ("mcast", "vector", "9p", "smp", "seccomp",
                             "patched") if self.has(f)]
        return (f"{self.path} (UML {self.version}, "
                f"{'AppPot build' if self.own else 'distribution'}; "
                f"{', '.join(feats) or 'basic'})")

    def require(self, *features):
        missing = [f for f in features if not self.has(f)]
        if missing:
            names = ", ".join(f"{f} ({FEATURES[f]})" for f in missing)
            raise KernelError(
                f"UML kernel {str(self.path)!r} lacks {names}",
                hint="use a kernel built with these options (--kernel)")

    @property
    def version_tuple(self):
        return tuple(int(x) for x in re.findall(r"\d+", self.version)[:3])


def _candidates(home=None):
    """Usable kernels, best first, loaded one at a time: AppPot's own
    builds (newest first, see apppot-kernel; without $APPPOT_HOME also the
    machine-wide ones scripts/setup.sh builds, as for images), then the
    distribution's."""
    from .kernelbuild import cached_builds  # noqa: PLC0415

    paths = [p for p, _ in cached_builds(None if home is None else [home])]
    paths += [Path(shutil.which(c) or c) for c in DEFAULT_KERNELS]
    seen = set()
    for p in paths:
        if not p.exists() or p.resolve() in seen:
            continue
        seen.add(p.resolve())
        try:
            yield load_kernel(p.resolve())
        except KernelError as e:
            log.warning("skipping kernel %s: %s", p, e)


def candidates(home=None):
    """All usable kernels, best first (``apppot-kernel list``)."""
    return list(_candidates(home))


def find_kernel(path=None, needs=()):
    """The kernel to use: ``path``, else the best candidate that has every
    feature in ``needs``.  Says which at -v."""
    if path:
        if not os.path.exists(path):
            raise KernelError(f"UML kernel not found: {path!r}",
                              hint="give the path of a linux.uml binary "
                              "(--kernel)")
        kern = load_kernel(Path(path).resolve())
        log.info("kernel: %s", kern.describe())
        return kern
    found = False
    for kern in _candidates():  # each costs two runs of the binary: stop early
        found = True
        if all(kern.has(f) for f in needs):
            log.info("kernel: %s", kern.describe())
            return kern
    if found:
        raise KernelError(f"no UML kernel here has {', '.join(needs)}",
                          hint="build one (apppot-kernel build) or pass "
                          "--kernel PATH")
    raise KernelError("no UML kernel found (linux.uml)",
                      hint="install Debian's user-mode-linux package, or pass "
                      "--kernel PATH")


def load_kernel(path):
    check_trusted(path, "UML kernel", error=KernelError)
    st = _stat(path)
    return _load_kernel(str(path), st.st_mtime_ns, st.st_size)


def _stat(path):
    try:
        st = os.stat(path)
    except OSError as e:
        raise KernelError(f"cannot read UML kernel {str(path)!r}",
                          hint="check the path and its permissions") from e
    if not os.access(path, os.X_OK):
        raise KernelError(f"UML kernel {str(path)!r} is not executable",
                          hint="chmod +x it, or pick another with --kernel")
    return st


def _options(path):
    """The kernel's command-line options (``--help`` lists them)."""
    try:
        out = subprocess.run([path, "--help"], capture_output=True, timeout=20,
                             stdin=subprocess.DEVNULL, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(re.findall(r"^([a-z_0-9]+=?)", out.decode(
        errors="replace"), re.M))


def _patches(path):
    """The patch names apppot-kernel recorded beside its build (build.json);
    () for other binaries."""
    try:
        meta = json.loads((path.parent / "build.json").read_text())
    except (OSError, ValueError):
        return ()
    return tuple(p["name"] for p in meta.get("patches", ()))


@functools.lru_cache(maxsize=8)
def _load_kernel(path, _mtime, _size):
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise KernelError(f"{path!r} is not a UML kernel (not an ELF binary)",
                              hint="use linux.uml from user-mode-linux")
    argv = [path, "--showconfig"]
    log.debug("executing: %s", shlex.join(argv))
    try:
        out = subprocess.run(argv, capture_output=True, timeout=20,
                             stdin=subprocess.DEVNULL, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelError(f"{path!r} is not a UML kernel",
                          hint="use linux.uml from user-mode-linux") from e
    text = out.decode(errors="replace")
    m = re.search(r"^# Linux/um ([^\s]+) Kernel Configuration", text, re.M)
    if not m:
        raise KernelError(f"{path!r} is not a UML kernel "
                          "(--showconfig gave no Linux/um configuration)",
                          hint="use linux.uml from user-mode-linux")
    config = dict(re.findall(r"^(CONFIG_\w+)=(.*)$", text, re.M))
    kernel = Kernel(Path(path), m.group(1), config, _options(path),
                    _patches(Path(path)))
    kernel.require(*BASE_FEATURES)
    return kernel


# ------------------------------------------------------------- xstate shim
def host_needs_xstate_shim(cpuinfo="/proc/cpuinfo"):
    """True when the host's XSAVE area exceeds the AVX layout (AVX-512/AMX)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512f", "amx_tile"})
    except OSError:
        pass
    return False


SHIM_BEFORE = (7, 0)  # kernels measured to need it: Debian 12's 6.1; 7.2 not


def xstate_shim(mode=None, kern=None):
    """Path of the LD_PRELOAD shim to use, or None (``APPPOT_XSTATE_SHIM``).
    ``auto``: on AVX-512/AMX hosts, for kernels older than SHIM_BEFORE."""
    mode = (mode or os.environ.get("APPPOT_XSTATE_SHIM") or "auto").lower()
    old = kern is None or kern.version_tuple < SHIM_BEFORE
    if mode == "off" or (mode == "auto" and not (
            old and host_needs_xstate_shim())):
        return None
    return build_shim()


def compile_shared(source, out, extra=(), *, error, what, hint):
    """Build the C file ``source`` into the shared library ``out`` with the
    host's compiler ($CC, cc or gcc): the xstate shim, and the guests'
    preload libraries (host and guests are both Debian 12)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cc:
        raise error(f"no C compiler found to build {what}", hint=hint)
    check_trusted(cc, "C compiler ($CC)", error=error)
    argv = [cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(source),
            *extra]
    log.debug("executing: %s", shlex.join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise error(f"cannot build {what}", hint="check the C compiler",
                    details=proc.stderr)
    os.chmod(out, 0o755)


def build_shim(cache=None):
    source = SHIM_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    cache = Path(cache) if cache else check_cache_home(apppot_home()) / "native"
    target = cache / f"xstate_shim-{digest}.so"
    if target.exists():  # preloaded into UML: only from a safe place
        return check_trusted(target, "xstate shim", error=KernelError)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
    os.close(fd)
    try:
        compile_shared(SHIM_SOURCE, tmp, ["-ldl"], error=KernelError,
                       what="the xstate shim this CPU (AVX-512) needs for "
                       "UML 6.1", hint="install gcc, or set "
                       "APPPOT_XSTATE_SHIM=off with a newer kernel")
    except KernelError:
        os.unlink(tmp)
        raise
    os.replace(tmp, target)  # atomic: concurrent launchers race safely
    return target
