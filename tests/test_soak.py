"""A short soak (the full one is ``python -m benchmarks.soak --runs 500``):
randomized jobs, every one checked for its status, an end within its
bound, nothing left behind and exactly what the ranks wrote."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.uml, pytest.mark.one_kernel]

RUNS, SEED = 30, 20261129  # fixed: the same jobs in every CI run


def test_short_soak_has_no_wrong_job(tmp_path, image, mpich_image,
                                     own_kernel):
    r = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--runs",
                        str(RUNS), "--seed", str(SEED), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1800,
                       stdin=subprocess.DEVNULL, check=False)
    report = json.loads((tmp_path / "soak.json").read_text())
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert report["runs"] == RUNS and report["failures"] == []
    assert report["hangs"] == report["leftovers"] == 0
    endings = {j["job"]["ending"] for j in report["jobs"]}
    assert len(endings) >= 6, endings  # the draw covers the endings
    assert r.stdout.splitlines()[-1].startswith(f"soak: {RUNS} jobs, 0 wrong")
