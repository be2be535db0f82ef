#!/usr/bin/env python3
"""A backend for flowgate's health tests, run as a real child process so that SIGKILL,
SIGSTOP and SIGCONT hit a real process.

Two listening ports on --host:

* traffic (--port, default 0): reads the client's first chunk, then
  - "GET " / "HEAD ": answers as the HTTP health endpoint below, then closes;
  - "PING": answers --ping-reply plus CRLF (default PONG), then closes;
  - anything else: writes its identity ("HOST:PORT" of the traffic port, which is the
    backend's name in flowgate) and a newline, echoes that chunk and keeps echoing.
  With --plain only the last case exists (no HTTP, no PING on the traffic port).
  A connection closed before any data is just closed (a plain TCP probe).
* health (--health-port, default 0): HTTP/1.1; every request gets --ok-status
  (default 200), or 503 while the file --down-flag exists.

Both bind with SO_REUSEADDR, so a killed backend can be restarted on the same port.
When both listen it prints "ready TRAFFIC_PORT HEALTH_PORT"; then one line per event:
"health STATUS" (before the response is sent) and "ping". It exits when its stdin
closes, so a test that dies leaves no backend behind.
"""

import argparse
import os
import socket
import sys
import threading

args = None
name = ""
out_lock = threading.Lock()


def say(line):
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def listen(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((args.host, port))
    s.listen(128)
    return s


def serve(sock, handler):
    def loop():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            threading.Thread(target=guarded, args=(handler, conn), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def guarded(handler, conn):
    try:
        handler(conn)
    except OSError:
        pass
    finally:
        try:
            conn.close()
        except OSError:
            pass


def http_reply(conn, first):
    data = first
    while b"\r\n\r\n" not in data:
        more = conn.recv(4096)
        if not more:
            return
        data += more
    status = 503 if args.down_flag and os.path.exists(args.down_flag) else args.ok_status
    say("health %d" % status)
    body = b"down\n" if status == 503 else b"ok\n"
    head = "HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
        status,
        len(body),
    )
    conn.sendall(head.encode() + body)


def traffic(conn):
    first = conn.recv(65536)
    if not first:
        return
    if not args.plain:
        if first.startswith(b"GET ") or first.startswith(b"HEAD "):
            http_reply(conn, first)
            return
        if first.startswith(b"PING"):
            say("ping")
            conn.sendall(args.ping_reply.encode() + b"\r\n")
            return
    conn.sendall(name.encode() + b"\n" + first)
    while True:
        data = conn.recv(65536)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


def health(conn):
    first = conn.recv(4096)
    if first:
        http_reply(conn, first)


def main():
    global args, name
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--health-port", type=int, default=0)
    p.add_argument("--down-flag")
    p.add_argument("--ok-status", type=int, default=200)
    p.add_argument("--ping-reply", default="PONG")
    p.add_argument("--plain", action="store_true")
    args = p.parse_args()
    t = listen(args.port)
    h = listen(args.health_port)
    name = "%s:%d" % (args.host, t.getsockname()[1])
    serve(t, traffic)
    serve(h, health)
    say("ready %d %d" % (t.getsockname()[1], h.getsockname()[1]))
    # Exit with the test: its end of our stdin closes when it exits, however it exits.
    sys.stdin.read()
    os._exit(0)


if __name__ == "__main__":
    main()
