/* Each rank greets and contributes rank + 1 to an allreduce. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    const char *greeting = getenv("HELLO_GREETING");
    int rank, size, sum, one;
    char host[MPI_MAX_PROCESSOR_NAME];
    int len;

    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        printf("mpi-hello 1.0 (MPI %d.%d)\n", MPI_VERSION, MPI_SUBVERSION);
        return 0;
    }
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(host, &len);
    one = rank + 1;
    MPI_Allreduce(&one, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("%s from rank %d of %d on %s: sum %d\n",
           greeting ? greeting : "hi", rank, size, host, sum);
    MPI_Finalize();
    return 0;
}
