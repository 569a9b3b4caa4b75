"""Recipe files: ``apppot-image build RECIPE.toml``.

A recipe says what goes into an appliance, in TOML (top-level keys first:
in TOML a key after a ``[table]`` header belongs to that table)::

    base = "debian:12"            # or debian:13 (default debian:12)
    mpi = "openmpi"               # openmpi | mpich | none (default openmpi)
    packages = ["gcc", "libopenmpi-dev"]   # Debian packages
    pip = ["numpy==1.26.4"]       # into the venv /opt/venv (see below)
    post = ["mpicc -O2 -o /usr/local/bin/hello /src/hello.c"]
    workdir = "/src"              # where post and the default command run
    command = ["hello"]           # run by apppot-start without PROG

    [[files]]                     # copied from the build context (the
    src = "hello.c"               # recipe's directory) before post runs
    dest = "/src/hello.c"

    [env]                         # for post commands and every run
    OMP_NUM_THREADS = "1"

    [labels]
    maintainer = "me@example.org"

Everything that needs the network happens on the host (mmdebstrap from the
machine's Debian mirror, ``pip download``); everything that installs runs
inside one boot of the new appliance as guest root (pip's venv, the post
commands), so a recipe's commands never run as root on the host.  The
cache key covers the recipe, every input file, the apt sources and
AppPot's guest side; ``apppot-image inspect IMG`` prints the recipe and the
provenance (package versions, wheel digests, file digests) of a build.
"""

import hashlib
import json
import os
import re
import shlex
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import ConfigError

# base → (Debian suite, Python version, glibc version) of that release
BASES = {
    "debian:12": ("bookworm", "3.11", (2, 36)),
    "debian:13": ("trixie", "3.13", (2, 41)),
}
ALIASES = {"bookworm": "debian:12", "trixie": "debian:13",
           "debian:bookworm": "debian:12", "debian:trixie": "debian:13"}
VENV = "/opt/venv"
KEYS = {
    "base": str, "mpi": str, "packages": list, "pip": list, "files": list,
    "post": (list, str), "env": dict, "workdir": str, "command": (list, str),
    "labels": dict,
}
TYPE_NAMES = {str: "string", list: "list", dict: "table", int: "number",
              float: "number", bool: "boolean"}
FILE_KEYS = {"src": str, "dest": str, "mode": str}
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.:-]*$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PIP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-\[\],<>=!~ ;'\"*+]*$")


class RecipeError(ConfigError):
    """A recipe that cannot be built; the message names its line."""


# ------------------------------------------------------------ line numbers
HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")
KEY_RE = re.compile(r"^\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*=")


def key_lines(text):
    """{(table, index, key): line} for every ``key =`` line of a TOML text;
    ``table`` is "" at the top level, ``index`` counts ``[[table]]``s."""
    lines, table, index, counts = {}, "", None, {}
    for n, line in enumerate(text.splitlines(), 1):
        m = HEADER_RE.match(line)
        if m:
            table = m.group(2).strip("\"'")
            index = None
            if m.group(1) == "[[":
                index = counts.get(table, -1) + 1
                counts[table] = index
            lines.setdefault((table, index, None), n)
            continue
        m = KEY_RE.match(line)
        if m:
            lines.setdefault((table, index, m.group(1).strip("\"'")), n)
    return lines


@dataclass(frozen=True)
class Where:
    """A recipe file and its key lines: names the line of a key."""

    path: Path
    lines: dict

    def line(self, key, table="", index=None):
        for k in ((table, index, key), (table, index, None), ("", None, table),
                  ("", None, key)):
            if k in self.lines:
                return self.lines[k]
        return None

    def error(self, message, hint, key, table="", index=None):
        n = self.line(key, table, index)
        at = f"{self.path}:{n}" if n else str(self.path)
        return RecipeError(f"{at}: {message}", hint=hint)


