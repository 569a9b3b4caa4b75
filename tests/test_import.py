"""Imported OCI/Docker images under apppot-start and apppot-mpirun.

Two images, both made offline: a busybox-static tree (no Python, no libc)
written as a docker save archive by hand, and a Debian tree with Open MPI
(mmdebstrap, AppPot's own cached root file system) packed by the real tools
umoci (OCI layout) and skopeo (docker-archive).  Both boot on AppPot's
system disk (``apppot-image build --mpi none``).
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_job, scratch_dir, start, tool
from ociarchive import (
    docker_archive,
    entry,
    image_config,
    layer_tar,
    oci_layout,
    write_tar,
)
from ociregistry import Registry

from apppot.images import default_image

pytestmark = [pytest.mark.uml, pytest.mark.one_kernel]

APPLETS = ("sh", "echo", "id", "pwd", "printf", "cat", "ls", "env", "true",
           "false", "sleep", "test")


def image_cmd(*args):
    return subprocess.run([tool("apppot-image"), *args], capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL,
                          timeout=900)


@pytest.fixture(scope="module")
def workdir():
    yield from scratch_dir("apppot-test-import-")


@pytest.fixture(scope="module")
def system_disk():
    path = default_image("none")
    assert path.exists(), f"system disk missing: {path} (apppot-image " \
        "build --mpi none)"
    return path


def busybox_parts():
    """Two layers (whiteouts, an opaque dir, a device node) and a config."""
    busybox = Path("/bin/busybox")
    assert busybox.exists(), "apt-get install busybox-static"
    base = [entry("bin", "dir"),
            entry("bin/busybox", data=busybox.read_bytes(), mode=0o755),
            *[entry(f"bin/{a}", "symlink", target="busybox")
              for a in APPLETS],
            entry("etc", "dir"),
            entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"
                  b"app:x:1234:1234:app:/home/app:/bin/sh\n"),
            entry("etc/group", data=b"root:x:0:\napp:x:1234:\n"),
            entry("home/app", "dir", uid=1234, gid=1234),
            entry("data", "dir"), entry("data/old", data=b"old"),
            entry("data/gone", data=b"gone")]
    top = [entry("data/.wh..wh..opq"), entry("data/new", data=b"new\n"),
           entry("bin/.wh.false"),
           entry("dev", "dir"), entry("dev/sda", "blk")]
    layers = [layer_tar(base), layer_tar(top)]
    config = image_config(
        layers, Env=["PATH=/bin", "GREETING=hi there"],
        Entrypoint=["/bin/sh", "-c"],
        Cmd=['echo "$GREETING"; pwd; id -u; id -g; echo "$HOME"; exit 7'],
        User="app", WorkingDir="/srv/app")
    return layers, config


@pytest.fixture(scope="module")
def busybox_img(workdir, system_disk):
    layers, config = busybox_parts()
    archive = write_tar(docker_archive(layers, config, "busybox:test"),
                        workdir / "busybox.tar")
    out = workdir / "busybox.img"
    r = image_cmd("import", str(archive), "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "1 device nodes skipped; MPI: none" in r.stderr
    print(r.stderr.splitlines()[-1])
    return out


def test_pull_from_a_registry_imports_the_same_image(busybox_img, workdir,
                                                     jobdir):
    """docker://REF: skopeo pulls from a registry (here one on 127.0.0.1
    speaking plain HTTP), then the layout is imported as any other."""
    layers, config = busybox_parts()
    out = workdir / "pulled.img"
    with Registry({("tools/busybox", "test"): oci_layout(layers, config)}
                  ) as reg:
        ref = f"docker://{reg.address}/tools/busybox:test"
        r = image_cmd("import", ref, "--insecure-registry", "--output",
                      str(out))
        assert r.returncode == 0, r.stderr
        assert f"pulling {ref}: skopeo copy" in r.stderr
        assert ("GET", "/v2/tools/busybox/manifests/test") in reg.requests
        # plain HTTP is refused unless asked for
        r = image_cmd("import", ref, "--output", str(workdir / "no.img"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    err = r.stderr.splitlines()
    assert err[-2].startswith(f"apppot-image: error: cannot pull {ref}: "), \
        r.stderr
    assert "HTTP response to HTTPS" in err[-2] or "TLS" in err[-2], err
    assert err[-1].startswith("hint: ")
    assert not (workdir / "no.img").exists()
    pulled = json.loads(Path(str(out) + ".json").read_text())
    saved = json.loads(Path(str(busybox_img) + ".json").read_text())
    assert pulled["provenance"]["pulled"] == ref
    assert pulled["provenance"]["layers"] == saved["provenance"]["layers"]
    assert pulled["runtime"] == saved["runtime"]
    r = start(["--image", str(out)], cwd=jobdir)
    assert r.returncode == 7, r.stderr
    assert r.stdout.decode().split("\n")[0] == "hi there"


def test_default_command_honours_env_user_workdir(busybox_img, jobdir):
    r = start(["--image", str(busybox_img)], cwd=jobdir)
    assert r.stdout == b"hi there\n/srv/app\n1234\n1234\n/home/app\n", r.stderr
    assert r.returncode == 7


def test_explicit_command_runs_exactly_in_the_jobdir(busybox_img, jobdir,
                                                     nobody):
    r = start(["--image", str(busybox_img), "--env", "GREETING=from env",
               "--", "printf", "[%s]\\n", "a b", "", "ü", "$GREETING"],
              cwd=jobdir, user=nobody)
    assert r.stdout == "[a b]\n[]\n[ü]\n[$GREETING]\n".encode(), r.stderr
    script = ('pwd; echo "$GREETING"; id -u; cat /data/new; ls /data; '
              'ls /bin/false /usr/bin/python3 /bin/python3 2>&1 | wc -l; '
              'echo made > out.txt')
    r = start(["--image", str(busybox_img), "--env", "GREETING=from env",
               "--", "sh", "-c", script], cwd=jobdir, user=nobody)
    assert r.returncode == 0, r.stderr
    # no python, no false (whited out), opaque /data: only the new file
    assert r.stdout.decode() == f"{jobdir}\nfrom env\n1234\nnew\nnew\n3\n"
    made = jobdir / "out.txt"
    assert made.read_text() == "made\n"
    assert made.stat().st_uid == nobody.pw_uid  # the host file is the caller's


def test_missing_program_and_status(busybox_img, jobdir):
    r = start(["--image", str(busybox_img), "--", "nosuchprog"], cwd=jobdir)
    assert r.returncode == 127
    assert b"apppot: cannot run 'nosuchprog': command not found" in r.stderr
    r = start(["--image", str(busybox_img), "--", "sh", "-c", "exit 42"],
              cwd=jobdir)
    assert r.returncode == 42


def test_mpirun_refuses_an_image_without_mpi(busybox_img, jobdir):
    r = run_job([tool("apppot-mpirun"), "--image", str(busybox_img), "-n", "2",
                 "true"], cwd=jobdir, timeout=60)
    assert r.returncode == 125
    err = r.stderr.decode().strip().splitlines()
    assert err[0] == (f"apppot-mpirun: error: imported image "
                      f"'{busybox_img}' has no MPI (neither Open MPI's "
                      "ompi_info nor MPICH's mpiexec.hydra found in it)")
    assert err[1].startswith("hint: ")


@pytest.fixture(scope="module")
def debian_archives(workdir):
    """A Debian 12 tree with Open MPI and mpi4py (mmdebstrap), as an OCI
    layout by umoci and as a docker-archive by skopeo."""
    from apppot import imagebuild
    from apppot.config import apppot_home

    for exe in ("umoci", "skopeo"):
        assert shutil.which(exe), f"apt-get install {exe}"
    tar, _ = imagebuild.build_rootfs(imagebuild.rootfs_inputs("openmpi", ()),
                                     apppot_home())
    layout, bundle = workdir / "layout", workdir / "bundle"

    def run(*argv):
        subprocess.run(argv, check=True, capture_output=True)

    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:deb")
    run("umoci", "unpack", "--image", f"{layout}:deb", str(bundle))
    run("tar", "--numeric-owner", "-xpf", str(tar), "-C",
        str(bundle / "rootfs"))
    run("umoci", "repack", "--image", f"{layout}:deb", str(bundle))
    run("umoci", "config", "--image", f"{layout}:deb", "--config.env",
        "IMAGE_VAR=from-image", "--config.cmd", "python3",
        "--config.cmd", "-c", "--config.cmd", "print('default cmd')")
    shutil.rmtree(bundle)
    docker = workdir / "deb-docker.tar"
    run("skopeo", "copy", f"oci:{layout}:deb",
        f"docker-archive:{docker}:deb:latest")
    return layout, docker


@pytest.fixture(scope="module")
def debian_img(debian_archives, workdir, system_disk):
    layout, docker = debian_archives
    out = workdir / "deb.img"
    r = image_cmd("import", str(docker), "--output", str(out))
    assert r.returncode == 0, r.stderr
    print(r.stderr.splitlines()[-1])  # the import's time and size
    stamp = json.loads(Path(str(out) + ".json").read_text())
    assert stamp["mpi_found"] == ["openmpi"]
    assert stamp["provenance"]["format"] == "docker-archive"
    return out


def test_umoci_layout_and_skopeo_archive_import_alike(debian_archives,
                                                      debian_img, workdir):
    layout, _ = debian_archives
    out = workdir / "deb-oci.img"
    r = image_cmd("import", str(layout), "--output", str(out), "--ref", "deb")
    assert r.returncode == 0, r.stderr
    a = json.loads(Path(str(out) + ".json").read_text())
    b = json.loads(Path(str(debian_img) + ".json").read_text())
    assert a["provenance"]["layers"] == b["provenance"]["layers"]
    assert a["stats"] == b["stats"] and a["runtime"] == b["runtime"]
    r = image_cmd("inspect", str(out))
    assert r.returncode == 0
    assert "kind: oci (boots on AppPot's system disk)" in r.stdout
    assert '"format": "oci-layout"' in r.stdout


def test_debian_image_default_command_and_env(debian_img, jobdir):
    r = start(["--image", str(debian_img)], cwd=jobdir)
    assert (r.returncode, r.stdout) == (0, b"default cmd\n"), r.stderr
    r = start(["--image", str(debian_img), "--", "sh", "-c",
               "echo $IMAGE_VAR; test -e /usr/lib/apppot/init.py && "
               "echo apppot-inside; cat /etc/debian_version | cut -c1-2"],
              cwd=jobdir)
    assert r.stdout == b"from-image\napppot-inside\n12\n", r.stderr


@pytest.mark.parametrize("per", ["node", "rank"])
def test_mpirun_runs_the_images_own_open_mpi(debian_img, jobdir, per,
                                             own_kernel):
    prog = ("from mpi4py import MPI; import os; c = MPI.COMM_WORLD; "
            "print(c.rank, c.size, c.allreduce(c.rank + 1), "
            "os.environ['IMAGE_VAR'], flush=True)")
    argv = [tool("apppot-mpirun"), "--image", str(debian_img), "-n", "2",
            "--per", per, "--kernel", own_kernel, "python3", "-c", prog]
    r = run_job(argv, cwd=jobdir, timeout=240)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert sorted(r.stdout.decode().splitlines()) == [
        "0 2 3 from-image", "1 2 3 from-image"]
