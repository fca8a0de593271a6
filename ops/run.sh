#!/usr/bin/env bash
# Serve mediad on the embedded defaults: a PostgreSQL of its own under ./var/pg, files under ./var,
# http://127.0.0.1:8000. Extra arguments go to `mediad serve`.
# Installs into .venv the first time (about a minute) and again only when pyproject.toml changed:
# the install is editable, so code changes need none.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
stamp=.venv/.mediad-installed
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/mediad ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    echo "ops/run.sh: installing mediad into .venv (the first time takes about a minute)" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
    echo "$wanted" > "$stamp"  # only after a complete install
fi
exec .venv/bin/mediad serve "$@"
