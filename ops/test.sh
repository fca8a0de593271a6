#!/usr/bin/env bash
# Install what the tests need into .venv and run the whole suite. Used by the README and CI.
# With MEDIAD_TEST_DATABASE_URL unset the tests start their own embedded PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "ops/test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$status"
