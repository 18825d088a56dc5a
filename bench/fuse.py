#!/usr/bin/env python3
"""FUSE export benchmark: rsd and qemu-storage-daemon export the same
preallocated 1 GiB raw image through FUSE, and fio runs on the mounted
file (psync at QD1, libaio at QD32, O_DIRECT for the 4k rows), servers
interleaved, medians; on tmpfs (/dev/shm) and a disk filesystem
(/var/tmp). It prints IOPS (MiB/s for 1M rows), rsd/QSD, and the
servers' CPU per I/O.

Usage: python3 bench/fuse.py [--runtime SECS] [--repeats N] [--only LABEL] [--rsd PATH]
Needs fio (installed here if root) and /dev/fuse. Not part of CI.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd import cpu_seconds  # noqa: E402

ROWS = [
    # label, rw, bs, engine, depth, direct
    ("4k randread QD1 psync direct", "randread", "4k", "psync", 1, 1),
    ("4k randwrite QD1 psync direct", "randwrite", "4k", "psync", 1, 1),
    ("4k randread QD32 libaio direct", "randread", "4k", "libaio", 32, 1),
    ("4k randwrite QD32 libaio direct", "randwrite", "4k", "libaio", 32, 1),
    ("1M seqread QD8 libaio", "read", "1M", "libaio", 8, 0),
    ("1M seqwrite QD8 libaio", "write", "1M", "libaio", 8, 0),
]


def mounted(path):
    with open("/proc/self/mounts") as f:
        return any(l.split(" ")[1] == path for l in f)


def serve(binary, d, name, img):
    mp = os.path.join(d, f"{name}.mnt")
    open(mp, "w").close()
    p = subprocess.Popen([binary,
                          "--blockdev", f"driver=file,node-name=f,filename={img}",
                          "--blockdev", "driver=raw,node-name=r,file=f",
                          "--export", f"type=fuse,id=e,node-name=r,mountpoint={mp},writable=on"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):
        if mounted(mp):
            return p, mp
        if p.poll() is not None:
            sys.exit(f"{binary} exited")
        time.sleep(0.01)
    sys.exit(f"{binary}: no mount")


def fio(path, rw, bs, engine, depth, direct, runtime):
    out = subprocess.run(["fio", "--name=f", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
                          f"--ioengine={engine}", f"--iodepth={depth}", f"--direct={direct}",
                          f"--runtime={runtime}", "--time_based", "--size=1G",
                          "--output-format=json"],
                         capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return side["iops"], side["bw_bytes"] / (1 << 20), side["total_ios"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="")
    ap.add_argument("--rsd", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "rsd"))
    a = ap.parse_args()
    if subprocess.run(["which", "fio"], capture_output=True).returncode != 0 and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "fio"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if not os.path.exists(a.rsd):
        subprocess.run(["cargo", "build", "--release", "--bin", "rsd"], check=True,
                       cwd=os.path.join(os.path.dirname(__file__), ".."))
    servers = [("rsd", os.path.abspath(a.rsd)), ("qsd", "qemu-storage-daemon")]
    rows = [r for r in ROWS if a.only in r[0]]
    print(f"fio on the FUSE-mounted file of a 1 GiB raw image, {a.repeats} x {a.runtime} s, medians")
    print(f"{'filesystem':<8}{'workload':<34}{'rsd':>9}{'qsd':>9}{'rsd/qsd':>9}{'cpu rsd':>9}{'qsd':>7}")
    for fs, base in (("tmpfs", "/dev/shm"), ("disk", "/var/tmp")):
        d = tempfile.mkdtemp(prefix="rsd-fuse-", dir=base)
        img = os.path.join(d, "disk.raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=full", img, "1G"],
                       check=True)
        res = {(r[0], s): [] for r in rows for s, _ in servers}
        try:
            for _ in range(a.repeats):
                for label, rw, bs, engine, depth, direct in rows:
                    for name, binary in servers:
                        p, mp = serve(binary, d, name, img)
                        c0 = cpu_seconds(p.pid)
                        iops, mibs, ios = fio(mp, rw, bs, engine, depth, direct, a.runtime)
                        cpu = (cpu_seconds(p.pid) - c0) / max(ios, 1) * 1e6
                        p.terminate()
                        p.wait()
                        res[(label, name)].append((mibs if bs == "1M" else iops, cpu))
        finally:
            subprocess.run(["rm", "-rf", d])
        for label, *_ in rows:
            med = {n: statistics.median(x[0] for x in res[(label, n)]) for n, _ in servers}
            cpu = {n: statistics.median(x[1] for x in res[(label, n)]) for n, _ in servers}
            unit = (lambda v: f"{v:.0f}") if "1M" in label else (lambda v: f"{v / 1000:.1f}k")
            print(f"{fs:<8}{label:<34}{unit(med['rsd']):>9}{unit(med['qsd']):>9}"
                  f"{med['rsd'] / med['qsd']:>9.2f}{cpu['rsd']:>9.1f}{cpu['qsd']:>7.1f}")


if __name__ == "__main__":
    main()
