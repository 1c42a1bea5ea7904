#!/usr/bin/env bash
# The Python client's checks: mypy over the package and the tests, then the pytest
# suite against the real broker binary (AGENTBUS_BIN, default ../../target/debug/agentbus)
# and the PostgreSQL on 127.0.0.1:5432. Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check --require-virtualenv -q)
# Every tool, the runtime dependencies and the build backend, pinned with hashes.
"${pip[@]}" install --require-hashes -r requirements-test.lock
# The package itself, installed as users install it (the backend comes from the lock).
"${pip[@]}" install --no-deps --no-build-isolation --force-reinstall .

.venv/bin/python -m mypy src/agentbus tests

export AGENTBUS_BIN="${AGENTBUS_BIN:-$here/../../target/debug/agentbus}"
.venv/bin/python -m pytest "$@"
