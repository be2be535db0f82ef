#!/usr/bin/env python3
"""A simulated inference server for tests/least_load.rs (issue 14).

One process is one GPU server: at most --slots requests run at once (continuous
batching), the rest wait in a FIFO queue. A running request emits --tokens tokens,
one every --token-ms milliseconds, as Server-Sent Events; the response head goes
out at once, as real servers send it, so time to first token is the time to the
first body byte.

GET /metrics (HTTP/1.1, kept alive) exposes the vLLM gauges:
vllm:num_requests_waiting, vllm:num_requests_running, and the KV cache usage
under its current name (vllm:kv_cache_usage_perc) or, with --old-names, its
former one (vllm:gpu_cache_usage_perc). --metrics-mode garbage|huge|status
serves a malformed body, an endless one, or a 500 instead.

GET /control/token-ms/<ms> changes the time per token from then on (a server
that gets slow, or recovers). Any other request (the body is ignored) is a
generation. The line "listening <port>" on stdout says it is ready. With
--tokens-from-header, a request's `x-tokens: N` header (1..100000) sets its token
count instead of --tokens (scripts/bench/inference.py: requests of different
lengths).
"""

import argparse
import asyncio
import sys


class Server:
    def __init__(self, args):
        self.args = args
        self.slots = asyncio.Semaphore(args.slots)
        self.waiting = 0
        self.running = 0
        self.served = 0

    def metrics(self):
        cache = "vllm:gpu_cache_usage_perc" if self.args.old_names else "vllm:kv_cache_usage_perc"
        usage = self.running / self.args.slots
        return (
            "# HELP vllm:num_requests_waiting Requests waiting.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="sim"}} {self.waiting}\n'
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="sim"}} {self.running}\n'
            f"# TYPE {cache} gauge\n"
            f'{cache}{{model_name="sim"}} {usage}\n'
            f'vllm:request_success_total{{model_name="sim"}} {self.served}\n'
        ).encode()

    async def handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = line.split()
                path = parts[1] if len(parts) > 1 else "/"
                length = 0
                tokens = self.args.tokens
                for h in head.split(b"\r\n")[1:]:
                    if h.lower().startswith(b"content-length:"):
                        length = int(h.split(b":", 1)[1])
                    elif self.args.tokens_from_header and h.lower().startswith(b"x-tokens:"):
                        tokens = max(1, min(100_000, int(h.split(b":", 1)[1])))
                if length:
                    await reader.readexactly(length)
                if path.startswith("/control/token-ms/"):
                    self.args.token_ms = float(path.rsplit("/", 1)[1])
                    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                    await writer.drain()
                    continue
                if path == "/metrics":
                    if not await self.serve_metrics(writer):
                        return
                    continue
                await self.generate(writer, tokens)
                return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def serve_metrics(self, writer):
        mode = self.args.metrics_mode
        if mode == "status":
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return True
        if mode == "huge":
            # An endless body: flowgate must stop reading at its cap.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"x_filler_metric 1\n" * 4000
            framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
            for _ in range(100_000):
                writer.write(framed)
                await writer.drain()
            return False
        body = b"this is not an exposition {{{\n" if mode == "garbage" else self.metrics()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        return True

    async def generate(self, writer, tokens):
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        self.waiting += 1
        async with self.slots:
            self.waiting -= 1
            self.running += 1
            try:
                for i in range(tokens):
                    await asyncio.sleep(self.args.token_ms / 1000.0)
                    writer.write(b"data: {\"backend\": \"%s\", \"token\": %d}\n\n" % (self.args.name.encode(), i))
                    await writer.drain()
                writer.write(b"data: [DONE]\n\n")
                await writer.drain()
            finally:
                self.running -= 1
                self.served += 1


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--name", default="sim")
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--tokens", type=int, default=6)
    p.add_argument("--token-ms", type=float, default=5.0)
    p.add_argument("--tokens-from-header", action="store_true")
    p.add_argument("--old-names", action="store_true")
    p.add_argument("--metrics-mode", default="ok", choices=["ok", "garbage", "huge", "status"])
    args = p.parse_args()
    server = Server(args)
    srv = await asyncio.start_server(server.handle, "127.0.0.1", args.port, backlog=1024)
    print("listening", srv.sockets[0].getsockname()[1], flush=True)
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
