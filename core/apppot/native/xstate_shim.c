/*
 * xstate_shim: LD_PRELOAD fix for UML kernels (Debian 12's 6.1) on hosts whose
 * XSAVE area is larger than the AVX layout UML was built for (AVX-512, AMX).
 *
 * Why: UML saves and restores each guest thread's FPU state with
 * PTRACE_GETREGSET/PTRACE_SETREGSET(NT_X86_XSTATE) using a fixed 832-byte
 * buffer.  GETREGSET truncates quietly, but the host kernel's SETREGSET
 * demands the whole XSAVE area and fails with EFAULT, so UML prints
 * "ptrace set fp regs failed, errno = 14" and the guest's init dies.
 *
 * What: for short XSTATE requests this keeps a full-size copy per UML buffer
 * (UML keeps one buffer per guest thread, so the address identifies the
 * thread), answers GETREGSET from a full read, and turns SETREGSET into a
 * full write of that copy with UML's bytes on top.  Requests of full size and
 * every other ptrace request pass straight through.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif

#define SLOTS 8192 /* open-addressing table of UML fp buffers */
#define PROBE_SIZE 65536

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

static ptrace_fn real_ptrace;
static size_t full_size;
static void *keys[SLOTS];
static unsigned char *bufs[SLOTS];
static char filled[SLOTS]; /* slot holds a full state read from the host */

static long call_real(int req, pid_t pid, void *addr, void *data)
{
	if (!real_ptrace)
		real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
	return real_ptrace(req, pid, addr, data);
}

/* The kernel reports the regset's real size when asked with a big buffer. */
static size_t xstate_size(pid_t pid)
{
	static unsigned char probe[PROBE_SIZE] __attribute__((aligned(64)));
	struct iovec iov = { probe, sizeof(probe) };

	if (!full_size && call_real(PTRACE_GETREGSET, pid,
				    (void *)(uintptr_t)NT_X86_XSTATE, &iov) == 0)
		full_size = iov.iov_len;
	return full_size;
}

/* Index of the slot for UML buffer `key`, or -1 (table full: no cache). */
static long slot_for(void *key)
{
	size_t h = ((uintptr_t)key >> 4) % SLOTS;

	for (size_t n = 0; n < SLOTS; n++, h = (h + 1) % SLOTS) {
		if (keys[h] == key)
			return (long)h;
		if (!keys[h]) {
			bufs[h] = aligned_alloc(64, (full_size + 63) & ~(size_t)63);
			if (!bufs[h])
				return -1;
			keys[h] = key;
			return (long)h;
		}
	}
	return -1;
}

static unsigned char scratch[PROBE_SIZE] __attribute__((aligned(64)));

static long xstate_get(pid_t pid, struct iovec *iov)
{
	long slot = slot_for(iov->iov_base);
	struct iovec full = { slot >= 0 ? bufs[slot] : scratch, full_size };
	long rc = call_real(PTRACE_GETREGSET, pid,
			    (void *)(uintptr_t)NT_X86_XSTATE, &full);

	if (rc == 0) {
		memcpy(iov->iov_base, full.iov_base, iov->iov_len);
		if (slot >= 0)
			filled[slot] = 1;
	}
	return rc;
}

static long xstate_set(pid_t pid, struct iovec *iov)
{
	long slot = slot_for(iov->iov_base);
	struct iovec full = { slot >= 0 ? bufs[slot] : scratch, full_size };

	/* No saved copy of this thread yet: start from its live state. */
	if (slot < 0 || !filled[slot]) {
		long rc = call_real(PTRACE_GETREGSET, pid,
				    (void *)(uintptr_t)NT_X86_XSTATE, &full);
		if (rc != 0)
			return rc;
		if (slot >= 0)
			filled[slot] = 1;
	}
	memcpy(full.iov_base, iov->iov_base, iov->iov_len);
	return call_real(PTRACE_SETREGSET, pid,
			 (void *)(uintptr_t)NT_X86_XSTATE, &full);
}

long ptrace(enum __ptrace_request request, ...)
{
	va_list ap;
	pid_t pid;
	void *addr, *data;

	va_start(ap, request);
	pid = va_arg(ap, pid_t);
	addr = va_arg(ap, void *);
	data = va_arg(ap, void *);
	va_end(ap);

	if ((request == PTRACE_GETREGSET || request == PTRACE_SETREGSET) &&
	    (uintptr_t)addr == NT_X86_XSTATE && data) {
		struct iovec *iov = data;
		size_t size = xstate_size(pid);

		if (size && iov->iov_len < size && size <= PROBE_SIZE)
			return request == PTRACE_GETREGSET ? xstate_get(pid, iov)
							   : xstate_set(pid, iov);
	}
	return call_real(request, pid, addr, data);
}
