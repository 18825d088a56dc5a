#!/usr/bin/env bash
# Builds the kit the real-guest test boots (tests/vhost_guest.rs): QEMU's
# x86 system emulator, SeaBIOS, a Debian cloud kernel and busybox, each
# unpacked from Debian's packages into a private folder, and an
# initramfs whose /init is tests/guest/init.
#
# qemu-system-x86 is never installed: bookworm's packages would replace
# the newer qemu-utils that carries qemu-storage-daemon. Only the shared
# libraries the emulator lacks are installed (apt-get, as root).
#
# Idempotent: once the kit matches this script and the init, it only
# prints the kit's folder. The last line on stdout is the kit's folder.
# Exit status 3 means the packages could not be downloaded (no network).
#
# Usage: bash tests/guest/fetch.sh [KIT_DIR]   (default $RSD_GUEST_DIR,
# else /var/tmp/rsd-guest)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kit=${1:-${RSD_GUEST_DIR:-/var/tmp/rsd-guest}}
mkdir -p "$kit"
kit=$(cd "$kit" && pwd)

stamp=$(cat "$0" "$here/init" | sha256sum | cut -d' ' -f1)
# Done when the kit is this script's and QEMU still finds its libraries.
ready() {
    [ "$(cat "$kit/ready" 2>/dev/null)" = "$stamp" ] && "$kit/qemu" -version >/dev/null 2>&1
}
if ready; then
    echo "$kit"
    exit 0
fi

# One builder at a time (tests in several worktrees share the kit).
exec 9>"$kit/lock"
flock 9
if ready; then
    echo "$kit"
    exit 0
fi
rm -f "$kit/ready"

say() { echo "guest kit: $*" >&2; }

# The packages, downloaded once.
debs="$kit/debs"
mkdir -p "$debs"
kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }'
}
download() {
    local kernel
    kernel=$(kernel_pkg)
    [ -n "$kernel" ] || return 1
    (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root \
        qemu-system-x86 qemu-system-common qemu-system-data seabios busybox-static "$kernel" >&2)
}
if ! ls "$debs"/linux-image-*.deb >/dev/null 2>&1 || ! ls "$debs"/busybox-static_*.deb >/dev/null 2>&1 \
    || ! ls "$debs"/qemu-system-x86_*.deb >/dev/null 2>&1; then
    rm -f "$debs"/*.deb
    if ! download; then
        # Package lists may be missing or stale on a fresh machine.
        if [ "$(id -u)" = 0 ]; then
            say "apt-get update, then retrying the download"
            apt-get update -qq >&2 || true
        fi
        if ! download; then
            say "cannot download the guest's packages (no network or no package lists?)"
            exit 3
        fi
    fi
fi

root="$kit/root"
rm -rf "$root"
mkdir -p "$root"
for deb in "$debs"/*.deb; do
    dpkg -x "$deb" "$root"
done

# The emulator's libraries: install the ones its package depends on
# that are missing (libraries only; QEMU's own packages stay unpacked).
qemu="$root/usr/bin/qemu-system-x86_64"
missing=""
for dep in $(dpkg-deb -f "$debs"/qemu-system-x86_*.deb Depends | tr ',' '\n' \
    | sed 's/([^)]*)//; s/|.*//; s/ //g' | grep '^lib'); do
    if ! dpkg-query -W -f='${Status}' "$dep" 2>/dev/null | grep -q 'install ok installed'; then
        missing="$missing $dep"
    fi
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        say "missing libraries for QEMU (run as root to install them):$missing"
        exit 1
    fi
    say "installing$missing"
    # shellcheck disable=SC2086
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2; then
        apt-get update -qq >&2 || true
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2 || exit 3
    fi
fi
if ldd "$qemu" | grep -q 'not found'; then
    say "QEMU still lacks libraries:"
    ldd "$qemu" | grep 'not found' >&2
    exit 1
fi

# The kernel and the initramfs.
vmlinuz=$(ls "$root"/boot/vmlinuz-* | head -n1)
moddir=$(ls -d "$root"/lib/modules/* | head -n1)
ln -sf "$vmlinuz" "$kit/vmlinuz"
ird="$kit/initramfs"
rm -rf "$ird"
mkdir -p "$ird/bin" "$ird/lib/modules" "$ird/dev" "$ird/proc" "$ird/sys" "$ird/tmp"
cp "$root/bin/busybox" "$ird/bin/busybox"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    f=$(find "$moddir" -name "$m.ko*" | head -n1)
    [ -n "$f" ] || { say "no module $m in $moddir"; exit 1; }
    case "$f" in
    *.ko.xz) xz -dc "$f" >"$ird/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$ird/lib/modules/$m.ko" ;;
    *) cp "$f" "$ird/lib/modules/$m.ko" ;;
    esac
done
cp "$here/init" "$ird/init"
chmod 755 "$ird/init" "$ird/bin/busybox"
# busybox's own cpio writes the newc archive (no host cpio needed).
(cd "$ird" && find . | sort | "$root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1) >"$kit/initrd.img.tmp"
mv "$kit/initrd.img.tmp" "$kit/initrd.img"

# A wrapper that finds TCG (a module in Debian) and the firmware.
cat >"$kit/qemu" <<WRAP
#!/bin/sh
export QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu"
exec "$qemu" -L "$root/usr/share/seabios" -L "$root/usr/share/qemu" "\$@"
WRAP
chmod 755 "$kit/qemu"
"$kit/qemu" -version >/dev/null

echo "$stamp" >"$kit/ready"
say "ready in $kit"
echo "$kit"
