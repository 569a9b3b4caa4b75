"""Smoke test of the benchmark suite: complete, well-formed output.

No timing assertions (performance lives in benchmarks/, not in tests).
"""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.uml, pytest.mark.one_kernel]


def test_quick_suite_output_is_complete(tmp_path, image):
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out",
                        str(out)], capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert {"date", "machine", "data", "ratios", "goals"} <= set(res)
    envs = {"native-shm", "native-tcp", "appliance"}
    for test in ("latency", "bw", "bibw"):
        series = res["data"]["pt2pt"][test]
        assert set(series) == envs
        sizes = [s for s, _ in series["appliance"]]
        assert sizes == [s for s, _ in series["native-tcp"]]
        assert sizes[-1] == 1 << 20
        assert all(v > 0 for env in envs for _, v in series[env]
                   if not (test != "latency" and _ == 0))
    assert sizes[:3] == [1, 2, 4]
    assert set(res["data"]["collectives"]) == {
        "allreduce-2", "barrier-2", "allreduce-4", "barrier-4"}
    assert set(res["data"]["startup"]) == {"launch_to_payload", "job-1",
                                           "job-2", "job-4"}
    assert set(res["data"]["memory"]) == {"n1", "n2"}
    for key in ("latency_small_vs_tcp", "transfer_1MiB_vs_tcp",
                "memory_overhead_mib", "launch_to_payload_vs_process"):
        assert isinstance(res["ratios"][key], float)
    for png in ("pt2pt.png", "startup.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "# OSU MPI latency (Latency (us))" in r.stdout
    assert "# Size" in r.stdout and "# ratios:" in r.stdout
