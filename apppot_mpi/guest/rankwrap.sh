#!/bin/sh
# Runs one MPI rank and records its exit status for apppot-mpirun, which then
# applies Open MPI's rule itself (the status of the lowest rank that failed);
# the image's own mpirun only reports the first failure it notices.
if [ -n "${PMI_RANK:-}" ] && [ -e /usr/lib/apppot/mpich_finalize.so ]; then
    # an MPICH (Hydra) rank: avoid MPICH 4.0.2's finalize deadlock (see
    # mpich_finalize.c); the user's own preloads stay
    export LD_PRELOAD="/usr/lib/apppot/mpich_finalize.so${LD_PRELOAD:+:$LD_PRELOAD}"
fi
"$@"
rc=$?
rank=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${PMIX_RANK:-}}}
if [ -n "$rank" ]; then
    # a FIFO the agent holds open: one short line is one atomic write
    echo "$rank $rc" > /run/apppot/mpi/status
fi
exit $rc
