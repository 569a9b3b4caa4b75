"""Ranks in different appliances writing the same job-dir file lose nothing.

The job dir is shared over 9P from one diod on the host (cache=none), so
reads are fresh, O_APPEND writes append on the host and MPI-IO sees one
coherent file; hostfs (each UML its own page cache and i_size) cannot
guarantee that, and is only used when asked for or when 9P is unavailable.
"""

import shutil
from pathlib import Path

import pytest
from test_mpirun import mpirun

pytestmark = pytest.mark.uml
PROGS = Path(__file__).with_name("progs")


@pytest.fixture
def progs(jobdir):
    for p in PROGS.glob("*.py"):
        shutil.copy(p, jobdir / p.name)
    return jobdir


def test_concurrent_appends_lose_nothing(progs, nobody, image):
    r = mpirun(["-n", "4", "python3", "appends.py", "log.txt"], cwd=progs,
               user=nobody)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"lines 1200 expected 1200" in r.stdout and b"torn 0" in r.stdout
    lines = (progs / "log.txt").read_text().splitlines()
    assert len(lines) == 1200
    assert (progs / "log.txt").stat().st_uid == nobody.pw_uid


@pytest.mark.parametrize("mpi", ["openmpi", "mpich"])
def test_mpi_io_shared_file(progs, nobody, image, mpich_image, mpi):
    r = mpirun(["--mpi", mpi, "-n", "3", "python3", "mpiio.py", "io.dat"],
               cwd=progs, user=nobody)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"blocks checked on every rank: 36, bad blocks: 0" in r.stdout
    assert (progs / "io.dat").stat().st_size == 36 * (4096 + 7)


def test_jobdir_fs_choice(progs, nobody, image):
    # auto is 9P even for a Debian user's PATH, which lacks /usr/sbin (diod)
    r = mpirun(["--per", "rank", "-n", "2", "sh", "-c",
                "mount | grep -c ' type 9p '"], cwd=progs, user=nobody,
               env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [b"1", b"1"]
    r = mpirun(["--jobdir-fs", "hostfs", "--per", "rank", "-n", "2", "sh",
                "-c", "mount | grep -c ' type hostfs '"], cwd=progs,
               user=nobody)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [b"1", b"1"]
