#!/usr/bin/env python3
"""System calls per short TCP connection through flowgate (one worker) with the PROXY
protocol off, accept_proxy v2, accept_proxy v2 + send_proxy v2, and send_proxy v2
alone, counted with `strace -f -c` attached to the running binary.

Usage: scripts/bench/proxy_syscalls.py FLOWGATE_BINARY [CONNECTIONS]

Each connection: connect, send (a v2 header naming 198.51.100.7:51000 when the
listener takes one, then) 64 bytes in one write, read the 64 bytes back from an echo
backend (which also echoes any header flowgate sends), close. 50 uncounted
connections warm up first. The listener binds a fixed free port. Needs root (or
ptrace_scope 0) for strace. Figures: docs/performance.md.
"""
import socket, subprocess, sys, time, re, os, threading, struct, signal
BIN = sys.argv[1]; N = int(sys.argv[2]) if len(sys.argv) > 2 else 500
def echo_server():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0)); s.listen(512)
    def loop():
        while True:
            c, _ = s.accept()
            def h(c=c):
                while True:
                    d = c.recv(65536)
                    if not d: break
                    c.sendall(d)
                c.close()
            threading.Thread(target=h, daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    return s.getsockname()[1]
V2 = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12) + socket.inet_aton("198.51.100.7") + socket.inet_aton("203.0.113.1") + struct.pack("!HH", 51000, 443)
def run(listener_extra, pool_extra, header):
    port = echo_server()
    t = socket.socket(); t.bind(("127.0.0.1", 0)); fixed = t.getsockname()[1]; t.close()
    cfg = f"""[runtime]\nworkers = 1\nupgrade_socket = "/tmp/ppsys.sock"\n[[listeners]]\nname = "l"\nbind = "127.0.0.1:{fixed}"\npool = "p"\n{listener_extra}\n[[pools]]\nname = "p"\n{pool_extra}\nbackends = [ {{ address = "127.0.0.1:{port}" }} ]\n"""
    open("/tmp/ppsys.toml", "w").write(cfg)
    p = subprocess.Popen([BIN, "run", "--config", "/tmp/ppsys.toml"], stderr=subprocess.PIPE, env={"RUST_LOG": "info"})
    addr = None
    while addr is None:
        m = re.search(r"listener=l addr=127.0.0.1:(\d+)", p.stderr.readline().decode())
        if m: addr = int(m.group(1))
    threading.Thread(target=lambda: p.stderr.read(), daemon=True).start()
    payload = b"x" * 64
    def one():
        c = socket.create_connection(("127.0.0.1", addr)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sendall(header + payload); got = b""
        while not got.endswith(payload):
            d = c.recv(4096)
            if not d: raise SystemExit("closed")
            got += d
        c.close()
    for _ in range(50): one()
    time.sleep(0.5)
    st = subprocess.Popen(["strace", "-f", "-c", "-p", str(p.pid), "-o", "/tmp/ppsys.strace"])
    time.sleep(1.0)
    for _ in range(N): one()
    time.sleep(0.5)
    st.send_signal(signal.SIGINT); st.wait()
    p.terminate(); p.wait()
    total = 0; calls = {}
    for line in open("/tmp/ppsys.strace"):
        f = line.split()
        if len(f) >= 5 and f[-1] not in ("syscall", "total") and f[3].isdigit():
            calls[f[-1]] = int(f[3]); total += int(f[3])
    ep = calls.get("epoll_wait", 0)
    top = ", ".join(f"{k} {v/N:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v / N >= 0.1)
    print(f"{total/N:.2f} per connection, {(total-ep)/N:.2f} besides epoll_wait: {top}")
print("plain:              ", end=""); run("", "", b"")
print("accept_proxy v2:    ", end=""); run('accept_proxy = "v2"', "", V2)
print("accept+send v2:     ", end=""); run('accept_proxy = "v2"', 'send_proxy = "v2"', V2)
print("send_proxy v2 only: ", end=""); run("", 'send_proxy = "v2"', b"")
