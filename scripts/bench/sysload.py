#!/usr/bin/env python3
"""Fixed workloads for the syscall-count figures of scripts/bench.sh (sys-*).

  sysload.py server --bind 127.0.0.1 --tcp-port 29011 --udp-port 29012
      An echo backend: echoes every byte on every TCP connection (closing
      when the peer closes) and every UDP datagram back to its sender.

  sysload.py client --mode pingpong|short|udp --host 127.0.0.1 --port P \
                    --ops N --ready-file R --go-file G --done-file D
      Warms up (a few operations, uncounted), writes R, waits until G
      exists, then does exactly N operations one after another and writes N
      into D:
        pingpong: a 64-byte round trip on one kept connection (TCP_NODELAY),
        short:    connect, 64 bytes each way, close,
        udp:      a 64-byte datagram round trip on one connected UDP socket.
      Between R and G the proxy is idle, so a tracer can attach to it
      without counting the warm-up. Exits non-zero on any error or timeout
      (a lost UDP datagram included), so a count it reports is exact.
"""

import argparse
import os
import selectors
import socket
import sys
import time

SIZE = 64
WARMUP = {"pingpong": 100, "short": 20, "udp": 100}


def serve(args):
    sel = selectors.DefaultSelector()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((args.bind, args.tcp_port))
    lsock.listen(1024)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, "accept")
    usock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    usock.bind((args.bind, args.udp_port))
    usock.setblocking(False)
    sel.register(usock, selectors.EVENT_READ, "udp")
    while True:
        for key, _ in sel.select():
            if key.data == "accept":
                try:
                    conn, _ = lsock.accept()
                except BlockingIOError:
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, "conn")
            elif key.data == "udp":
                try:
                    data, addr = usock.recvfrom(65536)
                except BlockingIOError:
                    continue
                usock.sendto(data, addr)
            else:
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    try:
                        conn.setblocking(True)
                        conn.sendall(data)
                        conn.setblocking(False)
                        continue
                    except OSError:
                        pass
                sel.unregister(conn)
                conn.close()


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def run_client(args):
    payload = b"x" * SIZE
    addr = (args.host, args.port)
    kept = None

    if args.mode in ("pingpong", "udp"):
        if args.mode == "pingpong":
            kept = socket.create_connection(addr, timeout=5)
            kept.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            kept = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            kept.settimeout(5)
            kept.connect(addr)

        def op():
            kept.sendall(payload) if args.mode == "pingpong" else kept.send(payload)
            got = recv_exact(kept, SIZE) if args.mode == "pingpong" else kept.recv(65536)
            if got != payload:
                raise ValueError("echo mismatch (%d bytes)" % len(got))
    else:
        def op():
            s = socket.create_connection(addr, timeout=5)
            try:
                s.sendall(payload)
                if recv_exact(s, SIZE) != payload:
                    raise ValueError("echo mismatch")
            finally:
                s.close()

    for _ in range(WARMUP[args.mode]):
        op()
    with open(args.ready_file, "w") as f:
        f.write("ready\n")
    deadline = time.monotonic() + args.wait
    while not os.path.exists(args.go_file):
        if time.monotonic() > deadline:
            sys.exit("sysload: no go file after %d s" % args.wait)
        time.sleep(0.01)
    done = 0
    for _ in range(args.ops):
        op()
        done += 1
    with open(args.done_file, "w") as f:
        f.write("%d\n" % done)
    # Hold a kept connection open until the tracer has detached, so its close
    # is not counted either.
    if kept is not None and args.mode == "pingpong":
        deadline = time.monotonic() + args.wait
        while not os.path.exists(args.done_file + ".close") and time.monotonic() < deadline:
            time.sleep(0.01)
        kept.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--bind", default="127.0.0.1")
    s.add_argument("--tcp-port", type=int, required=True)
    s.add_argument("--udp-port", type=int, required=True)
    c = sub.add_parser("client")
    c.add_argument("--mode", choices=sorted(WARMUP), required=True)
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--ops", type=int, required=True)
    c.add_argument("--ready-file", required=True)
    c.add_argument("--go-file", required=True)
    c.add_argument("--done-file", required=True)
    c.add_argument("--wait", type=int, default=60, help="seconds to wait for the go file")
    args = p.parse_args()
    try:
        serve(args) if args.cmd == "server" else run_client(args)
    except (OSError, ValueError) as e:
        sys.exit("sysload: %s" % e)


if __name__ == "__main__":
    main()
