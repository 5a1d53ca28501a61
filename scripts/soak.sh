#!/usr/bin/env bash
# Soak: MINUTES of a 2-queue write/verify workload (examples/soak_client.rs) while the client
# disconnects at random and this script restarts vublk at random (SIGTERM or SIGKILL), switching
# engines. Every acknowledged write must survive. Not part of CI; results go in docs/soak.md.
# Usage: scripts/soak.sh [MINUTES]   (default 10). Environment: IMG_DIR (default /tmp).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
minutes=${1:-10}
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
cargo build --release --quiet --manifest-path "$root/Cargo.toml" --example soak_client
vublk=${CARGO_TARGET_DIR:-$root/target}/release/vublk client=${CARGO_TARGET_DIR:-$root/target}/release/examples/soak_client
tmp=$(mktemp -d "${IMG_DIR:-/tmp}/vublk-soak.XXXXXX")
img=$tmp/disk.img sock=$tmp/blk.sock
truncate -s 64M "$img"
pid='' cpid=''
cleanup() {
    [[ -z $cpid ]] || kill "$cpid" 2>/dev/null || true
    [[ -z $pid ]] || kill "$pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
engines=(sync direct)
restarts=0 kills=0
start() {
    local e=${engines[RANDOM % 2]}
    "$vublk" --socket-path "$sock" --blk-file "$img" --num-queues 2 --engine "$e" \
        --log-level warn >>"$tmp/vublk.log" 2>&1 &
    pid=$!
    for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && return; sleep 0.05; done
    echo "soak: vublk did not start" && cat "$tmp/vublk.log" && exit 1
}
start
"$client" --path "$sock" --blocks 8192 --queues 2 --seconds $((minutes * 60)) >"$tmp/client.out" 2>&1 &
cpid=$!
t_end=$((SECONDS + minutes * 60))
while ((SECONDS < t_end)) && kill -0 "$cpid" 2>/dev/null; do
    sleep $((2 + RANDOM % 8))
    if ((RANDOM % 2)); then kill -KILL "$pid" && kills=$((kills + 1)); else kill -TERM "$pid"; fi
    wait "$pid" 2>/dev/null || true
    restarts=$((restarts + 1))
    start
done
wait "$cpid" && crc=0 || crc=$?
cpid=
cat "$tmp/client.out"
echo "soak: $minutes min, $restarts daemon restarts ($kills by SIGKILL), client exit $crc"
exit "$crc"
