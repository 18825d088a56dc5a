#!/usr/bin/env python3
"""Records what clients send to a UNIX socket server, for seed corpora.

usage: record.py LISTEN_PATH SERVER_PATH OUT_PREFIX [PREFIX_BYTE]

Accepts connections on LISTEN_PATH, forwards each both ways to
SERVER_PATH, and writes the bytes each client sent to OUT_PREFIX-N
(N counting connections), preceded by PREFIX_BYTE when given (the QMP
target's first byte says how its input is split into reads).
"""
import os
import socket
import sys
import threading


def pump(src, dst, log):
    while True:
        try:
            b = src.recv(65536)
        except OSError:
            b = b""
        if not b:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        if log is not None:
            log.write(b)
        try:
            dst.sendall(b)
        except OSError:
            return


def main():
    listen, server, prefix = sys.argv[1:4]
    first = bytes([int(sys.argv[4])]) if len(sys.argv) > 4 else b""
    if os.path.exists(listen):
        os.unlink(listen)
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(listen)
    ls.listen(8)
    n = 0
    while True:
        c, _ = ls.accept()
        s = socket.socket(socket.AF_UNIX)
        s.connect(server)
        log = open(f"{prefix}-{n}", "wb")
        log.write(first)
        n += 1
        t = threading.Thread(target=pump, args=(c, s, log), daemon=True)
        t.start()
        threading.Thread(target=lambda: (pump(s, c, None), t.join(), log.close()), daemon=True).start()


main()
