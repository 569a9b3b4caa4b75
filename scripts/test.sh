#!/bin/sh
# Run the whole test suite, real appliances included; installs and builds
# whatever is missing first (so it works on a fresh machine).  As root.
set -eu
cd "$(dirname "$0")/.."
export APPPOT_HOME="${APPPOT_HOME:-/var/cache/apppot}"
scripts/setup.sh --no-demo
.venv/bin/ruff check .
exec .venv/bin/pytest -p no:cacheprovider "$@" tests
