#!/bin/sh
# shellcheck shell=sh
# /init of the guest initramfs (busybox sh), built by mkinitramfs.sh. Settings come from the
# kernel command line as vublk.KEY=VALUE:
#   mode=shell (default)  load the virtio modules and give an interactive shell on the console
#   mode=test             the real-guest test (guest-test.sh): checks print "VUBLK-TEST PASS|FAIL
#                         b<boot>.<name>" on the console; boot 1 writes, reboots the VM once;
#                         boot 2 reads back and verifies, then powers off
#   size=BYTES queues=N [serial=ID] [lbs=N] pattern_off=BYTES   expected values for the checks
#   [resize_to=BYTES]     boot 2 waits for the host to grow the disk online to this size
export PATH=/bin
mount -t devtmpfs dev /dev
# The initramfs has no /dev/console node, so the kernel gave us no stdio: take it now.
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp

arg() { # arg KEY DEFAULT: value of vublk.KEY= on the kernel command line
    read -r cmdline </proc/cmdline
    for w in $cmdline; do
        case $w in "vublk.$1="*) echo "${w#*=}" && return ;; esac
    done
    echo "$2"
}
MODE=$(arg mode shell)
BOOT=b0
FAILED=0
pass() { echo "VUBLK-TEST PASS $BOOT.$1"; }
fail() { echo "VUBLK-TEST FAIL $BOOT.$1${2:+: $2}"; FAILED=1; }
check() { # check NAME CMD...: PASS/FAIL by the command's status
    n=$1 && shift
    if "$@"; then pass "$n"; else fail "$n" "$*"; fi
}
finish() {
    sync
    echo "VUBLK-DONE failed=$FAILED"
    poweroff -f
}

while read -r m; do
    insmod "/modules/$m.ko" || fail "insmod" "$m"
done </modules/order
i=0 # the disk appears asynchronously after virtio_blk loads
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do usleep 100000 && i=$((i + 1)); done

if [ "$MODE" = reconnect ]; then
    # reconnect-test.sh: the host kills and restarts the backend at the marked points; each
    # step reports what the guest saw. `timeout` turns a hang into a result.
    echo "VUBLK-RC idle-ready"
    sleep 12
    timeout 60 dd if=/dev/vda of=/dev/null bs=4096 count=1024 iflag=direct 2>/dev/null
    echo "VUBLK-RC idle-io rc=$?"
    echo "VUBLK-RC busy-start"
    timeout 90 fio --name=rc --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \
        --rw=randwrite --bs=4k --size=64M --time_based --runtime=15 --verify=crc32c \
        --do_verify=0 >/tmp/fio.log 2>&1
    echo "VUBLK-RC busy-fio rc=$? $(grep -Eo 'err= *[0-9]+' /tmp/fio.log | head -1)"
    timeout 90 fio --name=rc --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \
        --rw=randwrite --bs=4k --size=64M --verify=crc32c --verify_only=1 >/tmp/fio2.log 2>&1
    echo "VUBLK-RC busy-verify rc=$? $(grep -Eo 'verify: bad[^,]*|err= *[0-9]+' /tmp/fio2.log | head -1)"
    timeout 60 dd if=/dev/vda of=/dev/null bs=4096 count=1024 iflag=direct 2>/dev/null
    echo "VUBLK-RC after-io rc=$?"
    echo "VUBLK-RC done"
    poweroff -f
fi

if [ "$MODE" != test ]; then
    echo "vublk guest: /dev/vda is $(cat /sys/block/vda/size 2>/dev/null) sectors; fio and busybox here."
    echo "Exit the shell to power off (or Ctrl-A X to kill QEMU)."
    setsid cttyhack sh
    poweroff -f
fi

[ -b /dev/vda ] || { fail disk "no /dev/vda" && finish; }
DISK=$(blockdev --getsize64 /dev/vda)
MARK_OFF=$((DISK / 4096 - 1)) # last 4 KiB: boot marker, outside every fio region
PAT_OFF=$(arg pattern_off 0)
PAT_LEN=$(stat -c %s /pattern.bin)
# fio regions: two job pairs on disjoint halves of the space before the pattern, whole MiBs.
J=$((PAT_OFF / 4 / 1048576 * 1048576))
if dd if=/dev/vda bs=4096 skip=$MARK_OFF count=1 2>/dev/null | grep -q VUBLK-BOOT1; then
    BOOT=b2
else
    BOOT=b1
fi
echo "VUBLK-BOOT $BOOT"

