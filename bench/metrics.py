#!/usr/bin/env python3
"""What metrics cost on the NBD data path: rsd with no metrics server vs
rsd with one, scraped every second, in one run.

Two rsd daemons serve copies of the same 1 GiB raw image on tmpfs over
UNIX sockets; the second also listens with --metrics-server on a UNIX
socket, and a scraper thread GETs /metrics from it every second for the
whole run (as Prometheus would, and checks each answer is 200). fio's
nbd engine drives both, interleaved (each repeat runs every workload on
both daemons in turn), and the script prints per-row medians and the
ratio on/off (the target is >= 0.98).

Usage: python3 bench/metrics.py [--runtime SECS] [--repeats N] [--only LABEL] [--rsd PATH]
Needs fio (apt-get install -y fio; done here if root). Not part of CI.
"""
import argparse, os, shutil, socket, statistics, subprocess, sys, tempfile, threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd import cpu_seconds, run_fio, wait_for  # noqa: E402

WORKLOADS = [
    ("4k randread QD32", "randread", "4k", 32),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("1M seqread QD8", "read", "1M", 8),
    ("1M seqwrite QD8", "write", "1M", 8),
]


def scrape(path):
    """One GET /metrics on the UNIX socket; returns (status, body size)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: rsd\r\n\r\n")
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head = data.split(b"\r\n", 1)[0].split()
    return int(head[1]), len(data)


class Scraper(threading.Thread):
    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.stop, self.count, self.failed = path, threading.Event(), 0, 0

    def run(self):
        while not self.stop.wait(1.0):
            try:
                code, _ = scrape(self.path)
                self.count += 1
                self.failed += code != 200
            except OSError:
                self.failed += 1


def start(binary, d, name, img, metrics):
    sock = f"{d}/{name}.sock"
    argv = [binary]
    if metrics:
        argv += ["--metrics-server", f"addr.type=unix,addr.path={metrics}"]
    argv += ["--blockdev", f"driver=file,node-name=disk,filename={img}",
             "--blockdev", "driver=raw,node-name=fmt,file=disk",
             "--nbd-server", f"addr.type=unix,addr.path={sock}",
             "--export", "type=nbd,id=e,node-name=fmt,writable=on"]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(sock, p)
    return p, f"nbd+unix:///fmt?socket={sock}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="", help="run only the rows whose label contains this")
    ap.add_argument("--rsd", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "rsd"))
    a = ap.parse_args()
    workloads = [w for w in WORKLOADS if a.only in w[0]]
    if not shutil.which("fio"):
        if os.geteuid() == 0:
            subprocess.run(["apt-get", "install", "-y", "-qq", "fio"], check=True,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        else:
            sys.exit("missing fio")
    if not os.path.exists(a.rsd):
        subprocess.run(["cargo", "build", "--release", "--bin", "rsd"], check=True,
                       cwd=os.path.join(os.path.dirname(__file__), ".."))
    rsd = os.path.abspath(a.rsd)
    d = tempfile.mkdtemp(prefix="rsdm", dir="/dev/shm")
    chunk = os.urandom(1 << 20)
    for name in ("off", "on"):
        with open(f"{d}/{name}.img", "wb") as f:
            for _ in range(1024):
                f.write(chunk)
    msock = f"{d}/metrics.sock"
    servers = {"off": start(rsd, d, "off", f"{d}/off.img", None),
               "on": start(rsd, d, "on", f"{d}/on.img", msock)}
    wait_for(msock, servers["on"][0])
    scraper = Scraper(msock)
    scraper.start()
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
        scraper.stop.set()
        for p, _ in servers.values():
            p.terminate()
        shutil.rmtree(d, ignore_errors=True)
    print(f"fio nbd engine, 1 GiB raw on tmpfs, UNIX sockets, {a.repeats} repeats x {a.runtime}s, medians;")
    print(f"metrics on: /metrics scraped every second ({scraper.count} scrapes, {scraper.failed} failed)")
    print(f"{'workload':<18} {'off':>12} {'on':>12} {'on/off':>7}   {'cpu us/io off':>13} {'on':>6}")
    worst = None
    for (label, rw, bs, qd) in workloads:
        big = bs != "4k"
        med = {s: (statistics.median(r[1] if big else r[0] for r in res[(label, s)]),
                   statistics.median(r[2] for r in res[(label, s)])) for s in servers}
        unit = "MiB/s" if big else "IOPS"
        fmt = lambda v: f"{v:.0f} {unit}" if big else f"{v / 1000:.1f}k"
        ratio = med["on"][0] / med["off"][0]
        worst = ratio if worst is None else min(worst, ratio)
        print(f"{label:<18} {fmt(med['off'][0]):>12} {fmt(med['on'][0]):>12} {ratio:>7.3f}   "
              f"{med['off'][1]:>13.1f} {med['on'][1]:>6.1f}")
    print(f"worst on/off ratio: {worst:.3f} (target >= 0.98)")


if __name__ == "__main__":
    main()
