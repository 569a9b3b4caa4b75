"""Every rank appends N lines to one file with O_APPEND; rank 0 counts."""

import os
import sys

from mpi4py import MPI

comm = MPI.COMM_WORLD
name = sys.argv[1]
N = 300
comm.Barrier()
fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for i in range(N):
    os.write(fd, f"rank {comm.rank} line {i:04d} {'x' * 40}\n".encode())
os.close(fd)
comm.Barrier()
if comm.rank == 0:
    with open(name) as f:
        lines = f.read().splitlines()
    per = {r: sum(1 for line in lines if line.startswith(f"rank {r} "))
           for r in range(comm.size)}
    torn = sum(1 for line in lines if not line.endswith("x" * 40))
    print(f"lines {len(lines)} expected {N * comm.size} per rank {per} "
          f"torn {torn}")
    sys.exit(0 if len(lines) == N * comm.size and not torn else 1)
