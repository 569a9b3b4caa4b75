/* Guest behaviour that AppPot's kernel patches must not change
 * (tests/test_kpatch_guest.py).  Prints "ok ..." lines, exits 0; or
 * "FAIL ..." and exits 1.
 *
 *   behave signals   interval timer + system calls, EINTR vs SA_RESTART,
 *                    blocked and pending signals, signals between threads
 *   behave threads   8 threads: mutexes, condition variable ping-pong,
 *                    system calls and clock reads in parallel
 *   behave storm     fork+exec of /bin/true from 4 workers, and a burst of
 *                    concurrent children
 *   behave target    a gdb target: calls getppid() 3 times
 *   behave crash     dereferences NULL in crash_here()
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int failed;

#define FAIL(...) do { printf("FAIL "); printf(__VA_ARGS__); printf("\n"); \
		       failed = 1; } while (0)

/* --------------------------------------------------------------- signals */
static volatile sig_atomic_t alarms, usr1;

static void on_alarm(int sig)
{
	alarms++;
}

static void on_usr1(int sig)
{
	usr1++;
}

static void *kill_later(void *arg)
{
	usleep(50000);
	kill(getpid(), SIGUSR1);
	return NULL;
}

static int read_interrupted(int restart)
{
	struct sigaction sa = { .sa_handler = on_usr1,
				.sa_flags = restart ? SA_RESTART : 0 };
	int fds[2], got;
	pthread_t t;
	char c;

	sigaction(SIGUSR1, &sa, NULL);
	if (pipe(fds))
		return -2;
	/* with SA_RESTART the read resumes: give it something to return */
	pthread_create(&t, NULL, kill_later, NULL);
	if (restart) {
		pid_t pid = fork();

		if (pid == 0) {
			usleep(150000);
			(void)!write(fds[1], "x", 1);
			_exit(0);
		}
		got = read(fds[0], &c, 1);
		waitpid(pid, NULL, 0);
	} else {
		got = read(fds[0], &c, 1);
	}
	pthread_join(t, NULL);
	close(fds[0]);
	close(fds[1]);
	return got < 0 ? -errno : got;
}

static int signals(void)
{
	struct sigaction sa = { .sa_handler = on_alarm, .sa_flags = SA_RESTART };
	struct itimerval it = { { 0, 1000 }, { 0, 1000 } };
	struct timespec t0, t;
	sigset_t set, pend;
	long calls = 0;
	int r;

	sigaction(SIGALRM, &sa, NULL);
	setitimer(ITIMER_REAL, &it, NULL);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	do {
		if (syscall(SYS_getppid) != getppid())
			FAIL("getppid differs");
		calls++;
		clock_gettime(CLOCK_MONOTONIC, &t);
	} while ((t.tv_sec - t0.tv_sec) * 1000000000L + t.tv_nsec - t0.tv_nsec
		 < 500000000L);
	memset(&it, 0, sizeof(it));
	setitimer(ITIMER_REAL, &it, NULL);
	/* a 1 ms timer for 0.5 s: the guest's HZ (100) bounds it from below */
	if (alarms < 20)
		FAIL("only %d SIGALRM in 0.5 s", (int)alarms);
	else
		printf("ok %d SIGALRM during %ld system calls\n", (int)alarms, calls);

	r = read_interrupted(0);
	if (r != -EINTR)
		FAIL("read without SA_RESTART returned %d, not -EINTR", r);
	else
		printf("ok read interrupted: EINTR\n");
	r = read_interrupted(1);
	if (r != 1)
		FAIL("read with SA_RESTART returned %d, not 1", r);
	else
		printf("ok read restarted after the handler\n");

	/* a blocked signal stays pending, and is delivered once unblocked */
	usr1 = 0;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, NULL);
	kill(getpid(), SIGUSR1);
	sigpending(&pend);
	if (!sigismember(&pend, SIGUSR1) || usr1)
		FAIL("blocked SIGUSR1 not pending (handled %d)", (int)usr1);
	sigprocmask(SIG_UNBLOCK, &set, NULL);
	if (usr1 != 1)
		FAIL("SIGUSR1 handled %d times after unblocking", (int)usr1);
	else
		printf("ok blocked signal pending, delivered on unblock\n");

	/* sigwaitinfo picks up a queued real-time signal with its value */
	{
		union sigval v = { .sival_int = 42 };
		siginfo_t si;

		sigemptyset(&set);
		sigaddset(&set, SIGRTMIN);
		sigprocmask(SIG_BLOCK, &set, NULL);
		sigqueue(getpid(), SIGRTMIN, v);
		if (sigwaitinfo(&set, &si) != SIGRTMIN || si.si_value.sival_int != 42)
			FAIL("sigwaitinfo: %d, value %d", si.si_signo,
			     si.si_value.sival_int);
		else
			printf("ok sigqueue value arrives\n");
	}
	return failed;
}

