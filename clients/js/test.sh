#!/usr/bin/env bash
# The JS client's tests, as scripts/test runs them: installs the dev dependencies from the npm
# registry (`npm ci`: exactly the committed package-lock.json), builds the package, type-checks
# its declarations, and runs `node --test` against a real liverec (target/debug/liverec, built
# here unless LIVEREC_BIN names one) and headless Chromium (Debian's /usr/bin/chromium, or
# LIVEREC_CHROMIUM). Needs Node.js 20 or later.
set -euo pipefail
cd "$(dirname "$0")"

if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' 2>/dev/null; then
    echo "clients/js needs Node.js 20 or later (found: $(node --version 2>/dev/null || echo none))" >&2
    exit 1
fi
if [ -z "${LIVEREC_BIN:-}" ]; then
    (cd ../.. && cargo build --locked -p liverec --bin liverec)
    LIVEREC_BIN="$(cd ../.. && pwd)/target/debug/liverec"
    export LIVEREC_BIN
fi
# Node 20 has a WebSocket (for the client's "ws" transport) only behind a flag; 22 and later have it.
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 22 ]; then
    export NODE_OPTIONS="${NODE_OPTIONS:+$NODE_OPTIONS }--experimental-websocket"
fi
npm ci --no-audit --no-fund --loglevel=error
npm test
