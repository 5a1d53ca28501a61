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
serve_interactive run-qemu "$1"
qemu_cmd "$sock" "$QUEUES" "$cache/initramfs.cpio" "vublk.mode=shell"
"${qemu[@]}" -nographic -no-reboot || echo "run-qemu: QEMU exited with $?"
