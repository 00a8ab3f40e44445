#!/usr/bin/env bash
# A/B of W1 (echo recipe, one input per /sync) between an earlier commit and the working tree,
# alternating servers so both see the same machine: bench/ab.sh REV [ROUNDS]
# Run from the repository root with the project's venv (.venv) installed.
set -euo pipefail
rev=${1:?usage: bench/ab.sh REV [ROUNDS]}; rounds=${2:-2}
root=$(pwd); py="$root/.venv/bin/python"; base=$(mktemp -d)
git archive "$rev" fastdeploy | tar -x -C "$base"   # the earlier package, found first through PYTHONPATH
run() {  # NAME PYTHONPATH
  local port=$((19000 + RANDOM % 500)) state; state=$(mktemp -d)
  (cd /tmp && PYTHONPATH="$2" FASTDEPLOY_STATE_DIR="$state" exec "$py" -m fastdeploy run "$root/bench/recipes/echo" \
      --host 127.0.0.1 --port "$port" > /dev/null 2>&1) &
  local pid=$!
  for _ in $(seq 150); do curl -sf "localhost:$port/ready" > /dev/null && break; sleep 0.2; done
  echo "== $1"
  for c in 1 64; do
    "$py" "$root/bench/loadgen.py" "http://127.0.0.1:$port/sync" --body '{"data": [1]}' -c "$c" -d 8 --engine asyncio | tail -1
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true  # SIGTERM to the supervisor stops every process it started
  rm -rf "$state"
}
for _ in $(seq "$rounds"); do run "$rev" "$base"; run "working tree" ""; done
rm -rf "$base"
