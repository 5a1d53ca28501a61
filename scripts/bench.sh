#!/usr/bin/env bash
# Benchmark: vublk against qemu-storage-daemon (and cloud-hypervisor's vhost_user_block, if
# given) with the same libblkio client (examples/bench_client.rs), side by side.
#
# Each run starts a fresh backend pinned to CPU_BACKEND, drives it with the client pinned to
# CPU_CLIENT, and stops it again. The client samples the backend's (utime+stime) from
# /proc/PID/stat exactly at the edges of the measured window (→ cores used) and reads its peak
# RSS (VmHWM) at the end. Runs are interleaved (rep → workload → backend, backend order rotated
# each rep) and the report shows medians.
#
# Writes BENCHMARKS.md, docs/bench.png and docs/bench-raw.jsonl (under OUTDIR; QUICK=1 defaults
# OUTDIR to target/bench-quick so a smoke run never overwrites the published results).
#
# Environment:
#   RUNTIME=10        measured seconds per run            RAMP=2   warm-up seconds per run
#   REPS=3            repetitions (median reported)       QUICK=1  1 s runs, 1 rep (CI smoke)
#   ENGINES="sync"    vublk engines to run (each is one backend column), e.g. "sync direct";
#                     ENGINE+pollN adds --poll-us N and runs on the QD1 and disk workloads
#   QSD=1             include qemu-storage-daemon (0 to skip)
#   CH_BLOCK_BIN=PATH also run cloud-hypervisor's vhost_user_block
#   FIO=1             the extra fio row (local io_uring O_DIRECT, the disk's limit)
#   WORKLOADS="..."   subset of workload ids (default: all; see the table below)
#   VUBLK_ARGS="..." extra vublk arguments for every run (e.g. "--poll-us 50")
#   VUBLK_DIRECT_ARGS extra vublk arguments for the disk (O_DIRECT) workloads (default none).
#                     Engine "sync" serves them through the page cache, "direct"/"auto" with
#                     O_DIRECT; "direct" is skipped on the tmpfs workloads.
#   IMG_MIB=1024      image size           BENCH_DIR=/tmp  where the O_DIRECT image lives
#   CPU_CLIENT=0 CPU_BACKEND=1            OUTDIR=.  (see above)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# The settings given in the environment, to print the exact command in the report.
settings=(QUICK RUNTIME RAMP REPS ENGINES QSD FIO CH_BLOCK_BIN WORKLOADS VUBLK_ARGS VUBLK_DIRECT_ARGS IMG_MIB
    BENCH_DIR CPU_CLIENT CPU_BACKEND OUTDIR)
env_given=()
for v in "${settings[@]}"; do if [[ -v $v ]]; then env_given+=("$v"); fi; done

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    RUNTIME=${RUNTIME:-1} REPS=${REPS:-1} RAMP=${RAMP:-0.5} OUTDIR=${OUTDIR:-target/bench-quick}
fi
RUNTIME=${RUNTIME:-10} REPS=${REPS:-3} RAMP=${RAMP:-2} OUTDIR=${OUTDIR:-.}
ENGINES=${ENGINES:-sync} QSD=${QSD:-1} FIO=${FIO:-1} CH_BLOCK_BIN=${CH_BLOCK_BIN:-}
IMG_MIB=${IMG_MIB:-1024} BENCH_DIR=${BENCH_DIR:-/tmp}
CPU_CLIENT=${CPU_CLIENT:-0} CPU_BACKEND=${CPU_BACKEND:-1}