# ------------------------------------------------------------ the recipe
@dataclass(frozen=True)
class FileCopy:
    src: Path  # absolute, inside the build context
    dest: str  # absolute, inside the image
    mode: int | None = None


@dataclass(frozen=True)
class Recipe:
    path: Path
    text: str
    base: str = "debian:12"
    mpi: str = "openmpi"
    packages: tuple = ()
    pip: tuple = ()
    files: tuple = ()
    post: tuple = ()  # (command, recipe line)
    env: dict = field(default_factory=dict)
    workdir: str = ""
    command: tuple = ()
    labels: dict = field(default_factory=dict)

    @property
    def suite(self):
        return BASES[self.base][0]

    @property
    def python(self):
        return BASES[self.base][1]

    @property
    def context(self):
        return self.path.parent

    def debian_packages(self):
        return tuple(sorted(set(self.packages) | ({"python3-venv"}
                                                   if self.pip else set())))

    def runtime(self):
        """What apppot-start honours (apppot.runtime)."""
        env = dict(self.env)
        if self.pip:
            env.setdefault("PATH", f"{VENV}/bin:/usr/local/sbin:/usr/local/"
                           "bin:/usr/sbin:/usr/bin:/sbin:/bin")
        return {"env": [f"{k}={v}" for k, v in env.items()],
                "entrypoint": [], "cmd": list(self.command),
                "workdir": self.workdir, "user": None, "shell": True,
                "labels": dict(self.labels)}


def load(path):
    """Parse and check a recipe; errors name the file and line."""
    path = Path(path).absolute()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"cannot read recipe {str(path)!r} ({e.strerror})",
                          hint="give the path of a .toml recipe") from None
    try:
        text = raw.decode()
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text",
                          hint="recipes are TOML files") from None
    except tomllib.TOMLDecodeError as e:  # its message has the line
        raise RecipeError(f"{path}: {e}", hint="fix the TOML syntax "
                          "(https://toml.io)") from None
    return check(path, text, data)


def check(path, text, data):
    where = Where(path, key_lines(text))
    for key, value in data.items():
        if key not in KEYS:
            raise where.error(f"unknown key {key!r}", f"known keys: "
                              f"{', '.join(KEYS)}", key)
        want = KEYS[key]
        if not isinstance(value, want):
            names = " or ".join(TYPE_NAMES[t] for t in (
                want if isinstance(want, tuple) else (want,)))
            raise where.error(f"{key} must be a {names}, not a "
                              f"{TYPE_NAMES.get(type(value), 'value')}",
                              "see apppot-image build --help", key)
    base = ALIASES.get(data.get("base", "debian:12"), data.get("base",
                                                               "debian:12"))
    if base not in BASES:
        why = ("Ubuntu needs Ubuntu's archive keyring, which Debian 12 does "
               "not ship, and AppPot uses only the machine's Debian mirror"
               if base.startswith("ubuntu") else f"unknown base {base!r}")
        raise where.error(f"base {data['base']!r}: {why}",
                          f"use one of {', '.join(BASES)}", "base")
    mpi = data.get("mpi", "openmpi")
    if mpi not in ("openmpi", "mpich", "none"):
        raise where.error(f"mpi {mpi!r} is not openmpi, mpich or none",
                          "e.g. mpi = \"openmpi\"", "mpi")
    if mpi == "mpich" and base != "debian:12":
        raise where.error(f"mpi = \"mpich\" is built for debian:12 only "
                          f"(its mpi4py wheel), not {base}",
                          "use base = \"debian:12\", or mpi = \"openmpi\"",
                          "mpi")
    packages = _strings(where, data, "packages", PACKAGE_RE,
                        "Debian package names, e.g. [\"gcc\", \"make\"]")
    pip = _strings(where, data, "pip", PIP_RE,
                   "requirement specifiers, e.g. [\"numpy==1.26.4\"]")
    env = {}
    for name, value in data.get("env", {}).items():
        if not ENV_RE.match(name) or not isinstance(value, str):
            raise where.error(f"env: {name!r} must be a variable name with "
                              "a string value", "e.g. OMP_NUM_THREADS = \"1\"",
                              name, "env")
        env[name] = value
    labels = {}
    for name, value in data.get("labels", {}).items():
        if not isinstance(value, str):
            raise where.error(f"labels: {name!r} must be a string",
                              "e.g. maintainer = \"me@example.org\"", name,
                              "labels")
        labels[name] = value
    workdir = data.get("workdir", "")
    if workdir and not workdir.startswith("/"):
        raise where.error(f"workdir {workdir!r} is not an absolute path",
                          "e.g. workdir = \"/src\"", "workdir")
    command = data.get("command", [])
    if isinstance(command, str):
        command = ["/bin/sh", "-c", command]
    if not all(isinstance(a, str) for a in command):
        raise where.error("command must be a list of strings",
                          "e.g. command = [\"hello\", \"--fast\"]", "command")
    post = data.get("post", [])
    post = [post] if isinstance(post, str) else post
    if not all(isinstance(c, str) and c.strip() for c in post):
        raise where.error("post must be a list of non-empty shell commands",
                          "e.g. post = [\"make -C /src\"]", "post")
    post_line = where.line("post") or 0
    post_lines = _item_lines(text, post_line, post)
    files = tuple(_file(where, path.parent, i, f)
                  for i, f in enumerate(data.get("files", [])))
    return Recipe(path, text, base, mpi, tuple(packages), tuple(pip), files,
                  tuple(zip(post, post_lines, strict=True)), env, workdir,
                  tuple(command), labels)