check capacity [ "$(($(cat /sys/block/vda/size) * 512))" = "$(arg size -)" ]
set -- /sys/block/vda/mq/* # one directory per blk-mq hardware queue
check queues [ "$#" = "$(arg queues -)" ]
S=$(arg serial '')
[ -z "$S" ] || check serial [ "$(cat /sys/block/vda/serial)" = "$S" ]
L=$(arg lbs '')
[ -z "$L" ] || check lbs [ "$(cat /sys/block/vda/queue/logical_block_size)" = "$L" ]
LBS=$(cat /sys/block/vda/queue/logical_block_size)

runfio() { # runfio NAME ARGS...: two jobs, one per vCPU (so one per virtqueue), verifying crc32c
    n=$1 && shift
    if fio --name="$n" --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \
        --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split --group_reporting \
        --verify=crc32c --verify_fatal=1 "$@" >/tmp/fio.log 2>&1; then
        grep -E '^ *(READ|WRITE):' /tmp/fio.log
        pass "$n"
    else
        cat /tmp/fio.log
        fail "$n" "$*"
    fi
}
R1="--size=$J --offset=0 --offset_increment=$J --bs=4k"
R2="--size=$J --offset=$((2 * J)) --offset_increment=$J --bsrange=$LBS-64k"

if [ $BOOT = b1 ]; then
    # shellcheck disable=SC2086 # R1/R2 are word lists
    runfio fio-4k --rw=randwrite --do_verify=1 $R1
    # shellcheck disable=SC2086
    runfio fio-bsrange --rw=randwrite --do_verify=1 $R2
    # Every virtqueue must have completed requests: each has its own MSI-X vector, named
    # virtio<N>-req.<q> in /proc/interrupts, which counts the backend's used-ring notifications.
    NCPU=$(nproc)
    grep -E 'virtio[0-9]+-req' /proc/interrupts
    for q in $(seq 0 $(($(arg queues 1) - 1))); do
        c=$(awk -v q="-req.$q" -v n="$NCPU" 'substr($NF, length($NF) - length(q) + 1) == q {
            for (i = 2; i <= n + 1; i++) s += $i; print s }' /proc/interrupts)
        check "used-q$q" [ "${c:-0}" -gt 0 ]
    done
    # A pattern the host checks in the image file after poweroff, and boot 2 reads back.
    check pattern-write dd if=/pattern.bin of=/dev/vda bs=4096 seek=$((PAT_OFF / 4096)) conv=fsync
    echo VUBLK-BOOT1 | dd of=/dev/vda bs=4096 seek=$MARK_OFF conv=sync,fsync 2>/dev/null
    sync
    echo "VUBLK-REBOOT failed=$FAILED"
    echo b >/proc/sysrq-trigger # immediate reset, like a hard reboot: no device shutdown
    sleep 10
    fail reboot "sysrq reboot did not happen"
    finish
fi

# Boot 2, same QEMU process: the disk must still work and hold what boot 1 wrote.
check pattern-read sh -c "dd if=/dev/vda bs=4096 skip=$((PAT_OFF / 4096)) count=$((PAT_LEN / 4096)) 2>/dev/null | cmp - /pattern.bin"
# shellcheck disable=SC2086
runfio fio-verify-4k --rw=randwrite --verify_only=1 $R1
# shellcheck disable=SC2086
runfio fio-verify-bsrange --rw=randwrite --verify_only=1 $R2
runfio fio-short --rw=randwrite --do_verify=1 --bs=4k --size=8M --offset=0 --offset_increment=8M
# Write-through: the driver writes wce=0 to config space (SET_CONFIG); writes must still verify.
# (virtio_blk's cache_type attribute writes config space; queue/write_cache does not.)
check write-through sh -c 'echo "write through" >/sys/block/vda/cache_type &&
    [ "$(cat /sys/block/vda/cache_type)" = "write through" ]'
runfio fio-write-through --rw=randwrite --do_verify=1 --bs=4k --size=4M --offset=16M --offset_increment=4M
# Online resize: the host grows the image to resize_to bytes (last 4 KiB: "VUBLK-GROWN") and
# tells the backend; the capacity must change under us, with no reboot.
RS=$(arg resize_to '')
if [ -n "$RS" ]; then
    OLD=$(cat /sys/block/vda/size)
    echo "VUBLK-RESIZE ready old=$OLD"
    i=0
    while [ "$(cat /sys/block/vda/size)" = "$OLD" ] && [ $i -lt 600 ]; do usleep 100000 && i=$((i + 1)); done
    echo "VUBLK-RESIZE seen size=$(cat /sys/block/vda/size) after $((i / 10)) s"
    check resize-size [ "$(($(cat /sys/block/vda/size) * 512))" = "$RS" ]
    N4K=$((RS / 4096))
    check resize-read-new sh -c "dd if=/dev/vda bs=4096 skip=$((N4K - 1)) count=1 2>/dev/null | grep -q VUBLK-GROWN"
    check resize-write-new sh -c "echo VUBLK-NEWEND | dd of=/dev/vda bs=4096 seek=$((N4K - 2)) conv=sync,fsync 2>/dev/null"
    check resize-old-data sh -c "dd if=/dev/vda bs=4096 skip=$((PAT_OFF / 4096)) count=$((PAT_LEN / 4096)) 2>/dev/null | cmp - /pattern.bin"
fi
dd if=/dev/zero of=/dev/vda bs=4096 seek=$MARK_OFF count=1 conv=fsync 2>/dev/null # next run: boot 1
finish
