#!/usr/bin/env python3
"""NBD server benchmark: rsd vs qemu-storage-daemon vs nbdkit (file plugin).

All three serve the same 1 GiB raw image on tmpfs over UNIX sockets; fio's
nbd engine drives them, interleaved (each repeat runs every workload on
every server in turn), and the script prints per-row medians: IOPS or
MiB/s, the server's CPU time per I/O, and the ratios rsd/QSD and
rsd/nbdkit.

Usage: python3 bench/nbd.py [--runtime SECS] [--repeats N] [--only LABEL] [--rsd PATH]
Needs fio and nbdkit: apt-get install -y fio nbdkit (done here if root).
Not part of CI.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

WORKLOADS = [
    ("4k randread QD1", "randread", "4k", 1),
    ("4k randread QD32", "randread", "4k", 32),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("64k seqread QD8", "read", "64k", 8),
    ("1M seqread QD8", "read", "1M", 8),
    ("1M seqwrite QD8", "write", "1M", 8),
]


def ensure_tools():
    missing = [t for t in ("fio", "nbdkit") if not shutil.which(t)]
    if missing and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq"] + missing, env=env, check=True)
    for t in ("fio", "nbdkit", "qemu-storage-daemon"):
        if not shutil.which(t):
            sys.exit(f"missing {t}")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def wait_for(path, proc):
    for _ in range(500):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.args}")
        time.sleep(0.01)
    sys.exit(f"no socket {path}")


def start_servers(d, img, rsd):
    servers = {}
    for name, binary in (("rsd", rsd), ("qsd", "qemu-storage-daemon")):
        sock = f"{d}/{name}.sock"
        p = subprocess.Popen([binary,
                              "--blockdev", f"driver=file,node-name=disk,filename={img}",
                              "--blockdev", "driver=raw,node-name=fmt,file=disk",
                              "--nbd-server", f"addr.type=unix,addr.path={sock}",
                              "--export", "type=nbd,id=e,node-name=fmt,writable=on"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(sock, p)
        servers[name] = (p, f"nbd+unix:///fmt?socket={sock}")
    sock = f"{d}/nbdkit.sock"
    p = subprocess.Popen(["nbdkit", "--foreground", "--unix", sock, "file", img],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(sock, p)
    servers["nbdkit"] = (p, f"nbd+unix:///?socket={sock}")
    return servers


def run_fio(uri, rw, bs, qd, runtime, size="1G"):
    out = subprocess.run(["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
                          f"--bs={bs}", f"--iodepth={qd}", f"--runtime={runtime}", "--time_based",
                          f"--size={size}", "--output-format=json"],
                         capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return side["iops"], side["bw_bytes"] / (1 << 20), side["total_ios"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="run only the rows whose label contains this")
    ap.add_argument("--rsd", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "rsd"))
    a = ap.parse_args()
    workloads = [w for w in WORKLOADS if a.only in w[0]]
    ensure_tools()
    if not os.path.exists(a.rsd):
        subprocess.run(["cargo", "build", "--release", "--bin", "rsd"], check=True,
                       cwd=os.path.join(os.path.dirname(__file__), ".."))
    d = tempfile.mkdtemp(prefix="rsdb", dir="/dev/shm")
    img = f"{d}/disk.img"
    with open(img, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(chunk)
    servers = start_servers(d, img, os.path.abspath(a.rsd))
    res = {(w[0], s): [] for w in workloads for s in servers}
    try:
        for _ in range(a.repeats):
            for (label, rw, bs, qd) in workloads:
                for s, (p, uri) in servers.items():
                    c0 = cpu_seconds(p.pid)
                    iops, mibs, ios = run_fio(uri, rw, bs, qd, a.runtime)
                    cpu = cpu_seconds(p.pid) - c0
                    res[(label, s)].append((iops, mibs, cpu * 1e6 / max(ios, 1)))
    finally:
        for p, _ in servers.values():
            p.terminate()
        shutil.rmtree(d, ignore_errors=True)
    print(f"fio nbd engine, 1 GiB raw on tmpfs, UNIX sockets, {a.repeats} repeats x {a.runtime}s, medians")
    print(f"{'workload':<18} {'rsd':>12} {'qsd':>12} {'nbdkit':>12} {'rsd/qsd':>8} {'rsd/nbdkit':>10}   "
          f"{'cpu us/io rsd':>13} {'qsd':>6} {'nbdkit':>7}")
    for (label, rw, bs, qd) in workloads:
        big = bs != "4k"
        med = {}
        for s in servers:
            rows = res[(label, s)]
            med[s] = (statistics.median(r[1] if big else r[0] for r in rows),
                      statistics.median(r[2] for r in rows))
        unit = "MiB/s" if big else "IOPS"
        fmt = lambda v: f"{v:.0f} {unit}" if big else f"{v / 1000:.1f}k"
        print(f"{label:<18} {fmt(med['rsd'][0]):>12} {fmt(med['qsd'][0]):>12} {fmt(med['nbdkit'][0]):>12} "
              f"{med['rsd'][0] / med['qsd'][0]:>8.2f} {med['rsd'][0] / med['nbdkit'][0]:>10.2f}   "
              f"{med['rsd'][1]:>13.1f} {med['qsd'][1]:>6.1f} {med['nbdkit'][1]:>7.1f}")


if __name__ == "__main__":
    main()
