"""Smoke tests of the kernel benchmarks (benchmarks/syscalls.py,
benchmarks/kernels.py): complete, well-formed output that records the
configuration.  No timing assertions (performance lives in benchmarks/).
They need both own kernels: ``apppot-kernel build`` and
``apppot-kernel build --unpatched``."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.uml, pytest.mark.one_kernel]

PNG = b"\x89PNG\r\n\x1a\n"


def run_bench(module, out, timeout):
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{module}",
                        "--quick", "--out", str(out)], capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_syscalls_quick_output_is_complete(tmp_path, image):
    from benchmarks import syscalls

    r = run_bench("syscalls", tmp_path, 900)
    res = json.loads((tmp_path / "syscalls.json").read_text())
    assert {"date", "machine", "profile", "iterations", "configs", "kernels",
            "rows", "ratios", "samples", "unit"} <= set(res)
    assert res["machine"]["cpu"] and res["machine"]["host_kernel"]
    names = ["native", "debian-6.1", "own-unpatched-ptrace",
             "own-unpatched-seccomp", "own-patched-ptrace",
             "own-patched-seccomp"]
    assert list(res["rows"]) == names
    assert res["configs"]["own-patched-seccomp"]["seccomp"] == "on"
    assert res["configs"]["own-unpatched-ptrace"]["seccomp"] == "off"
    assert res["configs"]["native"]["apppot_start"] is None
    k = res["kernels"]
    assert k["own-patched"]["patches"] and not k["own-unpatched"]["patches"]
    assert k["debian-6.1"]["version"].startswith("6.1")
    for p in k["own-patched"]["patches"]:
        assert {"name", "sha256", "subject"} <= set(p)
    tests = set(syscalls.LOOPS + syscalls.PYLOOPS) | set(syscalls.SPAWNS)
    assert set(res["iterations"]) == tests
    for name in names:
        row = res["rows"][name]
        assert tests <= set(row), name
        assert all(row[t] > 0 for t in tests), (name, row)
        assert len(res["samples"][name]["getppid"]) == res["profile"]["reps"]
        if name != "native":
            assert row["idle_cpu"] >= 0
            assert set(res["ratios"][name]) >= tests
    assert (tmp_path / "syscalls.png").read_bytes()[:8] == PNG
    assert r.stdout.startswith("| | native | debian-6.1 |")
    table = subprocess.run([sys.executable, "-m", "benchmarks.syscalls",
                            "--table", str(tmp_path / "syscalls.json")],
                           capture_output=True, text=True, check=True).stdout
    assert table.strip() == r.stdout.split("\n# wrote")[0].strip()


def test_kernels_quick_output_is_complete(tmp_path, image):
    from benchmarks import kernels

    run_bench("kernels", tmp_path, 1500)
    res = json.loads((tmp_path / "kernels.json").read_text())
    assert list(res["rows"]) == ["own-unpatched-seccomp",
                                 "own-patched-seccomp", "own-patched-ptrace",
                                 "native-shm", "native-tcp"]
    own = set(kernels.LABELS)
    for name, row in res["rows"].items():
        want = own if name.startswith("own") else own - {
            "launch_s", "job4_per_node_s", "job8_per_node_s"}
        assert set(row) == want, name
        assert all(v > 0 for v in row.values())
    assert set(res["ratios_patched_over_unpatched"]) == own
    assert res["kernels"]["own-patched"]["patches"]
    assert (tmp_path / "kernels.png").read_bytes()[:8] == PNG
