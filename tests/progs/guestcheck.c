/* Guest-side checks for AppPot's kernel patches (tests/test_kpatch_guest.py).
 * Each prints "ok <name> ..." lines and exits 0, or prints "FAIL ..." and
 * exits 1.
 *
 *   guestcheck clocks      vDSO clocks agree with the system calls, never
 *                          go backwards, and say whether they trapped
 *   guestcheck vvar        the vDSO data page is read-only to user space:
 *                          store, mprotect, /proc/self/mem and ptrace pokes
 *   guestcheck handoff     flip the stub's hand-off word (FUTEX_WAITER bit,
 *                          spin budget) while making system calls
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int failed;

#define FAIL(...) do { printf("FAIL "); printf(__VA_ARGS__); printf("\n"); \
		       failed = 1; } while (0)

static long long ns(const struct timespec *t)
{
	return t->tv_sec * 1000000000LL + t->tv_nsec;
}

static long long sys_ns(clockid_t c)
{
	struct timespec t;

	syscall(SYS_clock_gettime, c, &t);
	return ns(&t);
}

/* ---------------------------------------------------------------- clocks */
static int clocks(void)
{
	static const struct { clockid_t id; const char *name; long long slack; }
	cl[] = {
		{ CLOCK_REALTIME, "REALTIME", 0 },
		{ CLOCK_MONOTONIC, "MONOTONIC", 0 },
		{ CLOCK_BOOTTIME, "BOOTTIME", 0 },
		{ CLOCK_MONOTONIC_RAW, "MONOTONIC_RAW", 0 },
		{ CLOCK_TAI, "TAI", 0 },
		/* coarse clocks lag by up to a tick */
		{ CLOCK_REALTIME_COARSE, "REALTIME_COARSE", 20000000 },
		{ CLOCK_MONOTONIC_COARSE, "MONOTONIC_COARSE", 20000000 },
	};
	struct timespec t, r1, r2;
	struct timeval tv;
	long long a, b, v, prev, t0;
	size_t i;
	int k;

	for (i = 0; i < sizeof(cl) / sizeof(cl[0]); i++) {
		for (k = 0; k < 1000; k++) {
			a = sys_ns(cl[i].id);
			if (clock_gettime(cl[i].id, &t)) {
				FAIL("clock_gettime(%s): %s", cl[i].name, strerror(errno));
				break;
			}
			v = ns(&t);
			b = sys_ns(cl[i].id);
			if (v < a - cl[i].slack || v > b) {
				FAIL("%s: vDSO %lld not within system calls [%lld, %lld]",
				     cl[i].name, v, a, b);
				break;
			}
		}
		syscall(SYS_clock_getres, cl[i].id, &r1);
		clock_getres(cl[i].id, &r2);
		if (ns(&r1) != ns(&r2))
			FAIL("%s: clock_getres %lld vs system call %lld", cl[i].name,
			     ns(&r2), ns(&r1));
		printf("ok clock %s resolution %lld ns\n", cl[i].name, ns(&r2));
	}

	/* CPU-time clocks are the guest's, not the host stub's */
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
	a = sys_ns(CLOCK_PROCESS_CPUTIME_ID);
	if (ns(&t) > a || a - ns(&t) > 1000000000LL)
		FAIL("PROCESS_CPUTIME vDSO %lld vs system call %lld", ns(&t), a);

	a = sys_ns(CLOCK_REALTIME);
	gettimeofday(&tv, NULL);
	b = sys_ns(CLOCK_REALTIME);
	v = tv.tv_sec * 1000000000LL + tv.tv_usec * 1000LL;
	if (v < a - 1000 || v > b)
		FAIL("gettimeofday %lld not within [%lld, %lld]", v, a, b);
	a = sys_ns(CLOCK_REALTIME) / 1000000000LL;
	v = time(NULL);
	b = sys_ns(CLOCK_REALTIME) / 1000000000LL;
	if (v < a - 1 || v > b)
		FAIL("time() %lld not within [%lld, %lld]", v, a, b);

	/* never backwards, across many reads (2 million, or 3 s where each
	 * read traps) and a sleep */
	prev = 0;
	t0 = sys_ns(CLOCK_MONOTONIC);
	for (k = 0; k < 2000000; k++) {
		clock_gettime(CLOCK_MONOTONIC, &t);
		if (ns(&t) < prev) {
			FAIL("MONOTONIC went backwards: %lld after %lld", ns(&t), prev);
			break;
		}
		prev = ns(&t);
		if (k == 10000)
			usleep(20000);
		if (k % 10000 == 0 && ns(&t) - t0 > 3000000000LL)
			break;
	}
	printf("ok monotonic %d reads in %lld ms\n", k,
	       (sys_ns(CLOCK_MONOTONIC) - t0) / 1000000);

	/* how much one read costs: a trap costs microseconds */
	a = sys_ns(CLOCK_MONOTONIC);
	for (k = 0; k < 20000; k++)
		clock_gettime(CLOCK_MONOTONIC, &t);
	printf("ok cost clock_gettime %lld ns\n",
	       (sys_ns(CLOCK_MONOTONIC) - a) / 20000);
	return failed;
}

/* ------------------------------------------------------------------ vvar */
static sigjmp_buf env;

static void on_segv(int sig)
{
	siglongjmp(env, sig);
}

static int find_mapping(const char *name, unsigned long *start,
			unsigned long *end)
{
	char line[512];
	FILE *f = fopen("/proc/self/maps", "r");

	while (f && fgets(line, sizeof(line), f))
		if (strstr(line, name) &&
		    sscanf(line, "%lx-%lx", start, end) == 2) {
			fclose(f);
			return 0;
		}
	if (f)
		fclose(f);
	return -1;
}

