"""Does the job dir behave like a local POSIX file system for the ranks?

    mpirun ... python3 posixfs.py CHECK

Checks (each prints one summary line on rank 0):
  mmap    ranks take turns: open one file, lock it, map it MAP_SHARED,
          write their own slot, msync, unlock, close; then every rank opens,
          locks and maps it afresh and reads all slots (as on NFS, taking a
          lock is what makes another appliance's writes visible)
  lock    fcntl record locks: each rank increments a counter file under
          lockf() ROUNDS times; the total must be exact
  sqlite  every rank inserts ROWS rows in its own transactions into one
          SQLite database (rollback journal: fcntl locks across writers)
  wal     the same in WAL mode with locking_mode=EXCLUSIVE, one writer at
          a time (no shared-memory index: the job dir's 9P server answers
          no F_GETLK)
  rename  each rank publishes files by write-then-rename while the others
          read them: a reader never sees a partial file
"""

import fcntl
import mmap
import os
import sqlite3
import sys
import time

from mpi4py import MPI

c = MPI.COMM_WORLD
r, n = c.rank, c.size
ROUNDS, ROWS, SLOT = 40, 30, 64


def check_mmap():
    fn = "mm.bin"
    if r == 0:
        with open(fn, "wb") as f:
            f.write(b"\0" * SLOT * n)
    c.Barrier()
    for turn in range(n):  # one writer at a time, as with any shared file
        if turn == r:
            fd = os.open(fn, os.O_RDWR)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            m = mmap.mmap(fd, SLOT * n, mmap.MAP_SHARED)
            m[r * SLOT:r * SLOT + 8] = f"rank{r:04d}".encode()
            m.flush()
            m.close()
            fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)
        c.Barrier()
    fd = os.open(fn, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_SH)  # as on NFS: a lock makes the cache current
    m = mmap.mmap(fd, SLOT * n, mmap.MAP_SHARED)
    seen = sum(m[i * SLOT:i * SLOT + 8] == f"rank{i:04d}".encode()
               for i in range(n))
    m.close()
    fcntl.lockf(fd, fcntl.LOCK_UN)
    os.close(fd)
    total = c.reduce(seen)
    if r == 0:
        print(f"mmap slots seen {total} expected {n * n}", flush=True)


def check_lock():
    fn = "counter.txt"
    if r == 0:
        with open(fn, "w") as f:
            f.write("0\n")
    c.Barrier()
    fd = os.open(fn, os.O_RDWR)
    for _ in range(ROUNDS):
        fcntl.lockf(fd, fcntl.LOCK_EX)
        value = int(os.pread(fd, 32, 0))
        time.sleep(0.001)  # widen the window a lost update would need
        data = f"{value + 1}\n".encode()
        os.pwrite(fd, data, 0)
        fcntl.lockf(fd, fcntl.LOCK_UN)
    c.Barrier()
    if r == 0:
        print(f"lock counter {int(os.pread(fd, 32, 0))} expected "
              f"{ROUNDS * n}", flush=True)
    os.close(fd)


def connect(fn, wal, timeout=5.0):
    db = sqlite3.connect(fn, timeout=timeout)
    if wal:  # each connection: the WAL index in memory, the file locked
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
    return db


def check_sqlite(wal):
    fn = "wal.db" if wal else "journal.db"
    if r == 0:
        db = connect(fn, wal)
        db.execute("CREATE TABLE t (rank INTEGER, i INTEGER)")
        db.commit()
        db.close()
    c.Barrier()
    # rollback journal: all at once; WAL in exclusive mode: one at a time
    for turn in range(n) if wal else [r]:
        if turn == r:
            db = connect(fn, wal, timeout=60)
            for i in range(ROWS):
                db.execute("INSERT INTO t VALUES (?, ?)", (r, i))
                db.commit()
            db.close()
        if wal:
            c.Barrier()
    c.Barrier()
    if r == 0:
        db = connect(fn, wal)
        rows = db.execute("SELECT COUNT(*), COUNT(DISTINCT rank) FROM t"
                          ).fetchone()
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
        ok = db.execute("PRAGMA integrity_check").fetchone()[0]
        print(f"sqlite {mode} rows {rows[0]} expected {ROWS * n} ranks "
              f"{rows[1]} integrity {ok}", flush=True)


def check_rename():
    os.makedirs("pub", exist_ok=True)
    c.Barrier()
    torn = 0
    payload = (f"rank {r} " * 2000).encode()
    for i in range(ROUNDS):
        tmp = f"pub/.{r}.tmp"
        with open(tmp, "wb") as f:
            f.write(payload)
        os.rename(tmp, f"pub/{r}")
        peer = (r + 1 + i) % n
        try:
            with open(f"pub/{peer}", "rb") as f:
                data = f.read()
            torn += data != (f"rank {peer} " * 2000).encode()
        except FileNotFoundError:
            pass
    total = c.reduce(torn)
    if r == 0:
        print(f"rename torn reads {total}", flush=True)


CHECKS = {"mmap": check_mmap, "lock": check_lock,
          "sqlite": lambda: check_sqlite(False),
          "wal": lambda: check_sqlite(True), "rename": check_rename}

if __name__ == "__main__":
    CHECKS[sys.argv[1]]()
