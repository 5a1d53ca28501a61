#!/usr/bin/env bash
# Usage: scripts/run-cloud-hypervisor.sh IMAGE
# Like run-qemu.sh, with cloud-hypervisor as the VMM: serves IMAGE (created with SIZE, default
# 1G, if missing) with vublk and boots an interactive guest on it (KVM): console on this
# terminal, the disk is /dev/vda, busybox and fio in the guest. Leave with `exit` in the guest
# shell (powers off). The daemon is stopped on exit.
# Environment: CH_BIN (default: cloud-hypervisor in PATH), KERNEL (default: the Debian cloud
# kernel that install-deps.sh fetches, a bzImage; cloud-hypervisor releases before bzImage
# support need an uncompressed PVH vmlinux here), QUEUES (default 2), and BACKEND, ENGINE,
# VUBLK_BIN, VUBLK_ARGS as in lib.sh.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# == 1 ]] || { echo "usage: $0 IMAGE" >&2 && exit 2; }
ch=${CH_BIN:-$(command -v cloud-hypervisor || true)}
if [[ -z $ch || ! -x $ch ]]; then
    echo "run-cloud-hypervisor: no cloud-hypervisor binary (not in PATH; set CH_BIN=/path/to/it)." >&2
    echo "Debian 12 does not package it: use a release binary of the cloud-hypervisor project." >&2
    exit 1
fi
[[ -r /dev/kvm && -w /dev/kvm ]] || {
    echo "run-cloud-hypervisor: cloud-hypervisor needs read-write /dev/kvm" >&2
    exit 1
}
serve_interactive run-cloud-hypervisor "$1"
kernel=${KERNEL:-$cache/kernel/vmlinuz}
# Guest memory must be shared (shared=on) so that vublk can map it.
"$ch" --cpus boot=2 --memory size=512M,shared=on \
    --kernel "$kernel" --initramfs "$cache/initramfs.cpio" \
    --cmdline "console=ttyS0 vublk.mode=shell" \
    --disk "vhost_user=true,socket=$sock,num_queues=$QUEUES,queue_size=256" \
    --serial tty --console off ||
    echo "run-cloud-hypervisor: cloud-hypervisor exited with $?"
