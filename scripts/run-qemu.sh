#!/usr/bin/env bash
# Usage: scripts/run-qemu.sh IMAGE
# Serves IMAGE (created with SIZE, default 1G, if missing) with vublk and boots an interactive
# TCG guest on it: console on this terminal, the disk is /dev/vda, busybox and fio in the guest.
# Leave with `exit` in the guest shell (powers off) or Ctrl-A X. The daemon is stopped on exit.
# Environment: BACKEND, ENGINE, VUBLK_BIN, VUBLK_ARGS (see lib.sh); QUEUES (default 2).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# == 1 ]] || { echo "usage: $0 IMAGE" >&2 && exit 2; }
img=$(realpath "$1")
QUEUES=${QUEUES:-2}
[[ -f $cache/kernel/vmlinuz ]] || "$root/scripts/install-deps.sh"
"$root/scripts/mkinitramfs.sh"
[[ -e $img ]] || truncate -s "${SIZE:-1G}" "$img"

tmp=$(mktemp -d /tmp/vublk-vm.XXXXXX)
backend_pid=
cleanup() {
    if [[ -n $backend_pid ]]; then
        kill "$backend_pid" 2>/dev/null || true
        wait "$backend_pid" || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
start_backend "$img" "$tmp/blk.sock" "$QUEUES" "$tmp/backend.log"
echo "run-qemu: $BACKEND serving $img (log: $tmp/backend.log while running)"
qemu_cmd "$tmp/blk.sock" "$QUEUES" "$cache/initramfs.cpio" "vublk.mode=shell"
"${qemu[@]}" -nographic -no-reboot || echo "run-qemu: QEMU exited with $?"
