# shellcheck shell=bash
# Shared by guest-test.sh, run-qemu.sh and run-cloud-hypervisor.sh: starting a vhost-user-blk backend and the QEMU command.
# Environment:
#   BACKEND=vublk|qsd   vublk (default) or qemu-storage-daemon, which speaks the same protocol
#   VUBLK_BIN=PATH      vublk binary (default target/release/vublk, else target/debug/vublk)
#   ENGINE=NAME         vublk --engine (default sync)
#   VUBLK_ARGS="..."    extra vublk arguments (e.g. "--logical-block-size 4096 --serial x")
#   BACKEND_CPU=N       pin the backend to CPU N (default: not pinned)
#   QSD_FILE_OPTS=...   qemu-storage-daemon file options (default cache.direct=off)

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${GUEST_CACHE:-$root/.cache/guest}
BACKEND=${BACKEND:-vublk}
ENGINE=${ENGINE:-sync}

vublk_bin() {
    local b
    for b in ${VUBLK_BIN:-} "$root/target/release/vublk" "$root/target/debug/vublk"; do
        [[ -x $b ]] && echo "$b" && return
    done
    echo "no vublk binary: run cargo build --release (or set VUBLK_BIN, or BACKEND=qsd)" >&2
    return 1
}

# start_backend IMAGE SOCKET QUEUES LOG: starts the backend in the background, sets backend_pid,
# and waits (bounded) for its socket to appear.
start_backend() {
    local img=$1 sock=$2 queues=$3 log=$4 bin extra=() pin=()
    [[ -z ${BACKEND_CPU:-} ]] || pin=(taskset -c "$BACKEND_CPU")
    case $BACKEND in
    vublk)
        bin=$(vublk_bin)
        read -ra extra <<<"${VUBLK_ARGS:-}"
        # DEFAULT_QUEUES=1: no --num-queues, to show the defaults suit a stock QEMU.
        local nq=(--num-queues "$queues")
        [[ -z ${DEFAULT_QUEUES:-} ]] || nq=()
        "${pin[@]}" "$bin" --socket-path "$sock" --blk-file "$img" "${nq[@]}" \
            --engine "$ENGINE" "${extra[@]}" >"$log" 2>&1 &
        ;;
    qsd)
        "${pin[@]}" qemu-storage-daemon \
            --blockdev "driver=file,node-name=f,filename=$img,${QSD_FILE_OPTS:-cache.direct=off}" \
            --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$sock,writable=on,num-queues=$queues" \
            >"$log" 2>&1 &
        ;;
    *) echo "unknown BACKEND=$BACKEND (vublk|qsd)" >&2 && return 1 ;;
    esac
    backend_pid=$!
    local i
    for ((i = 0; i < 100; i++)); do # up to 10 s
        [[ -S $sock ]] && return 0
        kill -0 "$backend_pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "backend $BACKEND did not create $sock; its log:" >&2
    cat "$log" >&2
    return 1
}

# qemu_cmd SOCKET QUEUES INITRD CMDLINE: fills the array qemu with a TCG q35 guest whose only
# disk is the vhost-user-blk device. Guest RAM is a shared memfd so the backend can map it.
qemu_cmd() {
    local sock=$1 queues=$2 initrd=$3 append=$4 dev="vhost-user-blk-pci,chardev=c0"
    # DEFAULT_QUEUES=1: QEMU's default queue count (one per vCPU).
    [[ -n ${DEFAULT_QUEUES:-} ]] || dev+=",num-queues=$queues"
    # shellcheck disable=SC2034,SC2054 # qemu is the result; commas are QEMU's
    qemu=(qemu-system-x86_64 -machine q35,accel=tcg -cpu max -smp 2 -m 512M
        -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
        -chardev "socket,id=c0,path=$sock${CHARDEV_OPTS:-}" -device "$dev"
        -kernel "$cache/kernel/vmlinuz" -initrd "$initrd" -append "console=ttyS0 $append")
}

# serve_interactive NAME IMAGE: what the interactive run scripts share. Makes sure the guest
# kernel and initramfs exist, creates IMAGE (SIZE, default 1G) if missing, and starts the
# backend on it in a temp dir that is removed, with the backend stopped, when the script exits.
# Sets img (absolute path), QUEUES (default 2), tmp, and the socket path sock.
serve_interactive() {
    local name=$1
    img=$(realpath "$2")
    QUEUES=${QUEUES:-2}
    [[ -f $cache/kernel/vmlinuz ]] || "$root/scripts/install-deps.sh"
    "$root/scripts/mkinitramfs.sh"
    [[ -e $img ]] || truncate -s "${SIZE:-1G}" "$img"
    tmp=$(mktemp -d "/tmp/vublk-$name.XXXXXX")
    sock=$tmp/blk.sock
    backend_pid=
    trap _serve_interactive_cleanup EXIT
    start_backend "$img" "$sock" "$QUEUES" "$tmp/backend.log"
    echo "$name: $BACKEND serving $img (log: $tmp/backend.log while running)"
}

_serve_interactive_cleanup() {
    if [[ -n $backend_pid ]]; then
        kill "$backend_pid" 2>/dev/null || true
        wait "$backend_pid" || true
    fi
    rm -rf "$tmp"
}
