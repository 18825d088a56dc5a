#!/usr/bin/env python3
"""Block-job benchmark: rsd and qemu-storage-daemon run the same job on
the same 1 GiB qcow2 image (768 MiB of data) into a fresh qcow2, on tmpfs
(/dev/shm) and on a disk filesystem (/var/tmp), runs interleaved:
- mirror: the time from blockdev-mirror to BLOCK_JOB_READY;
- backup: the time from blockdev-backup to BLOCK_JOB_COMPLETED.
It prints medians and the ratio QSD's time over rsd's (above 1: rsd is
faster), and checks the target with qemu-img compare each time.

With --latency, it measures what a guest sees instead: the source is
exported over NBD, the job runs at --speed MiB/s (the same copy rate for
both daemons, so the job outlasts the measurement), and fio writes 4k at
random, QD1, --rate-iops a second (1000), for --runtime seconds while it runs; it prints the median
and 99th percentile completion latency of those writes, and the same
with no job running as a baseline.

Usage: python3 bench/jobs.py [--repeats N] [--rsd PATH] [--size-mib N]
                             [--latency [--speed MIB] [--runtime SECS]]
Needs fio for --latency. Not part of CI.
"""
import argparse, json, os, shutil, socket, statistics, subprocess, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))


def qmp(path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(400):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.01)
    f = s.makefile("rwb")
    f.readline()
    send(f, {"execute": "qmp_capabilities"})
    wait(f, lambda v: "return" in v)
    return s, f


def send(f, msg):
    f.write(json.dumps(msg).encode() + b"\n")
    f.flush()


def wait(f, pred):
    while True:
        line = f.readline()
        if not line:
            raise RuntimeError("daemon closed the monitor")
        v = json.loads(line)
        if "error" in v:
            raise RuntimeError(v["error"]["desc"])
        if pred(v):
            return v


def one(binary, d, size_mib, job):
    src, tgt = os.path.join(d, "src.qcow2"), os.path.join(d, "tgt.qcow2")
    for p in (src, tgt):
        if os.path.exists(p):
            os.unlink(p)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", src, f"{size_mib}M"], check=True)
    data = size_mib * 3 // 4
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {data}M", src],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, f"{size_mib}M"], check=True)
    sock = os.path.join(d, "q.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    p = subprocess.Popen([binary, "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                          "--monitor", "chardev=m",
                          "--blockdev", f"driver=qcow2,node-name=src,file.driver=file,file.filename={src}",
                          "--blockdev", f"driver=qcow2,node-name=tgt,file.driver=file,file.filename={tgt}"],
                         stderr=subprocess.DEVNULL)
    try:
        s, f = qmp(sock)
        t = time.monotonic()
        send(f, {"execute": f"blockdev-{job}",
                 "arguments": {"job-id": "m", "device": "src", "target": "tgt", "sync": "full"}})
        if job == "mirror":
            wait(f, lambda v: v.get("event") == "BLOCK_JOB_READY")
            took = time.monotonic() - t
            send(f, {"execute": "job-complete", "arguments": {"id": "m"}})
            wait(f, lambda v: v.get("event") == "BLOCK_JOB_COMPLETED")
        else:
            wait(f, lambda v: v.get("event") == "BLOCK_JOB_COMPLETED")
            took = time.monotonic() - t
        send(f, {"execute": "quit"})
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    cmp = subprocess.run(["qemu-img", "compare", "-q", src, tgt])
    if cmp.returncode != 0:
        raise RuntimeError(f"{binary}: images differ after the {job}")
    return took