/* --------------------------------------------------------------- threads */
#define NTHREADS 8
#define ROUNDS 20000

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static long counter;
static pthread_mutex_t pp_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pp_cond = PTHREAD_COND_INITIALIZER;
static int turn;

static void *worker(void *arg)
{
	struct timespec t, last = { 0, 0 };
	long i;

	for (i = 0; i < ROUNDS; i++) {
		pthread_mutex_lock(&lock);
		counter++;
		pthread_mutex_unlock(&lock);
		if (i % 16 == 0 && syscall(SYS_getppid) <= 0)
			FAIL("getppid in a thread");
		clock_gettime(CLOCK_MONOTONIC, &t);
		if (t.tv_sec < last.tv_sec || (t.tv_sec == last.tv_sec &&
					       t.tv_nsec < last.tv_nsec))
			FAIL("clock went backwards in a thread");
		last = t;
	}
	return NULL;
}

static void *pong(void *arg)
{
	int i;

	for (i = 0; i < 2000; i++) {
		pthread_mutex_lock(&pp_lock);
		while (turn != 1)
			pthread_cond_wait(&pp_cond, &pp_lock);
		turn = 0;
		pthread_cond_signal(&pp_cond);
		pthread_mutex_unlock(&pp_lock);
	}
	return NULL;
}

static int threads(void)
{
	pthread_t t[NTHREADS], p;
	int i;

	for (i = 0; i < NTHREADS; i++)
		pthread_create(&t[i], NULL, worker, NULL);
	for (i = 0; i < NTHREADS; i++)
		pthread_join(t[i], NULL);
	if (counter != (long)NTHREADS * ROUNDS)
		FAIL("counter %ld, not %ld", counter, (long)NTHREADS * ROUNDS);
	else
		printf("ok %d threads, %ld locked increments\n", NTHREADS, counter);

	pthread_create(&p, NULL, pong, NULL);
	for (i = 0; i < 2000; i++) {
		pthread_mutex_lock(&pp_lock);
		turn = 1;
		pthread_cond_signal(&pp_cond);
		while (turn != 0)
			pthread_cond_wait(&pp_cond, &pp_lock);
		pthread_mutex_unlock(&pp_lock);
	}
	pthread_join(p, NULL);
	printf("ok 2000 condition variable round trips\n");
	return failed;
}

/* ----------------------------------------------------------------- storm */
static int storm(void)
{
	int w, i, status, bad = 0, n = 0;
	pid_t kids[64];

	for (w = 0; w < 4; w++) {
		if (fork() == 0) {
			for (i = 0; i < 100; i++) {
				pid_t pid = fork();

				if (pid == 0) {
					execl("/bin/true", "true", (char *)NULL);
					_exit(127);
				}
				if (waitpid(pid, &status, 0) != pid ||
				    !WIFEXITED(status) || WEXITSTATUS(status))
					_exit(1);
			}
			_exit(0);
		}
	}
	for (w = 0; w < 4; w++) {
		wait(&status);
		if (!WIFEXITED(status) || WEXITSTATUS(status))
			bad++;
	}
	if (bad)
		FAIL("%d of 4 fork+exec workers failed", bad);
	else
		printf("ok 400 fork+exec+wait from 4 workers\n");

	for (i = 0; i < 64; i++) {
		kids[i] = fork();
		if (kids[i] == 0) {
			usleep(1000 * (i % 7));
			_exit(i);
		}
	}
	for (i = 0; i < 64; i++) {
		if (waitpid(kids[i], &status, 0) == kids[i] && WIFEXITED(status) &&
		    WEXITSTATUS(status) == i)
			n++;
	}
	if (n != 64)
		FAIL("%d of 64 concurrent children reported their status", n);
	else
		printf("ok 64 concurrent children, statuses intact\n");
	return failed;
}

/* ------------------------------------------------------------ gdb/strace */
static int target(void)
{
	int i;

	for (i = 0; i < 3; i++)
		printf("ppid %d\n", getppid());
	return 0;
}

__attribute__((noinline)) static void crash_here(volatile int *p)
{
	*p = 1;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 2 && !strcmp(argv[1], "signals"))
		return signals();
	if (argc == 2 && !strcmp(argv[1], "threads"))
		return threads();
	if (argc == 2 && !strcmp(argv[1], "storm"))
		return storm();
	if (argc == 2 && !strcmp(argv[1], "target"))
		return target();
	if (argc == 2 && !strcmp(argv[1], "crash")) {
		crash_here(NULL);
		return 0;
	}
	fprintf(stderr, "usage: behave signals|threads|storm|target|crash\n");
	return 2;
}
