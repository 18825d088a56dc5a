#!/usr/bin/env python3
"""Disk-filesystem benchmark: rsd and qemu-storage-daemon on the same work
on a real filesystem (default /var/tmp, ext4 on the VM's disk here), where
flushes and allocation cost what they cost, buffered and with
cache.direct=on, on fresh (allocating) and preallocated images.

Rows (fio's nbd engine, one connection, servers interleaved, medians):
- fresh 4 GiB qcow2 (fio over the whole disk): 4k random writes QD32,
  64k random writes QD32 (each allocates a cluster), 1M sequential
  writes QD8; buffered and cache.direct=on;
- preallocated 1 GiB qcow2 (preallocation=full) and raw: 4k random reads
  and writes QD32, buffered and cache.direct=on.
It prints each server's IOPS (MiB/s for 1M rows), the ratio rsd/QSD and
server CPU per I/O, then each server's preallocated qcow2/raw ratios.

Usage: python3 bench/disk.py [--dir DIR] [--runtime SECS] [--repeats N] [--only LABEL] [--rsd PATH]
Needs fio (installed here if root). Not part of CI.
"""
import argparse, os, shutil, statistics, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd import cpu_seconds, ensure_tools, run_fio, wait_for  # noqa: E402

ROWS = [
    # label, image kind, direct, rw, bs, queue depth
    ("fresh qcow2 4k randwrite", "qcow2", False, "randwrite", "4k", 32),
    ("fresh qcow2 4k randwrite direct", "qcow2", True, "randwrite", "4k", 32),
    ("fresh qcow2 64k randwrite", "qcow2", False, "randwrite", "64k", 32),
    ("fresh qcow2 64k randwrite direct", "qcow2", True, "randwrite", "64k", 32),
    ("fresh qcow2 1M seqwrite QD8", "qcow2", False, "write", "1M", 8),
    ("fresh qcow2 1M seqwrite QD8 direct", "qcow2", True, "write", "1M", 8),
    ("prealloc qcow2 4k randread", "pqcow2", False, "randread", "4k", 32),
    ("prealloc qcow2 4k randread direct", "pqcow2", True, "randread", "4k", 32),
    ("prealloc qcow2 4k randwrite", "pqcow2", False, "randwrite", "4k", 32),
    ("prealloc qcow2 4k randwrite direct", "pqcow2", True, "randwrite", "4k", 32),
    ("prealloc raw 4k randread", "raw", False, "randread", "4k", 32),
    ("prealloc raw 4k randread direct", "raw", True, "randread", "4k", 32),
    ("prealloc raw 4k randwrite", "raw", False, "randwrite", "4k", 32),
    ("prealloc raw 4k randwrite direct", "raw", True, "randwrite", "4k", 32),
]

# fio's range: the whole fresh image, 1 GiB of the preallocated ones.
SIZE = {"qcow2": "4G", "pqcow2": "1G", "raw": "1G"}


def make_image(path, kind):
    if kind == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "4G"], check=True)
    elif kind == "pqcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full",
                        path, "1G"], check=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=full",
                        path, "1G"], check=True)


def serve(binary, d, name, kind, direct, img):
    sock = f"{d}/{name}.sock"
    cache = ",cache.direct=on" if direct else ""
    kind = "qcow2" if kind == "pqcow2" else kind
    p = subprocess.Popen([binary,
                          "--blockdev", f"driver=file,node-name=f,filename={img}{cache}",
                          "--blockdev", f"driver={kind},node-name=fmt,file=f",
                          "--nbd-server", f"addr.type=unix,addr.path={sock}",
                          "--export", "type=nbd,id=e,node-name=fmt,writable=on"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(sock, p)
    return p, f"nbd+unix:///fmt?socket={os.path.abspath(sock)}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="run only the rows whose label contains this")
    ap.add_argument("--rsd", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "rsd"))
    a = ap.parse_args()
    ensure_tools()
    if not os.path.exists(a.rsd):
        subprocess.run(["cargo", "build", "--release", "--bin", "rsd"], check=True,
                       cwd=os.path.join(os.path.dirname(__file__), ".."))
    rows = [r for r in ROWS if a.only in r[0]]
    d = tempfile.mkdtemp(prefix="rsdd", dir=a.dir)
    servers = [("rsd", a.rsd), ("qsd", "qemu-storage-daemon")]
    res = {(r[0], s[0]): [] for r in rows for s in servers}
    try:
        for _ in range(a.repeats):
            for label, kind, direct, rw, bs, qd in rows:
                for name, binary in servers:
                    img = f"{d}/{name}.{kind}"
                    make_image(img, kind)
                    p, uri = serve(binary, d, name, kind, direct, img)
                    c0 = cpu_seconds(p.pid)
                    iops, mibs, ios = run_fio(uri, rw, bs, qd, a.runtime, SIZE[kind])
                    cpu = (cpu_seconds(p.pid) - c0) / max(ios, 1) * 1e6
                    p.terminate()
                    p.wait()
                    os.unlink(img)
                    res[(label, name)].append((mibs if bs == "1M" else iops, cpu))
        fs = subprocess.run(["stat", "-f", "-c", "%T", d], capture_output=True, text=True).stdout.strip()
        print(f"fio nbd engine on {a.dir} ({fs}), {a.repeats} repeats x {a.runtime}s, medians")
        print(f"{'workload':36} {'rsd':>9} {'qsd':>9} {'rsd/qsd':>8}   cpu us/io rsd   qsd")
        med = {}
        for label, kind, direct, rw, bs, qd in rows:
            r = [x[0] for x in res[(label, 'rsd')]]
            q = [x[0] for x in res[(label, 'qsd')]]
            rc = statistics.median(x[1] for x in res[(label, 'rsd')])
            qc = statistics.median(x[1] for x in res[(label, 'qsd')])
            rm, qm = statistics.median(r), statistics.median(q)
            med[label] = (rm, qm)
            if bs == "1M":
                fig = f"{rm:6.0f}MiB {qm:6.0f}MiB"
            else:
                fig = f"{rm/1000:8.1f}k {qm/1000:8.1f}k"
            print(f"{label:36} {fig} {rm/max(qm,1):8.2f}   {rc:13.1f} {qc:5.1f}")
        for label in med:
            twin = label.replace("prealloc qcow2", "prealloc raw")
            if twin != label and twin in med:
                (rq, qq), (rr, qr) = med[label], med[twin]
                print(f"qcow2/raw {label[15:]:26} rsd {rq/max(rr,1):5.2f}  qsd {qq/max(qr,1):5.2f}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
