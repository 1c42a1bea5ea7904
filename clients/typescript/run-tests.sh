#!/usr/bin/env bash
# Installs the pinned dependencies, builds the client, typechecks it with its tests, and runs
# the tests against the real broker binary ($AGENTBUS_BIN, default ../../target/debug/agentbus)
# and the PostgreSQL server on 127.0.0.1:5432. Runs from any directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

npm ci --no-audit --no-fund --loglevel=error >/dev/null
rm -rf dist build
npx tsc -p tsconfig.json
npx tsc --noEmit -p tsconfig.json
npx tsc --noEmit -p test/tsconfig.json
npx tsc -p test/tsconfig.json
# The browser code path is tested with Node's standard WebSocket (behind a flag in Node 20).
node_flags=()
if ! node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)'; then
  node_flags+=(--experimental-websocket)
fi
# Each test file runs in its own process, at most two at a time (each starts its own brokers).
timeout 600 node "${node_flags[@]}" --test --test-concurrency=2 build/test/
