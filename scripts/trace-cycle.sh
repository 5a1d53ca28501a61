#!/usr/bin/env bash
# Where a disk round trip goes: runs one backend on an O_DIRECT image with the benchmark's
# client (or fio alone), records 1 s of block and scheduler tracepoints with perf, and splits
# each batch's round trip with scripts/trace_cycle.py. Method and results: docs/disk-cycle.md.
#
# usage: scripts/trace-cycle.sh vublk|vublk+pollN|qsd|fio
# Environment: IMG=/tmp/vublk-bench.img (created, 1 GiB, if missing)  RW=randread  QD=32
#              VUBLK=target/release/vublk  CPU_CLIENT=0  CPU_BACKEND=1  KEEP=1 keeps the trace
#              EXTRA_EVENTS="irq_vectors:call_function_single_entry ..." more tracepoints
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$root"
die() { echo "trace-cycle: $*" >&2; exit 1; }

backend=${1:-}
[[ $backend =~ ^(vublk(\+poll[0-9]+)?|qsd|fio)$ ]] || die "usage: $0 vublk|vublk+pollN|qsd|fio"
IMG=${IMG:-/tmp/vublk-bench.img} RW=${RW:-randread} QD=${QD:-32}
VUBLK=${VUBLK:-target/release/vublk} CPU_CLIENT=${CPU_CLIENT:-0} CPU_BACKEND=${CPU_BACKEND:-1}
command -v perf >/dev/null || die "perf not found (apt-get install linux-perf)"
client=target/release/examples/bench_client
[[ $backend == fio ]] || [[ -x $client ]] || cargo build --release --example bench_client
[[ $backend == vublk* ]] && { [[ -x $VUBLK ]] || cargo build --release; }
if [[ ! -f $IMG ]]; then
    dd if=/dev/urandom of="$IMG" bs=1M count=1024 status=none
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ ${KEEP:-0} == 1 ]] && echo "trace kept in $work" || rm -rf "$work"
}
trap cleanup EXIT
sock=$work/sock
sync && echo 1 >/proc/sys/vm/drop_caches 2>/dev/null || true

case $backend in
fio)
    taskset -c "$CPU_BACKEND" fio --name=trace --filename="$IMG" --direct=1 --ioengine=io_uring \
        --rw="$RW" --bs=4096 --iodepth="$QD" --runtime=5 --time_based >/dev/null &
    pids+=($!) ;;
*)
    # The benchmark's settings: pinned, O_DIRECT; QSD with io_uring.
    BACKEND=${backend%%+*} ENGINE=auto VUBLK_BIN=$VUBLK BACKEND_CPU=$CPU_BACKEND
    QSD_FILE_OPTS=cache.direct=on,aio=io_uring VUBLK_ARGS="--log-level warn"
    [[ $backend == *+poll* ]] && VUBLK_ARGS+=" --poll-us ${backend##*+poll}"
    start_backend "$IMG" "$sock" 1 "$work/backend.log" || die "backend did not start"
    bpid=$backend_pid
    pids+=("$bpid")
    taskset -c "$CPU_CLIENT" "$client" --path "$sock" --rw "$RW" --bs 4096 --iodepth "$QD" \
        --num-queues 1 --runtime 4 --ramp 1 --backend-pid "$bpid" >"$work/client.json" &
    pids+=($!) ;;
esac
sleep 2
# Threads whose syscall exits mark "back on the CPU" (switch-ins from idle are not always
# recorded here): fio's job process, or the backend's I/O thread and the client.
if [[ $backend == fio ]]; then
    tids=$(pgrep -P "${pids[0]}" || true)
else
    tids=$(ls "/proc/${pids[1]}/task")
    for t in $(ls "/proc/$bpid/task"); do
        [[ $(cat "/proc/$bpid/task/$t/comm" 2>/dev/null) == vring_worker* || $backend == qsd ]] && tids+=" $t"
    done
fi
filter=$(for t in $tids; do printf 'common_pid == %s || ' "$t"; done)
extra=()
for e in ${EXTRA_EVENTS:-}; do extra+=(-e "$e"); done
perf record -q -a -o "$work/perf.data" "${extra[@]}" -e block:block_rq_issue -e sched:sched_switch \
    -e sched:sched_wakeup -e raw_syscalls:sys_exit --filter "${filter% || }" \
    -- sleep 1 >/dev/null 2>&1 || die "perf record failed (root needed)"
perf script -i "$work/perf.data" -F comm,tid,cpu,time,event,trace >"$work/perf.txt" 2>/dev/null
case $backend in
fio) comm=fio; cc= ;;
qsd) comm=qemu-storage-da; cc=bench_client ;;
*) comm=vring_worker; cc=bench_client ;;
esac
echo "$backend, 4k $RW QD$QD on $IMG:"
python3 scripts/trace_cycle.py "$work/perf.txt" "$comm" $cc
