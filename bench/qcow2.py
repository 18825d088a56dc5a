#!/usr/bin/env python3
"""qcow2 benchmark: rsd and qemu-storage-daemon, each serving the same data
as raw and as qcow2, over NBD on UNIX sockets, driven by fio's nbd engine.

Rows 1-4 use a fully allocated 1 GiB image (qemu-img convert of random
data): 4k random read and overwrite at QD32, 1M sequential read and
write at QD8. The last row writes a fresh, empty qcow2 image with 64k
random writes at QD32, each allocating a new cluster (no time limit:
the whole image once). Servers are interleaved, repeats give medians.

It prints, per row, each server's median and the ratios
rsd-qcow2/rsd-raw (the target: at least 0.9), qsd-qcow2/qsd-raw and
rsd-qcow2/qsd-qcow2.

Usage: python3 bench/qcow2.py [--runtime SECS] [--repeats N] [--rsd PATH]
Needs fio (apt-get install -y fio; done here if root). Not part of CI.
"""
import argparse, os, shutil, statistics, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd import cpu_seconds, run_fio, wait_for  # noqa: E402

ROWS = [
    ("4k randread QD32", "randread", "4k", 32),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("1M seqread QD8", "read", "1M", 8),
    ("1M seqwrite QD8", "write", "1M", 8),
]


def start(binary, d, name, fmt, img):
    sock = f"{d}/{name}.sock"
    p = subprocess.Popen([binary,
                          "--blockdev", f"driver=file,node-name=f,filename={img}",
                          "--blockdev", f"driver={fmt},node-name=fmt,file=f",
                          "--nbd-server", f"addr.type=unix,addr.path={sock}",
                          "--export", "type=nbd,id=e,node-name=fmt,writable=on"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(sock, p)
    return p, f"nbd+unix:///fmt?socket={sock}"


def fio_once(uri, rw, bs, qd, size):
    out = subprocess.run(["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
                          f"--bs={bs}", f"--iodepth={qd}", f"--size={size}", "--output-format=json"],
                         capture_output=True, text=True, check=True).stdout
    import json
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["write"]["iops"], job["write"]["bw_bytes"] / (1 << 20), job["write"]["total_ios"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rsd", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "rsd"))
    a = ap.parse_args()
    if not shutil.which("fio") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", "fio"], env=env, check=True)
    if not os.path.exists(a.rsd):
        subprocess.run(["cargo", "build", "--release", "--bin", "rsd"], check=True,
                       cwd=os.path.join(os.path.dirname(__file__), ".."))
    rsd = os.path.abspath(a.rsd)
    d = tempfile.mkdtemp(prefix="rsdq", dir="/dev/shm")
    raw = f"{d}/disk.raw"
    with open(raw, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(chunk)
    for who in ("rsd", "qsd"):
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, f"{d}/{who}.qcow2"], check=True)
    servers = {}
    try:
        servers["rsd-raw"] = start(rsd, d, "rsd-raw", "raw", raw)
        servers["rsd-qcow2"] = start(rsd, d, "rsd-qcow2", "qcow2", f"{d}/rsd.qcow2")
        servers["qsd-raw"] = start("qemu-storage-daemon", d, "qsd-raw", "raw", raw)
        servers["qsd-qcow2"] = start("qemu-storage-daemon", d, "qsd-qcow2", "qcow2", f"{d}/qsd.qcow2")
        res = {(r[0], s): [] for r in ROWS for s in servers}
        for _ in range(a.repeats):
            for (label, rw, bs, qd) in ROWS:
                for s, (p, uri) in servers.items():
                    c0 = cpu_seconds(p.pid)
                    iops, mibs, ios = run_fio(uri, rw, bs, qd, a.runtime)
                    res[(label, s)].append((iops, mibs, (cpu_seconds(p.pid) - c0) * 1e6 / max(ios, 1)))
    finally:
        for p, _ in servers.values():
            p.terminate()
            p.wait()
    # Allocating writes on fresh images, one server at a time.
    alloc = {"rsd-qcow2": [], "qsd-qcow2": []}
    for _ in range(a.repeats):
        for s, binary in (("rsd-qcow2", rsd), ("qsd-qcow2", "qemu-storage-daemon")):
            img = f"{d}/fresh.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1G"], check=True)
            p, uri = start(binary, d, "fresh", "qcow2", img)
            try:
                c0 = cpu_seconds(p.pid)
                iops, mibs, ios = fio_once(uri, "randwrite", "64k", 32, "1G")
                alloc[s].append((iops, mibs, (cpu_seconds(p.pid) - c0) * 1e6 / max(ios, 1)))
            finally:
                p.terminate()
                p.wait()
            os.unlink(img)
    shutil.rmtree(d, ignore_errors=True)
    print(f"fio nbd engine, 1 GiB on tmpfs, UNIX sockets, {a.repeats} repeats x {a.runtime}s, medians")
    print(f"{'workload':<24} {'rsd-raw':>11} {'rsd-qcow2':>11} {'qsd-raw':>11} {'qsd-qcow2':>11}"
          f" {'rsd q/raw':>9} {'qsd q/raw':>9} {'rsd/qsd q':>9}   cpu us/io rsd-q qsd-q")
    for (label, rw, bs, qd) in ROWS:
        big = bs != "4k"
        med = {s: statistics.median(r[1] if big else r[0] for r in res[(label, s)]) for s in servers}
        cpu = {s: statistics.median(r[2] for r in res[(label, s)]) for s in servers}
        fmt = (lambda v: f"{v:.0f} MiB/s") if big else (lambda v: f"{v / 1000:.1f}k")
        print(f"{label:<24} " + " ".join(f"{fmt(med[s]):>11}" for s in servers) +
              f" {med['rsd-qcow2'] / med['rsd-raw']:>9.2f} {med['qsd-qcow2'] / med['qsd-raw']:>9.2f}"
              f" {med['rsd-qcow2'] / med['qsd-qcow2']:>9.2f}   {cpu['rsd-qcow2']:>11.1f} {cpu['qsd-qcow2']:>5.1f}")
    m = {s: statistics.median(r[0] for r in v) for s, v in alloc.items()}
    c = {s: statistics.median(r[2] for r in v) for s, v in alloc.items()}
    print(f"{'64k randwrite QD32 alloc':<24} {'':>11} {m['rsd-qcow2'] / 1000:>10.1f}k {'':>11}"
          f" {m['qsd-qcow2'] / 1000:>10.1f}k {'':>9} {'':>9} {m['rsd-qcow2'] / m['qsd-qcow2']:>9.2f}"
          f"   {c['rsd-qcow2']:>11.1f} {c['qsd-qcow2']:>5.1f}")


if __name__ == "__main__":
    main()
