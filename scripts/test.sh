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
step cargo test
cargo test
step cargo build --release
cargo build --release
step guest-test
BACKEND=vublk VUBLK_BIN=target/release/vublk scripts/guest-test.sh
step "all passed"
