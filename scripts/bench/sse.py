#!/usr/bin/env python3
"""SSE helper for the http-sse figure of scripts/bench.sh.

  sse.py server --bind 127.0.0.1 --port 29010 [--gap-ms 5]
      A tiny asyncio HTTP/1.1 server. Every request (any method and path) is
      answered at once with a `text/event-stream` response, chunked, whose
      first event ("data: first") goes out in the same write as the response
      head; GAP-MS later a second event ("data: T", T the server's
      time.monotonic_ns() just before the write) and the last chunk end the
      response, and the connection stays open for the next request
      (keep-alive). TCP_NODELAY is set on every connection. A balancer that
      held the first event back until more data or the end of the response
      came would show a first-event time of GAP-MS or more.

  sse.py client --host 127.0.0.1 --port 7010 --requests 500 [--warmup 20]
      Sends REQUESTS GET /sse requests one after another on one kept-alive
      connection (TCP_NODELAY, reconnecting only if the peer closes) and
      measures, in the process with time.perf_counter(), the time from just
      before the request is written to the moment the first complete event
      (a "data:" line ended by a blank line) of the decoded body has been
      read; and the delay of the second event, a mid-stream one: from T (the
      server's CLOCK_MONOTONIC, which this process shares) to the moment its
      chunk has been read. The first WARMUP requests are not counted (the
      balancer's upstream connection is set up there). Prints "p50 p99 mean
      event-p50 event-p99" in microseconds on stdout; exits non-zero on any error (status other than
      200, a response without an event, a connection failure).

Only the standard library is used.
"""

import argparse
import asyncio
import math
import socket
import statistics
import sys
import time

HEAD = (b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"\r\n")


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


FIRST = chunk(b"data: first\n\n")


def last():
    """The second event, stamped with the time it is written, and the end."""
    return chunk(b"data: %d\n\n" % time.monotonic_ns()) + b"0\r\n\r\n"


async def handle(reader, writer, gap):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or 0)
            if length:
                await reader.readexactly(length)
            writer.write(HEAD + FIRST)
            await writer.drain()
            await asyncio.sleep(gap)
            writer.write(last())
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(args):
    gap = args.gap_ms / 1000.0
    server = await asyncio.start_server(lambda r, w: handle(r, w, gap), args.bind, args.port,
                                        backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def server(args):
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


class Conn:
    """One kept-alive HTTP/1.1 client connection with a small incremental reader."""

    def __init__(self, host, port, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the connection was closed mid-response")
        self.buf += data

    def take_until(self, sep):
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out, self.buf = self.buf[:i], self.buf[i + len(sep):]
                return out
            self.fill()

    def take(self, n):
        while len(self.buf) < n:
            self.fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def one_request(conn, host):
    """Sends one request; returns (seconds to the first event, nanoseconds from
    the second event's write to its arrival or None, keep_alive)."""
    req = b"GET /sse HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n" % host.encode()
    t0 = time.perf_counter()
    conn.sock.sendall(req)
    head = conn.take_until(b"\r\n\r\n").split(b"\r\n")
    status = head[0].split(b" ")
    if len(status) < 2 or status[1] != b"200":
        raise ValueError("status line %r" % head[0])
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    chunked = b"chunked" in headers.get(b"transfer-encoding", b"")
    length = int(headers[b"content-length"]) if b"content-length" in headers else None
    keep = b"close" not in headers.get(b"connection", b"")
    body = b""
    first = None
    event = None

    def saw_event():
        return first is None and b"\n\n" in body and b"data:" in body

    if chunked:
        while True:
            size = int(conn.take_until(b"\r\n").split(b";")[0], 16)
            if size == 0:
                while conn.take_until(b"\r\n"):  # trailers, up to the blank line
                    pass
                break
            body += conn.take(size)
            conn.take(2)
            if saw_event():
                first = time.perf_counter() - t0
            elif first is not None and event is None:
                # The second event: "data: T" (the server's write time).
                rest = body.split(b"\n\n", 1)[1]
                if rest.startswith(b"data: ") and rest.endswith(b"\n\n"):
                    try:
                        event = time.monotonic_ns() - int(rest[6:-2])
                    except ValueError:
                        pass
    elif length is not None:
        while len(body) < length:
            if not conn.buf:
                conn.fill()
            n = min(length - len(body), len(conn.buf))
            body, conn.buf = body + conn.buf[:n], conn.buf[n:]
            if saw_event():
                first = time.perf_counter() - t0
    else:  # delimited by the close
        keep = False
        try:
            while True:
                if not conn.buf:
                    conn.fill()
                body, conn.buf = body + conn.buf, b""
                if saw_event():
                    first = time.perf_counter() - t0
        except EOFError:
            pass
    if first is None:
        raise ValueError("no event in the response body %r" % body[:200])
    return first, event, keep


def client(args):
    samples = []
    events = []
    conn = None
    reconnects = -1
    try:
        for i in range(args.warmup + args.requests):
            if conn is None:
                conn = Conn(args.host, args.port, args.timeout)
                reconnects += 1
            first, event, keep = one_request(conn, args.host)
            if i >= args.warmup:
                samples.append(first * 1e6)
                if event is not None:
                    events.append(event / 1e3)
            if not keep:
                conn.sock.close()
                conn = None
    except (OSError, EOFError, ValueError) as e:
        print("sse client: request %d failed: %s" % (len(samples) + 1, e), file=sys.stderr)
        return 1
    samples.sort()
    events.sort()
    if not events:
        print("sse client: no stamped second event in any response", file=sys.stderr)
        return 1

    def pct(p, of=samples):
        return of[max(0, math.ceil(p / 100.0 * len(of)) - 1)]  # nearest rank

    if reconnects:
        print("sse client: note: %d reconnects (the peer closed the connection)" % reconnects,
              file=sys.stderr)
    print("%.1f %.1f %.1f %.1f %.1f" % (pct(50), pct(99), statistics.fmean(samples),
                                        pct(50, events), pct(99, events)))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("server")
    ps.add_argument("--bind", default="127.0.0.1")
    ps.add_argument("--port", type=int, required=True)
    ps.add_argument("--gap-ms", type=float, default=5.0,
                    help="time between the first event and the end of the response")
    pc = sub.add_parser("client")
    pc.add_argument("--host", default="127.0.0.1")
    pc.add_argument("--port", type=int, required=True)
    pc.add_argument("--requests", type=int, default=500)
    pc.add_argument("--warmup", type=int, default=20)
    pc.add_argument("--timeout", type=float, default=10.0, help="socket timeout, seconds")
    args = p.parse_args()
    if args.cmd == "server":
        return server(args)
    return client(args)


if __name__ == "__main__":
    sys.exit(main() or 0)
