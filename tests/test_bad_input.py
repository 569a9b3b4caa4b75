"""Bad input, tried as a new user would: one line naming the thing, a hint,
a non-zero status, no traceback, nothing started, nothing changed in the
job dir; and the pure checks behind it."""

import io
import json
import os
import resource
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from conftest import tool

from apppot import trust
from apppot.appliance import N_USER, Appliance, Notice, wait_all
from apppot.config import parse_seconds
from apppot.errors import ConfigError, ImageError
from apppot.images import check_changes
from apppot.process import readable
from apppot_mpi import batchenv, rankspawn


# ------------------------------------------------------------- pure checks
@pytest.mark.parametrize("nodelist", [
    "node[5-1]", ",", "", "node[0-99999999]", "a[0-40000],b[0-40000]"])
def test_slurm_node_lists_that_name_no_or_too_many_hosts(nodelist):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        batchenv.expand_hostlist(nodelist)
    assert time.monotonic() - t0 < 0.5


@pytest.mark.parametrize("counts", ["1(x100000000000)", "2(x0)", "0",
                                    "70000", "1(x40000),1(x40000)"])
def test_slurm_task_counts_out_of_range(counts):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="SLURM_TASKS_PER_NODE"):
        batchenv.expand_counts(counts)
    assert time.monotonic() - t0 < 0.5


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400", "0", "-3",
                                  "1e10"])
def test_seconds_must_be_finite_and_positive(text):
    with pytest.raises(ConfigError, match="--timeout"):
        parse_seconds(text)


def test_malformed_guest_notices_are_ignored(tmp_path, caplog):
    app = Appliance(tmp_path, name="rank 0")
    for text in ("apppot:rank x y", "apppot:rank 1 300", "apppot:exit -1",
                 "apppot:exit lots", "apppot:rank 99999999999 0"):
        app._handle(Notice(N_USER, text, 1.0))
    assert app.rank_status == {} and app.exit_code is None
    assert "malformed notice ignored" in caplog.text
    app._handle(Notice(N_USER, "apppot:rank 3 7", 1.0))
    assert app.rank_status == {3: 7}


class HighFdAppliance:
    """An appliance stand-in whose notice socket is above fd 1024, where
    select() cannot go (a node with ~140 appliances has such fds)."""

    def __init__(self, fd, exit_after):
        self.r, w = socket.socketpair()
        self.keep = w
        os.dup2(self.r.fileno(), fd)
        self.fd = fd
        self.end = time.monotonic() + exit_after
        self.name = f"fd {fd}"
        self.started_at = self.ready_at = time.monotonic()
        self.exit_code = self.failure = None
        self.rank_status = {}
        self.proc = self

    def poll(self):
        return 0 if time.monotonic() > self.end else None

    def fileno(self):
        return self.fd

    def poll_notices(self, timeout):
        return bool(readable([self], timeout))

    def result(self):
        return 0

    def close(self):
        os.close(self.fd)
        self.r.close()
        self.keep.close()


def test_wait_all_takes_descriptors_beyond_select(monkeypatch):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2100), hard))
    apps = [HighFdAppliance(2000 + i, exit_after=0.3 + i) for i in range(3)]
    try:
        assert wait_all(apps, boot_timeout=10, timeout=10) == 0
    finally:
        for a in apps:
            a.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_node_room_raises_the_open_file_limit_or_says_why():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        rankspawn.check_node_room(150)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 1564
        if hard != resource.RLIM_INFINITY:
            with pytest.raises(ConfigError, match="open files"):
                rankspawn.check_node_room(hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def changes_archive(path, first=".apppot-changes.json", meta=None):
    with tarfile.open(path, "w:gz") as tar:
        data = json.dumps(meta if meta is not None else {
            "format": 1, "deleted": []}).encode()
        info = tarfile.TarInfo(first)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_changes_archive_checked_before_start(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an archive\n")
    with pytest.raises(ImageError, match="not an apppot-snap changes archive"):
        check_changes(str(text))
    other = tmp_path / "other.tar.gz"
    changes_archive(other, first="etc/passwd")
    with pytest.raises(ImageError, match="not an apppot-snap changes archive"):
        check_changes(str(other))
    good = tmp_path / "good.tar.gz"
    changes_archive(good)
    assert check_changes(str(good)) == good


# ----------------------------------------------------------------- trust
def test_resolve_in_stays_inside_the_tree(tmp_path):
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "usr/lib/apppot").symlink_to(outside)  # absolute: /tmp/...
    (root / "lib").symlink_to("usr/lib")
    (root / "up").symlink_to("../../../..")
    (root / "loop").symlink_to("/loop")
    assert trust.resolve_in(root, "usr/lib/apppot/init.py") == \
        root / str(outside).lstrip("/") / "init.py"
    assert trust.resolve_in(root, "lib/x") == root / "usr/lib/x"
    assert trust.resolve_in(root, "up/etc/passwd") == root / "etc/passwd"
    assert trust.resolve_in(root, "/../../etc") == root / "etc"
    with pytest.raises(ConfigError, match="too many symbolic links"):
        trust.resolve_in(root, "loop/x")


def test_install_guest_never_writes_through_a_link_out_of_the_tree(tmp_path):
    from apppot import imagebuild

    root = tmp_path / "root"
    for d in ("usr/lib", "usr/local", "var/lib", "var/log", "var/cache/apt",
              "var/lib/apt/lists"):
        (root / d).mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "etc").symlink_to(outside)  # a planted 'etc -> /somewhere'
    (root / "usr/lib/apppot").symlink_to(outside)
    imagebuild.install_guest(root, "none", tmp_path)
    assert list(outside.iterdir()) == []
    inside = root / str(outside).lstrip("/")
    assert (inside / "init.py").is_file() and (inside / "fstab").is_file()


