"""Fast unit tests of the pure parts of the core (no appliance started)."""

import json
import os
import struct
from pathlib import Path

import pytest

from apppot import snap, status
from apppot.appliance import (
    MCONSOLE_MAGIC,
    NOTIFY,
    check_max_map_count,
    choose_memdir,
    parse_notice,
    write_control_disk,
)
from apppot.config import parse_seconds, parse_size
from apppot.errors import ConfigError, ImageError
from apppot.images import COW_MAGIC, check_cow, check_image, parse_image_arg
from apppot.spec import ApplianceSpec, Channels, GuestSpec, parse_env_args


def make_spec(**kw):
    base = dict(kernel=Path("/usr/bin/linux.uml"), umid="job1",
                uml_dir=Path("/tmp/r"), mem_bytes=256 << 20,
                image=Path("/img/base.img"), cow=Path("/tmp/r/root.cow"),
                control=Path("/tmp/r/control.tar"), notify=Path("/tmp/r/notify"),
                channels=Channels(console=4, stdout=5, stderr=6, stdin=7),
                hostfs=Path("/home/u/job"))
    base.update(kw)
    return ApplianceSpec(**base)


def test_argv_is_data_and_keeps_secrets_off_the_command_line():
    argv = make_spec().argv()
    assert argv[0] == "/usr/bin/linux.uml"
    assert "ubd0=/tmp/r/root.cow,/img/base.img" in argv
    assert "ubd1r=/tmp/r/control.tar" in argv
    assert "hostfs=/home/u/job" in argv
    assert "mem=256M" in argv
    assert "mconsole=notify:/tmp/r/notify" in argv
    serial = [a for a in argv if a.startswith("ssl") and a != "ssl=null"]
    assert serial == ["ssl0=null,fd:5", "ssl1=null,fd:6", "ssl2=fd:7,null"]
    assert "noreboot" in argv and "con0=null,fd:4" in argv
    # nothing guest-specific (argv, env, uid) rides on the command line
    assert not any(a.startswith(("APPPOT", "apppot.")) for a in argv)


def test_argv_interactive_and_plain_image():
    spec = make_spec(cow=None, channels=Channels(console=3, terminal=9))
    argv = spec.argv()
    assert "ubd0=/img/base.img" in argv
    assert "ssl0=fd:9,fd:9" in argv
    assert not any(a.startswith("ssl2=") for a in argv)


def test_hostfs_defaults_to_nothing():
    assert "hostfs=/dev/null/apppot-no-host-files" in make_spec(
        hostfs=None).argv()
    for below in ("", "/", "/..", "/../..", "/../../etc"):  # as hostfs joins
        with pytest.raises(NotADirectoryError):
            os.stat("/dev/null/apppot-no-host-files" + below)


def test_guest_spec_roundtrips_any_bytes():
    args = [b"a b", b"", "ü".encode(), b"x\ny", b"\xff\xfe", b"'\"$"]
    spec = GuestSpec(uid=1, gid=2, user="u", group="g", jobdir="/j",
                     argv=args, env={b"K": b"v\n"})
    data = json.loads(spec.to_json())
    assert [bytes.fromhex(a) for a in data["argv"]] == args
    assert {bytes.fromhex(k): bytes.fromhex(v)
            for k, v in data["env"].items()} == {b"K": b"v\n"}


