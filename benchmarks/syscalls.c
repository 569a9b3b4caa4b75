/* Guest system-call micro-benchmarks for benchmarks/syscalls.py.
 *
 *   syscalls SCALE REPS DIR      all loops; one JSON object on stdout
 *   syscalls spawn K PROG ARG... K fork+exec+wait of PROG; one JSON object
 *
 * Each loop runs REPS times; the JSON gives every repetition's cost per
 * operation in nanoseconds (the Python side takes the median).  SCALE
 * multiplies the iteration counts (sized for about a second per
 * repetition in the slowest appliance at 1.0).  DIR is a
 * directory on the guest's (or host's) own root file system for the
 * file-backed loops: the page cache, not hostfs, is what they measure.
 * Compiled on the host and run unchanged natively and in the appliances
 * (host and guests are both Debian 12).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
	struct timespec ts;

	/* the raw syscall: the clock read must not depend on the vDSO under
	 * test (a trap costs the same in every loop it brackets) */
	syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static volatile long sink;
static char path[4096];
static char buf[4096];
static int rfd = -1;
static char *region;
static size_t region_len;

static void op_getppid(long n)
{
	for (long i = 0; i < n; i++)
		sink += syscall(SYS_getppid);
}

static void op_open_close(long n)
{
	for (long i = 0; i < n; i++) {
		int fd = open("/etc/passwd", O_RDONLY);

		if (fd < 0) {
			perror("open /etc/passwd");
			exit(2);
		}
		close(fd);
	}
}

static void op_clock_gettime(long n)
{
	struct timespec ts;

	for (long i = 0; i < n; i++) {
		clock_gettime(CLOCK_MONOTONIC, &ts);  /* libc: vDSO if any */
		sink += ts.tv_nsec;
	}
}

static void op_gettimeofday(long n)
{
	struct timeval tv;

	for (long i = 0; i < n; i++) {
		gettimeofday(&tv, NULL);
		sink += tv.tv_usec;
	}
}

static void op_read4k(long n)
{
	for (long i = 0; i < n; i++)
		if (pread(rfd, buf, sizeof(buf), 0) != sizeof(buf)) {
			perror("pread");
			exit(2);
		}
}

/* n = pages; one write fault per page of fresh anonymous memory */
static void op_fault_anon(long n)
{
	size_t len = n * 4096UL;
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	for (long i = 0; i < n; i++)
		p[i * 4096] = 1;
	munmap(p, len);
}

/* n = pages; one read access per page of a cached file (read faults,
 * the kind fault-around serves several at a time) */
static void op_fault_file(long n)
{
	int fd = open(path, O_RDONLY);
	char *p;

	if ((size_t)n * 4096 > region_len)
		n = region_len / 4096;
	p = mmap(NULL, n * 4096UL, PROT_READ, MAP_PRIVATE, fd, 0);
	if (p == MAP_FAILED) {
		perror("mmap file");
		exit(2);
	}
	close(fd);
	for (long i = 0; i < n; i++)
		sink += p[i * 4096];
	munmap(p, n * 4096UL);
}

static void op_fork(long n)
{
	for (long i = 0; i < n; i++) {
		pid_t pid = fork();

		if (pid == 0)
			_exit(0);
		waitpid(pid, NULL, 0);
	}
}

struct loop {
	const char *name;
	void (*fn)(long);
	long iters;	/* at SCALE 1 */
};

static const struct loop loops[] = {
	{ "getppid", op_getppid, 30000 },
	{ "open_close", op_open_close, 6000 },
	{ "clock_gettime", op_clock_gettime, 30000 },
	{ "gettimeofday", op_gettimeofday, 30000 },
	{ "read_4k", op_read4k, 30000 },
	{ "fault_anon", op_fault_anon, 8192 },
	{ "fault_file", op_fault_file, 4096 },
	{ "fork_exit_wait", op_fork, 100 },
};

static void make_file(const char *dir)
{
	int fd;

	region_len = 16 << 20;
	snprintf(path, sizeof(path), "%s/apppot-syscalls.%d", dir, getpid());
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0) {
		perror(path);
		exit(2);
	}
	region = malloc(region_len);
	memset(region, 'x', region_len);
	if (write(fd, region, region_len) != (ssize_t)region_len) {
		perror("write");
		exit(2);
	}
	free(region);
	fsync(fd);
	rfd = fd;
}

static int all(double scale, int reps, const char *dir)
{
	make_file(dir);
	printf("{\"unit\": \"ns/op\", \"loops\": {");
	for (size_t l = 0; l < sizeof(loops) / sizeof(loops[0]); l++) {
		long n = loops[l].iters * scale;

		if (n < 1)
			n = 1;
		loops[l].fn(n / 10 + 1);	/* warm-up */
		printf("%s\"%s\": {\"iterations\": %ld, \"ns\": [", l ? ", " : "",
		       loops[l].name, n);
		for (int r = 0; r < reps; r++) {
			double t0 = now_ns();

			loops[l].fn(n);
			printf("%s%.2f", r ? ", " : "", (now_ns() - t0) / n);
		}
		printf("]}");
		fflush(stdout);
	}
	printf("}}\n");
	close(rfd);
	unlink(path);
	return 0;
}

static int spawn(int k, char **argv)
{
	printf("{\"unit\": \"ns\", \"argv0\": \"%s\", \"ns\": [", argv[0]);
	for (int i = 0; i < k; i++) {
		double t0 = now_ns();
		int status;
		pid_t pid = fork();

		if (pid == 0) {
			int null = open("/dev/null", O_WRONLY);

			dup2(null, 1);
			execv(argv[0], argv);
			_exit(127);
		}
		waitpid(pid, &status, 0);
		if (!WIFEXITED(status) || WEXITSTATUS(status)) {
			fprintf(stderr, "%s failed (status %#x)\n", argv[0], status);
			return 2;
		}
		printf("%s%.0f", i ? ", " : "", now_ns() - t0);
	}
	printf("]}\n");
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 4 && !strcmp(argv[1], "spawn"))
		return spawn(atoi(argv[2]), argv + 3);
	if (argc == 4)
		return all(atof(argv[1]), atoi(argv[2]), argv[3]);
	fprintf(stderr, "usage: syscalls SCALE REPS DIR | syscalls spawn K PROG ARG...\n");
	return 1;
}