def _strings(where, data, key, pattern, hint):
    items = data.get(key, [])
    for item in items:
        if not isinstance(item, str) or not pattern.match(item):
            raise where.error(f"{key}: bad entry {item!r}", hint, key)
    return items


def _item_lines(text, first, items):
    """The line of each string of a list that starts at line ``first``
    (where its first words appear, in order), else ``first``."""
    lines = text.splitlines()
    out, n = [], max(first, 1)
    for item in items:
        probe = item.strip().splitlines()[0][:24] if item.strip() else ""
        found = next((k for k in range(n, len(lines) + 1)
                      if probe and probe in lines[k - 1]), None)
        out.append(found or first)
        n = found or n
    return out


def _file(where, context, index, entry):
    if not isinstance(entry, dict):
        raise where.error("files entries must be tables with src and dest",
                          "[[files]]\nsrc = \"hello.c\"\ndest = \"/src/hello.c\"",
                          "files")
    for key, value in entry.items():
        if key not in FILE_KEYS or not isinstance(value, FILE_KEYS[key]):
            raise where.error(f"files: unknown key or not a string: {key!r}",
                              "files entries have src, dest and mode "
                              "(\"0755\")", key, "files", index)
    for key in ("src", "dest"):
        if key not in entry:
            raise where.error(f"files: entry {index + 1} has no {key}",
                              "give src (in the build context) and dest "
                              "(absolute, in the image)", None, "files", index)
    src = Path(os.path.realpath(context / entry["src"]))
    if src != context.resolve() and context.resolve() not in src.parents:
        raise where.error(f"files: src {entry['src']!r} is outside the build "
                          f"context {str(context)!r}", "copy it next to the "
                          "recipe", "src", "files", index)
    if not src.exists():
        raise where.error(f"files: src {entry['src']!r} does not exist",
                          f"paths are relative to {str(context)!r}", "src",
                          "files", index)
    dest = entry["dest"]
    if not dest.startswith("/") or ".." in PurePosixPath(dest).parts:
        raise where.error(f"files: dest {dest!r} must be an absolute path "
                          "without '..'", "e.g. dest = \"/src/hello.c\"",
                          "dest", "files", index)
    mode = entry.get("mode")
    if mode is not None:
        try:
            mode = int(mode, 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o7777:
            raise where.error(f"files: mode {entry['mode']!r} is not octal",
                              "e.g. mode = \"0755\"", "mode", "files", index)
    return FileCopy(src, dest, mode)


# ------------------------------------------------------------ cache key
def file_digests(recipe):
    """sha256 of every input file (directories: every file under them,
    with its relative path, mode and link target)."""
    out = {}
    for f in recipe.files:
        paths = [f.src] if not f.src.is_dir() else sorted(
            p for p in f.src.rglob("*"))
        for p in [f.src, *paths] if f.src.is_dir() else paths:
            rel = str(p.relative_to(recipe.context))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = f"dir:{stat.S_IMODE(st.st_mode):o}"
            else:
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        h.update(chunk)
                out[rel] = f"{stat.S_IMODE(st.st_mode):o}:{h.hexdigest()}"
    return out


def inputs(recipe, rootfs_key, guest_key):
    """Everything a recipe build depends on (its cache key's input)."""
    return {"recipe": hashlib.sha256(recipe.text.encode()).hexdigest(),
            "files": file_digests(recipe), "rootfs": rootfs_key,
            "guest": guest_key}


# ------------------------------------------------------------ in the guest
WHEELS = "/var/lib/apppot/build/wheels"


def build_script(recipe):
    """The shell script the build boot runs as guest root.  Each step's
    failure exits with 100 + its number (0: pip, N: post command N), which
    the host turns back into a recipe line."""
    env = "".join(f"export {k}={shlex.quote(v)}\n"
                  for k, v in recipe.env.items())
    lines = ["set -u", "export PATH=/usr/local/sbin:/usr/local/bin:"
             "/usr/sbin:/usr/bin:/sbin:/bin", "export HOME=/root"]
    if recipe.pip:
        lines += [
            "echo '== pip: venv " + VENV + "' >&2",
            f"python3 -m venv --system-site-packages {VENV} || exit 100",
            shlex.join([f"{VENV}/bin/pip", "install", "--no-index",
                        "--no-cache-dir", "--disable-pip-version-check",
                        "--find-links", WHEELS, *recipe.pip])
            + " >&2 || exit 100",
            f"export PATH={VENV}/bin:$PATH"]
    lines.append(env.rstrip("\n"))
    if recipe.workdir:
        lines.append(f"mkdir -p {shlex.quote(recipe.workdir)}")
    lines.append(f"cd {shlex.quote(recipe.workdir or '/')}")
    for i, (cmd, _line) in enumerate(recipe.post, 1):
        lines += [f"echo {shlex.quote(f'== post {i}: {cmd}')} >&2",
                  f"/bin/sh -ec {shlex.quote(cmd)} >&2 || exit {100 + i}"]
    lines += ["rm -rf /var/lib/apppot/build", "exit 0"]
    return "\n".join(line for line in lines if line) + "\n"


def failed_step(recipe, status):
    """The recipe line of the step a build boot's status names."""
    if status == 100:
        return f"pip install (recipe line {recipe.path}:"\
               f"{Where(recipe.path, key_lines(recipe.text)).line('pip')})"
    i = status - 100
    if 1 <= i <= len(recipe.post):
        cmd, line = recipe.post[i - 1]
        return f"post command {i} ({recipe.path}:{line}: {cmd!r})"
    return None


def manifest(recipe):
    """The recipe as plain data (printed by apppot-image inspect)."""
    return {"base": recipe.base, "suite": recipe.suite, "mpi": recipe.mpi,
            "packages": list(recipe.packages), "pip": list(recipe.pip),
            "files": [{"src": str(f.src.relative_to(recipe.context)),
                       "dest": f.dest} for f in recipe.files],
            "post": [c for c, _ in recipe.post], "env": recipe.env,
            "workdir": recipe.workdir, "command": list(recipe.command),
            "labels": recipe.labels}


def dumps(obj):
    return json.dumps(obj, indent=1, sort_keys=True)
