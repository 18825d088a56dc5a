#!/usr/bin/env python3
"""Writes the hand-built seeds of fuzz/corpus: vhost-user-blk queues
(no client program to record them from) and an NBD session with
extended headers (which the recorded clients do not speak).
Run from the repository's top directory."""
import struct

# ---- vhost_user: [queue size selector, options, inflight?, memory] ----
SIZE_SEL = 4  # 16 descriptors
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000
HDRS, STATUS = 0x3000, 0x5000
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


def vhost(opts, inflight=None, broken=False):
    mem = bytearray(0x8100)
    descs = []
    heads = []

    def chain(parts):
        heads.append(len(descs))
        for i, (addr, ln, flags) in enumerate(parts):
            last = i == len(parts) - 1
            descs.append((addr, ln, flags | (0 if last else F_NEXT), len(descs) + 1))

    def hdr(i, kind, sector):
        struct.pack_into("<IIQ", mem, HDRS + 16 * i, kind, 0, sector)
        return (HDRS + 16 * i, 16, 0)

    chain([hdr(0, 0, 0), (0x4000, 4096, F_WRITE), (STATUS, 1, F_WRITE)])   # read
    chain([hdr(1, 1, 8), (0x6000, 1024, 0), (STATUS + 1, 1, F_WRITE)])     # write
    chain([hdr(2, 4, 0), (STATUS + 2, 1, F_WRITE)])                        # flush
    chain([hdr(3, 8, 0), (0x7000, 20, F_WRITE), (STATUS + 3, 1, F_WRITE)])  # get id
    struct.pack_into("<QII", mem, 0x7100, 16, 8, 0)
    chain([hdr(4, 11, 0), (0x7100, 16, 0), (STATUS + 4, 1, F_WRITE)])      # discard
    struct.pack_into("<QII", mem, 0x7110, 32, 8, 1)
    chain([hdr(5, 13, 0), (0x7110, 16, 0), (STATUS + 5, 1, F_WRITE)])      # write zeroes
    # An indirect table holding a read of 512 bytes.
    ind = [(HDRS + 0x60, 16, F_NEXT, 1), (0x4000, 512, F_WRITE | F_NEXT, 2), (STATUS + 6, 1, F_WRITE, 0)]
    struct.pack_into("<IIQ", mem, HDRS + 0x60, 0, 0, 1)
    for i, d in enumerate(ind):
        struct.pack_into("<QIHH", mem, 0x8000 + 16 * i, *d)
    heads.append(len(descs))
    descs.append((0x8000, 48, F_INDIRECT, 0))
    if broken:
        # A chain that loops on itself and a header split over regions.
        heads.append(len(descs))
        descs.append((0xfff8, 16, F_NEXT, len(descs)))
    for i, (addr, ln, flags, nxt) in enumerate(descs):
        struct.pack_into("<QIHH", mem, DESC + 16 * i, addr, ln, flags, nxt)
    struct.pack_into("<HH", mem, AVAIL, 0, len(heads))
    for i, h in enumerate(heads):
        struct.pack_into("<H", mem, AVAIL + 4 + 2 * i, h)
    return bytes([SIZE_SEL, opts]) + (inflight or b"") + bytes(mem)


def inflight_region():
    # Version 1, 16 descriptors, last batch head 0, used index 0; the
    # read (head 0) taken and not completed.
    stride = ((16 + 16 * 16 + 63) // 64) * 64
    r = bytearray(stride)
    struct.pack_into("<QHHHH", r, 0, 0, 1, 16, 0, 0)
    struct.pack_into("<B5xHQ", r, 16, 1, 0, 0)
    return bytes(r)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


write("fuzz/corpus/vhost_user/requests", vhost(0))
write("fuzz/corpus/vhost_user/event-idx", vhost(1))
write("fuzz/corpus/vhost_user/inflight", vhost(2, inflight_region()))
write("fuzz/corpus/vhost_user/read-only-4k", vhost(4 | 8 | 16))
write("fuzz/corpus/vhost_user/broken-chains", vhost(0, broken=True))

# ---- nbd: extended headers, meta contexts, every command ----
IHAVEOPT = 0x49484156454F5054


def opt(n, data=b""):
    return struct.pack(">QII", IHAVEOPT, n, len(data)) + data


def s32(b):
    return struct.pack(">I", len(b)) + b


def req(flags, kind, cookie, off, ln, payload=b""):
    return struct.pack(">IHHQQQ", 0x21E41C71, flags, kind, cookie, off, ln) + payload


nbd = struct.pack(">I", 3)
nbd += opt(11)
nbd += opt(10, s32(b"e") + struct.pack(">I", 2) + s32(b"base:allocation") + s32(b"qemu:allocation-depth"))
nbd += opt(7, s32(b"e") + struct.pack(">HH", 1, 3))
nbd += req(0, 1, 1, 0, 512, b"\x5a" * 512)
nbd += req(4, 0, 2, 0, 4096)
nbd += req(1 << 5, 7, 3, 0, 12, struct.pack(">QI", 1 << 20, 1))
nbd += req(8, 7, 4, 0, 1 << 20)
nbd += req(1, 4, 5, 4096, 4096)
nbd += req(2 | 16, 6, 6, 8192, 4096)
nbd += req(0, 5, 7, 0, 65536)
nbd += req(0, 3, 8, 0, 0)
nbd += req(0, 2, 9, 0, 0)
write("fuzz/corpus/nbd/extended-headers", nbd)
