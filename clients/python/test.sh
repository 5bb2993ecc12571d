#!/usr/bin/env bash
# The Python client's tests: makes a virtualenv (clients/python/.venv), installs the package and
# pytest from PyPI into it (versions in constraints.txt), and runs pytest against real liverec
# servers that the fixtures start from $LIVEREC_BIN (default: target/debug/liverec, built here if
# missing). Arguments go to pytest, e.g. `clients/python/test.sh -k stream`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

export LIVEREC_BIN="${LIVEREC_BIN:-$repo/target/debug/liverec}"
if [ ! -x "$LIVEREC_BIN" ]; then
    echo "==> building $LIVEREC_BIN"
    (cd "$repo" && cargo build --locked -p liverec --bin liverec)
fi

venv="${LIVEREC_PY_VENV:-$here/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating a virtualenv in $venv"
    python3 -m venv "$venv" || { echo "cannot create a virtualenv (needs python3 with venv)" >&2; exit 1; }
fi
echo "==> installing the client and pytest (PyPI) into $venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -c "$here/constraints.txt" "$here[test]"

echo "==> pytest (the Python client against $LIVEREC_BIN)"
cd "$here"
exec "$venv/bin/python" -m pytest -q "$@"
