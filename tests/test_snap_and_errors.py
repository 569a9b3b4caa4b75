"""apppot-snap round trips and the one-line errors, with real appliances."""

import os
import subprocess

import pytest
from conftest import start, tool

pytestmark = pytest.mark.uml

MAKE_CHANGES = """
set -e
echo new > /opt/added.txt
echo changed >> /etc/issue
chmod 0600 /etc/issue.net
mkdir -p /srv/tree/sub && echo deep > /srv/tree/sub/f
chown 1234:4321 /srv/tree/sub/f
ln -s /opt/added.txt /usr/local/bin/alink
rm /etc/debian_version
rm -r /usr/share/common-licenses
useradd -u 2345 -M -s /bin/false snapuser
apppot-snap changes -o "$1"
"""

CHECK_CHANGES = """
set -e
cat /opt/added.txt
tail -1 /etc/issue
stat -c %a /etc/issue.net
stat -c %u:%g /srv/tree/sub/f
readlink /usr/local/bin/alink
test ! -e /etc/debian_version && echo gone1
test ! -e /usr/share/common-licenses && echo gone2
getent passwd snapuser | cut -d: -f3
grep -c 'AppPot job user' /etc/passwd || true
"""


def test_snap_changes_merge_round_trip(jobdir, image):
    archive = jobdir / "my.changes.tar.gz"
    r = start(["sh", "-c", MAKE_CHANGES, "sh", str(archive)], cwd=jobdir)
    assert r.returncode == 0, r.stderr
    assert b"saved" in r.stdout
    assert archive.exists() and not (jobdir / "my.changes.tar.gz.tmp").exists()
    expected = [b"new", b"changed", b"600", b"1234:4321", b"/opt/added.txt",
                b"gone1", b"gone2", b"2345"]
    # merged at boot
    r = start(["--changes", str(archive), "sh", "-c", CHECK_CHANGES], cwd=jobdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(b"\n")[:8] == expected
    # merged by hand inside a fresh appliance
    r = start(["sh", "-c", f"apppot-snap merge {archive} && {CHECK_CHANGES}"],
              cwd=jobdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(b"\n")[1:9] == expected


def test_snap_needs_root_and_known_archive(jobdir, nobody, image):
    r = start(["apppot-snap", "changes"], cwd=jobdir, user=nobody)
    assert r.returncode == 1
    assert b"must run as root" in r.stderr and b"hint: use: sudo" in r.stderr
    bogus = jobdir / "bogus.tar.gz"
    subprocess.run(["tar", "czf", str(bogus), "-C", "/etc", "hostname"],
                   check=True)
    r = start(["--changes", str(bogus), "true"], cwd=jobdir)
    assert r.returncode == 125  # found before anything starts
    assert b"not an apppot-snap changes archive (no manifest)" in r.stderr


def listing(d):
    return sorted((p.name, p.stat().st_size) for p in d.iterdir())


def check_error(r, *words, status=125):
    err = r.stderr.decode()
    assert r.returncode == status, err
    lines = [line for line in err.splitlines() if line.startswith(
        "apppot-start: error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], err
    assert "hint:" in err


def test_errors_name_the_thing(jobdir, nobody, image, tmp_path):
    (jobdir / "keep.txt").write_text("precious")
    before = listing(jobdir)
    r = start(["--kernel", "/no/such/linux", "true"], cwd=jobdir, user=nobody)
    check_error(r, "UML kernel not found", "/no/such/linux")
    r = start(["--kernel", "/bin/true", "true"], cwd=jobdir, user=nobody)
    check_error(r, "not a UML kernel")
    r = start(["--image", "/no/such.img", "true"], cwd=jobdir, user=nobody)
    check_error(r, "image not found", "/no/such.img")
    r = start(["--image", str(jobdir / "keep.txt"), "true"], cwd=jobdir,
              user=nobody)
    check_error(r, "not an ext4 appliance image")
    secret = jobdir / "secret.img"
    secret.write_bytes(b"\0" * 2048)
    secret.chmod(0o600)
    os.chown(secret, 0, 0)
    r = start(["--image", str(secret), "true"], cwd=jobdir, user=nobody)
    check_error(r, "cannot read appliance image")
    secret.unlink()
    r = start(["--mem", "lots", "true"], cwd=jobdir, user=nobody)
    check_error(r, "--mem", "'lots'")
    r = start(["--frobnicate", "true"], cwd=jobdir, user=nobody)
    check_error(r, "--frobnicate")
    r = start(["--changes", "nope.tar.gz", "true"], cwd=jobdir, user=nobody)
    check_error(r, "changes archive not readable", "nope.tar.gz")
    ro = jobdir / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    r = start(["true"], cwd=ro, user=nobody)
    check_error(r, "job directory", "not writable")
    r = start(["true"], cwd=jobdir, user=nobody, env={"TMPDIR": "/proc"})
    check_error(r, "guest memory directory", "/proc")
    ro.chmod(0o755)
    ro.rmdir()
    assert listing(jobdir) == before
    assert (jobdir / "keep.txt").read_text() == "precious"


@pytest.mark.root
def test_memdir_noexec_and_too_small(jobdir, image):
    assert os.getuid() == 0, "this test mounts tmpfs (CI runs as root)"
    memdir = jobdir / "mem"
    memdir.mkdir()
    script = (f"mount -t tmpfs -o noexec,size=64m tmpfs {memdir} && "
              f"TMPDIR={memdir} {tool('apppot-start')} true; echo rc=$?; "
              f"mount -o remount,exec,size=16m {memdir} && "
              f"TMPDIR={memdir} {tool('apppot-start')} --mem 64M true; "
              "echo rc=$?")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=jobdir,
                       capture_output=True, text=True, check=False,
                       stdin=subprocess.DEVNULL, timeout=60)
    assert "mounted noexec" in r.stderr and "rc=125" in r.stdout, r.stderr
    assert "16 MiB free, --mem needs 64 MiB" in r.stderr, r.stderr
    assert r.stdout.count("rc=125") == 2


def test_max_map_count_warning_still_runs(jobdir, nobody, image):
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    mem = max(1024, (limit * 4096 >> 20) * 2)
    r = start(["--mem", f"{mem}M", "true"], cwd=jobdir, user=nobody)
    assert r.returncode == 0
    assert b"sysctl -w vm.max_map_count=" in r.stderr
