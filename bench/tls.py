#!/usr/bin/env python3
"""NBD over TLS benchmark: rsd with TLS beside rsd in plaintext and beside
qemu-storage-daemon with TLS.

The three servers export the same raw image on tmpfs over UNIX sockets
(the TLS ones with tls-creds-x509 and certificates made here with
openssl; the CA in $HOME/.pki/libnbd of the fio runs, which check the
server's certificate; the servers do not ask for the client's); fio's nbd engine (libnbd, nbds+unix URIs) drives them,
interleaved (each repeat runs every workload on every server in turn).
The script prints per-row medians (MiB/s or IOPS), the server's CPU time
per I/O, and the ratios rsd-TLS/rsd-plain and rsd-TLS/QSD-TLS.

Usage: python3 bench/tls.py [--runtime SECS] [--repeats N] [--size 1G] [--rsd PATH]
Needs fio and openssl (apt-get install -y fio openssl). Not part of CI.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

WORKLOADS = [
    ("1M seqread QD8", "read", "1M", 8),
    ("4k randread QD32", "randread", "4k", 32),
]


def sh(cwd, *argv):
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_pki(d):
    """A CA, a server certificate and a client certificate (RSA)."""
    pki = f"{d}/pki"
    os.makedirs(pki)
    sh(pki, "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
       "-out", "ca-cert.pem", "-days", "2", "-subj", "/O=Bench/CN=Bench CA",
       "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    for name, cn, purpose in (("server", "localhost", "serverAuth"), ("client", "client", "clientAuth")):
        sh(pki, "openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
           "-out", f"{name}.csr", "-subj", f"/O=Bench/CN={cn}")
        with open(f"{pki}/{name}.ext", "w") as f:
            f.write(f"basicConstraints=critical,CA:FALSE\nextendedKeyUsage={purpose}\n"
                    "subjectAltName=DNS:localhost\n")
        sh(pki, "openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey",
           "ca-key.pem", "-CAcreateserial", "-days", "2", "-out", f"{name}-cert.pem",
           "-extfile", f"{name}.ext")
    # fio's nbd engine may not name a certificates directory in its URI;
    # libnbd then reads $HOME/.pki/libnbd, which fio runs with.
    srv, cli = f"{d}/srv", f"{d}/.pki/libnbd"
    os.makedirs(srv)
    os.makedirs(cli)
    for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        shutil.copy(f"{pki}/{f}", srv)
    for f in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        shutil.copy(f"{pki}/{f}", cli)
    return srv, cli


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(path, proc):
    for _ in range(1000):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.args}")
        time.sleep(0.01)
    sys.exit(f"no socket {path}")


def start_servers(d, img, rsd, srv):
    servers = {}
    for name, binary, tls in (("rsd", rsd, False), ("rsd-tls", rsd, True),
                              ("qsd-tls", "qemu-storage-daemon", True)):
        sock = f"{d}/{name}.sock"
        argv = [binary]
        nbd = f"addr.type=unix,addr.path={sock}"
        if tls:
            # verify-peer off: fio's libnbd sends no client certificate
            # from $HOME (it does verify the server's with the CA there).
            argv += ["--object", f"tls-creds-x509,id=ts,dir={srv},endpoint=server,verify-peer=off"]
            nbd += ",tls-creds=ts"
        argv += ["--blockdev", f"driver=file,node-name=disk,filename={img}",
                 "--blockdev", "driver=raw,node-name=fmt,file=disk",
                 "--nbd-server", nbd,
                 "--export", "type=nbd,id=e,node-name=fmt,writable=on"]
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(sock, p)
        scheme = "nbds+unix" if tls else "nbd+unix"
        servers[name] = (p, f"{scheme}:///fmt?socket={sock}")
    return servers


def run_fio(uri, rw, bs, qd, runtime, size, home):
    out = subprocess.run(["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
                          f"--bs={bs}", f"--iodepth={qd}", f"--runtime={runtime}", "--time_based",
                          f"--size={size}", "--output-format=json"],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, HOME=home)).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return side["iops"], side["bw_bytes"] / (1 << 20), side["total_ios"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="1G", help="image size (fio's syntax: 1G, 64M)")
    ap.add_argument("--rsd", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "rsd"))
    a = ap.parse_args()
    for t in ("fio", "openssl", "qemu-storage-daemon"):
        if not shutil.which(t):
            sys.exit(f"missing {t}")
    if not os.path.exists(a.rsd):
        subprocess.run(["cargo", "build", "--release", "--bin", "rsd"], check=True,
                       cwd=os.path.join(os.path.dirname(__file__), ".."))
    mib = int(a.size[:-1]) * (1024 if a.size.endswith("G") else 1)
    d = tempfile.mkdtemp(prefix="rsdtls", dir="/dev/shm")
    srv, _ = make_pki(d)
    img = f"{d}/disk.img"
    with open(img, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(mib):
            f.write(chunk)
    servers = start_servers(d, img, os.path.abspath(a.rsd), srv)
    res = {(w[0], s): [] for w in WORKLOADS for s in servers}
    try:
        for _ in range(a.repeats):
            for (label, rw, bs, qd) in WORKLOADS:
                for s, (p, uri) in servers.items():
                    c0 = cpu_seconds(p.pid)
                    iops, mibs, ios = run_fio(uri, rw, bs, qd, a.runtime, a.size, d)
                    cpu = cpu_seconds(p.pid) - c0
                    res[(label, s)].append((iops, mibs, cpu * 1e6 / max(ios, 1)))
    finally:
        for p, _ in servers.values():
            p.terminate()
        shutil.rmtree(d, ignore_errors=True)
    print(f"fio nbd engine, {a.size} raw on tmpfs, UNIX sockets, {a.repeats} repeats x {a.runtime}s, medians")
    print(f"{'workload':<18} {'rsd plain':>12} {'rsd TLS':>12} {'QSD TLS':>12} {'TLS/plain':>9} "
          f"{'rsd/QSD TLS':>11}   {'cpu us/io rsd':>13} {'rsd TLS':>8} {'QSD TLS':>8}")
    for (label, rw, bs, qd) in WORKLOADS:
        big = bs != "4k"
        med = {}
        for s in servers:
            rows = res[(label, s)]
            med[s] = (statistics.median(r[1] if big else r[0] for r in rows),
                      statistics.median(r[2] for r in rows))
        unit = "MiB/s" if big else "IOPS"
        fmt = lambda v: f"{v:.0f} {unit}" if big else f"{v / 1000:.1f}k"
        print(f"{label:<18} {fmt(med['rsd'][0]):>12} {fmt(med['rsd-tls'][0]):>12} "
              f"{fmt(med['qsd-tls'][0]):>12} {med['rsd-tls'][0] / med['rsd'][0]:>9.2f} "
              f"{med['rsd-tls'][0] / med['qsd-tls'][0]:>11.2f}   {med['rsd'][1]:>13.1f} "
              f"{med['rsd-tls'][1]:>8.1f} {med['qsd-tls'][1]:>8.1f}")


if __name__ == "__main__":
    main()
