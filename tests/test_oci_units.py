"""apppot-image import without booting: layers, whiteouts, metadata, digests,
and hostile archives (as an attacker would write them, by hand)."""

import json
import os
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
from conftest import tool
from ociarchive import (
    docker_archive,
    entry,
    image_config,
    layer_tar,
    oci_layout,
    write_dir,
    write_tar,
)

from apppot import oci
from apppot.errors import BuildError

pytestmark = pytest.mark.root


def apply(root, *layers):
    stats = oci.Stats()
    for i, la in enumerate(layers):
        path = root.parent / f"layer{i}.tar"
        path.write_bytes(layer_tar(la))
        with tarfile.open(path, "r|") as t:
            oci.apply_layer(root, t, f"layer {i + 1}", stats)
    return stats


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_whiteouts_and_opaque_directories(root):
    apply(root, [entry("a", "dir"), entry("a/x", data=b"x"),
                 entry("a/y", data=b"y"), entry("b", "dir"),
                 entry("b/old", data=b"o"), entry("b/sub", "dir"),
                 entry("b/sub/deep", data=b"d"), entry("keep", data=b"k")],
          # this layer's own b/new comes before the opaque marker: it stays
          [entry("a/.wh.x"), entry("b/new", data=b"n"),
           entry("b/.wh..wh..opq"), entry(".wh.keep")])
    assert listing(root) == ["a", "a/y", "b", "b/new"]


def test_modes_owners_hard_links_and_capabilities(root):
    apply(root, [entry("bin", "dir"),
                 entry("bin/su", data=b"#!", mode=0o4755, uid=0, gid=0),
                 entry("data", "dir", uid=1234, gid=99, mode=0o1770),
                 entry("data/f", data=b"abc", uid=1234, gid=99, mode=0o640),
                 entry("data/g", "hardlink", target="data/f"),
                 entry("data/l", "symlink", target="/etc/passwd", uid=5,
                       gid=6),
                 entry("bin/ping", data=b"elf", mode=0o755, xattrs={
                     "security.capability": "\x01\x00\x00\x02 \x00\x00\x00"
                     "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"})])
    st = os.stat(root / "bin/su")
    assert oct(st.st_mode & 0o7777) == "0o4755"
    d = os.stat(root / "data")
    assert (d.st_uid, d.st_gid, oct(d.st_mode & 0o7777)) == (1234, 99,
                                                             "0o1770")
    f, g = os.stat(root / "data/f"), os.stat(root / "data/g")
    assert f.st_ino == g.st_ino and f.st_nlink == 2
    assert (f.st_uid, f.st_gid, oct(f.st_mode & 0o777)) == (1234, 99, "0o640")
    assert d.st_mtime == 1_700_000_000
    link = os.lstat(root / "data/l")
    assert os.readlink(root / "data/l") == "/etc/passwd"
    assert (link.st_uid, link.st_gid) == (5, 6)
    assert os.getxattr(root / "bin/ping", "security.capability")[:4] == \
        b"\x01\x00\x00\x02"


def test_device_nodes_are_skipped(root):
    stats = apply(root, [entry("dev", "dir"), entry("dev/sda", "blk"),
                         entry("dev/null", "chr"), entry("p", "fifo")])
    assert listing(root) == ["dev", "p"]
    assert stats.devices == 2 and stats.skipped == ["dev/sda", "dev/null"]


@pytest.mark.parametrize(("layer", "why"), [
    ([entry("/etc/evil", data=b"x")], "'/etc/evil' (absolute name)"),
    ([entry("a/../../evil", data=b"x")], "'a/../../evil' ('..' component)"),
    ([entry("up", "symlink", target="../../../../../tmp"),
      entry("up/pwned", data=b"x")],
     "'up' (symlink to '../../../../../tmp' leaves the tree)"),
    ([entry("x", data=b"x"), entry("h", "hardlink", target="/etc/shadow")],
     "'h' (hard link to '/etc/shadow': absolute name)"),
    ([entry("h", "hardlink", target="../etc/shadow")],
     "'h' (hard link to '../etc/shadow': '..' component)"),
    ([entry("hostetc", "symlink", target="/etc"),
      entry("h", "hardlink", target="hostetc/shadow")],
     "'h' (hard link to 'hostetc/shadow', not a file already in the tree)"),
    ([entry("loop", "symlink", target="/loop"),
      entry("loop/x", data=b"x")], "'loop/x' (symlink loop)"),
    ([entry("d", "dir"), entry("d/.wh..")],
     "'d/.wh..' (whiteout of '.' or '..')"),
    ([entry(".wh...")], "'.wh...' (whiteout of '.' or '..')"),
])
def test_hostile_layers_are_refused(root, layer, why):
    with pytest.raises(BuildError) as e:
        apply(root, layer)
    assert str(e.value) == f"layer 1: unsafe path {why}; nothing imported"
    assert e.value.hint


