#!/usr/bin/env python3
"""WebSocket peers for tests/http.rs, with the `websockets` package (PyPI).

* `ws_echo.py server`: an echo server on 127.0.0.1 (port 0); prints "ready PORT",
  then one line "conn PATH" per connection; exits when its stdin closes.
* `ws_echo.py client URL`: connects (no proxy), sends a text, a binary and a 1 MB
  text message, checks each comes back unchanged, closes cleanly and prints "ok".
  Any failure is an exception and a non-zero exit.
"""

import asyncio
import sys

try:
    import websockets
except ImportError:
    sys.exit("the websockets package is missing: python3 -m pip install websockets")


async def echo(ws):
    print("conn " + ws.request.path, flush=True)
    async for m in ws:
        await ws.send(m)


async def server():
    async with websockets.serve(echo, "127.0.0.1", 0, max_size=None) as s:
        port = s.sockets[0].getsockname()[1]
        print("ready %d" % port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def client(url):
    async with websockets.connect(url, max_size=None, proxy=None, open_timeout=10) as ws:
        for m in ["hello", b"\x00\x01\xffbinary", "x" * 1_000_000]:
            await ws.send(m)
            got = await asyncio.wait_for(ws.recv(), 10)
            if got != m:
                sys.exit("sent %r..., got %r..." % (m[:20], got[:20]))
    print("ok", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(server())
    else:
        asyncio.run(client(sys.argv[2]))
