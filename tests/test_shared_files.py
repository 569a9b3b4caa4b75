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


# The job dir behaves like a POSIX file system as NFS does (README): shared
# mmap (coherent across appliances at lock acquisition), record locks and
# atomic renames across appliances (per rank) and within one (per node);
# SQLite with writers in several appliances (rollback journal), and in WAL
# mode with locking_mode=EXCLUSIVE (diod answers no F_GETLK).
POSIX = [("mmap", "mmap slots seen 9 expected 9"),
         ("lock", "lock counter 120 expected 120"),
         ("sqlite", "sqlite delete rows 90 expected 90 ranks 3 integrity ok"),
         ("rename", "rename torn reads 0")]


def per_args(per, own_kernel):
    # per node needs an SMP kernel: pinned to the own one on every pass
    return ["--per", "rank"] if per == "rank" else [
        "--per", "node", "--kernel", own_kernel]


@pytest.mark.parametrize("mpi", ["openmpi", "mpich"])
@pytest.mark.parametrize("per", ["rank", "node"])
@pytest.mark.parametrize(("check", "expect"), POSIX, ids=[c for c, _ in POSIX])
def test_job_dir_is_a_posix_file_system(progs, nobody, image, mpich_image,
                                        own_kernel, mpi, per, check, expect):
    pin = ["--kernel", own_kernel] if check == "mmap" and per == "rank" \
        else []  # Debian's 6.1: EPERM (README), checked on AppPot's kernel
    r = mpirun(["--mpi", mpi, *per_args(per, own_kernel), *pin, "-n", "3",
                "python3", "posixfs.py", check], cwd=progs, user=nobody)
    assert r.returncode == 0, r.stdout + r.stderr
    assert expect.encode() in r.stdout, r.stdout + r.stderr


def test_sqlite_wal_within_one_appliance(progs, nobody, image, own_kernel):
    r = mpirun([*per_args("node", own_kernel), "-n", "3", "python3",
                "posixfs.py", "wal"], cwd=progs, user=nobody)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"sqlite wal rows 90 expected 90 ranks 3 integrity ok" in r.stdout


@pytest.mark.parametrize("mpi", ["openmpi", "mpich"])
@pytest.mark.parametrize("per", ["rank", "node"])
def test_mpi_runs_with_tmpdir_in_the_job_dir(progs, nobody, image,
                                             mpich_image, own_kernel, mpi,
                                             per):
    """MPI's session and shared-memory files stay on the guest's tmpfs
    whatever TMPDIR says (in the job dir, PMIx's store cannot map them)."""
    (progs / "tmp").mkdir()
    (progs / "tmp").chmod(0o777)
    r = mpirun(["--mpi", mpi, *per_args(per, own_kernel), "-n", "3",
                "-x", f"TMPDIR={progs}/tmp", "python3", "-c",
                "from mpi4py import MPI; import os; c = MPI.COMM_WORLD; "
                "print('sum', c.allreduce(c.rank + 1), os.environ['TMPDIR'])"],
               cwd=progs, user=nobody)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.decode().split("\n").count(f"sum 6 {progs}/tmp") == 3