def test_writes_through_absolute_links_stay_in_the_tree(root):
    host = Path("/var/tmp") / f"apppot-test-oci-{uuid.uuid4().hex}"
    host.mkdir()
    try:
        apply(root, [entry("out", "symlink", target=str(host)),
                     entry("out/pwned", data=b"x"),
                     entry("hostetc", "symlink", target="/etc"),
                     entry("hostetc/apppot-pwned", data=b"x")],
              [entry(f"{str(host)[1:]}/.wh.pwned")])  # a whiteout through it
        assert not list(host.iterdir())
        assert not Path("/etc/apppot-pwned").exists()
        assert (root / "etc/apppot-pwned").read_bytes() == b"x"
        assert not (root / str(host)[1:] / "pwned").exists()  # whited out
    finally:
        host.rmdir()


def busybox_like():
    return [[entry("bin", "dir"), entry("bin/sh", data=b"#!", mode=0o755),
             entry("usr/bin/mpiexec.hydra", data=b"", mode=0o755),
             entry("etc", "dir"),
             entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"
                   b"app:x:1234:99:app:/home/app:/bin/sh\n"),
             entry("etc/group", data=b"root:x:0:\nstaff:x:50:\n")],
            [entry("etc/motd", data=b"hi")]]


@pytest.mark.parametrize("fmt", ["docker", "oci-dir", "oci-tar",
                                 "oci-tar-plain"])
def test_import_formats_give_the_same_tree(tmp_path, fmt):
    layers = [layer_tar(la) for la in busybox_like()]
    config = image_config(layers, Env=["PATH=/bin", "A=b c"],
                          Entrypoint=["/bin/sh"], Cmd=["-c", "echo hi"],
                          User="app:staff", WorkingDir="/w")
    if fmt == "docker":
        archive = write_tar(docker_archive(layers, config, "bb:1"),
                            tmp_path / "a.tar")
    elif fmt == "oci-dir":
        archive = write_dir(oci_layout(layers, config), tmp_path / "layout")
    else:
        archive = write_tar(oci_layout(layers, config, gz=fmt == "oci-tar"),
                            tmp_path / "o.tar")
    out = oci.import_image(archive, tmp_path / "out.img")
    stamp = json.loads((tmp_path / "out.img.json").read_text())
    assert stamp["kind"] == "oci" and stamp["mpi"] == "mpich"
    assert stamp["runtime"]["user"] == {"uid": 1234, "gid": 50, "name": "app",
                                        "home": "/home/app"}
    assert stamp["runtime"]["env"] == ["PATH=/bin", "A=b c"]
    assert stamp["runtime"]["entrypoint"] == ["/bin/sh"]
    assert stamp["runtime"]["cmd"] == ["-c", "echo hi"]
    assert stamp["runtime"]["workdir"] == "/w"
    assert stamp["runtime"]["shell"] is True
    assert oct(out.stat().st_mode & 0o777) == "0o444"
    ls = subprocess.run(["debugfs", "-R", "ls -p /etc", str(out)],
                        capture_output=True, text=True, check=True).stdout
    assert "/motd/" in ls and "/passwd/" in ls
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(
        "apppot-import-")]


def test_corrupt_blob_is_refused(tmp_path):
    layers = [layer_tar(la) for la in busybox_like()]
    files = oci_layout(layers, image_config(layers), gz=False)
    name = next(n for n, d in files.items() if d == layers[1])
    files[name] = layers[1].replace(b"hi", b"ho")
    archive = write_dir(files, tmp_path / "layout")
    with pytest.raises(BuildError, match="layer 2 .*: blob digest mismatch"):
        oci.import_image(archive, tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()


def test_import_cli_refuses_hostile_archive_in_one_line(tmp_path):
    layers = [layer_tar([entry("ok", data=b"1")]),
              layer_tar([entry("../../../../tmp/evil", data=b"x")])]
    archive = write_tar(docker_archive(layers, image_config(layers)),
                        tmp_path / "evil.tar")
    r = subprocess.run([tool("apppot-image"), "import", str(archive),
                        "--output", str(tmp_path / "evil.img")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1
    err, hint = r.stderr.strip().splitlines()[-2:]
    assert err.startswith("apppot-image: error: layer 2 (sha256:")
    assert err.endswith("): unsafe path '../../../../tmp/evil' ('..' "
                        "component); nothing imported")
    assert hint.startswith("hint: ")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "evil.img").exists()


def test_not_an_archive(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"not a tar")
    with pytest.raises(BuildError, match="cannot read image archive"):
        oci.import_image(tmp_path / "x.tar", tmp_path / "x.img")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BuildError, match="neither a docker save archive"):
        oci.import_image(empty, tmp_path / "x.img")


def test_detects_mpi_and_user(root):
    apply(root, [entry("usr/lib/x86_64-linux-gnu/openmpi", "dir"),
                 entry("usr/bin/orterun", data=b"", mode=0o755),
                 entry("usr/bin/mpirun", "symlink", target="orterun")])
    assert oci.detect_mpi(root) == ["openmpi"]
    assert oci.resolve_user(root, "42:7") == {"uid": 42, "gid": 7,
                                              "name": "u42", "home": "/"}
    with pytest.raises(BuildError, match="no such user"):
        oci.resolve_user(root, "nobody-here")
