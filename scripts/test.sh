#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine, builds rsd and
# runs every test. Run as root (CI does) or with the packages present.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests use (qemu-utils with qemu-storage-daemon is on
# the machine already and must not be reinstalled from Debian's archive).
PACKAGES=""
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq || echo "warning: apt-get update failed" >&2
    if [ -n "$PACKAGES" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PACKAGES
    fi
fi
cargo build --workspace --all-targets
cargo test --workspace
