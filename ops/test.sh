#!/usr/bin/env bash
# Install what the tests need into .venv and run the whole suite. Used by the README and CI.
# With MEDIAD_TEST_DATABASE_URL unset the tests start their own embedded PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The browser tests drive Debian's Chromium: install it when missing (as root, never prompting);
# without it they are skipped with a message.
# The same for nginx-light, which the tests of mediad behind nginx (tests/nginx) run in front of it.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing+=(nginx-light)
if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
        || echo "ops/test.sh: could not install ${missing[*]}; the tests that need them will be skipped" >&2
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
# A temp root of this run's own: pytest prunes old /tmp/pytest-of-$USER/pytest-N dirs, which would
# pull the embedded PostgreSQL of another test run on the same machine from under it.
basetemp="$(mktemp -d -t mediad-tests.XXXXXX)"
trap 'rm -rf "$basetemp"' EXIT
set +e
.venv/bin/python -m pytest --basetemp="$basetemp/tmp" "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "ops/test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$status"
