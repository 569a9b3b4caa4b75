"""The root scripts' state directories cannot be planted by a local user.

scripts/slurm-local.sh, slurm-elastic.sh, slurm-sim-cluster.sh and
make-sacct-sample.sh run as root and write config, pid and log files into
a state directory.  As ``nobody`` we pre-create that directory (or a
symlink to a directory of ours) where the script will look, then run the
script as root: it must refuse with one line and a non-zero status, write
nothing through it, start nothing, and its ``down`` must not act on pid
files found there.
"""

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import NOBODY, as_user

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.root

SCRIPTS = {  # script → (its directory variable, extra environment)
    "slurm-local.sh": ("SLURM_LOCAL_DIR", {}),
    "slurm-elastic.sh": ("ELASTIC_DIR", {"ELASTIC_NETNS": "apppot-tsd-el"}),
    "slurm-sim-cluster.sh": ("SIM_DIR", {"SIM_PREFIX": "apppot-tsd-"}),
    "make-sacct-sample.sh": ("SACCT_GEN_DIR", {}),
}


def as_nobody(*argv):
    subprocess.run([*as_user(NOBODY), *argv], check=True)


@pytest.fixture
def attacker_dir():
    """A directory of nobody's in /var/tmp (where the others used to live)."""
    base = Path(tempfile.mkdtemp(prefix="apppot-test-plant-", dir="/var/tmp"))
    base.chmod(0o777)
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=False)


def netns_list():
    return subprocess.run(["ip", "netns", "list"], capture_output=True,
                          text=True, check=False).stdout


def run_script(name, action, path, tmp_out=None):
    var, extra = SCRIPTS[name]
    env = dict(os.environ, **extra, **{var: str(path)})
    argv = [REPO / "scripts" / name]
    if name != "make-sacct-sample.sh":
        argv.append(action)
    elif tmp_out:
        argv.append(str(tmp_out))
    return subprocess.run(argv, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("planted", ["dir", "symlink", "root-0777"])
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_planted_state_directory_is_refused(attacker_dir, tmp_path, name,
                                              planted):
    target = attacker_dir / "mine"
    path = attacker_dir / "state"
    as_nobody("mkdir", "-m", "777", str(target))
    if planted == "dir":
        as_nobody("mkdir", "-m", "777", str(path))
    elif planted == "symlink":
        as_nobody("ln", "-s", str(target), str(path))
    else:  # root's but writable by all: as good as planted
        path.mkdir()
        path.chmod(0o777)
    ns_before = netns_list()
    r = run_script(name, "up", path, tmp_path / "sacct.txt")
    assert r.returncode != 0, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(path) in lines[0] and ("refusing" in lines[0] or
                                      "exists" in lines[0]), lines[0]
    assert list(target.iterdir()) == []  # nothing written through it
    if planted != "symlink":
        assert list(path.iterdir()) == []
    assert netns_list() == ns_before  # no namespace made
    assert not (tmp_path / "sacct.txt").exists()


@pytest.mark.parametrize("name", ["slurm-local.sh", "slurm-elastic.sh",
                                  "slurm-sim-cluster.sh"])
def test_down_does_not_trust_pid_files_in_a_planted_directory(
        attacker_dir, name):
    path = attacker_dir / "state"
    as_nobody("mkdir", "-m", "777", str(path))
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        for pidfile in ("slurmd.pid", "slurmctld.pid", "slurmd.node0.pid"):
            (path / pidfile).write_text(f"{victim.pid}\n")
        (path / "munge").mkdir()
        (path / "munge" / "munged.pid").write_text(f"{victim.pid}\n")
        r = run_script(name, "down", path)
        assert r.returncode != 0
        assert "refusing state directory" in r.stderr
        time.sleep(0.3)
        assert victim.poll() is None, "down killed a process named there"
        assert path.exists()  # not removed either
    finally:
        victim.kill()
        victim.wait()


def test_down_without_a_state_directory_is_a_no_op(attacker_dir):
    for name in ("slurm-local.sh", "slurm-elastic.sh",
                 "slurm-sim-cluster.sh"):
        r = run_script(name, "down", attacker_dir / "never-made")
        assert r.returncode == 0, r.stderr
        assert not (attacker_dir / "never-made").exists()
