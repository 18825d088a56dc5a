#!/usr/bin/env bash
# Builds the container image from a static rsd built on this machine, for
# where no Rust base image can be pulled (with registry access,
# `podman build -t localhost/rsd .` builds everything in the container).
# Usage: bash scripts/container-image.sh [IMAGE]   (default localhost/rsd:latest)
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-localhost/rsd:latest}
rust_target=x86_64-unknown-linux-gnu
echo "building a static rsd (release, $rust_target); the first build takes minutes" >&2
# With --target, RUSTFLAGS reach only the target's crates, so the host's
# build scripts stay dynamic and the normal builds are left alone.
RUSTFLAGS=-Ctarget-feature=+crt-static nice -n 10 \
    cargo build --release --locked --target "$rust_target" --bin rsd
target_dir=$(cargo metadata --no-deps --format-version 1 |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="$target_dir/$rust_target/release/rsd"
# The build context for the rsd-build stage: the binary alone.
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$bin" "$ctx/rsd"
podman build --build-context rsd-build="$ctx" -t "$image" -f Containerfile .