# id | dir | rw | bs | iodepth per queue | queues | title [| client flags]
# The "-pollc" rows run the client with --poll (libblkio poll queues: it spins instead of
# sleeping, and asks the backend not to signal). They show how much of the gap to fio is the
# client's own sleep and wake-up, which every vhost-user backend pays and fio does not.
all_workloads=(
    "shm-randread-qd1|shm|randread|4096|1|1|4k randread QD1, /dev/shm"
    "shm-randread-qd32|shm|randread|4096|32|1|4k randread QD32, 1 queue, /dev/shm"
    "shm-randread-qd32-2q|shm|randread|4096|32|2|4k randread QD32 per queue, 2 queues, /dev/shm"
    "shm-randwrite-qd32|shm|randwrite|4096|32|1|4k randwrite QD32, 1 queue, /dev/shm"
    "disk-randread-qd32|disk|randread|4096|32|1|4k randread QD32, 1 queue, $BENCH_DIR (disk)"
    "disk-randwrite-qd32|disk|randwrite|4096|32|1|4k randwrite QD32, 1 queue, $BENCH_DIR (disk)"
    "disk-read128k-qd8|disk|read|131072|8|1|128k sequential read QD8, 1 queue, $BENCH_DIR (disk)"
    "disk-randread-qd32-pollc|disk|randread|4096|32|1|4k randread QD32, 1 queue, $BENCH_DIR (disk), polling client|--poll"
    "disk-randwrite-qd32-pollc|disk|randwrite|4096|32|1|4k randwrite QD32, 1 queue, $BENCH_DIR (disk), polling client|--poll"
)
# fio runs the same workload on the image directly: the disk's own limit, for every disk row.
FIO_WORKLOADS="disk-randread-qd32 disk-randwrite-qd32 disk-read128k-qd8"
FIO_WORKLOADS+=" disk-randread-qd32-pollc disk-randwrite-qd32-pollc"

say() { printf '%s\n' "$*" >&2; }
die() {
    say "bench: $*"
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Cleanup: every process we start is tracked by PID and stopped on exit, Ctrl-C or TERM.
# ---------------------------------------------------------------------------------------------
work="" shm="" bpid="" cpid="" raw_tmp=""

stop_pid() { # stop_pid PID [SECONDS]: TERM, wait (bounded), then KILL; returns its exit status
    local pid=$1 secs=${2:-10} i
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 20; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "bench: pid $pid ignored SIGTERM for ${secs}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    local rc=0
    wait "$pid" 2>/dev/null || rc=$?
    return $rc
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # Backend first: qemu-storage-daemon aborts if its frontend dies with I/O in flight.
    stop_pid "$bpid" 5 || true
    stop_pid "$cpid" 5 || true
    # Anything else still running from our private directories (nothing, normally).
    local p
    for d in "$work" "$shm"; do
        [[ -n $d ]] || continue
        for p in $(pgrep -f -- "$d" 2>/dev/null || true); do
            [[ $p == "$$" ]] && continue
            say "bench: stray process $p ($(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)); killing it"
            kill -KILL "$p" 2>/dev/null || true
        done
    done
    [[ -n $raw_tmp ]] && rm -f "$raw_tmp"
    [[ -n $work ]] && rm -rf "$work"
    [[ -n $shm ]] && rm -rf "$shm"
    exit "$rc"
}
trap cleanup EXIT
trap 'say "bench: interrupted"; exit 130' INT
trap 'say "bench: terminated"; exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------------------------
(($(nproc) > CPU_CLIENT && $(nproc) > CPU_BACKEND)) || die "need CPUs $CPU_CLIENT and $CPU_BACKEND"
command -v python3 >/dev/null || die "python3 is required for the report"
if [[ $QSD == 1 ]]; then
    command -v qemu-storage-daemon >/dev/null ||
        die "qemu-storage-daemon not found (apt-get install qemu-system-common / qemu-utils), or QSD=0"
fi
if [[ $FIO == 1 ]] && ! command -v fio >/dev/null; then
    say "bench: fio not found; skipping the fio row"
    FIO=0
fi
if [[ -n $CH_BLOCK_BIN && ! -x $CH_BLOCK_BIN ]]; then
    die "CH_BLOCK_BIN=$CH_BLOCK_BIN is not executable"
fi
if ! command -v gnuplot >/dev/null && ! python3 -c 'import matplotlib' 2>/dev/null; then
    say "bench: installing gnuplot-nox for the chart"
    { apt-get install -y gnuplot-nox >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 && apt-get install -y gnuplot-nox >/dev/null 2>&1; }; } ||
        say "bench: could not install gnuplot; the chart will be skipped"
fi

