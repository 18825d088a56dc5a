#!/bin/bash
# RSS (MiB) of rsd and of qemu-storage-daemon serving one NBD export:
# idle, right after 8 fio clients of mixed 4 KiB-4 MiB I/O leave, and
# 1, 3, 7, 15 and 30 s later. Shows whether memory a burst used goes back.
# usage: bench/idle_rss.sh [RSD_BINARY]   (needs fio with its nbd engine)
rsd=${1:-$(dirname "$0")/../target/release/rsd}
for bin in "$rsd" qemu-storage-daemon; do
    d=$(mktemp -d /dev/shm/rss.XXXX)
    truncate -s 1G "$d/img"
    "$bin" --blockdev "driver=file,node-name=disk,filename=$d/img" \
        --blockdev driver=raw,node-name=fmt,file=disk \
        --nbd-server "addr.type=unix,addr.path=$d/s" \
        --export type=nbd,id=e,node-name=fmt,writable=on >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 200); do [ -S "$d/s" ] && break; sleep 0.05; done
    rss() { awk '/VmRSS/{printf " %d", $2/1024}' "/proc/$pid/status"; }
    printf '%-22s idle' "$(basename "$bin")"; rss
    fio --name=b --ioengine=nbd --uri="nbd+unix:///fmt?socket=$d/s" --rw=randrw \
        --bsrange=4k-4m --iodepth=16 --numjobs=8 --runtime=4 --time_based \
        --size=1G >/dev/null 2>&1
    printf ' | after'; rss
    for t in 1 2 4 8 15; do sleep $t; rss; done
    echo
    kill $pid; wait $pid 2>/dev/null; rm -rf "$d"
done