@pytest.mark.root
def test_untrusted_caches_are_refused(tmp_path, nobody):
    assert os.getuid() == 0, "chowns files to another user (CI runs as root)"
    tmp_path.chmod(0o755)
    mine = tmp_path / "mine.so"
    mine.write_bytes(b"")
    mine.chmod(0o755)
    assert trust.unsafe_reason(mine) is None
    theirs = tmp_path / "theirs.so"
    theirs.write_bytes(b"")
    os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    assert "belongs to uid" in trust.unsafe_reason(theirs)
    # a non-root caller trusts its own files and root's, not others'
    assert trust.unsafe_reason(theirs, euid=nobody.pw_uid) is None
    assert trust.unsafe_reason(mine, euid=1234) is None  # root's: trusted
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    lib = shared / "lib.so"
    lib.write_bytes(b"")
    assert "writable by group or others" in trust.unsafe_reason(lib)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "own").mkdir()
    (sticky / "own/lib.so").write_bytes(b"")
    assert trust.unsafe_reason(sticky / "own/lib.so") is None
    home = tmp_path / "userhome"
    home.mkdir()
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(ConfigError, match="as root, cache directory"):
        trust.check_cache_home(home)


@pytest.mark.root
def test_root_refuses_a_users_apppot_home(tmp_path, nobody, image):
    assert os.getuid() == 0
    tmp_path.chmod(0o755)
    home = tmp_path / "cache"
    home.mkdir()
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    r = subprocess.run([tool("apppot-start"), "true"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60,
                       check=False, stdin=subprocess.DEVNULL,
                       env={**os.environ, "APPPOT_HOME": str(home)})
    assert r.returncode == 125, r.stderr
    assert "as root, cache directory" in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------- the CLI, end to end
def one_line_error(r, *words):
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    assert r.returncode == 125, err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[1].startswith("hint: "), err
    for w in words:
        assert w in lines[0], err
    assert "Traceback" not in err


def mpirun_cli(args, cwd, env=None):
    return subprocess.run([tool("apppot-mpirun"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          check=False, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


def test_mpirun_bad_input_is_one_line_and_changes_nothing(jobdir, image):
    (jobdir / "result").write_text("a file\n")
    (jobdir / "notes.txt").write_text("not an archive\n")
    before = sorted(p.name for p in jobdir.iterdir())
    cases = [
        (["--ranks-per-appliance", "0", "-n", "2", "true"],
         ["--ranks-per-appliance"]),
        (["--output-filename", "result", "-n", "2", "true"],
         ["--output-filename", "not a directory"]),
        (["--output-filename", "../x", "-n", "2", "true"],
         ["--output-filename", "outside the job dir"]),
        (["--output-filename", "out", "--subnet", "bogus", "-n", "2", "true"],
         ["--subnet"]),
        (["--changes", "notes.txt", "-n", "2", "true"],
         ["--changes", "not an apppot-snap changes archive"]),
        (["--timeout", "nan", "-n", "2", "true"], ["--timeout"]),
        (["--timeout", "inf", "-n", "2", "true"], ["--timeout"]),
        (["--oversubscribe", "-n", "100000000", "true"], ["-n"]),
    ]
    for args, words in cases:
        one_line_error(mpirun_cli(args, jobdir), *words)
    slurm = {"SLURM_JOB_ID": "7"}
    for nodes, tasks, word in (("node[5-1]", "1", "SLURM_JOB_NODELIST"),
                               (",", "1", "SLURM_JOB_NODELIST"),
                               ("node[0-99999999]", "1", "SLURM_JOB_NODELIST"),
                               ("n1", "1(x100000000000)",
                                "SLURM_TASKS_PER_NODE")):
        r = mpirun_cli(["true"], jobdir, {**slurm, "SLURM_JOB_NODELIST": nodes,
                                          "SLURM_TASKS_PER_NODE": tasks})
        one_line_error(r, word)
    long_tmp = Path("/tmp") / ("t" * 90)
    long_tmp.mkdir(exist_ok=True)
    try:
        r = mpirun_cli(["-n", "2", "true"], jobdir, {"TMPDIR": str(long_tmp)})
        one_line_error(r, "too long for a UNIX socket")
    finally:
        long_tmp.rmdir()
    assert sorted(p.name for p in jobdir.iterdir()) == before


def test_per_node_checks_memory_of_the_packed_appliance(jobdir, image,
                                                        own_kernel):
    # 8 ranks in one appliance need max(256, 96 * 8 + 64) = 832 MiB: more
    # than vm.max_map_count lets one process map (65530 pages here)
    r = mpirun_cli(["--dry-run", "--kernel", own_kernel, "--per", "node",
                    "--oversubscribe", "-n", "8", "true"], jobdir)
    assert r.returncode == 0, r.stderr
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    warned = "--mem 832 MiB: vm.max_map_count" in r.stderr
    assert warned == (limit * 4096 < (832 - 32) << 20), r.stderr
