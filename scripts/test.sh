#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run): dependencies, format, lints, Rust tests, release
# build, then the real-guest test against the release binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { echo && echo "==== $* ($SECONDS s)"; }

step install-deps
scripts/install-deps.sh
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy

step cargo fmt --check
cargo fmt --check
step cargo clippy
cargo clippy --all-targets -- -D warnings
step "systemd-analyze verify systemd/*"
cargo build
scripts/verify-units.sh target/debug/vublk
step cargo test
cargo test
# The libblkio integration tests again per engine (the default, auto, picks direct on /tmp):
# sync, then direct on the thread-pool fallback that runs where io_uring is unavailable.
step "cargo test: integration tests, engine=sync"
VUBLK_TEST_ARGS="--engine sync" cargo test --test blkio_io --test lifecycle
step "cargo test: EIO fault injection (test-only engine wrapper)"
cargo test --features fault-injection --test faults_eio --test stats
step "cargo test: integration tests, engine=direct without io_uring"
VUBLK_DISABLE_IO_URING=1 VUBLK_TEST_ARGS="--engine direct" cargo test --test blkio_io --test lifecycle
step cargo build --release
cargo build --release
# The shipped units under a real systemd (in a container): activation, sandbox, io_uring.
step "systemd-e2e: vublk@.socket/.service under systemd"
VUBLK_BIN=target/release/vublk scripts/systemd-e2e.sh
# The real guest against each engine, and the direct engine on a 4 KiB-sector device under a
# 512-byte-sector guest (read-modify-write).
# The sync run uses vublk's and QEMU's default queue counts (QEMU: one per vCPU), to show a
# stock vhost-user-blk-pci starts against vublk without extra flags.
step "guest-test engine=sync, default queue counts"
BACKEND=vublk ENGINE=sync DEFAULT_QUEUES=1 VUBLK_BIN=target/release/vublk scripts/guest-test.sh
step "guest-test engine=sync on tmpfs (I/O through the image mapping)"
BACKEND=vublk ENGINE=sync IMG_DIR=/dev/shm VUBLK_BIN=target/release/vublk scripts/guest-test.sh
step "guest-test engine=direct"
BACKEND=vublk ENGINE=direct VUBLK_BIN=target/release/vublk scripts/guest-test.sh
# Polling holds the guest's kicks (avail_event behind its index) and must re-arm them when the
# window ends; a Linux guest's driver honours EVENT_IDX, so a missed re-arm hangs its I/O.
step "guest-test engine=direct with --poll-us 50"
BACKEND=vublk ENGINE=direct VUBLK_ARGS="--poll-us 50" VUBLK_BIN=target/release/vublk scripts/guest-test.sh
step "guest-test engine=direct on a 4096-byte-sector loop device"
BACKEND=vublk ENGINE=direct LOOP_SECTOR=4096 VUBLK_BIN=target/release/vublk scripts/guest-test.sh
# The default engine on a block device (what LVM or NVMe volumes are): auto must pick direct.
step "guest-test engine=auto on a 512-byte-sector loop device"
BACKEND=vublk ENGINE=auto LOOP_SECTOR=512 VUBLK_BIN=target/release/vublk scripts/guest-test.sh
# Backend restarts under a guest with QEMU reconnect=1 (idle and during fio); docs/reconnect.md.
for engine in sync direct; do
    step "reconnect-test engine=$engine"
    ENGINE=$engine VUBLK_BIN=target/release/vublk scripts/reconnect-test.sh
done
# A bounded fuzz run of the request path, so regressions show (the long run is manual:
# see fuzz/README.md). cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets stable accept them.
step "fuzz smoke (60 s)"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
corpus=$(mktemp -d)
RUSTC_BOOTSTRAP=1 cargo fuzz run request "$corpus" fuzz/seeds/request -- \
    -max_len=16384 -max_total_time=60 -print_final_stats=1 2>&1 | tail -n 15
rm -rf "$corpus"
# A 1-second smoke of the benchmark, so the harness cannot rot (results go to target/).
step "bench smoke"
QUICK=1 FIO=0 ENGINES=auto scripts/bench.sh
step "all passed"
