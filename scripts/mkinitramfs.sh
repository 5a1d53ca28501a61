#!/usr/bin/env bash
# Builds the guest initramfs .cache/guest/initramfs.cpio: static busybox, the virtio modules
# fetched by install-deps.sh, fio with every shared library it links (found with ldd), and
# scripts/guest-init.sh as /init. Left uncompressed: unpacking gzip under TCG costs seconds.
# guest-test.sh appends a second small cpio with per-run files (the kernel merges archives).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${GUEST_CACHE:-$root/.cache/guest}
[[ -f $cache/kernel/vmlinuz ]] || "$root/scripts/install-deps.sh"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,tmp,modules}
cp /bin/busybox "$stage/bin/" # from busybox-static: no libraries needed
for applet in $("$stage/bin/busybox" --list); do
    [[ -e $stage/bin/$applet ]] || ln -s busybox "$stage/bin/$applet"
done

fio=$(command -v fio)
cp "$fio" "$stage/bin/fio"
# Copy each library to the path the host loader found it at, so the guest loader (no ld.so.cache)
# finds it the same way: default dirs, or RUNPATH (e.g. ceph's private directory).
ldd "$fio" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u |
    while read -r lib; do cp -L --parents "$lib" "$stage"; done

cp "$cache"/kernel/modules/* "$stage/modules/"
cp "$root/scripts/guest-init.sh" "$stage/init"
chmod 755 "$stage/init"

(cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet) >"$cache/initramfs.cpio.tmp"
mv "$cache/initramfs.cpio.tmp" "$cache/initramfs.cpio"
