#!/usr/bin/env bash
# QEMU with `-chardev socket,...,reconnect=1`: restart vublk under an idle guest and under a
# guest doing I/O, and record what the guest sees (the baseline for in-flight recovery).
# The idle case must recover; the busy case is reported as observed.
# Environment: ENGINE (default sync), TIMEOUT (default 300 s), KEEP=1.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
TIMEOUT=${TIMEOUT:-300}
"$root/scripts/install-deps.sh"
"$root/scripts/mkinitramfs.sh"
tmp=$(mktemp -d /tmp/vublk-rc.XXXXXX)
img=$tmp/disk.img sock=$tmp/blk.sock log=$tmp/console.log
backend_pid='' qemu_pid=''
cleanup() {
    [[ -z $qemu_pid ]] || kill "$qemu_pid" 2>/dev/null || true
    [[ -z $backend_pid ]] || kill "$backend_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    if [[ -n ${KEEP:-} ]]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
truncate -s 256M "$img"
n=0
start() { n=$((n + 1)) && start_backend "$img" "$sock" 2 "$tmp/backend$n.log"; }
restart() { # restart WHAT: SIGKILL the backend, start a new one on the same socket
    kill -KILL "$backend_pid" && wait "$backend_pid" 2>/dev/null || true
    echo "reconnect-test: killed vublk ($1)"
    start
}
wait_for() { # wait_for PATTERN: until the console shows it (bounded by TIMEOUT)
    while ! grep -q "$1" "$log" 2>/dev/null; do
        ((SECONDS < TIMEOUT)) || { echo "reconnect-test: timeout waiting for $1" && return 1; }
        kill -0 "$qemu_pid" 2>/dev/null || { echo "reconnect-test: QEMU exited" && return 1; }
        sleep 0.2
    done
}
start
CHARDEV_OPTS=,reconnect=1 qemu_cmd "$sock" 2 "$cache/initramfs.cpio" "quiet vublk.mode=reconnect"
"${qemu[@]}" -nodefaults -no-user-config -display none -no-reboot -serial "file:$log" </dev/null >"$tmp/qemu.log" 2>&1 &
qemu_pid=$!
rc=0
wait_for "VUBLK-RC idle-ready" || rc=1
((rc)) || restart "guest idle"
((rc)) || wait_for "VUBLK-RC busy-start" || rc=1
((rc)) || { sleep 4 && restart "guest running fio"; }
((rc)) || wait_for "VUBLK-RC done" || rc=1
wait "$qemu_pid" || true
qemu_pid=
echo "---- what the guest saw ----"
grep -a "VUBLK-RC" "$log" | tr -d '\r' || true
if grep -aq "VUBLK-RC idle-io rc=0" "$log"; then
    echo "reconnect: 1 passed, 0 failed (idle restart: guest I/O works after reconnect)"
else
    echo "reconnect: 0 passed, 1 failed (idle restart)"; tail -n 30 "$log"; exit 1
fi