@pytest.mark.parametrize(("text", "value"), [
    ("256M", 256 << 20), ("1G", 1 << 30), ("512", 512 << 20),
    ("64mib", 64 << 20), ("2048K", 2 << 20)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["abc", "", "0", "1.5G", "-3M", "12Q"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError, match="--mem"):
        parse_size(text)


def test_parse_seconds():
    assert parse_seconds("2.5") == 2.5
    with pytest.raises(ConfigError, match="--timeout"):
        parse_seconds("soon")


def test_env_args():
    env = parse_env_args(["A=1", "B", "C="], {"B": "from-host"})
    assert env == {b"A": b"1", b"B": b"from-host", b"C": b""}
    with pytest.raises(ConfigError, match="not set"):
        parse_env_args(["MISSING"], {})
    with pytest.raises(ConfigError, match="bad variable name"):
        parse_env_args(["1X=2"], {})


def test_image_arg_forms(tmp_path):
    assert parse_image_arg("/a/b.img").cow is None
    choice = parse_image_arg("my.cow:/a/b.img")
    assert choice.cow.name == "my.cow" and str(choice.base) == "/a/b.img"
    assert parse_image_arg("c,/a/b.img").cow.name == "c"
    with pytest.raises(ImageError):
        parse_image_arg(":/a/b.img")


def test_check_image(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        check_image(tmp_path / "missing.img")
    bad = tmp_path / "bad.img"
    bad.write_bytes(b"\0" * 4096)
    with pytest.raises(ImageError, match="not an ext4"):
        check_image(bad)
    good = tmp_path / "good.img"
    good.write_bytes(b"\0" * 1080 + struct.pack("<H", 0xEF53) + b"\0" * 100)
    assert check_image(good) == good


def test_check_cow_detects_changed_base(tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(b"x" * 1000)
    st = os.stat(base)
    cow = tmp_path / "c.cow"
    header = struct.pack(">IIIQIII", COW_MAGIC, 3, int(st.st_mtime), 1000,
                         512, 4096, 0)
    cow.write_bytes(header + str(base).encode() + b"\0" * 10)
    check_cow(cow, base)  # matches
    os.utime(base, (st.st_atime, st.st_mtime + 10))
    with pytest.raises(ImageError, match="changed since COW"):
        check_cow(cow, base)


def test_parse_notice():
    msg = b"apppot:exit 3"
    data = NOTIFY.pack(MCONSOLE_MAGIC, 2, 3, len(msg)) + msg + b"\0" * 20
    n = parse_notice(data, 1.5)
    assert (n.kind, n.text, n.at) == (3, "apppot:exit 3", 1.5)
    assert parse_notice(b"junk") is None
    assert parse_notice(NOTIFY.pack(0, 2, 3, 1) + b"x") is None


def test_control_disk_is_block_aligned_tar(tmp_path):
    import tarfile

    changes = tmp_path / "c.tar.gz"
    changes.write_bytes(b"z" * 777)
    disk = tmp_path / "control.tar"
    write_control_disk(disk, b'{"a": 1}', changes)
    assert disk.stat().st_size % 512 == 0 and disk.stat().st_size >= 64 << 10
    with tarfile.open(disk) as tar:
        assert tar.getnames() == ["spec.json", "changes.tar.gz"]
        assert tar.extractfile("changes.tar.gz").read() == b"z" * 777


def test_memdir_follows_uml_rule():
    assert choose_memdir({"TMPDIR": "/x"}) == (Path("/x"), "TMPDIR")
    assert choose_memdir({"TMP": "/y"})[1] == "TMP"


def test_max_map_count_warning(tmp_path, caplog):
    f = tmp_path / "mmc"
    f.write_text("65530\n")
    assert check_max_map_count(256 << 20, f) is None
    want = check_max_map_count(1 << 30, f)
    assert want >= (1 << 30) // 4096
    assert "sysctl -w vm.max_map_count" in caplog.text


def test_status_codes_distinct():
    codes = [status.BOOT_FAILED, status.GUEST_CRASHED, status.TIMEOUT,
             status.APPPOT_ERROR, status.CANNOT_EXECUTE, status.NOT_FOUND]
    assert len(set(codes)) == len(codes)
    assert status.from_signal(2) == 130
    assert "124" in status.help_text()


# ------------------------------------------------------------ snap logic
def test_snap_diff_added_changed_deleted():
    base = {"/a": [1], "/d": [2], "/d/x": [3], "/d/y": [3], "/keep": [4]}
    now = {"/a": [9], "/keep": [4], "/new": [5]}
    changed, deleted = snap.diff(base, now)
    assert changed == ["/a", "/new"]
    assert deleted == ["/d"]  # children of a deleted dir are implied


def test_snap_without_init_lines():
    text = "root:x:0:0::/root:/bin/bash\nalice:x:1000:1000:AppPot job user:/h:/b\n"
    assert snap.without_lines(text, ["alice:x:1000:1000:AppPot job user:/h:/b"]) \
        == "root:x:0:0::/root:/bin/bash\n"


@pytest.mark.parametrize("name", ["../etc/x", "/etc/x", "a/../../b", "."])
def test_snap_refuses_unsafe_names(name):
    with pytest.raises(snap.SnapError):
        snap.safe_member_name(name)


def test_snap_scan_sees_modes_owners_links(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "l").symlink_to("f")
    m1 = snap.scan(str(tmp_path), exclude=())
    os.chmod(tmp_path / "f", 0o600)
    (tmp_path / "l").unlink()
    (tmp_path / "l").symlink_to("elsewhere")
    m2 = snap.scan(str(tmp_path), exclude=())
    changed, deleted = snap.diff(m1, m2)
    assert changed == [str(tmp_path / "f"), str(tmp_path / "l")]
    assert deleted == []
    assert snap.excluded("/proc/1") and not snap.excluded("/procx")


def test_kernel_feature_check_names_the_option():
    from apppot.errors import KernelError
    from apppot.kernel import Kernel

    k = Kernel(Path("/k"), "6.1.0", {"CONFIG_HOSTFS": "y"})
    k.require("hostfs")
    with pytest.raises(KernelError, match="CONFIG_UML_NET_MCAST"):
        k.require("mcast")
    assert k.version_tuple == (6, 1, 0)


def test_real_kernel_config_is_read(uml_kernel):
    from apppot.kernel import find_kernel

    k = find_kernel(uml_kernel)
    assert k.has("hostfs") and k.has("mconsole") and k.has("mcast")
    assert k.version_tuple >= (6, 1)


def test_parse_net_tap_and_raw_links():
    from apppot.start import HostLink, parse_net

    assert parse_net(None) == "none" and parse_net("slirp") == "slirp"
    tap = parse_net("tap:apo1:10.254.0.11/24")
    assert tap == HostLink("tap", "apo1", "10.254.0.11/24")
    assert tap.uml_args() == ("vec0:transport=tap,ifname=apo1",)
    assert tap.guest_net() == [{"device": "vec0", "name": "eth0",
                                "address": "10.254.0.11/24"}]
    assert parse_net("raw:veth-g:10.0.0.2/8").uml_args() == (
        "vec0:transport=raw,ifname=veth-g",)
    for bad, msg in (("tap:x", "cannot parse"), ("gre:a:1.2.3.4/8",
                     "cannot parse"), ("tap:a,b:1.2.3.4/8", "interface name"),
                     ("tap:abcdefghijklmnop:1.2.3.4/8", "interface name"),
                     ("raw:a:1.2.3.400/8", "bad address"),
                     ("raw:a:1.2.3.4", "no prefix"),
                     ("fd:x:1.2.3.4/8", "bad file descriptor"),
                     ("fd:-3:1.2.3.4/8", "bad file descriptor"),
                     ("fd:2:1.2.3.4/8", "bad file descriptor"),
                     ("fd:3", "cannot parse"), ("fd:3:1.2.3.4", "no prefix")):
        with pytest.raises(ConfigError, match=msg):
            parse_net(bad)


def test_parse_net_inherited_socket():
    from apppot.start import HostLink, check_link, parse_net

    link = parse_net("fd:7:10.254.0.12/24")
    assert link == HostLink("fd", None, "10.254.0.12/24", 7)
    assert link.uml_args() == ("vec0:transport=fd,fd=7",)
    assert link.fds() == (7,)
    assert parse_net("raw:veth-g:10.0.0.2/8").fds() == ()
    assert link.guest_net() == [{"device": "vec0", "name": "eth0",
                                 "address": "10.254.0.12/24"}]
    r, w = os.pipe()  # open, but not a socket
    try:
        with pytest.raises(ConfigError, match=f"file descriptor {r} is not "
                           "an open socket"):
            check_link(parse_net(f"fd:{r}:10.0.0.2/8"))
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(ConfigError, match="not an open socket"):
        check_link(parse_net(f"fd:{r}:10.0.0.2/8"))  # closed now
    import socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        check_link(parse_net(f"fd:{a.fileno()}:10.0.0.2/8"))


def test_no_job_dir_gives_the_guest_no_hostfs_prefix(monkeypatch, tmp_path):
    """--no-job-dir: no job dir check (even in /), jobdir None in the
    guest spec, and so no real hostfs= prefix on UML's command line."""
    from apppot import start

    seen = {}

    def fake_common(args, environ, **kw):
        seen.update(kw)
        return "plan"

    monkeypatch.setattr(start, "prepare_common", fake_common)
    args = start.build_parser().parse_args(["--no-job-dir", "true"])
    assert args.no_job_dir is True
    assert start.prepare(args, {})[0] == "plan"
    assert seen == {"with_jobdir": False}
    args = start.build_parser().parse_args(["true"])
    start.prepare(args, {})
    assert seen == {"with_jobdir": True}
    spec = GuestSpec(uid=1, gid=2, user="u", group="g", jobdir=None)
    assert json.loads(spec.to_json())["jobdir"] is None


def test_machine_wide_kernel_builds_are_candidates_without_apppot_home(
        tmp_path, monkeypatch):
    """As for images: a user without $APPPOT_HOME gets the kernel
    scripts/setup.sh built; with $APPPOT_HOME only their own builds."""
    from apppot import images, kernel

    build = tmp_path / "system" / "kernels" / "uml-9.9-x"
    build.mkdir(parents=True)
    (build / "build.json").write_text('{"version": "9.9.1"}')
    (build / "linux").write_text("")  # never run: load_kernel is faked
    monkeypatch.setattr(images, "SYSTEM_HOME", tmp_path / "system")
    loaded = []
    monkeypatch.setattr(kernel, "load_kernel", loaded.append)
    monkeypatch.delenv("APPPOT_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    list(kernel._candidates())
    assert loaded[0] == (build / "linux").resolve()  # before the stock one
    loaded.clear()
    monkeypatch.setenv("APPPOT_HOME", str(tmp_path / "own"))
    list(kernel._candidates())
    assert (build / "linux").resolve() not in loaded and loaded


def test_job_dir_cache_options_per_kernel():
    """Shared mappings only where appends stay whole: 6.1 as is, netfs
    kernels only with AppPot's 9P patch, else no caching at all."""
    from apppot.share import cache_options

    assert cache_options((6, 1, 176)) == ("cache=mmap",)
    assert cache_options((7, 2, 13)) == ("cache=none",)
    assert cache_options((7, 2, 13), (
        "0001-um-seccomp-spin-then-park-handoff.patch",)) == ("cache=none",)
    assert cache_options((7, 2, 13), (
        "0003-9p-appenders-keep-o-append-in-mmap-mode.patch",)) == (
        "cache=mmap", "directio")
