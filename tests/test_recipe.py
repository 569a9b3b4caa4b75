"""Recipes: checks that name the recipe line (no boot), then the shipped
examples built and run under apppot-start and apppot-mpirun."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_job, scratch_dir, start, tool

from apppot import recipe
from apppot.errors import ConfigError

EXAMPLES = Path(__file__).parent.parent / "examples"


def write(tmp_path, text, name="r.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ('base = "debian:12"\nmpi = openmpi\n',
     "r.toml: Invalid value (at line 2, column 7)"),
    ('mpi = "none"\n\npackges = ["gcc"]\n',
     "r.toml:3: unknown key 'packges'"),
    ('mpi = "none"\npackages = "gcc"\n',
     "r.toml:2: packages must be a list, not a string"),
    ('mpi = "none"\n[env]\nOK = "1"\n"BAD NAME" = "x"\n',
     "r.toml:4: env: 'BAD NAME' must be a variable name with a string value"),
    ('mpi = "none"\n[env]\nN = 1\n',
     "r.toml:3: env: 'N' must be a variable name with a string value"),
    ('base = "ubuntu:24.04"\n', "r.toml:1: base 'ubuntu:24.04': Ubuntu needs "
     "Ubuntu's archive keyring, which Debian 12 does not ship, and AppPot "
     "uses only the machine's Debian mirror"),
    ('base = "debian:13"\nmpi = "mpich"\n', "r.toml:2: mpi = \"mpich\" is "
     "built for debian:12 only (its mpi4py wheel), not debian:13"),
    ('packages = ["gcc", "rm -rf /"]\n',
     "r.toml:1: packages: bad entry 'rm -rf /'"),
    ('pip = ["--index-url=http://evil"]\n',
     "r.toml:1: pip: bad entry '--index-url=http://evil'"),
    ('workdir = "src"\n', "r.toml:1: workdir 'src' is not an absolute path"),
    ('post = ["true", ""]\n',
     "r.toml:1: post must be a list of non-empty shell commands"),
    ('mpi = "none"\n\n[[files]]\nsrc = "a"\ndest = "/a"\n\n[[files]]\n'
     'src = "../outside"\ndest = "/b"\n',
     "r.toml:8: files: src '../outside' is outside the build context"),
    ('[[files]]\nsrc = "a"\ndest = "/a"\n[[files]]\nsrc = "a"\n'
     'dest = "x/../y"\n',
     "r.toml:6: files: dest 'x/../y' must be an absolute path without '..'"),
    ('[[files]]\nsrc = "missing"\ndest = "/a"\n',
     "r.toml:2: files: src 'missing' does not exist"),
    ('[[files]]\nsrc = "a"\ndest = "/a"\nmode = "rwx"\n',
     "r.toml:4: files: mode 'rwx' is not octal"),
])
def test_errors_name_the_recipe_line(tmp_path, text, message):
    (tmp_path / "a").write_text("a")
    (tmp_path.parent / "outside").write_text("secret")
    with pytest.raises(ConfigError) as e:
        recipe.load(write(tmp_path, text))
    assert str(e.value).replace(str(tmp_path) + "/", "").startswith(message)
    assert e.value.hint


def test_cli_reports_a_bad_recipe_in_one_line(tmp_path):
    path = write(tmp_path, 'mpi = "none"\ncomand = ["x"]\n')
    r = subprocess.run([tool("apppot-image"), "build", str(path)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        f"apppot-image: error: {path}:2: unknown key 'comand'",
        "hint: known keys: base, mpi, packages, pip, files, post, env, "
        "workdir, command, labels"]


def test_cache_key_covers_recipe_and_every_input_file(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.c").write_text("int a;")
    path = write(tmp_path, 'mpi = "none"\n[[files]]\nsrc = "src"\n'
                 'dest = "/src"\n')

    def key():
        return recipe.inputs(recipe.load(path), "rootfs", "guest")

    first = key()
    assert first["files"] == {
        "src": "dir:755",
        "src/a.c": "644:" + __import__("hashlib").sha256(b"int a;").hexdigest()}
    (tmp_path / "src" / "a.c").write_text("int b;")
    assert key() != first
    second = key()
    (tmp_path / "src" / "b.h").write_text("")
    assert key() != second
    third = key()
    (tmp_path / "src" / "b.h").chmod(0o600)
    assert key() != third
    fourth = key()
    path.write_text(path.read_text() + "# a comment changes the recipe\n")
    assert key() != fourth


def test_build_script_and_failed_step_lines(tmp_path):
    path = write(tmp_path, 'mpi = "none"\npip = ["tabulate==0.10.0"]\n'
                 'workdir = "/w d"\npost = [\n  "make all",\n'
                 '  "echo \'two\'",\n]\n[env]\nA = "x y"\n')
    rec = recipe.load(path)
    assert rec.post == (("make all", 5), ("echo 'two'", 6))
    script = recipe.build_script(rec)
    assert script.splitlines() == [
        "set -u",
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
        "/sbin:/bin",
        "export HOME=/root",
        "echo '== pip: venv /opt/venv' >&2",
        "python3 -m venv --system-site-packages /opt/venv || exit 100",
        "/opt/venv/bin/pip install --no-index --no-cache-dir "
        "--disable-pip-version-check --find-links /var/lib/apppot/build/"
        "wheels tabulate==0.10.0 >&2 || exit 100",
        "export PATH=/opt/venv/bin:$PATH",
        "export A='x y'",
        "mkdir -p '/w d'",
        "cd '/w d'",
        "echo '== post 1: make all' >&2",
        "/bin/sh -ec 'make all' >&2 || exit 101",
        "echo '== post 2: echo '\"'\"'two'\"'\"'' >&2",
        "/bin/sh -ec 'echo '\"'\"'two'\"'\"'' >&2 || exit 102",
        "rm -rf /var/lib/apppot/build",
        "exit 0"]
    assert recipe.failed_step(rec, 102) == \
        f"post command 2 ({path}:6: \"echo 'two'\")"
    assert recipe.failed_step(rec, 100) == f"pip install (recipe line {path}:2)"
    assert recipe.failed_step(rec, 1) is None
    assert rec.runtime()["env"] == [
        "A=x y", "PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:"
        "/usr/sbin:/usr/bin:/sbin:/bin"]


# ------------------------------------------------------------ real builds
@pytest.fixture(scope="module")
def outdir():
    yield from scratch_dir("apppot-test-recipe-")


def build(recipe_path, out, *extra):
    assert os.getuid() == 0, "image builds need root (CI is root)"
    t0 = time.monotonic()
    r = subprocess.run([tool("apppot-image"), "build", str(recipe_path),
                        "--output", str(out), *extra], capture_output=True,
                       text=True, check=False, stdin=subprocess.DEVNULL,
                       timeout=1800)
    return r, time.monotonic() - t0


@pytest.fixture(scope="module")
def hello_img(outdir):
    out = outdir / "hello.img"
    r, took = build(EXAMPLES / "mpi-hello" / "apppot.toml", out)
    assert r.returncode == 0, r.stderr[-4000:]
    for n in range(1, 7):
        assert f"[{n}/6 " in r.stderr
    assert "== post 2: mpi-hello --version" in r.stderr
    print(f"mpi-hello build: {took:.0f} s;", r.stderr.splitlines()[-1])
    return out


@pytest.mark.uml
@pytest.mark.one_kernel
def test_mpi_example_default_command_and_mpirun(hello_img, jobdir):
    r = start(["--image", str(hello_img)], cwd=jobdir)
    assert (r.returncode, r.stdout) == (0, b"mpi-hello 1.0 (MPI 3.1)\n")
    r = run_job([tool("apppot-mpirun"), "--image", str(hello_img), "-n", "3",
                 "mpi-hello"], cwd=jobdir, timeout=240)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    lines = sorted(r.stdout.decode().splitlines())
    assert [line.split(" on ")[0] for line in lines] == [
        f"hello from rank {i} of 3" for i in range(3)]
    assert all(line.endswith(": sum 6") for line in lines)


@pytest.mark.uml
@pytest.mark.one_kernel
def test_mpi_example_is_reused_and_inspected(hello_img):
    r, took = build(EXAMPLES / "mpi-hello" / "apppot.toml", hello_img)
    assert r.returncode == 0 and "image up to date" in r.stderr
    assert took < 10
    r = subprocess.run([tool("apppot-image"), "inspect", str(hello_img)],
                       capture_output=True, text=True, check=True)
    text = (EXAMPLES / "mpi-hello" / "apppot.toml").read_text().rstrip("\n")
    assert text in r.stdout
    prov = json.loads(r.stdout.split("provenance:\n", 1)[1])
    assert prov["files"]["hello.c"].startswith("644:")
    assert prov["packages"]["libopenmpi-dev"].startswith("4.1")
    assert prov["suite"] == "bookworm"


@pytest.mark.uml
@pytest.mark.one_kernel
def test_python_example_with_pip(outdir, jobdir):
    out = outdir / "wordstats.img"
    r, took = build(EXAMPLES / "python-pip" / "apppot.toml", out)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "wheels" in r.stderr
    print(f"python-pip build: {took:.0f} s;", r.stderr.splitlines()[-1])
    r = start(["--image", str(out)], cwd=jobdir)
    assert r.stdout == (b"wordstats ok: numpy 1.26.4, /opt/venv/lib/python3.11/"
                        b"site-packages/numpy/__init__.py\n"), r.stderr
    (jobdir / "w.txt").write_text("the cat and the hat\n")
    r = start(["--image", str(out), "--", "python3", "-m", "wordstats",
               "w.txt"], cwd=jobdir)
    assert r.stdout.decode().splitlines() == [
        "file      words    distinct    mean length",
        "------  -------  ----------  -------------",
        "w.txt         5           4           3.00"], r.stderr


@pytest.mark.uml
@pytest.mark.one_kernel
def test_failing_post_command_names_its_line(tmp_path):
    path = write(tmp_path, 'mpi = "none"\npost = [\n  "true",\n'
                 '  "echo about to fail; exit 3",\n]\n')
    out = tmp_path / "bad.img"
    r, _ = build(path, out)
    assert r.returncode == 1
    assert "about to fail" in r.stderr
    assert (f"apppot-image: error: post command 2 ({path}:4: "
            "'echo about to fail; exit 3') failed") in r.stderr
    assert not out.exists() and not list(tmp_path.glob("apppot-recipe-*"))


@pytest.mark.uml
@pytest.mark.one_kernel
def test_debian_13_base(tmp_path, jobdir):
    path = write(tmp_path, 'base = "debian:13"\nmpi = "none"\n'
                 'command = ["cat", "/etc/debian_version"]\n')
    out = tmp_path / "trixie.img"
    r, took = build(path, out)
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"debian:13 build: {took:.0f} s;", r.stderr.splitlines()[-1])
    r = start(["--image", str(out)], cwd=jobdir)
    assert r.returncode == 0 and r.stdout.startswith(b"13."), r.stderr
