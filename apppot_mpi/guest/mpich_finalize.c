/*
 * Preloaded into MPICH ranks by rankwrap: works around a finalize deadlock
 * of Debian 12's MPICH 4.0.2 (ch4:ucx).
 *
 * Its MPI_Finalize closes every UCX endpoint with ucp_disconnect_nb (a
 * flush), progresses until all closes complete, and only then enters a PMI
 * barrier.  A flush to a peer whose connection is still being wired up
 * needs that peer to progress UCX; if the peer has already finished its own
 * closes it sits in the PMI barrier, which does not progress UCX, and both
 * wait forever (seen here: ranks spinning in ucp_worker_progress under
 * PMPI_Finalize, one rank blocked in read() in the PMI barrier; one job in
 * about ten with one rank per appliance).  Upstream moved the barrier
 * first, then dropped it (pmodels/mpich#6596).
 *
 * Skipping the close is safe at this point: MPI requires all communication
 * to be complete before MPI_Finalize, and ucp_worker_destroy, which MPICH
 * calls after the barrier, destroys the endpoints without waiting on peers.
 * MPICH 4.0.2 calls ucp_disconnect_nb only in its finalize.
 */
#include <stddef.h>

void *ucp_disconnect_nb(void *ep)
{
    (void)ep;
    return NULL; /* UCS_OK: "closed", nothing to wait for */
}
