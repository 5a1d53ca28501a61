#!/usr/bin/env bash
# Real-guest test: a Linux guest under QEMU (TCG) uses the backend as its virtio-blk disk with two
# queues. The guest's /init (guest-init.sh) checks capacity and queues, runs fio with crc32c
# verification, writes a pattern, reboots once (same QEMU process, same backend connection), reads
# everything back, and powers off. The host then checks the pattern in the image file, that the
# backend outlived the guest, and that SIGTERM makes it exit 0 and remove its socket.
# Environment: BACKEND, ENGINE, VUBLK_BIN, VUBLK_ARGS (see lib.sh); SIZE (image, default 256M);
# TIMEOUT (guest seconds, default 240); KEEP=1 keeps the temp dir; IMG_DIR (default /tmp) holds
# it and the image (/dev/shm: the sync engine's mapped I/O); LOOP_SECTOR=4096 serves the
# image through a loop device with that sector size (a 4 KiB-aligned O_DIRECT target under a
# 512-byte-sector guest: the direct engine's read-modify-write path).
# With vublk the guest's second boot also checks online resize: when it says so, the host grows
# the image by 64 MiB (and the loop device with it), sends SIGHUP, and the guest must see the new
# capacity, read and write the new blocks, and still read its old data.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SIZE=${SIZE:-256M}
TIMEOUT=${TIMEOUT:-240}
QUEUES=2 # the guest has 2 vCPUs and uses min(queues, vCPUs) queues
"$root/scripts/install-deps.sh"
"$root/scripts/mkinitramfs.sh"

