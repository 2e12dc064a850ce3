#!/usr/bin/env bash
# Run the A2A conformance kit (a2aproject/a2a-tck, branch 1.0-dev) against a fresh node on a tiny model.
#
#   TCK_DIR=/path/to/tck scripts/run_tck.sh [jsonrpc|http_json ...]   (default: jsonrpc http_json)
#
# Nothing is fetched: TCK_DIR holds the kit checkout in a2a-tck/ and its virtualenv in .venv/.
# The node runs `serve --conformance` on a tiny random-weight GGUF (tests/tiny_models.py) and the kit
# is pointed at the conformance agent (/conformance), which implements the kit's scenarios on the
# node's own A2A stack. TCK_AGENT=/ points it at the node's main agent instead (a real skill answers).
# LEVELS (default "must should may") are run one kit invocation each; NODE_ARGS is added to
# `python -m node serve`. Prints pytest's counts per transport and level, then every failed test;
# reports land in $OUT_DIR/<transport>-<level>/. Exit status 1 when a MUST-level test failed.
set -euo pipefail
TCK_DIR=${TCK_DIR:?set TCK_DIR to the folder holding a2a-tck/ and .venv/}
[ -f "$TCK_DIR/a2a-tck/run_tck.py" ] && [ -x "$TCK_DIR/.venv/bin/python" ] \
  || { echo "no kit at $TCK_DIR/a2a-tck (or no $TCK_DIR/.venv)" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY="$REPO/.venv/bin/python"
WORK=$(mktemp -d)
OUT_DIR=${OUT_DIR:-$WORK/reports}
LEVELS=${LEVELS:-must should may}
TCK_AGENT=${TCK_AGENT:-/conformance}
NODE_ARGS=${NODE_ARGS:---max-tokens 4}
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
SUT="$URL${TCK_AGENT%/}"

(cd "$REPO" && "$PY" -c 'import sys; from pathlib import Path; sys.path.insert(0, "tests")
from tiny_models import write_tiny_gguf; write_tiny_gguf(Path(sys.argv[1]))' "$WORK/tiny.gguf")
# shellcheck disable=SC2086
(cd "$REPO" && NODE_MODEL_CACHE="$WORK/models" exec "$PY" -m node serve --port "$PORT" --cache-dir "$WORK/cache" \
  --model "$WORK/tiny.gguf" --conformance $NODE_ARGS) >"$WORK/node.log" 2>&1 &
NODE_PID=$!
trap 'kill "$NODE_PID" 2>/dev/null; wait "$NODE_PID" 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -fs "$URL/health" >/dev/null 2>&1 && break; sleep 1; done
curl -fs "$URL/health" >/dev/null || { echo "node did not start; log: $WORK/node.log" >&2; exit 1; }
echo "kit $(git -C "$TCK_DIR/a2a-tck" rev-parse --short HEAD 2>/dev/null || echo '?') against $SUT (work $WORK)"

transports=("$@"); [ ${#transports[@]} -gt 0 ] || transports=(jsonrpc http_json)
status=0
for t in "${transports[@]}"; do
  for level in $LEVELS; do
    report="$OUT_DIR/$t-$level"
    mkdir -p "$report"
    (cd "$TCK_DIR/a2a-tck" && ../.venv/bin/python run_tck.py --sut-host "$SUT" --transport "$t" --level "$level") \
      >"$report/tck.log" 2>&1 || { [ "$level" = must ] && status=1; }
    cp -r "$TCK_DIR/a2a-tck/reports/." "$report/"
    "$PY" - "$t" "$level" "$report/junitreport.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

transport, level, path = sys.argv[1:]
counts = dict.fromkeys(("passed", "failed", "skipped", "xfailed", "xpassed"), 0)
failed = []
for case in ET.parse(path).iter("testcase"):
    outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
    if outcome is None:
        counts["passed"] += 1
    elif outcome.tag == "skipped":
        counts["xfailed" if outcome.get("type") == "pytest.xfail" else "skipped"] += 1
    else:
        counts["failed"] += 1
        failed.append(f"  FAIL {case.get('name')}: {(outcome.get('message') or '?').splitlines()[0][:200]}")
print(f"{transport:<10}{level.upper():<7}" + " ".join(f"{k}={v}" for k, v in counts.items()))
print("\n".join(failed)) if failed else None
PY
  done
done
exit $status
