"""apppot-start with real appliances (Debian 12's UML 6.1, the built images)."""

import os
import signal
import subprocess
import time

import pexpect
import pytest
from conftest import as_user, start, tool

pytestmark = pytest.mark.uml

PY_ARGV = "import sys, json; print(json.dumps(sys.argv[1:]))"


def test_exact_argv_stdout_stderr_and_status(jobdir, nobody, image):
    args = ["a b", "", "ü ñ", "x\ny", "'\"$HOME;*", "-v", "--"]
    r = start(["--", "python3", "-c",
               PY_ARGV + "; print('to-err', file=sys.stderr); sys.exit(7)",
               *args], cwd=jobdir, user=nobody)
    assert r.returncode == 7, r.stderr
    import json
    assert json.loads(r.stdout) == args
    assert r.stderr.decode().strip().endswith("to-err")
    assert b"Linux" not in r.stdout and b"apppot-init" not in r.stdout


def test_the_pass_runs_the_kernel_it_names(jobdir, nobody, image):
    """scripts/test.sh runs the appliance tests twice, the second time with
    APPPOT_KERNEL naming Debian's 6.1: the guest runs exactly the kernel the
    tools say they picked, so a pass cannot silently repeat the other."""
    from apppot import kernel

    chosen = kernel.find_kernel(os.environ.get("APPPOT_KERNEL"))
    r = start(["-v", "uname", "-r"], cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == chosen.version, r.stderr
    if "APPPOT_KERNEL" in os.environ:
        assert os.path.realpath(chosen.path) == os.path.realpath(
            os.environ["APPPOT_KERNEL"])
    else:  # the first pass: AppPot's own build, patches and all
        assert chosen.version.startswith("7."), chosen
        assert chosen.has("patched"), chosen


def test_argv_larger_than_kernel_command_line(jobdir, nobody, image):
    big = "y" * 20000
    r = start(["python3", "-c", "import sys; print(len(sys.argv[1]), "
               "sys.argv[1] == 'y' * 20000)", big], cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"20000 True\n"


def test_argv_not_visible_in_ps(jobdir, nobody, image):
    secret = "s3cret-token-xyz"
    p = subprocess.Popen(
        as_user(nobody) + [tool("apppot-start"), "sh", "-c", "sleep 3", secret],
        cwd=jobdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**os.environ, "HOME": str(jobdir)})
    try:
        time.sleep(2.5)
        ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True,
                            text=True, check=True).stdout
        uml_lines = [line for line in ps.splitlines() if "uml_dir=" in line]
        assert uml_lines, "appliance not running"
        assert not any(secret in line for line in uml_lines)
    finally:
        p.communicate(timeout=60)
    assert p.returncode == 0


