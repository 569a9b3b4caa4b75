"""What an image asks of a run: its environment, default command, working
directory, user, and whether it boots on AppPot's system disk.

Read from the stamp next to the image (``IMG.json``, written by
``apppot-image build`` and ``apppot-image import``); an image without one
(or an older stamp) is an AppPot image that boots itself with no defaults.

Rules (the same for recipe images and imported OCI images):

* **Command**: ``apppot-start PROG ARGS`` runs exactly PROG ARGS (like
  ``apptainer exec`` or ``docker run --entrypoint``); without PROG the image's
  ``Entrypoint`` + ``Cmd`` (a recipe's ``command``) run, like ``docker run
  IMG`` or Apptainer's ``%runscript``; without either, ``./apppot-run`` of
  the job dir or a shell, as for every AppPot image.
* **Working directory**: an explicit PROG starts in the job dir (relative
  paths in its arguments name job files; MPI ranks always do); the image's
  default command starts in its ``WorkingDir`` if it has one.  The job dir
  is mounted at its host path either way.
* **Environment**: the image's ``Env`` first, then AppPot's own
  (``HOME``, ``USER`` ...), then ``--env``/``-x``: the user's word is last.
  An image's ``PATH`` replaces AppPot's default one.
* **User**: an image ``User`` runs the program as that uid/gid (resolved in
  the image's /etc/passwd at import); without one it runs as you.  Files
  written to the job dir belong to you on the host either way (UML and the
  9P server write as you); inside, the job dir shows its host owner, so a
  ``User`` other than you or root can write there only if its mode lets it.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ImageError
from .images import check_image, default_image

SYSTEM_MPI = "none"  # the system disk: the minimal image (python3 + AppPot)
TREE_DEVICE = "/dev/ubdc"  # ubd0 system disk, ubd1 control disk, ubd2 tree


@dataclass(frozen=True)
class ImageRuntime:
    """An image's run-time defaults (see the module docstring)."""

    image: Path
    kind: str = "apppot"  # apppot: boots itself; oci: a tree on the system disk
    env: tuple = ()  # "NAME=value" as in an OCI config
    entrypoint: tuple = ()
    cmd: tuple = ()
    workdir: str = ""
    user: dict | None = None  # uid, gid, name, home
    mpi: str | None = None
    mpi_found: tuple = ()
    shell: bool = True  # has /bin/sh (the MPI launchers' remote start)
    labels: dict = field(default_factory=dict)

    @classmethod
    def load(cls, image):
        stamp = Path(str(image) + ".json")
        try:
            data = json.loads(stamp.read_text())
        except FileNotFoundError:
            return cls(Path(image))
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot read image stamp {str(stamp)!r} ({e})",
                             hint="rebuild or re-import the image") from None
        rt = data.get("runtime") or {}
        return cls(Path(image), kind=data.get("kind", "apppot"),
                   env=tuple(rt.get("env") or ()),
                   entrypoint=tuple(rt.get("entrypoint") or ()),
                   cmd=tuple(rt.get("cmd") or ()),
                   workdir=rt.get("workdir") or "",
                   user=rt.get("user"), mpi=data.get("mpi"),
                   mpi_found=tuple(data.get("mpi_found") or ()),
                   shell=bool(rt.get("shell", True)),
                   labels=dict(rt.get("labels") or {}))

    @property
    def on_system_disk(self):
        return self.kind == "oci"

    def env_bytes(self, with_user=True):
        out = {}
        for item in self.env:
            name, sep, value = item.partition("=")
            if name and sep:
                out[name.encode()] = value.encode("utf-8", "surrogateescape")
        if self.user and with_user:
            for var in ("USER", "LOGNAME"):
                out.setdefault(var.encode(), self.user["name"].encode())
            out.setdefault(b"HOME", self.user["home"].encode())
        return out

    def default_argv(self):
        return [os.fsencode(a) for a in (*self.entrypoint, *self.cmd)]

    def apply(self, guest):
        """Set ``guest``'s argv, working directory, environment and user
        from the image; ``guest.argv`` empty means no PROG was given."""
        if not guest.argv and self.default_argv():
            guest.argv = self.default_argv()
            if self.workdir:
                guest.extra["cwd"] = self.workdir
        guest.env = {**self.env_bytes(), **guest.env}
        if self.user:
            guest.uid, guest.gid = int(self.user["uid"]), int(self.user["gid"])
            guest.user = guest.group = self.user["name"]
        if self.on_system_disk:
            guest.extra["image_root"] = {"device": TREE_DEVICE}


def system_disk():
    """AppPot's system disk for imported images (checked)."""
    path = default_image(SYSTEM_MPI)
    if not path.exists():
        raise ImageError(f"AppPot's system disk {str(path)!r} is missing "
                         "(imported images boot from it)",
                         hint="build it once: apppot-image build --mpi none")
    return check_image(path)


@dataclass(frozen=True)
class Disks:
    """Which disks an appliance boots: ``image`` (ubd0, with ``cow``) and,
    for an imported image, its tree as ubd2 (``tree`` with ``tree_cow``)."""

    image: Path
    cow: Path
    tree: Path | None = None
    tree_cow: Path | None = None

    def extra_args(self):
        return (f"ubd2={self.tree_cow},{self.tree}",) if self.tree else ()


def disks(rt, rundir, cow=None, system=None):
    """The disks for ``rt``'s image; a user's COW file (``--image COW:IMG``)
    keeps the changes of the image itself (for an imported one: its tree,
    booted from ``system``, AppPot's system disk)."""
    rundir = Path(rundir)
    if not rt.on_system_disk:
        return Disks(rt.image, cow or rundir / "root.cow")
    return Disks(system or system_disk(), rundir / "system.cow", rt.image,
                 cow or rundir / "tree.cow")

