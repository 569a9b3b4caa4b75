"""Appliance images: where the default ones live, and checks before booting.

Pure reads only; building images is ``apppot.imagebuild``.
"""

import json
import os
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .config import apppot_home
from .errors import ImageError

EXT_MAGIC_OFFSET = 1024 + 56  # superblock s_magic
EXT_MAGIC = 0xEF53
COW_MAGIC = 0x4F4F4F4D  # "MOOO"
COW_V3 = struct.Struct(">IIIQIII")  # magic, version, mtime, size, ...
MPI_FLAVOURS = ("openmpi", "mpich", "none")


SYSTEM_HOME = Path("/var/cache/apppot")  # where scripts/setup.sh builds


def default_image(mpi="openmpi", home=None, environ=None):
    """Where ``apppot-image build --mpi MPI`` puts its image.

    Without $APPPOT_HOME, a user who has not built their own image gets the
    machine-wide one that scripts/setup.sh builds.
    """
    if mpi not in MPI_FLAVOURS:
        raise ImageError(f"unknown MPI flavour {mpi!r}",
                         hint=f"use one of {', '.join(MPI_FLAVOURS)}")
    name = Path("images") / f"apppot-{mpi}.img"
    if home is not None:
        return Path(home) / name
    return cached_path(name, environ)


def cache_homes(environ=None):
    """Where cached builds are looked for, in order: $APPPOT_HOME alone if
    set; else the user's own cache, then the machine-wide one that
    scripts/setup.sh fills."""
    from .trust import check_cache_home  # noqa: PLC0415

    environ = os.environ if environ is None else environ
    own = apppot_home(environ)
    homes = [own] if environ.get("APPPOT_HOME") else [own, SYSTEM_HOME]
    return [check_cache_home(h) for h in homes]


def cached_path(name, environ=None):
    """``name`` in the first of ``cache_homes`` that has it, else in the
    first (where a build would put it)."""
    homes = cache_homes(environ)
    return next((h / name for h in homes if (h / name).exists()),
                homes[0] / name)


@dataclass(frozen=True)
class ImageChoice:
    """The base image and, if the user named one, the COW file to use."""

    base: Path
    cow: Path | None = None


def parse_image_arg(value, mpi="openmpi"):
    """``--image IMG`` or ``--image COW:IMG`` (``COW,IMG`` as in 2012)."""
    if not value:
        return ImageChoice(default_image(mpi))
    for sep in (":", ","):
        if sep in value:
            cow, base = value.split(sep, 1)
            if not cow or not base:
                raise ImageError(f"--image: cannot parse {value!r}",
                                 hint="use IMG or COW:IMG")
            return ImageChoice(Path(base).absolute(), Path(cow).absolute())
    return ImageChoice(Path(value).absolute())


def check_image(path):
    """Raise ImageError unless ``path`` is a readable ext2/3/4 image."""
    path = Path(path)
    if not path.exists():
        hint = ("build it with: apppot-image build" if path.parent.name ==
                "images" else "check the path given to --image")
        raise ImageError(f"appliance image not found: {str(path)!r}", hint=hint)
    if "," in str(path):
        raise ImageError(f"image path contains ',': {str(path)!r}",
                         hint="UML splits disk options at commas; rename it")
    try:
        with open(path, "rb") as f:
            f.seek(EXT_MAGIC_OFFSET)
            magic = f.read(2)
    except OSError as e:
        raise ImageError(f"cannot read appliance image {str(path)!r}",
                         hint="check its permissions") from e
    if len(magic) < 2 or struct.unpack("<H", magic)[0] != EXT_MAGIC:
        raise ImageError(f"{str(path)!r} is not an ext4 appliance image",
                         hint="build one with apppot-image build")
    return path


def check_cow(cow, base):
    """An existing COW file must match its base image (path, size, mtime)."""
    cow = Path(cow)
    if not cow.exists():
        return
    try:
        with open(cow, "rb") as f:
            head = f.read(COW_V3.size + 4096)
    except OSError as e:
        raise ImageError(f"cannot read COW file {str(cow)!r}",
                         hint="check its permissions") from e
    if len(head) < COW_V3.size or COW_V3.unpack_from(head)[0] != COW_MAGIC:
        raise ImageError(f"{str(cow)!r} is not a UML COW file",
                         hint="give a COW file made by UML, or a new name")
    _, version, mtime, size, *_ = COW_V3.unpack_from(head)
    if version != 3:
        return  # older formats: let UML judge
    st = os.stat(base)
    if int(st.st_mtime) != mtime or st.st_size != size:
        raise ImageError(
            f"base image {str(base)!r} changed since COW file {str(cow)!r} "
            "was made (size or mtime differ)",
            hint="use a new COW file, or restore the base image's mtime "
            "(cp --preserve=timestamps)")


CHANGES_META = ".apppot-changes.json"  # snap.META: an archive's first member


def check_changes(value):
    """``--changes``: an apppot-snap changes archive, checked before anything
    starts (its first member is the archive's manifest)."""
    path = Path(value).absolute()
    hint = "give a file made by apppot-snap changes"
    if not os.access(path, os.R_OK) or not path.is_file():
        raise ImageError(f"changes archive not readable: {value!r}", hint=hint)
    try:
        with tarfile.open(path, "r:*") as tar:
            first = tar.next()
            if first is None or first.name != CHANGES_META or not first.isfile():
                raise ValueError("no manifest")
            meta = json.load(tar.extractfile(first))
            if not isinstance(meta, dict) or not isinstance(
                    meta.get("deleted"), list):
                raise ValueError("bad manifest")
    except (OSError, EOFError, tarfile.TarError, ValueError,
            UnicodeDecodeError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0].rstrip(":")
        raise ImageError(f"--changes {value!r} is not an apppot-snap changes "
                         f"archive ({why})", hint=hint) from None
    return path