static int vvar(void)
{
	unsigned long start, end, word;
	struct timespec t1, t2;
	volatile unsigned long *p;
	int fd, status;
	pid_t pid;

	if (find_mapping("[vvar]", &start, &end)) {
		FAIL("no [vvar] mapping in /proc/self/maps");
		return 1;
	}
	p = (void *)start;
	word = p[0];
	printf("ok vvar %#lx-%#lx first word %#lx\n", start, end, word);

	/* 1. a plain store faults */
	signal(SIGSEGV, on_segv);
	signal(SIGBUS, on_segv);
	if (sigsetjmp(env, 1) == 0) {
		p[0] = 0x4141414141414141UL;
		FAIL("store into [vvar] succeeded");
	} else {
		printf("ok store into vvar faulted\n");
	}

	/* 2. mprotect to writable is refused */
	if (mprotect((void *)start, end - start, PROT_READ | PROT_WRITE) == 0)
		FAIL("mprotect([vvar], PROT_WRITE) succeeded");
	else
		printf("ok mprotect refused: %s\n", strerror(errno));

	/* 3. /proc/self/mem (FOLL_FORCE) */
	fd = open("/proc/self/mem", O_RDWR);
	if (fd >= 0 && pwrite(fd, "AAAAAAAA", 8, start) == 8)
		FAIL("/proc/self/mem write into [vvar] succeeded");
	else
		printf("ok /proc/self/mem write refused: %s\n", strerror(errno));
	if (fd >= 0)
		close(fd);

	/* 4. ptrace POKEDATA from a parent into a stopped child */
	pid = fork();
	if (pid == 0) {
		ptrace(PTRACE_TRACEME, 0, 0, 0);
		raise(SIGSTOP);
		_exit(p[0] == word ? 0 : 3);
	}
	waitpid(pid, &status, 0);
	errno = 0;
	if (ptrace(PTRACE_POKEDATA, pid, (void *)start, (void *)0x4242UL) == 0)
		FAIL("ptrace POKEDATA into [vvar] succeeded");
	else
		printf("ok ptrace poke refused: %s\n", strerror(errno));
	ptrace(PTRACE_CONT, pid, 0, 0);
	waitpid(pid, &status, 0);
	if (!WIFEXITED(status) || WEXITSTATUS(status))
		FAIL("child saw a changed [vvar] (status %#x)", status);

	/* 5. unchanged: the clock still works and agrees */
	if (p[0] != word && word != 0)
		printf("note: first word changed %#lx -> %#lx (time moves)\n",
		       word, p[0]);
	clock_gettime(CLOCK_REALTIME, &t1);
	syscall(SYS_clock_gettime, CLOCK_REALTIME, &t2);
	if (llabs(ns(&t1) - ns(&t2)) > 100000000LL)
		FAIL("clock after the attempts: %lld vs %lld", ns(&t1), ns(&t2));
	else
		printf("ok clock unchanged\n");
	return failed;
}

/* --------------------------------------------------------------- handoff */
/*
 * The stub's data page sits above the guest's address space, at the top
 * of the host's (STUB_DATA = top - 2 pages); the hand-off word and the
 * stub's spin budget are at fixed offsets in it (struct stub_data:
 * after the 99 queued stub system calls, 16 + 3960 bytes, and the
 * restart_wait short).  The page is not a guest mapping, so the guest
 * kernel does not know it: user space can still reach it, as upstream.
 */
#define FUTEX_OFF 3980
#define SPIN_OFF 3984

static int handoff(void)
{
	static const unsigned long tops[] = { 0x7ffffffff000UL,
					      0xfffffffffff000UL };
	volatile unsigned int *futex = NULL, *spin = NULL;
	pid_t ppid = getppid();
	unsigned long data;
	struct timespec d = { 0, 200000 };
	size_t i;
	int k;

	signal(SIGSEGV, on_segv);
	for (i = 0; i < sizeof(tops) / sizeof(tops[0]) && !futex; i++) {
		data = tops[i] - 2 * 4096;
		if (sigsetjmp(env, 1) == 0) {
			unsigned int v = *(volatile unsigned int *)(data + FUTEX_OFF);

			futex = (void *)(data + FUTEX_OFF);
			spin = (void *)(data + SPIN_OFF);
			printf("ok stub data at %#lx: hand-off word %u, spin %u\n",
			       data, v, *spin);
		}
	}
	signal(SIGSEGV, SIG_DFL);
	if (!futex) {
		printf("ok no stub data page reachable\n");
		return 0;
	}

	for (k = 0; k < 2000; k++) {
		/* the waiter bit, set and cleared behind the kernel's back */
		*futex = (k & 1) ? 2 : 0;
		if (k % 100 == 0)
			*spin = 0xffffffffU;	/* ask the stub to spin forever */
		if (getppid() != ppid) {
			FAIL("getppid() wrong after tampering (round %d)", k);
			break;
		}
		if (k % 500 == 0)
			nanosleep(&d, NULL);	/* a blocking call: kernel parks */
	}
	if (!failed)
		printf("ok 2000 system calls with the hand-off word tampered\n");
	return failed;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 2 && !strcmp(argv[1], "clocks"))
		return clocks();
	if (argc == 2 && !strcmp(argv[1], "vvar"))
		return vvar();
	if (argc == 2 && !strcmp(argv[1], "handoff"))
		return handoff();
	fprintf(stderr, "usage: guestcheck clocks|vvar|handoff\n");
	return 2;
}
