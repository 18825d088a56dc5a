#!/usr/bin/env python3
"""Two NBD exports on two iothreads, beside one export, rsd beside
qemu-storage-daemon, in one run.

Each daemon serves two 1 GiB raw images on tmpfs as two NBD exports,
each bound to an iothread of its own (`--object iothread,id=ioN` and the
export's `iothread=ioN`). Per repeat and daemon, fio (nbd engine) drives
first one export alone, then both at once (one fio process per export,
started together). It prints total IOPS (MiB/s for 1M rows), the
daemon's CPU time per I/O, the two-export/one-export scaling, and the
ratio rsd/QSD, as medians.

Usage: python3 bench/iothreads.py [--runtime SECS] [--repeats N] [--only LABEL] [--rsd PATH]
Needs fio. Not part of CI.
"""
import argparse, os, shutil, statistics, subprocess, sys, tempfile, threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd import cpu_seconds, ensure_tools, run_fio, wait_for  # noqa: E402

QSD = "/usr/bin/qemu-storage-daemon"
WORKLOADS = [
    ("4k randread QD32", "randread", "4k", 32),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("1M seqread QD8", "read", "1M", 8),
]


def start(binary, d, name, imgs):
    sock = f"{d}/{name}.sock"
    args = [binary]
    for i, img in enumerate(imgs):
        args += ["--object", f"iothread,id=io{i}",
                 "--blockdev", f"driver=file,node-name=f{i},filename={img}",
                 "--blockdev", f"driver=raw,node-name=d{i},file=f{i}"]
    args += ["--nbd-server", f"addr.type=unix,addr.path={sock}"]
    for i in range(len(imgs)):
        args += ["--export", f"type=nbd,id=e{i},node-name=d{i},name=d{i},writable=on,iothread=io{i}"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(sock, p)
    return p, [f"nbd+unix:///d{i}?socket={sock}" for i in range(len(imgs))]


def both(uris, rw, bs, qd, runtime):
    """fio on every URI at once; returns summed IOPS, MiB/s and I/Os."""
    out = [None] * len(uris)

    def one(i):
        out[i] = run_fio(uris[i], rw, bs, qd, runtime)
    ts = [threading.Thread(target=one, args=(i,)) for i in range(len(uris))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return tuple(sum(x[k] for x in out) for k in range(3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="")
    ap.add_argument("--rsd", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "rsd"))
    a = ap.parse_args()
    ensure_tools()
    workloads = [w for w in WORKLOADS if a.only in w[0]]
    d = tempfile.mkdtemp(prefix="rsdio", dir="/dev/shm")
    imgs = []
    for i in range(2):
        img = f"{d}/disk{i}.img"
        with open(img, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(1024):
                f.write(chunk)
        imgs.append(img)
    servers = {"rsd": os.path.abspath(a.rsd), "qsd": QSD}
    res = {}
    try:
        for _ in range(a.repeats):
            for s, binary in servers.items():
                p, uris = start(binary, d, s, imgs)
                try:
                    for (label, rw, bs, qd) in workloads:
                        for n in (1, 2):
                            c0 = cpu_seconds(p.pid)
                            iops, mibs, ios = both(uris[:n], rw, bs, qd, a.runtime)
                            cpu = cpu_seconds(p.pid) - c0
                            res.setdefault((label, s, n), []).append(
                                (iops, mibs, cpu * 1e6 / max(ios, 1)))
                finally:
                    p.terminate()
                    p.wait()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    med = lambda k, i: statistics.median(x[i] for x in res[k])
    print(f"fio nbd engine, two 1 GiB raw images on tmpfs, each export on its own iothread, "
          f"{a.repeats} repeats x {a.runtime}s, medians (IOPS, or MiB/s for 1M rows; CPU us per I/O)")
    print(f"{'workload':<18} {'exports':>7} {'rsd':>10} {'qsd':>10} {'rsd/qsd':>8} "
          f"{'cpu rsd':>8} {'qsd':>7}")
    for (label, rw, bs, qd) in workloads:
        unit = 1 if bs == "1M" else 0
        for n in (1, 2):
            r, q = med((label, "rsd", n), unit), med((label, "qsd", n), unit)
            print(f"{label:<18} {n:>7} {r:>10.0f} {q:>10.0f} {r / q:>8.2f} "
                  f"{med((label, 'rsd', n), 2):>8.1f} {med((label, 'qsd', n), 2):>7.1f}")
        for s in ("rsd", "qsd"):
            sc = med((label, s, 2), unit) / med((label, s, 1), unit)
            print(f"{'':<18} {s} two/one {sc:.2f}")


if __name__ == "__main__":
    main()
