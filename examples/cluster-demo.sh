#!/usr/bin/env bash
# A three-node ftkit cluster on one machine: three watchd processes on loopback, each with its
# own data directory and the same cluster secret. Shows `ftctl cluster status` once the nodes
# agree on a view, kills node c's watchd with kill -9, shows what the survivors report, changes
# the cluster database while c is away, then starts c again and shows it rejoin with the
# database it missed. Needs cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p watchd --quiet
DEMO=$PWD/target/ftkit-cluster-demo
rm -rf "$DEMO"
mkdir -p "$DEMO"
printf 'demo-secret-0123456789\n' >"$DEMO/secret"
chmod 600 "$DEMO/secret"

declare -A PORT=([a]=17601 [b]=17602 [c]=17603)
for n in a b c; do
    {
        cat <<TOML
[watchd]
node = "$n"
data_dir = "$DEMO/$n"
cgroups = false

[cluster]
name = "demo"
secret_file = "$DEMO/secret"
listen = ["127.0.0.1:${PORT[$n]}"]
TOML
        for m in a b c; do
            [ "$m" = "$n" ] && continue
            printf '\n[[node]]\nname = "%s"\naddresses = ["127.0.0.1:%s"]\n' "$m" "${PORT[$m]}"
        done
    } >"$DEMO/$n.toml"
done

declare -A PID
start() { target/debug/watchd --config "$DEMO/$1.toml" 2>>"$DEMO/$1.log" & PID[$1]=$!; }
trap 'kill -TERM ${PID[a]} ${PID[b]} ${PID[c]} 2>/dev/null; wait 2>/dev/null || true' EXIT
for n in a b c; do start "$n"; done

ctl() { target/debug/ftctl --config "$DEMO/$1.toml" "${@:2}"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Polls node $1's status (JSON) until it contains $2.
wait_for() {
    for _ in $(seq 200); do
        ctl "$1" cluster status --json 2>/dev/null | grep -q -- "$2" && return 0
        sleep 0.05
    done
    echo "node $1 never showed $2" >&2
    return 1
}

wait_for a '"members":\["a","b","c"\],"coordinator":"a","acting":true'
step "three nodes agree on a view"
ctl a cluster status

step "kill -9 of node c's watchd"
kill -9 "${PID[c]}"
wait "${PID[c]}" 2>/dev/null || true
T0=$(date +%s%N)
wait_for a '"members":\["a","b"\],"coordinator":"a","acting":true'
echo "node a committed the view without c $(( ($(date +%s%N) - T0) / 1000000 )) ms after the kill"
ctl a cluster status
step "what node a saw"
ctl a cluster events --last 6

step "while c is down, node b changes the cluster database (a global update)"
ctl b cluster set web.owner b
ctl a cluster db

step "node c starts again, rejoins, and receives the database it missed"
start c
wait_for c '"members":\["a","b","c"\],"coordinator":"a","acting":true'
ctl c cluster status
for _ in $(seq 100); do ctl c cluster db | grep -q web.owner && break; sleep 0.05; done
ctl c cluster db