def test_job_dir_same_path_owned_by_caller(jobdir, nobody, image):
    r = start(["sh", "-c", "pwd; id -u; id -g; echo data > out.txt; "
               "mkdir sub; ls -ln out.txt"], cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == str(jobdir)
    assert lines[1:3] == [str(nobody.pw_uid), str(nobody.pw_gid)]
    st = (jobdir / "out.txt").stat()
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert (jobdir / "out.txt").read_text() == "data\n"
    assert (jobdir / "sub").stat().st_uid == nobody.pw_uid


def test_hostfs_confined_to_job_dir(jobdir, image):
    # guest root mounting hostfs again sees the job dir, not the host's /
    (jobdir / "marker").write_text("job")
    r = start(["sh", "-c", "mkdir -p /mnt/h && mount -t hostfs none /mnt/h && "
               "ls /mnt/h && test ! -e /mnt/h/etc/passwd && echo confined"],
              cwd=jobdir)
    assert r.returncode == 0, r.stderr
    assert b"marker" in r.stdout and b"confined" in r.stdout


def test_stdin_pipe_and_file(jobdir, nobody, image):
    data = b"".join(b"line %d \xff\n" % i for i in range(20000))
    r = start(["sh", "-c", "cat | md5sum"], cwd=jobdir, user=nobody,
              input=data)
    import hashlib
    assert r.stdout.split()[0].decode() == hashlib.md5(data).hexdigest()  # noqa: S324
    f = jobdir / "in.txt"
    f.write_bytes(b"from a file\n")
    with open(f, "rb") as fh:
        r = start(["cat"], cwd=jobdir, user=nobody, stdin=fh)
    assert r.stdout == b"from a file\n"
    r = start(["cat"], cwd=jobdir, user=nobody)  # /dev/null: immediate EOF
    assert r.returncode == 0 and r.stdout == b""


def test_binary_stdout_is_exact(jobdir, nobody, image):
    r = start(["python3", "-c", "import sys; sys.stdout.buffer.write("
               "bytes(range(256)) * 64)"], cwd=jobdir, user=nobody)
    assert r.returncode == 0
    assert r.stdout == bytes(range(256)) * 64


def test_no_prog_runs_apppot_run_then_shell(jobdir, nobody, image):
    script = jobdir / "apppot-run"
    script.write_text("#!/bin/sh\necho from-apppot-run \"$#\"\nexit 4\n")
    script.chmod(0o755)
    r = start([], cwd=jobdir, user=nobody)
    assert (r.returncode, r.stdout) == (4, b"from-apppot-run 0\n")
    script.unlink()
    r = start([], cwd=jobdir, user=nobody, input=b"echo shell-$((6*7))\nexit 3\n")
    assert (r.returncode, r.stdout) == (3, b"shell-42\n")


def test_env_and_signal_status(jobdir, nobody, image):
    r = start(["--env", "FOO=bar baz", "--env", "HOSTVAR", "sh", "-c",
               'echo "$FOO|$HOSTVAR"; kill -TERM $$'], cwd=jobdir, user=nobody,
              env={"HOSTVAR": "h"})
    assert r.stdout == b"bar baz|h\n"
    assert r.returncode == 128 + signal.SIGTERM


def test_not_found_and_not_executable(jobdir, nobody, image):
    r = start(["no-such-program"], cwd=jobdir, user=nobody)
    assert r.returncode == 127
    assert b"no-such-program" in r.stderr and b"not found" in r.stderr
    (jobdir / "noexec.sh").write_text("echo hi\n")
    r = start(["./noexec.sh"], cwd=jobdir, user=nobody)
    assert r.returncode == 126


def test_sudo_in_guest_and_mpi_library(jobdir, nobody, image):
    r = start(["sh", "-c", "sudo id -u; python3 -c 'import mpi4py; "
               "print(mpi4py.__version__)'; mpirun --version | head -1"],
              cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().splitlines()
    assert out[0] == "0"
    assert out[1].startswith("3.")
    assert "Open MPI" in out[2]


def test_mpich_image_has_mpi4py_on_mpich(jobdir, nobody, mpich_image):
    r = start(["--mpi", "mpich", "python3", "-c", "from mpi4py import MPI; "
               "print(MPI.Get_library_version().split()[0], "
               "MPI.COMM_WORLD.Get_size())"], cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"MPICH 1\n"


def test_timeout(jobdir, nobody, image):
    t0 = time.monotonic()
    r = start(["--timeout", "8", "sleep", "100"], cwd=jobdir, user=nobody)
    assert r.returncode == 124
    assert b"timeout" in r.stderr
    assert time.monotonic() - t0 < 30


def test_boot_timeout_is_boot_failure(jobdir, nobody, image):
    r = start(["--boot-timeout", "0.3", "true"], cwd=jobdir, user=nobody)
    assert r.returncode == 120
    assert b"not booted" in r.stderr


def test_guest_panic_is_reported(jobdir, image):
    # sysrq 'c' crashes the guest kernel on purpose
    r = start(["sh", "-c", "echo c > /proc/sysrq-trigger; sleep 30"],
              cwd=jobdir)
    assert r.returncode == 121, r.stderr
    assert b"crashed" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_tear_down(jobdir, nobody, image, sig):
    p = subprocess.Popen(
        as_user(nobody) + [tool("apppot-start"), "sleep", "100"], cwd=jobdir,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**os.environ, "HOME": str(jobdir)})
    time.sleep(4)
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 128 + sig, err
    # the autouse fixture checks that no UML process or run dir is left


def test_sigkill_of_launcher_leaves_nothing(jobdir, nobody, image):
    p = subprocess.Popen(
        as_user(nobody) + [tool("apppot-start"), "sleep", "100"], cwd=jobdir,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**os.environ, "HOME": str(jobdir)})
    time.sleep(4)
    import psutil
    target = psutil.Process(p.pid)
    if as_user(nobody):  # setpriv execs, so the pid is apppot-start's
        assert "apppot-start" in " ".join(target.cmdline())
    p.kill()
    p.wait()
    # the autouse fixture waits up to 10 s for the watchdog to clean up


def test_keep_keeps_cow_and_log(jobdir, nobody, image, tmp_path):
    r = start(["--keep", "-v", "true"], cwd=jobdir, user=nobody)
    assert r.returncode == 0
    kept = [line for line in r.stderr.decode().splitlines()
            if "run directory kept" in line]
    assert kept
    rundir = kept[0].split(": ")[-1]
    try:
        assert os.path.exists(os.path.join(rundir, "root.cow"))
        assert os.path.exists(os.path.join(rundir, "console.log"))
    finally:
        import shutil
        shutil.rmtree(rundir)


def test_verbose_prints_launch_to_payload(jobdir, nobody, image):
    r = start(["-v", "true"], cwd=jobdir, user=nobody)
    assert r.returncode == 0
    assert b"launch to payload" in r.stderr


def test_interactive_terminal_session(jobdir, nobody, image):
    env = {**os.environ, "HOME": str(jobdir), "TERM": "dumb"}
    argv = as_user(nobody) + [tool("apppot-start")]
    child = pexpect.spawn(argv[0], argv[1:], cwd=str(jobdir), env=env,
                          timeout=60)
    try:
        child.expect(r"\$ ")
        child.sendline("tty; echo answer-$((6*7))")
        child.expect("answer-42")
        assert b"/dev/ttyS0" in child.before
        child.sendline("exit 5")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 5


def test_changed_base_under_cow(jobdir, image):
    img = jobdir / "copy.img"
    subprocess.run(["cp", "--sparse=always", "--preserve=timestamps",
                    str(image), str(img)], check=True)
    cow = jobdir / "mine.cow"
    r = start(["--image", f"{cow}:{img}", "sh", "-c", "echo x > /kept"],
              cwd=jobdir)
    assert r.returncode == 0, r.stderr
    r = start(["--image", f"{cow}:{img}", "cat", "/kept"], cwd=jobdir)
    assert r.stdout == b"x\n"  # the COW file kept the change
    os.utime(img, None)
    r = start(["--image", f"{cow}:{img}", "true"], cwd=jobdir)
    assert r.returncode == 125
    assert b"changed since COW" in r.stderr and b"hint:" in r.stderr


def test_shared_base_never_written(jobdir, nobody, image):
    before = (image.stat().st_mtime_ns, image.stat().st_size)
    r = start(["sh", "-c", "sudo sh -c 'echo x > /etc/written'"], cwd=jobdir,
              user=nobody)
    assert r.returncode == 0
    assert (image.stat().st_mtime_ns, image.stat().st_size) == before
    assert not os.access(image, os.W_OK) or os.getuid() == 0
    assert oct(image.stat().st_mode & 0o777) == "0o444"


def test_slirp_reaches_host_loopback_only_server(jobdir, nobody, image):
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(60)
    port = srv.getsockname()[1]

    def serve():
        conn, _ = srv.accept()
        conn.sendall(b"hello-loopback\n")
        conn.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        r = start(["--net", "slirp", "python3", "-c",
                   "import socket; s = socket.create_connection(('10.0.2.2', "
                   f"{port}), timeout=20); print(s.recv(64).decode().strip())"],
                  cwd=jobdir, user=nobody)
    finally:
        srv.close()
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello-loopback\n"


def test_net_none_has_only_loopback(jobdir, nobody, image):
    r = start(["sh", "-c", "ls /sys/class/net"], cwd=jobdir, user=nobody)
    assert r.stdout.split() == [b"lo"]


def test_defaults_from_environment_and_id(jobdir, nobody, image):
    r = start(["sh", "-c", "hostname; grep MemTotal /proc/meminfo"], cwd=jobdir,
              user=nobody, env={"APPPOT_MEM": "160M", "APPPOT_ID": "myjob-7"})
    assert r.returncode == 0, r.stderr
    host, mem = r.stdout.decode().splitlines()
    assert host == "myjob-7"
    assert 120_000 < int(mem.split()[1]) <= 160 * 1024
    r = start(["--mem", "200M", "true"], cwd=jobdir, user=nobody,
              env={"APPPOT_MEM": "junk"})
    assert r.returncode == 0  # the command line beats the environment
    r = start(["true"], cwd=jobdir, user=nobody, env={"APPPOT_MEM": "junk"})
    assert r.returncode == 125 and b"'junk'" in r.stderr


FPU_SIGNAL = r"""
/* Does a vector register survive a signal handler that changes it? */
#include <signal.h>
#include <stdio.h>
#include <sys/time.h>
#ifdef AVX512 /* zmm16: beyond the 832-byte AVX XSAVE layout */
#define SET_ONES "vpternlogd $0xff, %%zmm16, %%zmm16, %%zmm16"
#define SET_ZERO "vpxord %%zmm16, %%zmm16, %%zmm16"
#define READ "vmovq %%xmm16, %0"
#define REG "xmm16"
#else /* the upper half of ymm15 */
#define SET_ONES "vpcmpeqd %%ymm15, %%ymm15, %%ymm15"
#define SET_ZERO "vpxor %%xmm15, %%xmm15, %%xmm15"
#define READ "vextracti128 $1, %%ymm15, %%xmm0; vmovq %%xmm0, %0"
#define REG "xmm15"
#endif
static volatile long handled;
static void on_alarm(int sig) { __asm__ volatile(SET_ONES ::: REG); handled++; }
int main(void)
{
	struct sigaction sa = {0};
	struct itimerval it = {{0, 500}, {0, 500}};
	long loops = 0, bad = 0;
	sa.sa_handler = on_alarm;
	sigaction(SIGALRM, &sa, 0);
	setitimer(ITIMER_REAL, &it, 0);
	while (handled < 2000) {
		unsigned long long v;
		__asm__ volatile(SET_ZERO ::: REG);
		for (volatile int i = 0; i < 2000; i++)
			;
		__asm__ volatile(READ : "=r"(v) :: "xmm0");
		bad += v != 0;
		loops++;
	}
	printf("corrupted %ld of %ld loops\n", bad, loops);
	return bad != 0;
}
"""


def test_vector_registers_survive_signal_handlers(jobdir, nobody, image,
                                                  own_kernel):
    # glibc's string functions keep data in ymm16-31 on AVX-512 hosts: the
    # guest kernel must give back the whole XSAVE area after a handler.
    # AppPot's own kernel does; Debian's 6.1 with the xstate shim cannot
    # (README, "How it works"), so this pins the own kernel.
    avx512 = "avx512vl" in open("/proc/cpuinfo").read()
    (jobdir / "fpu.c").write_text(FPU_SIGNAL)
    subprocess.run(["cc", "-O2", "-static", "-o", str(jobdir / "fpu"),
                    *(["-mavx512f", "-mavx512vl", "-DAVX512"] if avx512
                      else ["-mavx2"]), str(jobdir / "fpu.c")], check=True)
    native = subprocess.run([jobdir / "fpu"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert native.returncode == 0, native.stdout
    r = start(["--kernel", own_kernel, "./fpu"], cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(b"corrupted 0 of ")
