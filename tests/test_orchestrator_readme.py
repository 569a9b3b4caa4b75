"""The README's orchestrator quick start, run as written, leaves nothing.

The ``sh`` block at the top of README.md's orchestrator section is taken
from the README itself and run with ``sh -e`` from the repository (as
root, as the README says).  It must show the job's output from a node
appliance, and after its last line (``kill $ORCH;
scripts/slurm-elastic.sh down``) nothing may be left: no orchestrator, no
UML process, watchdog or other node process, no veth, no network
namespace, no state directory, no slurmctld or munged of the cluster.
"""

import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from conftest import is_uml

from apppot.config import apppot_home

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.uml, pytest.mark.root, pytest.mark.one_kernel]
NETNS = "apppot-elastic"
STATE = Path("/run/apppot-slurm-elastic")


def quick_start():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## apppot-orchestrator"):]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def ours():
    """Processes of the quick start's cluster and nodes."""
    found = {}
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        cmd = p.info["cmdline"] or []
        text = " ".join(cmd)
        if is_uml(cmd) or "apppot_mpi.orchestrator" in text or \
                "apppot.watchdog" in cmd or \
                "apppot-orchestrator" in text or "apppot.start" in cmd or \
                str(STATE) in text:
            found[p.info["pid"]] = text[:160]
    return found


def test_readme_quick_start_runs_and_leaves_nothing():
    assert os.getuid() == 0, "the README's quick start runs as root"
    block = quick_start()
    assert "kill $ORCH; scripts/slurm-elastic.sh down" in block
    assert "sudo" not in block  # works on a bare Debian (root, no sudo)
    assert not STATE.exists() and NETNS not in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True,
        check=True).stdout, "a cluster of an earlier run is still up"
    before = ours()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["APPPOT_HOME"] = str(apppot_home())
    proc = subprocess.Popen(["sh", "-ec", block], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        subprocess.run([REPO / "scripts/slurm-elastic.sh", "down"],
                       check=False, timeout=120)
        pytest.fail(f"the quick start overran 300 s:\n{out}\n{err}")
    assert proc.returncode == 0, f"{out}\n{err}"
    lines = out.splitlines()
    assert "apppot-n1" in lines, out  # srun's output, from the node ...
    release = lines[lines.index("apppot-n1") + 1]
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", release), out
    assert release != os.uname().release  # ... and its kernel
    assert re.search(r"apppot-n1 +READY", out), out  # the status
    assert "Traceback" not in err and "failed with status" not in err, err
    # nothing left behind
    left = {pid: cmd for pid, cmd in ours().items() if pid not in before}
    assert not left, f"left running: {left}"
    assert not STATE.exists()
    assert NETNS not in subprocess.run(["ip", "netns", "list"],
                                       capture_output=True, text=True,
                                       check=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True,
                           text=True, check=True).stdout
    assert not re.search(r"\bapo\d+[hg]\b", links), links
