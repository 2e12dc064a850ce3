#!/usr/bin/env bash
# Run the A2A conformance kit (a2aproject/a2a-tck, branch 1.0-dev) against a fresh node.
#
#   TCK_DIR=/path/to/tck scripts/run_tck.sh [jsonrpc|http_json ...]   (default: jsonrpc http_json)
#
# TCK_DIR holds the kit checkout in a2a-tck/ and its virtualenv in .venv/ (the kit is not part of
# this repository). NODE_ARGS is passed to `python -m node serve` (default: a small --max-tokens,
# since every kit test waits for a generation). Reports are copied to $OUT_DIR/<transport>/.
set -euo pipefail
TCK_DIR=${TCK_DIR:?set TCK_DIR to the folder holding a2a-tck/ and .venv/}
[ -f "$TCK_DIR/a2a-tck/run_tck.py" ] && [ -x "$TCK_DIR/.venv/bin/python" ] \
  || { echo "no kit at $TCK_DIR/a2a-tck (or no $TCK_DIR/.venv)" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
OUT_DIR=${OUT_DIR:-$WORK/reports}
NODE_ARGS=${NODE_ARGS:---max-tokens 4}
PORT=$("$REPO/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"

# shellcheck disable=SC2086
"$REPO/.venv/bin/python" -m node serve --port "$PORT" --cache-dir "$WORK/cache" $NODE_ARGS >"$WORK/node.log" 2>&1 &
NODE_PID=$!
trap 'kill "$NODE_PID" 2>/dev/null; wait "$NODE_PID" 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -fs "$URL/health" >/dev/null 2>&1 && break; sleep 1; done
curl -fs "$URL/health" >/dev/null || { echo "node did not start; log: $WORK/node.log" >&2; exit 1; }

transports=("$@"); [ ${#transports[@]} -gt 0 ] || transports=(jsonrpc http_json)
status=0
for t in "${transports[@]}"; do
  (cd "$TCK_DIR/a2a-tck" && ../.venv/bin/python run_tck.py --sut-host "$URL" --transport "$t") \
    >"$WORK/tck_$t.log" 2>&1 || status=1
  mkdir -p "$OUT_DIR/$t" && cp -r "$TCK_DIR/a2a-tck/reports/." "$OUT_DIR/$t/"
  echo "== $t (log $WORK/tck_$t.log, reports $OUT_DIR/$t)"
  "$TCK_DIR/.venv/bin/python" - "$OUT_DIR/$t/compatibility.json" <<'PY'
import collections, json, sys
reqs = json.load(open(sys.argv[1]))["per_requirement"]
count = collections.Counter((r["level"], r["status"]) for r in reqs.values())
for level in ("MUST", "SHOULD", "MAY"):
    print(level, " ".join(f"{s}={count[(level, s)]}" for s in ("PASS", "FAIL", "SKIPPED", "NOT TESTED")))
for rid, r in sorted(reqs.items()):
    if r["status"] == "FAIL":
        print("FAIL", r["level"], rid, (r["errors"] or ["?"])[0][:160])
PY
done
exit $status