workloads=()
for w in "${all_workloads[@]}"; do
    id=${w%%|*}
    if [[ -z ${WORKLOADS:-} || " $WORKLOADS " == *" $id "* ]]; then workloads+=("$w"); fi
done
((${#workloads[@]})) || die "WORKLOADS=$WORKLOADS matches none of: $(printf '%s ' "${all_workloads[@]%%|*}")"

say "bench: building (cargo build --release, example bench_client)"
cargo build --release --quiet
cargo build --release --quiet --example bench_client
vublk=$root/target/release/vublk
client=$root/target/release/examples/bench_client

VUBLK_ARGS=${VUBLK_ARGS:-} VUBLK_DIRECT_ARGS=${VUBLK_DIRECT_ARGS:-}
read -ra vublk_args <<<"$VUBLK_ARGS"
read -ra vublk_direct_args <<<"$VUBLK_DIRECT_ARGS"
for e in $ENGINES; do
    "$vublk" --help | grep -qE "^ *- ${e%%+*}:" || die "vublk has no --engine ${e%%+*} (see vublk --help)"
done

backends=()
for e in $ENGINES; do backends+=("vublk-$e"); done
[[ $QSD == 1 ]] && backends+=(qsd)
[[ -n $CH_BLOCK_BIN ]] && backends+=(ch)
((${#backends[@]})) || die "no backends (ENGINES empty and QSD=0)"

work=$(mktemp -d "$BENCH_DIR/vublk-bench.XXXXXX")
shm=$(mktemp -d /dev/shm/vublk-bench.XXXXXX)
shm_img=$shm/disk.img
disk_img=$work/disk.img

say "bench: writing ${IMG_MIB} MiB of random data to $shm_img and $disk_img"
head -c "$((IMG_MIB * 1024 * 1024))" /dev/urandom >"$shm_img"
cp "$shm_img" "$disk_img"
sync "$disk_img"
if ! dd if="$disk_img" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null; then
    die "$BENCH_DIR does not support O_DIRECT; set BENCH_DIR to a directory on a disk filesystem"
fi

mkdir -p "$OUTDIR/docs"
raw=$OUTDIR/docs/bench-raw.jsonl
raw_tmp=$(mktemp "$OUTDIR/docs/.bench-raw.XXXXXX")
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
# The revision measured: taken before this run writes its own outputs (docs/, BENCHMARKS.md).
git_rev=$(git describe --always --dirty 2>/dev/null || echo unknown)

# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------
run_seq=0

# json_get FILE KEY...: prints the values of top-level keys of a one-line JSON object.
json_get() {
    python3 - "$@" <<'EOF'
import json, sys
d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(" ".join("-" if d.get(k) is None else str(d.get(k)) for k in sys.argv[2:]))
EOF
}

wait_socket() { # wait_socket SOCK PID LOG: bounded poll for the listening socket
    local sock=$1 pid=$2 log=$3 i
    for ((i = 0; i < 1000; i++)); do # ≤ 10 s
        [[ -S $sock ]] && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.01
    done
    say "bench: backend (pid $pid) did not create $sock; its log:"
    tail -n 20 "$log" >&2
    return 1
}

# run_one WORKLOAD-SPEC BACKEND REP: appends one JSON line to $raw_tmp
run_one() {
    local id dir rw bs qd nq title cflags
    IFS='|' read -r id dir rw bs qd nq title cflags <<<"$1"
    local client_flags=()
    read -ra client_flags <<<"$cflags"
    local backend=$2 rep=$3
    local img direct cache
    if [[ $dir == shm ]]; then
        img=$shm_img direct=off cache="tmpfs (page cache)"
    else
        img=$disk_img direct=on cache="O_DIRECT"
        # Same start for every backend: none of the image in the page cache (a page-cache engine
        # would otherwise see whatever earlier runs left there, and O_DIRECT writes drop it).
        sync "$img"
        dd if="$img" iflag=nocache count=0 status=none
    fi
    run_seq=$((run_seq + 1))
    local sock=$work/s$run_seq.sock log=$work/backend-$run_seq.log out=$work/client-$run_seq.json
    local budget
    budget=$(python3 -c "print(int($RUNTIME + $RAMP + 60))")

    if [[ $backend == fio ]]; then
        timeout "$budget" taskset -c "$CPU_CLIENT" fio --name=local --filename="$img" \
            --ioengine=io_uring --direct=1 --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
            --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --norandommap --randrepeat=0 \
            --lat_percentiles=1 --output-format=json --output="$out.fio" >"$log" 2>&1 &
        cpid=$!
        wait "$cpid" || {
            cpid=""
            tail -n 20 "$log" >&2
            die "fio failed"
        }
        cpid=""
        python3 - "$out.fio" "$rw" "$bs" "$qd" "$nq" >"$out" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
j = d["jobs"][0]
s = j["write"] if "write" in sys.argv[2] else j["read"]
pct = s["lat_ns"].get("percentile", {})
secs = s["runtime"] / 1000.0
print(json.dumps({
    "rw": sys.argv[2], "bs": int(sys.argv[3]), "iodepth": int(sys.argv[4]),
    "num_queues": int(sys.argv[5]), "runtime_s": secs, "ios": s["total_ios"],
    "iops": round(s["iops"]), "mib_s": round(s["bw_bytes"] / 2**20, 2),
    "lat_mean_us": round(s["lat_ns"]["mean"] / 1000, 2),
    "lat_p50_us": round(pct.get("50.000000", 0) / 1000, 2),
    "lat_p99_us": round(pct.get("99.000000", 0) / 1000, 2),
    "lat_p999_us": round(pct.get("99.900000", 0) / 1000, 2),
    "lat_max_us": round(s["lat_ns"]["max"] / 1000, 2), "errors": j["error"],
    "client_cpu": round((j["usr_cpu"] + j["sys_cpu"]) / 100, 3),
    "backend_cpu": None, "backend_hwm_kib": None, "backend_anon_kib": None,
}))
EOF
        cache="O_DIRECT"
    else
        local cmd
        case $backend in
        vublk-*)
            # ENGINE or ENGINE+pollN (the latter adds --poll-us N)
            local engine=${backend#vublk-} poll=()
            if [[ $engine == *+poll* ]]; then
                poll=(--poll-us "${engine##*+poll}")
                engine=${engine%%+*}
            fi
            cmd=(taskset -c "$CPU_BACKEND" "$vublk" --socket-path "$sock" --blk-file "$img"
                --num-queues "$nq" --engine "$engine" --log-level warn "${poll[@]}" "${vublk_args[@]}")
            if [[ $direct == on ]]; then
                cmd+=("${vublk_direct_args[@]}")
                case $engine in
                direct | auto) cache="O_DIRECT" ;;
                sync) ((${#vublk_direct_args[@]})) || cache="page cache" ;;
                *) cache="engine $engine" ;;
                esac
            fi
            ;;
        qsd)
            cmd=(taskset -c "$CPU_BACKEND" qemu-storage-daemon
                --blockdev "driver=file,node-name=f,filename=$img,cache.direct=$direct,aio=io_uring"
                --export "type=vhost-user-blk,id=e0,node-name=f,addr.type=unix,addr.path=$sock,writable=on,num-queues=$nq")
            ;;
        ch)
            cmd=(taskset -c "$CPU_BACKEND" "$CH_BLOCK_BIN"
                --block-backend "path=$img,socket=$sock,num_queues=$nq,direct=$([[ $direct == on ]] && echo true || echo false)")
            ;;
        *) die "unknown backend $backend" ;;
        esac
        "${cmd[@]}" >"$log" 2>&1 &
        bpid=$!
        wait_socket "$sock" "$bpid" "$log" || die "$backend did not start"
        timeout "$budget" taskset -c "$CPU_CLIENT" "$client" --path "$sock" --rw "$rw" --bs "$bs" \
            --iodepth "$qd" --num-queues "$nq" --runtime "$RUNTIME" --ramp "$RAMP" \
            --backend-pid "$bpid" "${client_flags[@]}" >"$out" 2>"$out.err" &
        cpid=$!
        if ! wait "$cpid"; then
            cpid=""
            cat "$out.err" >&2
            say "bench: client failed against $backend ($id); backend log:"
            tail -n 20 "$log" >&2
            exit 1
        fi
        cpid=""
        local brc=0
        stop_pid "$bpid" 60 || brc=$?
        bpid=""
        if ((brc != 0)) && [[ $backend != ch ]]; then
            # cloud-hypervisor's backend exits by itself (non-zero) when its frontend leaves.
            say "bench: warning: $backend exited with status $brc; log:"
            tail -n 5 "$log" >&2
        fi
    fi

    local body
    body=$(tail -n 1 "$out")
    printf '{"workload":"%s","title":"%s","backend":"%s","rep":%d,"cache":"%s","ts":"%s",%s\n' \
        "$id" "$title" "$backend" "$rep" "$cache" "$(date -u +%FT%TZ)" "${body#\{}" >>"$raw_tmp"
    local v
    read -ra v <<<"$(json_get "$out" iops mib_s lat_p50_us lat_p99_us backend_cpu client_cpu)"
    printf '  %-22s %-12s %9s IOPS %9s MiB/s  p50 %7s µs  p99 %7s µs  backend %5s cores  client %5s\n' \
        "$id" "$backend" "${v[@]}" >&2
}

# ---------------------------------------------------------------------------------------------
# The runs: rep → workload → backend, backend order rotated each rep.
# ---------------------------------------------------------------------------------------------
say "bench: backends: ${backends[*]}; ${#workloads[@]} workloads; REPS=$REPS RUNTIME=${RUNTIME}s RAMP=${RAMP}s"
[[ -n $VUBLK_ARGS ]] && say "bench: extra vublk args: $VUBLK_ARGS"
[[ -n $VUBLK_DIRECT_ARGS ]] && say "bench: extra vublk args on the disk workloads: $VUBLK_DIRECT_ARGS"
for ((rep = 1; rep <= REPS; rep++)); do
    say "bench: rep $rep/$REPS"
    for w in "${workloads[@]}"; do
        list=()
        for b in "${backends[@]}"; do
            # The direct engine needs O_DIRECT, which tmpfs lacks.
            [[ $b == vublk-direct && ${w#*|} == shm* ]] && continue
            # Polling variants (ENGINE+pollN) are measured where polling matters: QD1, where
            # it is the latency, and the disk, where a round trip's wake-up is IOPS.
            [[ $b == *+poll* && ${w%%|*} != *-qd1 && ${w#*|} != disk* ]] && continue
            list+=("$b")
        done
        [[ $FIO == 1 && " $FIO_WORKLOADS " == *" ${w%%|*} "* ]] && list+=(fio)
        n=${#list[@]}
        for ((k = 0; k < n; k++)); do
            run_one "$w" "${list[$(((k + rep - 1) % n))]}" "$rep"
        done
    done
done

mv "$raw_tmp" "$raw"
raw_tmp=""
finished=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
cmdline=""
for v in "${env_given[@]}"; do cmdline+="$v=$(printf '%q' "${!v}") "; done
cmdline+="scripts/bench.sh"
qsd_version=$(qemu-storage-daemon --version 2>/dev/null | head -n1 || true)
fio_version=$(fio --version 2>/dev/null || true)
export BENCH_RAW=$raw BENCH_OUTDIR=$OUTDIR BENCH_CMD=$cmdline BENCH_STARTED=$started \
    BENCH_FINISHED=$finished BENCH_LOAD="$load_before → $load_after" \
    BENCH_RUNTIME=$RUNTIME BENCH_RAMP=$RAMP BENCH_REPS=$REPS BENCH_CPU_CLIENT=$CPU_CLIENT \
    BENCH_CPU_BACKEND=$CPU_BACKEND BENCH_IMG_MIB=$IMG_MIB BENCH_DIR \
    BENCH_VUBLK_ARGS=$VUBLK_ARGS BENCH_VUBLK_DIRECT_ARGS=$VUBLK_DIRECT_ARGS \
    BENCH_QSD_VERSION=$qsd_version BENCH_FIO_VERSION=$fio_version BENCH_GIT=$git_rev
python3 scripts/bench_report.py
say "bench: wrote $OUTDIR/BENCHMARKS.md, $OUTDIR/docs/bench.png, $raw"
