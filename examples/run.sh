#!/usr/bin/env bash
# Starts rsd on a ready-made example: a QMP monitor on a UNIX socket and a
# secret object. Connect with any QMP client, e.g.
#   python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print(s.recv(4096).decode())' rsd-example/qmp.sock
# Stop it with Ctrl-C or the QMP command quit.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${RSD_DIR:-$here/rsd-example}
mkdir -p "$dir"
bin=${RSD_BIN:-}
if [ -z "$bin" ]; then
    (cd "$here" && cargo build --release --quiet)
    bin=$here/target/release/rsd
fi
echo "rsd: QMP on $dir/qmp.sock (pidfile $dir/rsd.pid)" >&2
exec "$bin" \
    --chardev "socket,path=$dir/qmp.sock,server=on,wait=off,id=qmp0" \
    --monitor chardev=qmp0 \
    --object secret,id=sec0,data=example \
    --pidfile "$dir/rsd.pid"
