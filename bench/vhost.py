#!/usr/bin/env python3
"""vhost-user-blk benchmark: rsd and qemu-storage-daemon serve the same
image as a vhost-user-blk export (num-queues=2), and the load generator
(bench/vhost_load.rs, built as the example vhost-bench: a frontend with
one thread per queue, memfd guest memory, split rings with event-idx)
drives it.

Rows: 4k random reads at QD1 and QD32, 4k random writes at QD32, each on
one queue and on two (QD per queue), and 1M sequential reads and writes
at QD8 on one queue. Each row runs on a 1 GiB raw image filled with
data, preallocated, on tmpfs (/dev/shm) and in --dir (default /var/tmp,
with cache.direct=on unless --buffered), servers interleaved (each
repeat runs every row on every server in turn), each server started
once per folder and repeat. It prints per-row medians: IOPS (MiB/s for
1M rows), the ratio rsd/QSD, the server CPU time per I/O (us, from
/proc/PID/stat), and each server's 2-queue/1-queue scaling.

Servers (--servers, comma-separated; default rsd,qsd):
- rsd: rsd with its default engine;
- rsd2: the binary given with --rsd2 (to compare two builds);
- qsd: qemu-storage-daemon with its default aio=threads;
- qsd-uring: qemu-storage-daemon with aio=io_uring.

Usage: python3 bench/vhost.py [--dir DIR] [--runtime SECS] [--repeats N] [--only LABEL]
                              [--servers LIST] [--rsd PATH] [--rsd2 PATH] [--loader PATH]
                              [--buffered] [--no-tmpfs] [--debug]
--debug uses debug builds (a smoke check of the script, not a measure).
Builds release binaries of rsd and vhost-bench if missing. Not part of CI.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd import wait_for  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

ROWS = [
    # label, rw, block size, depth per queue, queues
    ("4k randread QD1", "randread", 4096, 1, 1),
    ("4k randread QD32", "randread", 4096, 32, 1),
    ("4k randread QD32 2q", "randread", 4096, 32, 2),
    ("4k randwrite QD32", "randwrite", 4096, 32, 1),
    ("4k randwrite QD32 2q", "randwrite", 4096, 32, 2),
    ("1M seqread QD8", "read", 1 << 20, 8, 1),
    ("1M seqwrite QD8", "write", 1 << 20, 8, 1),
]

IMAGE_SIZE = 1 << 30

# name -> (binary key, extra file-node options)
SERVERS = {
    "rsd": ("rsd", ""),
    "rsd2": ("rsd2", ""),
    "qsd": ("qsd", ""),
    "qsd-uring": ("qsd", ",aio=io_uring"),
}


def make_image(path):
    """1 GiB of data (reads of holes would skip the I/O path in QSD)."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(IMAGE_SIZE >> 20):
            f.write(chunk)


