#!/usr/bin/env python3
"""The traffic side of scripts/ha-test.sh: a backend, a client loop, and the figures.

  ha_client.py serve PORT
      A backend: each connection sends one line, and gets back the address it came
      from (the balancer instance's own address, since flowgate connects from it).
  ha_client.py loop HOST:PORT STOPFILE LOG
      Short requests one after another (connect, send a line, read the answer,
      close) until STOPFILE exists. Each attempt is a LOG line:
      "START END ok PEER" or "START END fail REASON", times in Unix seconds.
  ha_client.py analyze LOG FROM TO TARGET
      Figures for the attempts that started between FROM and TO, as key=value:
      attempts, ok_target, ok_other, failed; first_ok_s (from FROM to the end of
      the first success through TARGET); failed_after_first_ok and
      other_after_first_ok (attempts after that success that failed, or went
      through another instance); last_bad_s (from FROM to the end of the last
      attempt that did not succeed through TARGET, 0 when none).
"""

import os
import socket
import socketserver
import sys
import time


def serve(port):
    class Answer(socketserver.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            self.wfile.write(f"{self.client_address[0]}\n".encode())

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer(("0.0.0.0", port), Answer) as srv:
        srv.serve_forever()


def attempt(host, port):
    """One short request; returns ("ok", peer) or ("fail", reason)."""
    try:
        # A short connect timeout: while the VIP moves, SYNs go unanswered, and the
        # next attempt should not wait long. A long answer timeout: a slow answer on
        # a busy machine is not a failure.
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.settimeout(5.0)
            s.sendall(b"hello\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    return "fail", "eof"
                data += chunk
            return "ok", data.decode().strip()
    except OSError as e:
        return "fail", type(e).__name__


def loop(target, stop, log):
    host, port = target.rsplit(":", 1)
    with open(log, "w", buffering=1) as out:
        while not os.path.exists(stop):
            start = time.time()
            result, what = attempt(host, int(port))
            out.write(f"{start:.3f} {time.time():.3f} {result} {what}\n")
            time.sleep(0.02)


def analyze(log, t_from, t_to, target):
    rows = []
    with open(log) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 4:
                continue  # the line being written when the log was read
            start, end = float(parts[0]), float(parts[1])
            if t_from <= start <= t_to:
                rows.append((start, end, parts[2], parts[3]))
    good = [r for r in rows if r[2] == "ok" and r[3] == target]
    bad = [r for r in rows if not (r[2] == "ok" and r[3] == target)]
    first_ok = good[0] if good else None
    after = [r for r in rows if first_ok and r[0] > first_ok[0]]
    figures = {
        "attempts": len(rows),
        "ok_target": len(good),
        "ok_other": sum(1 for r in rows if r[2] == "ok" and r[3] != target),
        "failed": sum(1 for r in rows if r[2] == "fail"),
        "first_ok_s": f"{first_ok[1] - t_from:.3f}" if first_ok else "none",
        "failed_after_first_ok": sum(1 for r in after if r[2] == "fail"),
        "other_after_first_ok": sum(1 for r in after if r[2] == "ok" and r[3] != target),
        "last_bad_s": f"{max(r[1] for r in bad) - t_from:.3f}" if bad else "0",
    }
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "serve" and len(sys.argv) == 3:
        serve(int(sys.argv[2]))
    elif cmd == "loop" and len(sys.argv) == 5:
        loop(*sys.argv[2:5])
    elif cmd == "analyze" and len(sys.argv) == 6:
        analyze(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
