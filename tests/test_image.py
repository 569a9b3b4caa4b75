"""apppot-image: paths, a custom build, reuse, and refusal without root."""

import subprocess
import time

import pytest
from conftest import as_user, start, tool

pytestmark = [pytest.mark.uml, pytest.mark.one_kernel]


def image_cmd(*args, user=None, env=None):
    return subprocess.run(as_user(user) + [tool("apppot-image"), *args],
                          capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL, timeout=900, env=env)


def test_path_names_the_cache(image, mpich_image):
    assert image_cmd("path").stdout.strip() == str(image)
    assert image_cmd("path", "--mpi", "mpich").stdout.strip() == str(mpich_image)


def test_custom_build_then_reuse(jobdir):
    assert __import__("os").getuid() == 0, "image builds need root (CI is root)"
    out = jobdir / "custom.img"
    r = image_cmd("build", "--mpi", "none", "--packages", "bc",
                  "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "[4/4]" in r.stderr  # progress is shown
    assert oct(out.stat().st_mode & 0o777) == "0o444"
    r = start(["--image", str(out), "sh", "-c",
               "echo '6*7' | bc; command -v mpirun || echo no-mpi"], cwd=jobdir)
    assert r.stdout == b"42\nno-mpi\n", r.stderr
    t0 = time.monotonic()
    r = image_cmd("build", "--mpi", "none", "--packages", "bc",
                  "--output", str(out))
    assert r.returncode == 0 and "up to date" in r.stderr
    assert time.monotonic() - t0 < 10


def test_build_refuses_without_root(jobdir, nobody):
    r = image_cmd("build", "--output", str(jobdir / "x.img"), user=nobody,
                  env={"HOME": str(jobdir), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1
    assert "needs root" in r.stderr and "hint:" in r.stderr
    assert not (jobdir / "x.img").exists()
