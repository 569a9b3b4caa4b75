"""OSU-style MPI micro-benchmarks in mpi4py, one JSON line per result.

Runs unchanged under the host's mpirun and inside appliances (standard
library + mpi4py only).  Conventions follow OSU 5.x/7.x: latency is half the
round trip of a ping-pong, bandwidth uses a window of 64 non-blocking sends,
sizes are 0, 1, 2, 4 ... MAX; warm-up iterations are skipped.  Iteration
counts are OSU's, capped by a per-size time budget (``--budget``) because a
UML appliance is ~100x slower per message than shared memory.

    mpirun -n 2 python3 osu.py latency --max 4194304
    mpirun -n 4 python3 osu.py allreduce --max 1048576
"""

import argparse
import json
import sys
import time

from mpi4py import MPI

LARGE = 8192  # OSU's LARGE_MESSAGE_SIZE
ITERS = {"latency": (10000, 100, 1000, 10), "bw": (100, 10, 20, 2),
         "bibw": (100, 10, 20, 2), "allreduce": (1000, 100, 100, 10),
         "barrier": (1000, 100, 1000, 100)}
WINDOW = 64


def sizes(min_size, max_size):
    size = min_size
    while size <= max_size:
        yield size
        size = size * 2 if size else 1


def iterations(test, size, budget, per_iter):
    loop, skip, loop_l, skip_l = ITERS[test]
    if size > LARGE:
        loop, skip = loop_l, skip_l
    if per_iter > 0:  # cap by the time budget, keep at least a few
        loop = max(5, min(loop, int(budget / per_iter)))
        skip = max(1, min(skip, loop // 10))
    return loop, skip


def probe(fn, comm):
    """Seconds per iteration of ``fn`` (agreed on by all ranks)."""
    comm.Barrier()
    t = time.perf_counter()
    fn()
    fn()
    dt = (time.perf_counter() - t) / 2
    return comm.allreduce(dt, op=MPI.MAX)


def pingpong(comm, size, loop, skip):
    buf = bytearray(size)
    rank = comm.rank
    t0 = 0.0
    for i in range(loop + skip):
        if i == skip:
            comm.Barrier()
            t0 = MPI.Wtime()
        if rank == 0:
            comm.Send([buf, MPI.BYTE], 1, 1)
            comm.Recv([buf, MPI.BYTE], 1, 1)
        elif rank == 1:
            comm.Recv([buf, MPI.BYTE], 0, 1)
            comm.Send([buf, MPI.BYTE], 0, 1)
    return (MPI.Wtime() - t0) * 1e6 / (2 * loop)


def bandwidth(comm, size, loop, skip, bidirectional):
    # one buffer for the whole window, as OSU's osu_bw does (64 separate
    # 4 MiB buffers would not fit a small appliance)
    sbufs = [bytearray(size)] * WINDOW
    rbufs = [bytearray(size)] * WINDOW
    ack = bytearray(4)
    rank = comm.rank
    t0 = 0.0
    for i in range(loop + skip):
        if i == skip:
            comm.Barrier()
            t0 = MPI.Wtime()
        if rank == 0:
            reqs = [comm.Isend([b, MPI.BYTE], 1, 100) for b in sbufs]
            if bidirectional:
                reqs += [comm.Irecv([b, MPI.BYTE], 1, 100) for b in rbufs]
            MPI.Request.Waitall(reqs)
            comm.Recv([ack, MPI.BYTE], 1, 101)
        elif rank == 1:
            reqs = [comm.Irecv([b, MPI.BYTE], 0, 100) for b in rbufs]
            if bidirectional:
                reqs += [comm.Isend([b, MPI.BYTE], 0, 100) for b in sbufs]
            MPI.Request.Waitall(reqs)
            comm.Send([ack, MPI.BYTE], 0, 101)
    elapsed = MPI.Wtime() - t0
    moved = size * WINDOW * loop * (2 if bidirectional else 1)
    return moved / elapsed / 1e6  # MB/s, as OSU


def allreduce(comm, size, loop, skip):
    count = max(1, size // 4)
    send, recv = bytearray(count * 4), bytearray(count * 4)
    total = 0.0
    for i in range(loop + skip):
        comm.Barrier()
        t = MPI.Wtime()
        comm.Allreduce([send, MPI.FLOAT], [recv, MPI.FLOAT], op=MPI.SUM)
        if i >= skip:
            total += MPI.Wtime() - t
    return comm.allreduce(total * 1e6 / loop) / comm.size  # avg over ranks


def barrier(comm, loop, skip):
    total = 0.0
    for i in range(loop + skip):
        t = MPI.Wtime()
        comm.Barrier()
        if i >= skip:
            total += MPI.Wtime() - t
    return comm.allreduce(total * 1e6 / loop) / comm.size


def warm_up(comm, test, seconds=1.0):
    """Untimed traffic first: a freshly booted appliance still faults in
    code and buffers (~100 us per page under UML), which a budget-capped
    skip count would not absorb."""
    end = MPI.Wtime() + seconds
    while comm.allreduce(MPI.Wtime() < end, op=MPI.LAND):
        if test in ("latency", "bw", "bibw"):
            pingpong(comm, 1024, 10, 0)
        else:
            comm.Barrier()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("test", choices=sorted(ITERS))
    p.add_argument("--min", type=int, default=0)
    p.add_argument("--max", type=int, default=1 << 22)
    p.add_argument("--budget", type=float, default=1.0,
                   help="seconds per message size at most (approximately)")
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    if args.test in ("latency", "bw", "bibw") and comm.size != 2:
        sys.exit("osu.py: this test requires exactly two processes")
    out = []
    warm_up(comm, args.test)
    if args.test == "barrier":
        per = probe(comm.Barrier, comm)
        loop, skip = iterations("barrier", 0, args.budget, per)
        out.append({"size": 0, "value": barrier(comm, loop, skip),
                    "iterations": loop})
    for size in ([] if args.test == "barrier" else sizes(
            max(args.min, 0 if args.test == "latency" else 1), args.max)):
        if args.test == "latency":
            per = probe(lambda s=size: pingpong(comm, s, 1, 0), comm) * 2
            loop, skip = iterations("latency", size, args.budget, per)
            value = pingpong(comm, size, loop, skip)
        elif args.test in ("bw", "bibw"):
            bi = args.test == "bibw"
            per = probe(lambda s=size, b=bi: bandwidth(comm, s, 1, 0, b), comm)
            loop, skip = iterations(args.test, size, args.budget, per)
            value = bandwidth(comm, size, loop, skip, bi)
        else:
            per = probe(lambda s=size: allreduce(comm, s, 1, 0), comm)
            loop, skip = iterations("allreduce", size, args.budget, per)
            value = allreduce(comm, size, loop, skip)
        out.append({"size": size, "value": value, "iterations": loop})
    if comm.rank == 0:
        print(json.dumps({"test": args.test, "ranks": comm.size,
                          "library": MPI.Get_library_version().split("\n")[0],
                          "results": out}), flush=True)


if __name__ == "__main__":
    main()