tmp=$(mktemp -d "${IMG_DIR:-/tmp}/vublk-guest.XXXXXX")
img=$tmp/disk.img sock=$tmp/blk.sock log=$tmp/console.log blog=$tmp/backend.log
backend_pid='' qemu_pid='' loopdev=''
cleanup() {
    [[ -z $qemu_pid ]] || kill "$qemu_pid" 2>/dev/null || true
    [[ -z $backend_pid ]] || kill "$backend_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    [[ -z $loopdev ]] || losetup -d "$loopdev" || true
    if [[ -n ${KEEP:-} ]]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

passed=0 failed=0
ok() { echo "PASS host.$1" && passed=$((passed + 1)); }
bad() { echo "FAIL host.$1${2:+: $2}" && failed=$((failed + 1)); }

truncate -s "$SIZE" "$img"
file=$img
bytes=$(stat -c %s "$img")
grown=$((bytes + 64 * 1048576))
if [[ -n ${LOOP_SECTOR:-} ]]; then
    loopdev=$(losetup --sector-size "$LOOP_SECTOR" -f --show "$img")
    img=$loopdev
    echo "guest-test: image is $loopdev (sector size $(blockdev --getss "$loopdev"))"
fi
pat_off=$((bytes - 2 * 1048576)) # pattern: 1 MiB, 2 MiB before the end (the end holds the boot marker)
# Per-run files ride in a second cpio appended to the shared initramfs.
mkdir "$tmp/extra"
head -c 1048576 /dev/urandom >"$tmp/extra/pattern.bin"
(cd "$tmp/extra" && echo pattern.bin | cpio -o -H newc --quiet) | cat "$cache/initramfs.cpio" - >"$tmp/initrd"

append="quiet panic=-1 vublk.mode=test vublk.size=$bytes vublk.queues=$QUEUES vublk.pattern_off=$pat_off"
# Expected values vublk can be asked for (qsd has no serial option and defaults to 512).
args=" ${VUBLK_ARGS:-} "
if [[ $BACKEND == vublk && $args =~ \ --serial\ ([^ ]+) ]]; then append+=" vublk.serial=${BASH_REMATCH[1]}"; fi
if [[ $BACKEND == vublk && $args =~ \ --logical-block-size\ ([0-9]+) ]]; then append+=" vublk.lbs=${BASH_REMATCH[1]}"; fi
if [[ $BACKEND == vublk ]]; then append+=" vublk.resize_to=$grown"; fi
resized=
grow_image() { # what an operator does: grow the file (and its loop device), then tell vublk
    truncate -s "$grown" "$file"
    echo VUBLK-GROWN | dd of="$file" bs=4096 seek=$((grown / 4096 - 1)) conv=notrunc,sync status=none
    [[ -z $loopdev ]] || losetup -c "$loopdev"
    kill -HUP "$backend_pid"
}

echo "guest-test: backend=$BACKEND engine=$ENGINE image=$SIZE kernel=$(cat "$cache/kernel/version")"
start=$SECONDS
start_backend "$img" "$sock" "$QUEUES" "$blog"
qemu_cmd "$sock" "$QUEUES" "$tmp/initrd" "$append"
# No -no-reboot: the guest reboots once on purpose. A panic (panic=-1) also reboots, so the
# loop below stops QEMU on a panic or a third boot instead of letting it loop.
"${qemu[@]}" -nodefaults -no-user-config -display none -serial "file:$log" </dev/null >"$tmp/qemu.log" 2>&1 &
qemu_pid=$!
reason=
while kill -0 "$qemu_pid" 2>/dev/null; do
    if ((SECONDS - start > TIMEOUT)); then reason="timeout after ${TIMEOUT}s"; fi
    if grep -q 'Kernel panic' "$log" 2>/dev/null; then reason="guest kernel panic"; fi
    boots=$(grep -c '^VUBLK-BOOT ' "$log" 2>/dev/null) || true
    if ((${boots:-0} > 2)); then reason="guest booted a third time"; fi
    if [[ -n $reason ]]; then kill "$qemu_pid" && break; fi
    if [[ $BACKEND == vublk && -z $resized ]] && grep -q '^VUBLK-RESIZE ready' "$log" 2>/dev/null; then
        resized=1 && grow_image
    fi
    sleep 0.5
done
qrc=0
wait "$qemu_pid" || qrc=$?
qemu_pid=
echo "guest-test: QEMU exited with $qrc after $((SECONDS - start)) s"

# Guest-side results, as printed by guest-init.sh.
tr -d '\r' <"$log" >"$tmp/console.txt"
grep -E '^(VUBLK-|PASS|FAIL)' "$tmp/console.txt" || true
passed=$(grep -c '^VUBLK-TEST PASS ' "$tmp/console.txt" || true)
failed=$(grep -c '^VUBLK-TEST FAIL ' "$tmp/console.txt" || true)
if [[ -z $reason ]]; then ok qemu-ran; else bad qemu-ran "$reason"; fi
if ((qrc == 0)); then ok qemu-exit; else bad qemu-exit "status $qrc: $(tail -n 3 "$tmp/qemu.log")"; fi
for c in b1.capacity b1.queues b1.fio-4k b1.fio-bsrange b1.used-q0 b1.used-q1 b1.pattern-write \
    b2.capacity b2.queues b2.pattern-read b2.fio-verify-4k b2.fio-verify-bsrange b2.fio-short \
    b2.write-through b2.fio-write-through; do
    grep -qE "^VUBLK-TEST (PASS|FAIL) $c(\$|:)" "$tmp/console.txt" || bad "guest-$c" "check never ran"
done
if [[ $BACKEND == vublk ]]; then
    for c in b2.resize-size b2.resize-read-new b2.resize-write-new b2.resize-old-data; do
        grep -qE "^VUBLK-TEST (PASS|FAIL) $c(\$|:)" "$tmp/console.txt" || bad "guest-$c" "check never ran"
    done
    # What the guest wrote past the old end is in the file; vublk logged who it told.
    if dd if="$file" bs=4096 skip=$((grown / 4096 - 2)) count=1 status=none | grep -q VUBLK-NEWEND; then
        ok resize-write-in-image
    else
        bad resize-write-in-image
    fi
    if grep -q "SIGHUP: image .*grew from $bytes to $grown bytes.*frontend notified" "$blog"; then
        ok resize-logged
    else
        bad resize-logged "$(grep -i 'SIGHUP' "$blog" | tail -n 2)"
    fi
fi
if grep -q '^VUBLK-DONE failed=0' "$tmp/console.txt"; then ok guest-done; else bad guest-done "guest did not finish cleanly"; fi

# The guest's pattern must be in the image file, where the guest put it.
if cmp -n 1048576 -i "$pat_off:0" "$img" "$tmp/extra/pattern.bin"; then ok pattern-in-image; else bad pattern-in-image; fi

# The guest's wce=0 must have reached vublk (SET_CONFIG); qsd does not log it.
if [[ $BACKEND == vublk ]]; then
    if grep -q 'write cache off' "$blog"; then ok wce-set-config; else bad wce-set-config "no SET_CONFIG wce=0 in the log"; fi
    # On tmpfs the sync engine must have served I/O through its mapping of the image.
    if [[ ${IMG_DIR:-/tmp} == /dev/shm* && $ENGINE == sync ]]; then
        if grep -q 'reading and writing through a mapping of the image' "$blog"; then ok mapped-io; else bad mapped-io "no mapping in the log"; fi
    fi
    # A block device gets the direct engine from auto.
    if [[ -n $loopdev && $ENGINE == auto ]]; then
        if grep -q 'engine auto: using direct' "$blog"; then ok auto-direct; else bad auto-direct "$(grep -m1 'engine auto' "$blog")"; fi
    fi
fi

# The backend must outlive its frontend, then stop cleanly on SIGTERM.
if kill -0 "$backend_pid" 2>/dev/null; then
    ok backend-alive
    kill -TERM "$backend_pid"
    brc=
    for ((i = 0; i < 100; i++)); do # up to 10 s
        kill -0 "$backend_pid" 2>/dev/null || { brc=0 && wait "$backend_pid" || brc=$?; break; }
        sleep 0.1
    done
    if [[ -z $brc ]]; then
        bad backend-sigterm "still running 10 s after SIGTERM"
    elif ((brc == 0)); then ok backend-sigterm; else bad backend-sigterm "exit status $brc"; fi
    if [[ -e $sock ]]; then bad socket-removed "$sock still exists"; else ok socket-removed; fi
else
    bad backend-alive "backend died while serving the guest"
fi
backend_pid=

if ((failed)); then
    echo "---- console log (tail) ----" && tail -n 60 "$tmp/console.txt"
    echo "---- backend log (tail) ----" && tail -n 30 "$blog"
fi
echo "guest-test: $((SECONDS - start)) s"
echo "guest: $passed passed, $failed failed"
((failed == 0))
