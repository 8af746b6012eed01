#!/usr/bin/env bash
# ftkit file replication on one machine: a primary and a backup watchd on loopback (two nodes
# of one cluster), an unmodified program (sh, cp, tar) writing under the LD_PRELOAD shim, and a
# C program using libft's file API. Shows `ftctl repl status`, kills the primary's watchd with
# kill -9 in the middle of a workload, and checks that the replica ends identical.
# Needs cargo, cc, make and diff.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
cargo build --workspace --quiet
make -s -C examples/c
DEMO=$ROOT/target/ftkit-repl-demo
rm -rf "$DEMO"
mkdir -p "$DEMO/a" "$DEMO/b" "$DEMO/rings"
printf 'demo-secret-0123456789\n' >"$DEMO/secret"

node_config() { # name listen other other-addr dir
    cat <<TOML
[watchd]
node = "$1"
data_dir = "$DEMO/$1/data"
ring_dir = "$DEMO/rings"

[cluster]
name = "demo"
secret_file = "$DEMO/secret"
listen = ["$2"]

[[node]]
name = "$3"
addresses = ["$4"]

[[fileset]]
name = "data"
path = "$5"
primary = "a"
backups = ["b"]
TOML
}
node_config b 127.0.0.1:17402 a 127.0.0.1:17401 "$DEMO/b/replica" >"$DEMO/b.toml"
node_config a 127.0.0.1:17401 b 127.0.0.1:17402 "$DEMO/a/files" >"$DEMO/a.toml"
cat >>"$DEMO/a.toml" <<TOML

[[service]]
name = "shell"
command = "/bin/sh"
args = ["-c", "cp -r $ROOT/examples tree && i=0; while [ ! -e $DEMO/stop ]; do echo \"line \$i\" >> log\$((i % 8)); i=\$((i+1)); done; echo \$i > count; exec sleep 100000"]
cwd = "$DEMO/a/files"
filesets = ["data"]
repl_shim = true                 # LD_PRELOAD libftrepl.so

[[service]]
name = "libft-writer"
command = "$ROOT/examples/c/build/replwriter"
args = ["5000"]
cwd = "$DEMO/a/files/api"
filesets = ["data"]              # ft_create_file / ft_write_file log through libft
restart = { policy = "never" }
TOML
mkdir -p "$DEMO/a/files/api"

target/debug/watchd --config "$DEMO/b.toml" 2>"$DEMO/b.log" &
B=$!
target/debug/watchd --config "$DEMO/a.toml" 2>"$DEMO/a.log" &
A=$!
trap 'touch "$DEMO/stop"; kill -TERM $A $B 2>/dev/null; wait 2>/dev/null || true' EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
FA=(target/debug/ftctl --config "$DEMO/a.toml")
FB=(target/debug/ftctl --config "$DEMO/b.toml")
for _ in $(seq 100); do "${FA[@]}" status >/dev/null 2>&1 && "${FB[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
sleep 1

step "node a (primary): services writing into the fileset, and the stream to node b"
"${FA[@]}" status
"${FA[@]}" repl status
step "node b (backup): log and replay"
"${FB[@]}" repl status

step "kill -9 of the primary's watchd while the shell keeps writing; then a new watchd"
kill -9 $A
sleep 1
target/debug/watchd --config "$DEMO/a.toml" 2>>"$DEMO/a.log" &
A=$!
for _ in $(seq 100); do "${FA[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
sleep 1
touch "$DEMO/stop"
echo "the shell wrote $(cat "$DEMO/a/files/count" 2>/dev/null || echo '?') lines; waiting for the backup to catch up"

for _ in $(seq 200); do
    if diff -r "$DEMO/a/files" "$DEMO/b/replica" >/dev/null 2>&1; then break; fi
    sleep 0.1
done
"${FA[@]}" repl status
if diff -r "$DEMO/a/files" "$DEMO/b/replica" >/dev/null; then
    step "the replica is identical: $(find "$DEMO/b/replica" -type f | wc -l) files ($(du -sh "$DEMO/b/replica" | cut -f1))"
else
    step "the replica differs:"; diff -r "$DEMO/a/files" "$DEMO/b/replica" | head -20; exit 1
fi
