#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine, builds rsd and
# runs every test. Run as root (CI does) or with the packages present.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests use (prometheus and curl for tests/metrics.rs,
# podman and runc for tests/container.rs; fio for tests/throttle.rs;
# openssl makes tests/tls.rs's certificates;
# qemu-utils with qemu-storage-daemon is on the machine already and must
# not be reinstalled from Debian's archive).
PACKAGES="libnbd-bin prometheus curl podman runc fio openssl"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq || echo "warning: apt-get update failed" >&2
    if [ -n "$PACKAGES" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PACKAGES
    fi
fi
# The real-guest test's kit (QEMU, SeaBIOS, a kernel and busybox unpacked
# from Debian's packages, and its initramfs): built once, then reused.
# The test builds it too; a failure here shows up there, with its reason.
bash tests/guest/fetch.sh >/dev/null || echo "warning: the guest kit could not be built" >&2
cargo build --workspace --all-targets
# The container test's image (a static release rsd, minutes the first
# time): built here, before the tests run, so that the build does not
# compete with timed tests for the cores. The test builds it too; a
# failure here shows up there, with its reason.
if command -v podman >/dev/null; then
    bash scripts/container-image.sh localhost/rsd:test >/dev/null ||
        echo "warning: the container image could not be built" >&2
fi
# The fuzz targets run here too, on stable: tests/fuzz_replay.rs replays
# fuzz/corpus and a few thousand mutated inputs per target through the
# libFuzzer targets' bodies. libFuzzer itself (cargo-fuzz, nightly, a
# 2-minute install and a 30-minute instrumented build here) is for long
# runs by hand: README.md, "Fuzzing".
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
