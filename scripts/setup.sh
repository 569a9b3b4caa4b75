#!/bin/sh
# Install AppPot-MPI on a fresh Debian 12 machine, build the appliance images
# and run a job in an appliance.  Run as root (an admin who is not root:
# sudo).  Idempotent: a second run reuses the packages, the venv and the
# cached kernel and images.
#
#   scripts/setup.sh            install, build, run the demo job
#   scripts/setup.sh --no-demo  install and build only (used by scripts/test.sh)
set -eu
cd "$(dirname "$0")/.."
REPO=$(pwd)

APT_PACKAGES="user-mode-linux mmdebstrap e2fsprogs libslirp-helper gcc libc6-dev
  python3 python3-venv python3-dev python3-mpi4py openmpi-bin libopenmpi-dev mpich
  libmpich-dev iproute2 util-linux procps tar gzip diod slurm-wlm munge
  make bc bison flex patch xz-utils chromium chromium-driver curl
  busybox-static umoci skopeo"
export APPPOT_HOME="${APPPOT_HOME:-/var/cache/apppot}"  # machine-wide images

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages); not root: sudo scripts/setup.sh" >&2
    exit 1
fi

echo "== installing Debian packages" >&2
wanted=$(echo $APT_PACKAGES | wc -w)
have=$(dpkg-query -W -f='${Status}\n' $APT_PACKAGES 2>/dev/null \
       | grep -c 'install ok installed' || true)
if [ "$have" != "$wanted" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends $APT_PACKAGES >/dev/null
fi

# apppot-orchestrator's node appliances run as this unprivileged user, never
# as root (--node-user names another)
if ! id apppot-node >/dev/null 2>&1; then
    echo "== creating the system user apppot-node" >&2
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin apppot-node
fi

echo "== installing the project into .venv" >&2
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check \
    -e '.[test,bench,orchestrator,browser]'

mkdir -p "$APPPOT_HOME" && chmod 755 "$APPPOT_HOME"
echo "== building AppPot's UML kernel from Debian's linux-source (cached)" >&2
.venv/bin/apppot-kernel build
# the same without AppPot's patches: benchmarks.syscalls and .kernels
# measure the two side by side (the tools always prefer the patched one)
.venv/bin/apppot-kernel build --unpatched

echo "== building the appliance images (cached in $APPPOT_HOME)" >&2
.venv/bin/apppot-image build --mpi openmpi
.venv/bin/apppot-image build --mpi mpich
.venv/bin/apppot-image build --mpi none  # the system disk of imported images
.venv/bin/apppot-orchestrator image  # Open MPI + slurmd, for the orchestrator

if [ "${1:-}" != "--no-demo" ]; then
    echo "== running a 4-rank MPI job in an appliance (its ranks share it)" >&2
    demo=$(mktemp -d /var/tmp/apppot-demo-XXXXXX)
    cd "$demo"
    "$REPO/.venv/bin/apppot-mpirun" -v -n 4 python3 -c \
        'from mpi4py import MPI; import socket; c = MPI.COMM_WORLD; h = socket.gethostname(); print(f"rank {c.rank} of {c.size} on {h} ({socket.gethostbyname(h)}): allreduce = {c.allreduce(c.rank + 1)}")' \
        </dev/null || { echo "setup.sh: the demo job failed" >&2; exit 1; }
    cd "$REPO" && rm -rf "$demo"
fi
