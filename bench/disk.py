#!/usr/bin/env python3
"""Disk-filesystem benchmark: rsd and qemu-storage-daemon on the same work
on a real filesystem (default /var/tmp, ext4 on the VM's disk here), where
flushes and allocation cost what they cost, buffered and with
cache.direct=on, on fresh (allocating) and preallocated images.

Rows (fio's nbd engine, one connection, servers interleaved, medians):
- fresh 4 GiB qcow2 (fio over the whole disk): 4k random writes QD32,
  64k random writes QD32 (each allocates a cluster), 1M sequential
  writes QD8; buffered and cache.direct=on;
- preallocated 1 GiB qcow2 (preallocation=full): 4k random reads and
  writes QD32, buffered and cache.direct=on;
- preallocated raw, 4k random reads and writes QD32 and 1M sequential
  reads and writes QD8, buffered and cache.direct=on.
It prints each server's IOPS (MiB/s for 1M rows), the ratios of rsd to
each other server and server CPU per I/O, then each server's
preallocated qcow2/raw ratios.

Servers (--servers, comma-separated; default rsd,qsd-uring,qsd):
- rsd: rsd with its default engine (the thread pool, as aio=threads);
- rsd-threads: rsd with aio=threads (its blocking pool);
- rsd-uring: rsd with aio=io_uring;
- rsd2: the binary given with --rsd2 (to compare two builds);
- qsd: qemu-storage-daemon with its default aio=threads;
- qsd-uring: qemu-storage-daemon with aio=io_uring.

Usage: python3 bench/disk.py [--dir DIR] [--runtime SECS] [--repeats N] [--only LABEL]
                             [--servers LIST] [--rsd PATH] [--rsd2 PATH]
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
    ("prealloc raw 1M seqread QD8", "raw", False, "read", "1M", 8),
    ("prealloc raw 1M seqread QD8 direct", "raw", True, "read", "1M", 8),
    ("prealloc raw 1M seqwrite QD8", "raw", False, "write", "1M", 8),
    ("prealloc raw 1M seqwrite QD8 direct", "raw", True, "write", "1M", 8),
]

# fio's range: the whole fresh image, 1 GiB of the preallocated ones.
SIZE = {"qcow2": "4G", "pqcow2": "1G", "raw": "1G"}

# name -> (binary option, extra file-node options)
SERVERS = {
    "rsd": ("rsd", ""),
    "rsd-threads": ("rsd", ",aio=threads"),
    "rsd-uring": ("rsd", ",aio=io_uring"),
    "rsd2": ("rsd2", ""),
    "qsd": ("qsd", ""),
    "qsd-uring": ("qsd", ",aio=io_uring"),
}


def make_image(path, kind):
    if kind == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "4G"], check=True)
    elif kind == "pqcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full",
                        path, "1G"], check=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=full",
                        path, "1G"], check=True)


def serve(binary, d, name, kind, direct, img, extra):
    sock = f"{d}/{name}.sock"
    kind = "qcow2" if kind == "pqcow2" else kind
    cache = ",cache.direct=on" if direct else ""
    p = subprocess.Popen([binary,
                          "--blockdev", f"driver=file,node-name=f,filename={img}{cache}{extra}",
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
    ap.add_argument("--servers", default="rsd,qsd-uring,qsd")
    ap.add_argument("--rsd", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "rsd"))
    ap.add_argument("--rsd2", default="")
    a = ap.parse_args()
    ensure_tools()
    if not os.path.exists(a.rsd):
        subprocess.run(["cargo", "build", "--release", "--bin", "rsd"], check=True,
                       cwd=os.path.join(os.path.dirname(__file__), ".."))
    rows = [r for r in ROWS if a.only in r[0]]
    d = tempfile.mkdtemp(prefix="rsdd", dir=a.dir)
    binaries = {"rsd": os.path.abspath(a.rsd), "rsd2": a.rsd2 and os.path.abspath(a.rsd2),
                "qsd": "qemu-storage-daemon"}
    names = [n for n in a.servers.split(",") if n]
    for n in names:
        if n not in SERVERS or not binaries[SERVERS[n][0]]:
            sys.exit(f"unknown server {n} (or --rsd2 not given)")
    servers = [(n, binaries[SERVERS[n][0]], SERVERS[n][1]) for n in names]
    res = {(r[0], s[0]): [] for r in rows for s in servers}
    try:
        for _ in range(a.repeats):
            for label, kind, direct, rw, bs, qd in rows:
                for name, binary, extra in servers:
                    img = f"{d}/{name}.{kind}"
                    make_image(img, kind)
                    p, uri = serve(binary, d, name, kind, direct, img, extra)
                    c0 = cpu_seconds(p.pid)
                    iops, mibs, ios = run_fio(uri, rw, bs, qd, a.runtime, SIZE[kind])
                    cpu = (cpu_seconds(p.pid) - c0) / max(ios, 1) * 1e6
                    p.terminate()
                    p.wait()
                    os.unlink(img)
                    res[(label, name)].append((mibs if bs == "1M" else iops, cpu))
        fs = subprocess.run(["stat", "-f", "-c", "%T", d], capture_output=True, text=True).stdout.strip()
        print(f"fio nbd engine on {a.dir} ({fs}), {a.repeats} repeats x {a.runtime}s, medians")
        print("IOPS (k) for 4k/64k rows, MiB/s for 1M rows; ratios are rsd/<server>;"
              " CPU is the server's us per I/O")
        first = names[0]
        others = names[1:]
        head = f"{'workload':36}" + "".join(f" {n:>10}" for n in names)
        head += "".join(f" {first + '/' + o:>16}" for o in others)
        head += "   cpu " + " ".join(f"{n:>8}" for n in names)
        print(head)
        for label, _, _, _, bs, _ in rows:
            med = {n: statistics.median(x[0] for x in res[(label, n)]) for n in names}
            cpu = {n: statistics.median(x[1] for x in res[(label, n)]) for n in names}
            unit = (lambda v: f"{v:10.0f}") if bs == "1M" else (lambda v: f"{v/1000:9.1f}k")
            line = f"{label:36}" + "".join(" " + unit(med[n]) for n in names)
            line += "".join(f" {med[first]/max(med[o], 1e-9):16.2f}" for o in others)
            line += "       " + " ".join(f"{cpu[n]:8.1f}" for n in names)
            print(line)
            sys.stdout.flush()
        for label, *_ in rows:
            twin = label.replace("prealloc qcow2", "prealloc raw")
            if twin == label or twin not in [r[0] for r in rows]:
                continue
            ratios = []
            for n in names:
                q = statistics.median(x[0] for x in res[(label, n)])
                r = statistics.median(x[0] for x in res[(twin, n)])
                ratios.append(f"{n} {q / max(r, 1e-9):5.2f}")
            print(f"qcow2/raw {label[15:]:26} " + "  ".join(ratios))
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
