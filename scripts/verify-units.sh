#!/usr/bin/env bash
# Runs `systemd-analyze verify systemd/*` and fails on any output: verify exits 0 on warnings
# such as a misspelt key, which it then ignores. verify insists that ExecStart's binary exists, so
# when /usr/bin/vublk is not installed the built binary is shown there through an overlay in a
# private mount namespace (nothing on the host changes).
# Usage: scripts/verify-units.sh [VUBLK_BINARY]   (default target/release/vublk, else debug)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bin=${1:-}
for b in $bin target/release/vublk target/debug/vublk; do
    [[ -x $b ]] && bin=$(realpath "$b") && break
done
command -v systemd-analyze >/dev/null || { echo "verify-units: install systemd" >&2; exit 1; }
units=(systemd/*)
if [[ -x /usr/bin/vublk ]]; then
    out=$(systemd-analyze verify "${units[@]}" 2>&1) || { echo "$out" >&2; exit 1; }
else
    [[ -x $bin ]] || { echo "verify-units: no vublk binary (cargo build first)" >&2; exit 1; }
    over=$(mktemp -d)
    trap 'rm -rf "$over"' EXIT
    ln -s "$bin" "$over/vublk"
    out=$(unshare --mount bash -c '
        mount -t overlay overlay -o "lowerdir=$1:/usr/bin" /usr/bin
        shift
        systemd-analyze verify "$@"
    ' _ "$over" "${units[@]}" 2>&1) || { echo "$out" >&2; exit 1; }
fi
if [[ -n $out ]]; then
    echo "$out" >&2
    echo "verify-units: systemd-analyze verify warned (see above)" >&2
    exit 1
fi
echo "verify-units: ${units[*]} clean"