def latency(binary, d, size_mib, job, speed, runtime, rate_iops):
    """(p50, p99) of 4k QD1 random-write latency in µs seen over an NBD
    export of the source while `job` runs (or no job if None)."""
    src, tgt = os.path.join(d, "src.qcow2"), os.path.join(d, "tgt.qcow2")
    for p in (src, tgt):
        if os.path.exists(p):
            os.unlink(p)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", src, f"{size_mib}M"], check=True)
    data = size_mib * 3 // 4
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {data}M", src],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, f"{size_mib}M"], check=True)
    sock, nbd = os.path.join(d, "q.sock"), os.path.join(d, "nbd.sock")
    for p in (sock, nbd):
        if os.path.exists(p):
            os.unlink(p)
    p = subprocess.Popen([binary, "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                          "--monitor", "chardev=m",
                          "--blockdev", f"driver=qcow2,node-name=src,file.driver=file,file.filename={src}",
                          "--blockdev", f"driver=qcow2,node-name=tgt,file.driver=file,file.filename={tgt}",
                          "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                          "--export", "type=nbd,id=e,node-name=src,writable=on"],
                         stderr=subprocess.DEVNULL)
    try:
        s, f = qmp(sock)
        if job:
            send(f, {"execute": f"blockdev-{job}",
                     "arguments": {"job-id": "m", "device": "src", "target": "tgt",
                                   "sync": "full", "speed": speed << 20}})
            wait(f, lambda v: "return" in v)
        out = subprocess.run(["fio", "--name=l", "--ioengine=nbd", f"--uri=nbd+unix:///src?socket={nbd}",
                              "--rw=randwrite", "--bs=4k", "--iodepth=1", f"--runtime={runtime}",
                              f"--rate_iops={rate_iops}",
                              "--time_based", f"--size={size_mib}M", "--output-format=json"],
                             capture_output=True, text=True, check=True).stdout
        if job:
            send(f, {"execute": "query-block-jobs"})
            v = wait(f, lambda v: "return" in v)
            if not v["return"]:
                raise RuntimeError(f"{binary}: the {job} ended before the measurement did")
        send(f, {"execute": "quit"})
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    pct = json.loads(out[out.index("{"):])["jobs"][0]["write"]["clat_ns"]["percentile"]
    return pct["50.000000"] / 1000, pct["99.000000"] / 1000


def latency_main(a, servers):
    print(f"4k random writes QD1 over an NBD export of the source for {a.runtime} s, "
          f"{a.rate_iops} a second, the job at {a.speed} MiB/s; completion latency in µs, medians of {a.repeats} runs")
    print(f"{'job':<8}{'filesystem':<12}{'rsd p50':>9}{'qsd p50':>9}{'rsd p99':>9}{'qsd p99':>9}"
          f"{'qsd/rsd p50':>13}{'qsd/rsd p99':>13}")
    for job in (None, "mirror", "backup"):
        for label, base in (("tmpfs", "/dev/shm"), ("disk", "/var/tmp")):
            res = {k: [] for k in servers}
            d = tempfile.mkdtemp(prefix="rsd-jobs-", dir=base)
            try:
                for _ in range(a.repeats):
                    for k, b in servers.items():
                        res[k].append(latency(b, d, a.size_mib, job, a.speed, a.runtime, a.rate_iops))
            finally:
                shutil.rmtree(d, ignore_errors=True)
            med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
                   for k, v in res.items()}
            (r50, r99), (q50, q99) = med["rsd"], med["qsd"]
            print(f"{job or 'none':<8}{label:<12}{r50:>9.0f}{q50:>9.0f}{r99:>9.0f}{q99:>9.0f}"
                  f"{q50 / r50:>13.2f}{q99 / r99:>13.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rsd", default=os.path.join(HERE, "..", "target", "release", "rsd"))
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--speed", type=int, default=100, help="MiB/s of the job with --latency")
    ap.add_argument("--runtime", type=int, default=3, help="seconds of fio with --latency")
    ap.add_argument("--rate-iops", type=int, default=1000,
                    help="writes per second of fio with --latency (the same guest load for both; "
                         "unbounded, a faster server's writes copy more clusters before they are "
                         "overwritten and end a backup before the measurement does)")
    a = ap.parse_args()
    servers = {"rsd": a.rsd, "qsd": shutil.which("qemu-storage-daemon")}
    if a.latency:
        latency_main(a, servers)
        return
    print(f"a {a.size_mib} MiB qcow2 ({a.size_mib * 3 // 4} MiB of data) into a fresh qcow2, "
          f"{a.repeats} runs interleaved, medians (mirror: to READY; backup: to the end)")
    print(f"{'job':<8}{'filesystem':<12}{'rsd s':>10}{'qsd s':>10}{'qsd/rsd':>10}")
    for job in ("mirror", "backup"):
        for label, base in (("tmpfs", "/dev/shm"), ("disk", "/var/tmp")):
            times = {k: [] for k in servers}
            d = tempfile.mkdtemp(prefix="rsd-jobs-", dir=base)
            try:
                for _ in range(a.repeats):
                    for k, b in servers.items():
                        times[k].append(one(b, d, a.size_mib, job))
            finally:
                shutil.rmtree(d, ignore_errors=True)
            r, q = statistics.median(times["rsd"]), statistics.median(times["qsd"])
            print(f"{job:<8}{label:<12}{r:>10.2f}{q:>10.2f}{q / r:>10.2f}")


if __name__ == "__main__":
    main()
