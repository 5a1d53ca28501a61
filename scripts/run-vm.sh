#!/usr/bin/env bash
# Old name of scripts/run-qemu.sh, kept so existing commands keep working.
exec "$(dirname "${BASH_SOURCE[0]}")/run-qemu.sh" "$@"
