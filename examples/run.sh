#!/usr/bin/env bash
# Starts rsd on a ready-made example: a 64 MiB raw image exported over NBD
# at rsd-example/nbd.sock (export "disk", writable), a QMP monitor at
# rsd-example/qmp.sock and a secret object. Try:
#   qemu-img info 'nbd+unix:///disk?socket=rsd-example/nbd.sock'
#   qemu-io -f raw -c 'write -P 0xab 0 1M' 'nbd+unix:///disk?socket=rsd-example/nbd.sock'
# Stop it with Ctrl-C or the QMP command quit.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${RSD_DIR:-$here/rsd-example}
mkdir -p "$dir"
bin=${RSD_BIN:-}
if [ -z "$bin" ]; then
    if [ ! -x "$here/target/release/rsd" ]; then
        echo "rsd: building the release binary (cargo build --release); the first build takes a few minutes" >&2
    fi
    (cd "$here" && cargo build --release --bin rsd)
    bin=$here/target/release/rsd
fi
[ -e "$dir/disk.img" ] || truncate -s 64M "$dir/disk.img"
echo "rsd: NBD export 'disk' on $dir/nbd.sock, QMP on $dir/qmp.sock (pidfile $dir/rsd.pid)" >&2
exec "$bin" \
    --chardev "socket,path=$dir/qmp.sock,server=on,wait=off,id=qmp0" \
    --monitor chardev=qmp0 \
    --object secret,id=sec0,data=example \
    --blockdev "driver=file,node-name=file0,filename=$dir/disk.img" \
    --blockdev driver=raw,node-name=disk,file=file0 \
    --nbd-server "addr.type=unix,addr.path=$dir/nbd.sock" \
    --export type=nbd,id=export0,node-name=disk,writable=on \
    --pidfile "$dir/rsd.pid"
