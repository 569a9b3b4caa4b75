"""MPI-IO on one shared file: interleaved independent and collective
writes of blocks that straddle pages, then every rank reads and checks all."""

import sys

from mpi4py import MPI

comm = MPI.COMM_WORLD
r, n = comm.rank, comm.size
B = 4096 + 7  # blocks straddle pages, so ranks share pages
K = 6
name = sys.argv[1] if len(sys.argv) > 1 else "shared.dat"
fh = MPI.File.Open(comm, name, MPI.MODE_CREATE | MPI.MODE_RDWR)
fh.Set_size(0)
comm.Barrier()


def fill(region, rank, k):
    return bytes([(region * 37 + rank * 11 + k * 3) % 251 + 1]) * B


for k in range(K):  # independent writes, interleaved across ranks
    fh.Write_at((k * n + r) * B, [fill(0, r, k), MPI.BYTE])
base = K * n * B
for k in range(K):  # collective writes, interleaved across ranks
    fh.Write_at_all(base + (k * n + r) * B, [fill(1, r, k), MPI.BYTE])
fh.Sync()
comm.Barrier()
fh.Sync()
data = bytearray(2 * K * n * B)
fh.Read_at_all(0, [data, MPI.BYTE])
bad = 0
for region in range(2):
    for k in range(K):
        for rank in range(n):
            off = region * base + (k * n + rank) * B
            if data[off:off + B] != fill(region, rank, k):
                bad += 1
fh.Close()
total = comm.allreduce(bad)
if r == 0:
    print(f"blocks checked on every rank: {2 * K * n}, bad blocks: {total}")
sys.exit(1 if total else 0)
