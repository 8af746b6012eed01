#!/usr/bin/env bash
# ftkit quick start: builds everything, runs watchd on examples/watchd.toml, and shows a crash
# and a hang being detected and repaired. Needs only cargo, cc and make.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
cargo build --workspace --quiet
make -s -C examples/c
DATA=$ROOT/target/ftkit-demo
mkdir -p "$DATA"
FTCTL=(target/debug/ftctl --config examples/watchd.toml)

target/debug/watchd --config examples/watchd.toml 2>"$DATA/watchd.log" &
WATCHD=$!
trap 'kill -TERM $WATCHD 2>/dev/null; wait $WATCHD 2>/dev/null || true' EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
pid_of() { "${FTCTL[@]}" status --json | python3 -c "import json,sys; [print(s['pid'] or '') for s in map(json.loads, sys.stdin) if s['name']=='$1']"; }
wait_running() { for _ in $(seq 100); do p=$(pid_of "$1"); if [ -n "$p" ] && [ "$p" != "$2" ]; then echo "$p"; return; fi; sleep 0.1; done; echo "timeout" >&2; exit 1; }

for _ in $(seq 100); do "${FTCTL[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
sleep 1.5
step "watchd supervises three services"
"${FTCTL[@]}" status

step "kill -9 hbdemo-rust: a crash, detected through its pidfd"
OLD=$(pid_of hbdemo-rust); kill -9 "$OLD"
NEW=$(wait_running hbdemo-rust "$OLD")
echo "pid $OLD killed -> replacement pid $NEW"

step "kill -STOP hbdemo-c: a hang, detected by its missed heartbeat deadline (500 ms)"
OLD=$(pid_of hbdemo-c); kill -STOP "$OLD"
NEW=$(wait_running hbdemo-c "$OLD")
echo "pid $OLD stopped -> hang verdict, tree killed -> replacement pid $NEW"

step "events"
"${FTCTL[@]}" events --last 12

step "captured output of hbdemo-c (tail)"
"${FTCTL[@]}" logs hbdemo-c --bytes 300; echo

step "stopping watchd (SIGTERM stops every service)"
