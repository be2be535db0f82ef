#!/usr/bin/env python3
"""HTTP/1.1 backends for tests/http.rs (flowgate's L7 mode), run as a child process.

Starts --servers servers on 127.0.0.1 (port 0 each; ThreadingHTTPServer with
protocol_version HTTP/1.1, so connections are kept alive) and prints
"ready PORT1 PORT2 ..." once all listen. A server's name is "127.0.0.1:PORT", the
backend's name in flowgate. It exits when its stdin closes, so a test that dies
leaves no backend behind.

Every request but GET /__seen and GET /__conns is recorded as "METHOD TARGET"
(TARGET as received, query included) before it is answered; GET /__seen answers
the list as JSON, so a test asks a backend directly what reached it. GET /__conns
answers how many connections are open, the one asking included.

What a request gets depends on its query's `do` (any path, so routes and
strip_prefix do not matter):

* (none): 200, JSON {backend, method, target, headers: [[name, value], ...],
  body_len, sha256}, after reading the whole body (Content-Length or chunked,
  hashed as it streams).
* do=sse&n=N&ms=M: 200 text/event-stream, chunked: N events "id: I\\ndata: T\\n\\n",
  one every M ms, T the time.time() just before the event is written. With
  &ack=KEY the events go in lockstep instead: event I+1 is written only once the
  client has said it got event I with GET /__ack?key=KEY&i=I (sent straight to this
  server); after 30 s without it the stream ends early. A proxy that held an event
  back would stall the stream, with no clock involved.
* do=download&bytes=N: 200 with N bytes from `blocks()` (tests/http.rs makes the
  same bytes to compare hashes).
* do=sleep&ms=M: waits M ms, then as with no `do`.
* do=die: reads the body, sends a head promising 1,000,000 bytes and 1,000 of them,
  then resets the connection (a backend dying mid-response).
* do=status&code=C: answers C with a short body.
* do=hop: 200 with hop-by-hop headers (Connection: x-bar, X-Bar, Keep-Alive) and an
  end-to-end X-Kept.
* do=trailers: 200, chunked: "hello" and the trailer X-Checksum: 42.

HEAD gets the head GET would get, without the body. With --idle-close-ms MS, a
kept-alive connection with no request for MS is closed (as nginx's
keepalive_timeout does), without a word.

Every response carries X-Backend: NAME.
"""

import hashlib
import http.server
import json
import os
import socket
import struct
import sys
import threading
import time
import urllib.parse

BLOCK = 65536


def base_block():
    return bytes((i * 7 + i // 251) % 256 for i in range(BLOCK))


BASE = base_block()


def blocks(total):
    """The download bytes: 64 KiB blocks, block K starting with K as a big-endian
    u64 and then BASE from byte 8; the last block cut to size."""
    k = 0
    left = total
    while left > 0:
        b = struct.pack(">Q", k) + BASE[8:]
        if left < BLOCK:
            b = b[:left]
        yield b
        left -= len(b)
        k += 1


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "test-backend"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.lock:
            self.server.open += 1

    def finish(self):
        with self.server.lock:
            self.server.open -= 1
        super().finish()

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def read_body(self):
        h = hashlib.sha256()
        n = 0
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("eof in chunked body")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    d = self.rfile.read(min(left, BLOCK))
                    if not d:
                        raise ConnectionError("eof in chunk")
                    h.update(d)
                    n += len(d)
                    left -= len(d)
                self.rfile.readline(3)
        else:
            left = int(self.headers.get("Content-Length", "0") or 0)
            while left:
                d = self.rfile.read(min(left, BLOCK))
                if not d:
                    raise ConnectionError("eof in body")
                h.update(d)
                n += len(d)
                left -= len(d)
        return n, h.hexdigest()

    def reply(self, code, body, ctype="application/json", extra=()):
        self.send_response(code)
        self.send_header("X-Backend", self.server.name)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def serve(self):
        url = urllib.parse.urlsplit(self.path)
        if self.command == "GET" and url.path == "/__seen":
            with self.server.lock:
                seen = list(self.server.seen)
            return self.reply(200, json.dumps(seen).encode())
        if self.command == "GET" and url.path == "/__ack":
            a = dict(urllib.parse.parse_qsl(url.query))
            with self.server.acked:
                self.server.acks.add((a["key"], int(a["i"])))
                self.server.acked.notify_all()
            return self.reply(200, b"{}")
        if self.command == "GET" and url.path == "/__conns":
            with self.server.lock:
                n = self.server.open
            return self.reply(200, json.dumps(n).encode())
        with self.server.lock:
            self.server.seen.append("%s %s" % (self.command, self.path))
        q = dict(urllib.parse.parse_qsl(url.query))
        do = q.get("do", "")
        if do == "sse":
            return self.sse(int(q.get("n", "20")), int(q.get("ms", "50")), q.get("ack"))
        if do == "download":
            total = int(q["bytes"])
            self.send_response(200)
            self.send_header("X-Backend", self.server.name)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(total))
            self.end_headers()
            if self.command != "HEAD":
                for b in blocks(total):
                    self.wfile.write(b)
            return
        if do == "trailers":
            self.send_response(200)
            self.send_header("X-Backend", self.server.name)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Checksum")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n0\r\nX-Checksum: 42\r\n\r\n")
            return
        n, digest = self.read_body()
        if do == "die":
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nX-Backend: "
                + self.server.name.encode()
                + b"\r\n\r\n"
                + b"x" * 1000
            )
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            self.close_connection = True
            return
        if do == "status":
            return self.reply(int(q["code"]), b"status\n", "text/plain")
        if do == "hop":
            return self.reply(
                200,
                b"hop\n",
                "text/plain",
                [("Connection", "x-bar"), ("X-Bar", "1"), ("Keep-Alive", "timeout=5"), ("X-Kept", "1")],
            )
        if do == "sleep":
            time.sleep(int(q["ms"]) / 1000.0)
        body = {
            "backend": self.server.name,
            "method": self.command,
            "target": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": n,
            "sha256": digest,
        }
        self.reply(200, json.dumps(body).encode())

    def sse(self, n, ms, ack=None):
        self.send_response(200)
        self.send_header("X-Backend", self.server.name)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(n):
            if i and ack is not None:
                with self.server.acked:
                    if not self.server.acked.wait_for(lambda: (ack, i - 1) in self.server.acks, 30):
                        break
            elif i:
                time.sleep(ms / 1000.0)
            ev = ("id: %d\ndata: %.6f\n\n" % (i, time.time())).encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev))
        self.wfile.write(b"0\r\n\r\n")


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        # A client (flowgate) that resets or stalls is part of the tests: no
        # traceback on the test's stderr.
        pass

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.name = "127.0.0.1:%d" % self.server_address[1]
        self.seen = []
        self.open = 0
        self.lock = threading.Lock()
        # (key, event) pairs clients acknowledged (do=sse&ack=KEY).
        self.acks = set()
        self.acked = threading.Condition()


def main():
    count = 1
    args = sys.argv[1:]
    while args:
        if args[0] == "--servers":
            count = int(args[1])
        elif args[0] == "--idle-close-ms":
            Handler.timeout = int(args[1]) / 1000.0
        else:
            sys.exit("unknown argument " + args[0])
        args = args[2:]
    servers = [Server() for _ in range(count)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready " + " ".join(str(s.server_address[1]) for s in servers), flush=True)
    sys.stdin.read()
    os._exit(0)


if __name__ == "__main__":
    main()
