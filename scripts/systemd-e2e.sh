#!/usr/bin/env bash
# The shipped units under a real systemd: boots this machine's systemd in a throw-away
# systemd-nspawn container (--volatile=yes: /usr from the host, everything else tmpfs), installs
# vublk the way the README's "Running under systemd" says (sysusers, /etc/vublk/NAME.conf, the
# units), starts vublk@disk0.socket and drives the socket-activated, sandboxed daemon from the
# host with libblkio. Checks: nothing runs before a client connects, the service becomes active
# (Type=notify), the direct engine gets O_DIRECT and io_uring inside the sandbox, the socket's
# owner and mode, `vublk stats` through the runtime directory, online resize by `systemctl reload`,
# a restart, and a clean stop.
# Only the vublk binary path differs from the shipped unit (a drop-in points ExecStart at the
# build): /usr is the host's, read-only.
# Usage: scripts/systemd-e2e.sh   (VUBLK_BIN to pick the binary; needs root)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bin=${VUBLK_BIN:-}
for b in $bin target/release/vublk target/debug/vublk; do
    [[ -x $b ]] && bin=$(realpath "$b") && break
done
[[ -x $bin ]] || { echo "systemd-e2e: build vublk first" >&2; exit 1; }
client=target/debug/examples/bench_client
[[ -x $client ]] || cargo build -q --example bench_client
command -v systemd-nspawn >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd-container
}

# Images on a disk filesystem (not tmpfs), so the direct engine really uses O_DIRECT.
work=$(mktemp -d /var/tmp/vublk-e2e.XXXXXX)
mkdir "$work/images"
truncate -s 256M "$work/images/disk0.raw"
machine=vublk-e2e-$$
nspawn_pid=
cleanup() {
    if [[ -n $nspawn_pid ]] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$nspawn_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
fail() {
    echo "systemd-e2e: FAIL: $*" >&2
    [[ -n ${init:-} ]] && ct journalctl --no-pager -n 60 -u 'vublk@*' >&2 || true
    exit 1
}

systemd-nspawn -D / --volatile=yes --console=passive -b --machine="$machine" --register=no \
    --keep-unit --bind-ro="$root:/opt/vublk" --bind="$bin:/opt/vublk-bin/vublk" \
    --bind="$work/images:/var/lib/vublk" -- systemd.mask=systemd-firstboot.service \
    >"$work/nspawn.log" 2>&1 &
nspawn_pid=$!
init=
for _ in $(seq 100); do
    init=$(pgrep -P "$nspawn_pid" | head -n1 || true)
    [[ -n $init ]] && break
    sleep 0.1
done
[[ -n $init ]] || fail "container did not start: $(cat "$work/nspawn.log")"
ct() { nsenter -t "$init" -m -u -i -p -- "$@"; }
state=
for _ in $(seq 300); do
    state=$(ct systemctl is-system-running 2>/dev/null || true)
    [[ $state == running || $state == degraded ]] && break
    sleep 0.1
done
[[ $state == running || $state == degraded ]] || fail "container systemd state: $state"
echo "systemd-e2e: container systemd $state"

# Install as the README says.
ct systemd-sysusers /opt/vublk/share/vublk/sysusers.conf
ct chown vublk:vublk /var/lib/vublk /var/lib/vublk/disk0.raw
ct mkdir -p /etc/vublk
ct cp /opt/vublk/share/vublk/example.conf /etc/vublk/disk0.conf
ct sed -i 's/^num-queues = .*/num-queues = 2/; s/^# engine = auto/engine = direct/' \
    /etc/vublk/disk0.conf
ct cp /opt/vublk/systemd/vublk@.service /opt/vublk/systemd/vublk@.socket /etc/systemd/system/
ct mkdir -p /etc/systemd/system/vublk@.service.d
exec_start=$(sed -n 's|^ExecStart=/usr/bin/vublk|ExecStart=/opt/vublk-bin/vublk|p' \
    systemd/vublk@.service)
printf '[Service]\nExecStart=\n%s\n' "$exec_start" |
    ct tee /etc/systemd/system/vublk@.service.d/binary.conf >/dev/null
ct systemctl daemon-reload
ct systemctl start vublk@disk0.socket
sock=/proc/$init/root/run/vublk/disk0.sock
[[ -S $sock ]] || fail "no socket $sock"
[[ $(ct systemctl is-active vublk@disk0.service || true) == inactive ]] ||
    fail "service started before anyone connected"

run_client() {
    "$client" --path "$sock" --num-queues 2 --iodepth 16 --runtime 1 --ramp 0.2 "$@" ||
        fail "libblkio client $*"
}
run_client --rw randwrite >"$work/w.json"
run_client --rw randread >"$work/r.json"
echo "systemd-e2e: randwrite $(cat "$work/w.json")"
echo "systemd-e2e: randread  $(cat "$work/r.json")"
[[ $(ct systemctl is-active vublk@disk0.service) == active ]] || fail "service not active"
log=$(ct journalctl --no-pager -o cat -u vublk@disk0.service)
grep -q "O_DIRECT alignment" <<<"$log" || fail "no O_DIRECT in the sandbox"
! grep -q "io_uring unavailable" <<<"$log" || fail "io_uring denied in the sandbox"
main_pid=$(ct systemctl show -P MainPID vublk@disk0.service)
rings=$(ct find "/proc/$main_pid/fd" -lname 'anon_inode:\[io_uring\]' | wc -l)
((rings >= 2)) || fail "vublk holds $rings io_uring fds (want one per queue)"
echo "systemd-e2e: O_DIRECT, $rings io_urings"
ct /opt/vublk-bin/vublk stats /run/vublk/disk0/control.sock || fail "vublk stats"
ct setpriv --reuid=vublk --regid=vublk --init-groups /opt/vublk-bin/vublk stats /run/vublk/disk0/control.sock >/dev/null ||
    fail "vublk stats as the service user"
# Online resize the systemd way: grow the image, `systemctl reload` (SIGHUP).
ct truncate -s +64M /var/lib/vublk/disk0.raw
ct systemctl reload vublk@disk0.service
for _ in $(seq 50); do
    ct journalctl --no-pager -o cat -u vublk@disk0 | grep -q "SIGHUP: image .*grew from" && break
    sleep 0.1
done
ct journalctl --no-pager -o cat -u vublk@disk0 | grep "SIGHUP: image .*grew from" ||
    fail "systemctl reload did not resize"
ct /opt/vublk-bin/vublk resize /run/vublk/disk0/control.sock | grep -q "size unchanged" ||
    fail "vublk resize"
perms=$(ct stat -c '%U:%G %a' /run/vublk/disk0.sock)
[[ $perms == "root:kvm 660" ]] || fail "socket is $perms"

# A restart serves again; a stop is a clean SIGTERM exit.
ct systemctl restart vublk@disk0.service
run_client --rw randread >/dev/null
ct systemctl stop vublk@disk0.service vublk@disk0.socket
result=$(ct systemctl show -P Result vublk@disk0.service)
[[ $result == success ]] || fail "service result $result"
grep -q "signal 15: shutting down" <<<"$(ct journalctl --no-pager -o cat -u vublk@disk0)" ||
    fail "no clean SIGTERM shutdown in the journal"
echo "systemd-e2e: passed"
