#!/usr/bin/env python3
"""Soak (issue 22, docs/reliability.md): many NBD clients doing verified
I/O on rsd for a long time while the monitor adds and removes nodes and
exports, with rsd's RSS and descriptor count sampled all along.

rsd serves --exports images (qcow2 and raw, alternately) over one UNIX
socket. Each of --clients clients owns a region of one export and loops:
writes a pattern naming the client, the block and a generation, reads
ranges back and checks each block against what it last wrote, zeroes,
flushes, and now and then disconnects and connects again. Beside them a
monitor loop adds a qcow2 node on a spare image, exports it, writes and
reads it through a short-lived client, adds and removes a dirty bitmap,
removes the export and the node, over and over. With --vhost-queues,
a vhost-user-blk export on its own qcow2 image is driven all along by
the vhost-bench example (`--rw verify`: each ring slot writes a block,
reads it back and compares).

Every few seconds the script samples VmRSS, the descriptors and the
threads of rsd. At the end the clients disconnect and the script waits
until rsd's descriptors are back at what they were before any client
came (same monitor connection), then quits rsd through QMP.

Prints a summary and, with --json, one JSON object (the last line):
ops, errors (must be 0), p50/p99/max latency in ms per request, RSS and
fds at warm-up end and at the end, fds idle before and after, churn
cycles.

Usage: python3 bench/soak.py [--rsd PATH] [--duration 600] [--clients 64]
           [--exports 4] [--vhost-queues 4] [--vhost-bench PATH]
           [--warmup SECS] [--sample 5] [--json]
Needs python3 and qemu-img; vhost-bench is built by
`cargo build [--release] --example vhost-bench` (--vhost-queues 0 skips it).
"""
import argparse, json, os, random, shutil, socket, struct, subprocess, sys
import tempfile, threading, time
import multiprocessing as mp

BLOCK = 4096
EXPORT_SIZE = 64 << 20
SPARE_SIZE = 8 << 20
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
OPT_MAGIC = 0x49484156454F5054
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6


class NbdError(Exception):
    pass


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise NbdError("connection closed")
        buf += chunk
    return bytes(buf)


class Nbd:
    """A fixed-newstyle client (NBD_OPT_GO, simple replies, one request
    in flight)."""

    def __init__(self, path, name):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(60)
        self.s.connect(path)
        hello = recv_exact(self.s, 18)
        if hello[:8] != b"NBDMAGIC":
            raise NbdError("no NBDMAGIC")
        self.s.sendall(struct.pack(">I", 3))
        nb = name.encode()
        data = struct.pack(">I", len(nb)) + nb + struct.pack(">H", 0)
        self.s.sendall(struct.pack(">QII", OPT_MAGIC, 7, len(data)) + data)
        self.size = None
        while True:
            _, _, kind, length = struct.unpack(">QIII", recv_exact(self.s, 20))
            d = recv_exact(self.s, length)
            if kind == 1:
                break
            if kind == 3 and len(d) >= 12 and d[:2] == b"\0\0":
                self.size = struct.unpack(">Q", d[2:10])[0]
            elif kind != 3:
                raise NbdError(f"GO answered {kind:#x}")
        if self.size is None:
            raise NbdError("no export size")
        self.cookie = 0

    def request(self, cmd, off=0, length=0, payload=b""):
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, cmd, self.cookie, off, length) + payload)
        magic, err, cookie = struct.unpack(">IIQ", recv_exact(self.s, 16))
        if magic != NBD_SIMPLE_REPLY_MAGIC or cookie != self.cookie:
            raise NbdError(f"bad reply magic {magic:#x} cookie {cookie}")
        if err:
            raise NbdError(f"command {cmd} at {off}+{length}: error {err}")
        if cmd == CMD_READ:
            return recv_exact(self.s, length)
        return b""

    def close(self):
        try:
            self.s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.s.close()