def serve(binary, d, name, img, direct, extra):
    sock = f"{d}/{name}.sock"
    cache = ",cache.direct=on" if direct else ""
    p = subprocess.Popen([binary,
                          "--blockdev", f"driver=file,node-name=f,filename={img}{cache}{extra}",
                          "--blockdev", "driver=raw,node-name=disk,file=f",
                          "--export", "type=vhost-user-blk,id=vu,node-name=disk,writable=on,"
                                      f"num-queues=2,addr.type=unix,addr.path={sock}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(sock, p)
    return p, sock


def run_load(loader, sock, pid, rw, bs, depth, queues, runtime):
    out = subprocess.run([loader, "--socket", sock, "--pid", str(pid), "--rw", rw,
                          "--bs", str(bs), "--depth", str(depth), "--queues", str(queues),
                          "--runtime", str(runtime)],
                         capture_output=True, text=True, timeout=runtime + 60)
    if out.returncode != 0:
        sys.exit(f"vhost-bench failed on {sock}: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(debug):
    profile = [] if debug else ["--release"]
    subprocess.run(["cargo", "build"] + profile + ["--bin", "rsd", "--example", "vhost-bench"],
                   check=True, cwd=ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="run only the rows whose label contains this")
    ap.add_argument("--servers", default="rsd,qsd")
    ap.add_argument("--rsd", default="")
    ap.add_argument("--rsd2", default="")
    ap.add_argument("--loader", default="")
    ap.add_argument("--buffered", action="store_true", help="no cache.direct=on in --dir")
    ap.add_argument("--no-tmpfs", action="store_true", help="only --dir")
    ap.add_argument("--debug", action="store_true", help="debug builds (a smoke check)")
    a = ap.parse_args()
    profile = "debug" if a.debug else "release"
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    rsd = a.rsd or os.path.join(target, profile, "rsd")
    loader = a.loader or os.path.join(target, profile, "examples", "vhost-bench")
    if not (os.path.exists(rsd) and os.path.exists(loader)):
        build(a.debug)
    if not shutil.which("qemu-storage-daemon"):
        sys.exit("missing qemu-storage-daemon")
    binaries = {"rsd": os.path.abspath(rsd), "rsd2": a.rsd2 and os.path.abspath(a.rsd2),
                "qsd": "qemu-storage-daemon"}
    names = [n for n in a.servers.split(",") if n]
    for n in names:
        if n not in SERVERS or not binaries[SERVERS[n][0]]:
            sys.exit(f"unknown server {n} (or --rsd2 not given)")
    rows = [r for r in ROWS if a.only in r[0]]
    places = ([] if a.no_tmpfs else [("/dev/shm", False)]) + [(a.dir, not a.buffered)]
    for where, direct in places:
        d = tempfile.mkdtemp(prefix="rsdv", dir=where)
        img = f"{d}/disk.img"
        res = {(r[0], n): [] for r in rows for n in names}
        try:
            make_image(img)
            for _ in range(a.repeats):
                for name in names:
                    key, extra = SERVERS[name]
                    p, sock = serve(binaries[key], d, name, img, direct, extra)
                    try:
                        for label, rw, bs, depth, queues in rows:
                            r = run_load(os.path.abspath(loader), sock, p.pid, rw, bs, depth,
                                         queues, a.runtime)
                            value = r["mibs"] if bs >= 1 << 20 else r["iops"]
                            res[(label, name)].append((value, r["cpu_us_per_io"]))
                    finally:
                        p.terminate()
                        p.wait()
            fs = subprocess.run(["stat", "-f", "-c", "%T", d], capture_output=True,
                                text=True).stdout.strip()
            mode = "cache.direct=on" if direct else "buffered"
            report(f"{where} ({fs}, {mode})", rows, names, res, a)
        finally:
            shutil.rmtree(d, ignore_errors=True)


def report(place, rows, names, res, a):
    print(f"vhost-user-blk, 1 GiB raw on {place}, {a.repeats} repeats x {a.runtime}s, medians"
          f"{' (DEBUG BUILDS)' if a.debug else ''}")
    print("IOPS (k) for 4k rows, MiB/s for 1M rows; QD is per queue; ratios are "
          f"{names[0]}/<server>; CPU is the server's us per I/O")
    first, others = names[0], names[1:]
    head = f"{'workload':22}" + "".join(f" {n:>10}" for n in names)
    head += "".join(f" {first + '/' + o:>14}" for o in others)
    head += "   cpu " + " ".join(f"{n:>8}" for n in names)
    print(head)
    med = {}
    for label, _, bs, _, _ in rows:
        for n in names:
            med[(label, n)] = (statistics.median(x[0] for x in res[(label, n)]),
                               statistics.median(x[1] for x in res[(label, n)]))
        unit = (lambda v: f"{v:10.0f}") if bs >= 1 << 20 else (lambda v: f"{v / 1000:9.1f}k")
        line = f"{label:22}" + "".join(" " + unit(med[(label, n)][0]) for n in names)
        line += "".join(f" {med[(label, first)][0] / max(med[(label, o)][0], 1e-9):14.2f}"
                        for o in others)
        line += "       " + " ".join(f"{med[(label, n)][1]:8.1f}" for n in names)
        print(line)
    for label, *_ in rows:
        two = label + " 2q"
        if two not in [r[0] for r in rows]:
            continue
        scaling = "  ".join(f"{n} {med[(two, n)][0] / max(med[(label, n)][0], 1e-9):5.2f}"
                            for n in names)
        print(f"2q/1q {label:20} {scaling}")
    print()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
