#!/usr/bin/env python3
"""gRPC peers for tests/http.rs, with grpcio (PyPI), no code generation: generic
handlers with raw bytes as messages.

* `grpc_peer.py server N`: N servers on 127.0.0.1 (port 0 each), each with
  /test.Svc/Unary (answers its own name, "127.0.0.1:PORT") and /test.Svc/Stream (the
  request is a count C in ASCII; answers C messages "0", "1", ...). Prints
  "ready PORT1 PORT2 ..."; exits when its stdin closes.
* `grpc_peer.py client TARGET UNARY STREAM`: one insecure channel to TARGET (no
  proxy); UNARY unary calls, then one server stream of STREAM messages when STREAM
  is not 0. Prints JSON: {"counts": {name: calls}, "stream_len", "stream_ok",
  "code"} (code: the stream's status, from its trailers). A failed call raises:
  non-zero exit.
"""

import json
import os
import sys
from concurrent import futures

try:
    import grpc
except ImportError:
    sys.exit("the grpcio package is missing: python3 -m pip install grpcio")


def server(n):
    servers, ports = [], []
    for _ in range(n):
        s = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        port = s.add_insecure_port("127.0.0.1:0")
        name = ("127.0.0.1:%d" % port).encode()

        def unary(req, ctx, name=name):
            return name

        def stream(req, ctx):
            for i in range(int(req)):
                yield b"%d" % i

        h = grpc.method_handlers_generic_handler(
            "test.Svc",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(unary),
                "Stream": grpc.unary_stream_rpc_method_handler(stream),
            },
        )
        s.add_generic_rpc_handlers((h,))
        s.start()
        servers.append(s)
        ports.append(port)
    print("ready " + " ".join(map(str, ports)), flush=True)
    sys.stdin.read()
    os._exit(0)


def client(target, unary_n, stream_n):
    ch = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    grpc.channel_ready_future(ch).result(timeout=10)
    unary = ch.unary_unary("/test.Svc/Unary")
    counts = {}
    for _ in range(unary_n):
        name = unary(b"x", timeout=10).decode()
        counts[name] = counts.get(name, 0) + 1
    out = {"counts": counts}
    if stream_n:
        call = ch.unary_stream("/test.Svc/Stream")(b"%d" % stream_n, timeout=30)
        got = list(call)
        out["stream_len"] = len(got)
        out["stream_ok"] = got == [b"%d" % i for i in range(stream_n)]
        out["code"] = call.code().name
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
