#!/bin/sh
# Runs one MPI rank and records its exit status for apppot-mpirun, which then
# applies Open MPI's rule itself (the status of the lowest rank that failed);
# the image's own mpirun only reports the first failure it notices.
"$@"
rc=$?
rank=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${PMIX_RANK:-}}}
if [ -n "$rank" ]; then
    # a FIFO the agent holds open: one short line is one atomic write
    echo "$rank $rc" > /run/apppot/mpi/status
fi
exit $rc
