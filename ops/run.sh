#!/usr/bin/env bash
# Install mediad into .venv and serve it on the embedded defaults: a PostgreSQL of its own under
# ./var/pg, files under ./var, http://127.0.0.1:8000. Extra arguments go to `mediad serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/mediad serve "$@"
