#!/usr/bin/env python3
"""Idle-connection helper for the memory-per-connection figure of scripts/bench.sh.

  holdconn.py server --bind 127.0.0.1 --port 9004
      Accepts any number of TCP connections, echoes every byte it receives
      (so the client can prove the whole client -> balancer -> backend path
      is established) and otherwise keeps the connections open until the
      peer closes them.

  holdconn.py client --host 127.0.0.1 --port 7004 --count 4000 \
                     --ready-file FILE [--hold 300]
      Opens COUNT connections, sends one byte on each and waits for the
      echo, then writes "COUNT" into FILE and holds every connection open
      until it is terminated (SIGTERM/SIGINT) or HOLD seconds have passed.
      Exits non-zero (and writes nothing to FILE) if the connections cannot
      all be established within the timeout.

  holdconn.py client --http --host 127.0.0.1 --port 7051 --count 4000 ...
      The same, but each connection is an HTTP/1.1 client: it sends one
      keep-alive "GET / HTTP/1.1" and reads the whole response (which must be
      a 200 with a Content-Length), and is then held idle, kept alive, like a
      browser's or an SDK's pooled connection between requests
      (the http-mem figure; the backend is an HTTP server, not the hold
      server).

Both sides raise RLIMIT_NOFILE to the hard limit; the client and the server
are separate processes, so each gets its own budget of file descriptors.
"""

import argparse
import os
import resource
import selectors
import signal
import socket
import sys
import time


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def server(args):
    raise_nofile()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((args.bind, args.port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)

    def stop(signum, frame):
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    while True:
        for key, _ in sel.select():
            if key.data is None:
                # Accept everything that is pending.
                while True:
                    try:
                        conn, _ = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:  # EMFILE and friends: report, back off
                        print(f"holdconn server: accept failed: {e}", file=sys.stderr)
                        time.sleep(0.05)
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "c")
            else:
                conn = key.fileobj
                try:
                    data = conn.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    conn.close()
                    continue
                try:
                    conn.send(data)
                except OSError:
                    sel.unregister(conn)
                    conn.close()


HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: holdconn\r\n\r\n"


def http_exchange(s):
    """One keep-alive request on socket s; raises OSError unless a full 200 came back."""
    s.sendall(HTTP_REQUEST)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(4096)
        if not data:
            raise OSError("connection closed before the response head")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if lines[0].split(b" ")[1:2] != [b"200"]:
        raise OSError("response %r" % lines[0])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        if name.strip().lower() == b"connection" and b"close" in value.lower():
            raise OSError("the server asked to close the connection")
    if length is None:
        raise OSError("response without Content-Length")
    while len(body) < length:
        data = s.recv(4096)
        if not data:
            raise OSError("connection closed mid-body")
        body += data


def client(args):
    limit = raise_nofile()
    if args.count + 16 > limit:
        print(f"holdconn client: --count {args.count} needs more fds than the limit {limit}",
              file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.timeout
    socks = []
    for i in range(args.count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            s.connect((args.host, args.port))
            if args.http:
                http_exchange(s)
            else:
                s.sendall(b"x")
                if s.recv(1) != b"x":
                    raise OSError("connection closed before the echo came back")
        except OSError as e:
            print(f"holdconn client: connection {i + 1}/{args.count} failed: {e}",
                  file=sys.stderr)
            return 1
        socks.append(s)

    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{len(socks)}\n")
    os.rename(tmp, args.ready_file)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    end = time.monotonic() + args.hold
    while time.monotonic() < end:
        time.sleep(0.2)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("server")
    ps.add_argument("--bind", default="127.0.0.1")
    ps.add_argument("--port", type=int, required=True)
    pc = sub.add_parser("client")
    pc.add_argument("--host", default="127.0.0.1")
    pc.add_argument("--port", type=int, required=True)
    pc.add_argument("--count", type=int, default=4000)
    pc.add_argument("--ready-file", required=True)
    pc.add_argument("--hold", type=float, default=300.0)
    pc.add_argument("--http", action="store_true",
                    help="one HTTP/1.1 keep-alive request per connection instead of the echo")
    pc.add_argument("--timeout", type=float, default=60.0,
                    help="seconds allowed for establishing all connections")
    args = p.parse_args()
    if args.cmd == "server":
        return server(args)
    return client(args)


if __name__ == "__main__":
    sys.exit(main() or 0)
