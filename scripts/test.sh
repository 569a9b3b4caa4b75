#!/bin/sh
# Run the whole test suite, real appliances included; installs and builds
# whatever is missing first (so it works on a fresh machine).  As root.
# Twice: with the kernel the tools pick (AppPot's own build), then the
# appliance tests where the kernel matters (not marked one_kernel) again
# with Debian 12's stock UML 6.1.
set -eu
cd "$(dirname "$0")/.."
export APPPOT_HOME="${APPPOT_HOME:-/var/cache/apppot}"
scripts/setup.sh --no-demo
.venv/bin/ruff check .
echo "== tests with AppPot's own kernel" >&2
.venv/bin/pytest -p no:cacheprovider "$@" tests
echo "== appliance tests again with Debian's stock kernel (not one_kernel)" >&2
APPPOT_KERNEL=/usr/bin/linux.uml exec .venv/bin/pytest -p no:cacheprovider \
    -m "uml and not one_kernel" "$@" tests