def pattern(owner, block, gen):
    return struct.pack("<IIQ", owner, gen, block) * (BLOCK // 16)


def client_loop(cid, path, name, first, blocks, stop_at, duration, reconnect_every, out):
    """One client: verified I/O on blocks [first, first+blocks) of export
    `name` until `stop_at`; puts (ops, errors, latencies, messages) on out."""
    rng = random.Random(cid)
    model = {}  # block -> generation last written (0: zeroes)
    lat = []
    ops = errors = reconnects = 0
    msgs = []
    slowest = (0.0, "", 0.0)  # seconds, request, when (s from the start)
    start_at = stop_at - duration
    gen = 0
    conn = None
    since = 0
    while time.time() < stop_at:
        try:
            if conn is None or since >= reconnect_every:
                if conn is not None:
                    conn.close()
                    reconnects += 1
                conn = Nbd(path, name)
                since = 0
            n = rng.randint(1, 16)
            b = first + rng.randrange(blocks - n + 1)
            pick = rng.random()
            t = time.perf_counter()
            if pick < 0.45:
                gen += 1
                data = b"".join(pattern(cid, x, gen) for x in range(b, b + n))
                conn.request(CMD_WRITE, b * BLOCK, n * BLOCK, data)
                for x in range(b, b + n):
                    model[x] = gen
            elif pick < 0.85:
                data = conn.request(CMD_READ, b * BLOCK, n * BLOCK)
                for i, x in enumerate(range(b, b + n)):
                    g = model.get(x)
                    if g is None:
                        continue
                    want = bytes(BLOCK) if g == 0 else pattern(cid, x, g)
                    if data[i * BLOCK:(i + 1) * BLOCK] != want:
                        raise NbdError(f"client {cid} block {x}: not generation {g}")
            elif pick < 0.93:
                conn.request(CMD_WRITE_ZEROES, b * BLOCK, n * BLOCK)
                for x in range(b, b + n):
                    model[x] = 0
            else:
                conn.request(CMD_FLUSH)
            took = time.perf_counter() - t
            lat.append(took)
            if took > slowest[0]:
                kind = "write" if pick < 0.45 else "read" if pick < 0.85 else "zeroes" if pick < 0.93 else "flush"
                slowest = (took, kind, round(time.time() - start_at, 1))
            ops += 1
            since += 1
        except (NbdError, OSError) as e:
            errors += 1
            if len(msgs) < 5:
                msgs.append(f"client {cid}: {e}")
            conn = None
            time.sleep(0.1)
    if conn is not None:
        conn.close()
    out.put((ops, errors, reconnects, lat, msgs, slowest))


def worker(specs, stop_at, duration, reconnect_every, out):
    """One process running several clients as threads."""
    threads = [threading.Thread(target=client_loop, args=(*s, stop_at, duration, reconnect_every, out))
               for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(60)
        # The socket's file exists a moment before it listens.
        for _ in range(1000):
            try:
                self.s.connect(path)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                time.sleep(0.02)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.events = []
        self.cmd("qmp_capabilities")

    def cmd(self, command, **args):
        self.f.write(json.dumps({"execute": command, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"{command}: monitor closed")
            v = json.loads(line)
            if "event" in v:
                self.events.append(v)
                continue
            if "error" in v:
                raise RuntimeError(f"{command} {args}: {v['error']['desc']}")
            return v["return"]


def churn_once(qmp, sock, img, n):
    """Adds a node on `img`, exports it, writes and reads it through a
    client, adds and removes a bitmap, and removes the export and node."""
    node, exp = f"spare{n}", f"churn{n}"
    qmp.cmd("blockdev-add", **{"driver": "qcow2", "node-name": node,
                                "file": {"driver": "file", "filename": img}})
    qmp.cmd("block-export-add", type="nbd", id=exp, name=exp, writable=True, **{"node-name": node})
    qmp.cmd("block-dirty-bitmap-add", node=node, name="b")
    c = Nbd(sock, exp)
    blk = random.randrange(c.size // BLOCK - 4)
    data = b"".join(pattern(999, x, n + 1) for x in range(blk, blk + 4))
    c.request(CMD_WRITE, blk * BLOCK, len(data), data)
    if c.request(CMD_READ, blk * BLOCK, len(data)) != data:
        raise RuntimeError(f"churn {n}: read back differs")
    c.request(CMD_FLUSH)
    c.close()
    qmp.cmd("query-named-block-nodes")
    qmp.cmd("block-dirty-bitmap-remove", node=node, name="b")
    qmp.cmd("block-export-del", id=exp)
    deadline = time.time() + 30
    while any(e["id"] == exp for e in qmp.cmd("query-block-exports")):
        if time.time() > deadline:
            raise RuntimeError(f"export {exp} never went")
        time.sleep(0.01)
    qmp.cmd("blockdev-del", **{"node-name": node})


def churn(qmp, sock, spares, stop, stats):
    """Churns nodes and exports on the spares in turn until `stop`."""
    n = 1
    while not stop.is_set():
        try:
            churn_once(qmp, sock, spares[n % len(spares)], n)
            stats["cycles"] += 1
        except (RuntimeError, NbdError, OSError) as e:
            stats["errors"] += 1
            if len(stats["msgs"]) < 5:
                stats["msgs"].append(str(e))
            time.sleep(0.5)
        n += 1
        stop.wait(0.05)


def settle(pid, want, secs):
    """rsd's status once its descriptors are `want` (or after `secs`)."""
    deadline = time.time() + secs
    while True:
        s = status(pid)
        if s["fds"] == want or time.time() > deadline:
            return s
        time.sleep(0.1)


def fd_targets(pid):
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "Threads"):
                out[k] = int(v.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def percentile(sorted_values, p):
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rsd", default=os.path.join(here, "..", "target", "release", "rsd"))
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--exports", type=int, default=4)
    ap.add_argument("--warmup", type=float, help="seconds (default: a tenth of --duration, at most 60)")
    ap.add_argument("--sample", type=float, default=5)
    ap.add_argument("--reconnect-every", type=int, default=500, help="requests per connection")
    ap.add_argument("--vhost-queues", type=int, default=4)
    ap.add_argument("--vhost-bench", help="default: examples/vhost-bench beside --rsd")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    warmup = a.warmup if a.warmup is not None else min(60, a.duration / 10)
    d = tempfile.mkdtemp(prefix="rsd-soak-")
    try:
        return run(a, d, warmup)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(a, d, warmup):
    sock, qsock = f"{d}/nbd.sock", f"{d}/qmp.sock"
    cmd = [a.rsd, "--chardev", f"socket,id=m,path={qsock},server=on,wait=off", "--monitor", "chardev=m",
           "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=0"]
    for i in range(a.exports):
        img = f"{d}/e{i}.img"
        fmt = "qcow2" if i % 2 == 0 else "raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, img, str(EXPORT_SIZE)], check=True)
        cmd += ["--blockdev", f"driver={fmt},node-name=n{i},discard=unmap,file.driver=file,file.filename={img}",
                "--export", f"type=nbd,id=x{i},node-name=n{i},name=e{i},writable=on"]
    if a.vhost_queues:
        img = f"{d}/vhost.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(EXPORT_SIZE)], check=True)
        cmd += ["--blockdev", f"driver=qcow2,node-name=vn,file.driver=file,file.filename={img}",
                "--export", f"type=vhost-user-blk,id=vh,node-name=vn,writable=on,num-queues={a.vhost_queues},"
                f"addr.type=unix,addr.path={d}/vhost.sock"]
        vbench = a.vhost_bench or os.path.join(os.path.dirname(os.path.abspath(a.rsd)), "examples", "vhost-bench")
        if not os.path.exists(vbench):
            sys.exit(f"no {vbench}: cargo build --example vhost-bench, or --vhost-queues 0")

    def vhost(secs):
        return subprocess.Popen([vbench, "--socket", f"{d}/vhost.sock", "--queues", str(a.vhost_queues),
                                 "--depth", "4", "--rw", "verify", "--runtime", str(secs)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    spares = []
    for i in range(2):
        img = f"{d}/spare{i}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(SPARE_SIZE)], check=True)
        spares.append(img)
    err = open(f"{d}/rsd.err", "w+")
    rsd = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    for _ in range(2000):
        if os.path.exists(qsock) or rsd.poll() is not None:
            break
        time.sleep(0.01)
    qmp = Qmp(qsock)
    # Prime what rsd creates once and keeps (each export's first I/O,
    # the first churn), so that idle before and after compare the same.
    for i in range(a.exports):
        c = Nbd(sock, f"e{i}")
        c.request(CMD_WRITE, 0, BLOCK, bytes(BLOCK))
        c.request(CMD_FLUSH)
        c.close()
    churn_once(qmp, sock, spares[0], 0)
    if a.vhost_queues:
        v = vhost(0.5)
        if v.wait() != 0:
            sys.exit(f"vhost-bench: {v.stderr.read()}")
    time.sleep(1)
    idle_start = status(rsd.pid)
    idle_fds = fd_targets(rsd.pid)

    # Clients: each export's blocks shared out among its clients.
    per_export = -(-a.clients // a.exports)
    blocks = EXPORT_SIZE // BLOCK // per_export
    specs = [(c, sock, f"e{c % a.exports}", (c // a.exports) * blocks, blocks) for c in range(a.clients)]
    nproc = min(len(specs), 8)
    out = mp.Queue()
    start = time.time()
    stop_at = start + a.duration
    procs = [mp.Process(target=worker, args=(specs[i::nproc], stop_at, a.duration, a.reconnect_every, out)) for i in range(nproc)]
    for p in procs:
        p.start()
    vh = vhost(a.duration) if a.vhost_queues else None
    stop = threading.Event()
    cstats = {"cycles": 0, "errors": 0, "msgs": []}
    ct = threading.Thread(target=churn, args=(qmp, sock, spares, stop, cstats))
    ct.start()

    samples = []
    # The last sample comes a second before the clients stop.
    while time.time() < stop_at - 1:
        s = status(rsd.pid)
        s["t"] = round(time.time() - start, 1)
        samples.append(s)
        if not a.json:
            print(f"t={s['t']:7.1f}s rss={s['VmRSS'] / 1024:7.1f} MiB fds={s['fds']:4d} threads={s['Threads']:4d}"
                  f" churn={cstats['cycles']}", flush=True)
        time.sleep(max(0, min(a.sample, stop_at - 1 - time.time())))
    end = samples[-1]
    results = [out.get() for _ in specs]
    for p in procs:
        p.join()
    stop.set()
    ct.join()
    vhost_ios, vhost_errors = 0, 0
    if vh is not None:
        vout, verr = vh.communicate()
        if vh.returncode != 0:
            vhost_errors = 1
            cstats["msgs"].append(f"vhost-bench: {verr.strip()[-500:]}")
        else:
            vhost_ios = json.loads(vout.strip().splitlines()[-1])["ios"]
    # Back to idle: every client gone, only the monitor connected.
    idle_end = settle(rsd.pid, idle_start["fds"], 30)
    # rsd gives freed heap back a second after the last client leaves
    # (util::trim_memory_soon): the idle RSS is read after that.
    time.sleep(1.5)
    idle_end["VmRSS"] = status(rsd.pid)["VmRSS"]
    if idle_end["fds"] != idle_start["fds"]:
        now = fd_targets(rsd.pid)
        extra = [f for f in now if f not in idle_fds or now.count(f) > idle_fds.count(f)]
        cstats["msgs"].append(f"descriptors {idle_start['fds']} idle before, {idle_end['fds']} after: {sorted(set(extra))}")
    qmp.cmd("quit")
    try:
        code = rsd.wait(30)
    except subprocess.TimeoutExpired:
        rsd.kill()
        code = rsd.wait()
    err.seek(0)
    stderr = err.read()

    lat = sorted(x for r in results for x in r[3])
    ops = sum(r[0] for r in results)
    errors = (sum(r[1] for r in results) + cstats["errors"] + (code != 0) + ("panicked" in stderr)
              + (idle_end["fds"] != idle_start["fds"]) + vhost_errors)
    msgs = [m for r in results for m in r[4]] + cstats["msgs"]
    if code != 0 or "panicked" in stderr:
        msgs.append(f"rsd exited {code}: {stderr[-2000:]}")
    after = [s for s in samples if s["t"] >= warmup] or samples
    warm = after[0]
    report = {
        "duration_s": a.duration, "clients": a.clients, "exports": a.exports, "warmup_s": warmup,
        "ops": ops, "ops_per_s": round(ops / a.duration, 1), "errors": errors, "messages": msgs[:10],
        "reconnects": sum(r[2] for r in results), "churn_cycles": cstats["cycles"],
        "vhost_queues": a.vhost_queues, "vhost_ios": vhost_ios,
        "p50_ms": round(percentile(lat, 50) * 1000, 3), "p99_ms": round(percentile(lat, 99) * 1000, 3),
        "max_ms": round((lat[-1] if lat else 0) * 1000, 3),
        "slowest": [{"ms": round(r[5][0] * 1000, 1), "request": r[5][1], "at_s": r[5][2]}
                    for r in sorted(results, key=lambda r: -r[5][0])[:5]],
        "rss_kib_warm": warm["VmRSS"], "rss_kib_end": end["VmRSS"],
        "rss_kib_max_after_warmup": max(s["VmRSS"] for s in after),
        "fds_warm": warm["fds"], "fds_end": end["fds"],
        "fds_max_after_warmup": max(s["fds"] for s in after),
        "fds_min_after_warmup": min(s["fds"] for s in after),
        "rss_kib_min_after_warmup": min(s["VmRSS"] for s in after),
        # About ten samples across the run, for the shape.
        "series": [(s["t"], s["VmRSS"], s["fds"]) for s in samples[::max(1, len(samples) // 10)]],
        "threads_warm": warm["Threads"], "threads_end": end["Threads"],
        "fds_idle_start": idle_start["fds"], "fds_idle_end": idle_end["fds"],
        "rss_kib_idle_start": idle_start["VmRSS"], "rss_kib_idle_end": idle_end["VmRSS"],
        "exit_code": code,
    }
    print(f"{ops} requests in {a.duration:.0f} s ({report['ops_per_s']}/s) by {a.clients} clients, "
          f"{report['reconnects']} reconnects, {cstats['cycles']} churn cycles, "
          f"{vhost_ios} verified vhost-user-blk requests on {a.vhost_queues} queues, {errors} errors")
    print(f"latency p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms, max {report['max_ms']} ms")
    print(f"RSS {warm['VmRSS'] / 1024:.1f} MiB at warm-up end ({warmup:.0f} s), {end['VmRSS'] / 1024:.1f} MiB at end; "
          f"fds {warm['fds']} -> {end['fds']}; idle fds {idle_start['fds']} before, {idle_end['fds']} after; "
          f"idle RSS {idle_start['VmRSS'] / 1024:.1f} MiB before, {idle_end['VmRSS'] / 1024:.1f} MiB after")
    for m in msgs[:10]:
        print("error:", m)
    if a.json:
        print(json.dumps(report))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
