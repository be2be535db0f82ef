#!/usr/bin/env python3
"""Issue 14's benchmark: `scripts/bench.sh inference` (or FIGURES=inference).

Simulated inference servers (tests/support/inference_sim.py, one process each:
INF_SLOTS requests decode at once, a FIFO queue beyond, one SSE token every
token-ms, the head sent at once, vLLM gauges on /metrics) of different speeds
behind flowgate, fed a bursty arrival trace, once per algorithm:

  round-robin, least-connections, least-load (vLLM /metrics every 100 ms,
  INF_REPORT_INTERVAL),
  least-load+affinity (the same, plus [pools.affinity] header = "x-session-id",
  max_load_factor 1.25 (the default)).

Every algorithm runs behind an HTTP listener (protocol = "http"), so only the
pool's algorithm differs; requests carry `x-session-id` (ignored without
[pools.affinity]) and `x-tokens` (the request's length; the simulator's
--tokens-from-header).

Trace: a modulated Poisson process, seeded: a lull of 2 s, then a burst of
1 s at INF_BURST x the mean rate, and so on (the lull's rate makes the mean
INF_LOAD x the servers' capacity). Each request
has a length drawn uniformly from INF_TOKENS and a session drawn Zipf-like
(weight 1/rank) from INF_SESSIONS sessions. Round r uses seed INF_SEED + r for every
algorithm (the same trace), a fresh flowgate per measurement, a warm-up of
INF_WARMUP seconds (another seed, not measured: least-load learns the speeds),
then the trace; the order of the algorithms rotates from round to round. The
servers are started once and are idle between measurements.

Measured per request, in the client (asyncio, raw streams, monotonic clock):
TTFT = from just before the connect to the first SSE token (the first body
byte that is a token; the head comes at once), the backend (named in the
token), the length, and the time of the last token.

Reported, as medians over the rounds: p50 and p99 TTFT; tokens/s over the
measurement (all tokens / (last token - first request)); the mean decode
rate of one stream (tokens after the first / time from the first to the last
token); the share of requests each backend served; and p99 / oracle p99.

Oracle: computed offline from each round's trace, a discrete-event simulation
of the same servers that knows every queue exactly and sends each request, in
arrival order, where its TTFT is lowest (greedy; ties to the faster server):
a server's slots free at known times (FIFO), a request starts at
max(arrival, earliest free slot), its TTFT is that wait + the server's first
token time, its slot is held for length x the server's token time. Two
versions: "nominal" uses the configured token times and no overhead;
"measured" (the one the ratio is taken against) uses, per server, the median
per-token time measured in that round's runs (the servers run slower than
nominal on a loaded machine), and adds the fixed overhead (client, flowgate,
loopback) measured before the rounds: sequential requests through a
round-robin flowgate on idle servers, TTFT minus that request's token time.

Environment (defaults in brackets):
  ROUNDS         rounds [2]
  INF_SECONDS    length of the measured trace, s [15]
  INF_WARMUP     warm-up before each measurement, s [4]
  INF_SPEEDS     token times of the servers, ms ["5 5 10 20"]
  INF_SLOTS      concurrent requests per server [2]
  INF_TOKENS     request length range, tokens ["4-16"]
  INF_LOAD       mean offered load / capacity [0.6]
  INF_BURST      burst rate / mean rate [1.6]
  INF_SESSIONS   sessions [40]
  INF_SEED       trace seed of round 1 [1]
  INF_ALGOS      which to run ["round-robin least-connections least-load least-load+affinity"];
                 also least-load-inflight: least-load without [pools.load_report]
                 (flowgate's own in-flight counts and learned speeds only),
                 and power-of-two
  INF_REPORT_INTERVAL  [pools.load_report] interval ["100ms"]
  PORT_BASE      first of the ports used [29500]
  OUT_DIR        raw results, configs and logs [<repo>/target/bench/inference-<UTC time>]

Output: progress on stderr; the Markdown tables on stdout, also in
$OUT_DIR/results.md; every request of every run in $OUT_DIR/raw.tsv; the
per-round figures in $OUT_DIR/rounds.tsv; flowgate's pool state (API, after
each least-load run) in $OUT_DIR/pools-*.json.
"""

import argparse
import asyncio
import heapq
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIM = os.path.join(REPO, "tests", "support", "inference_sim.py")


def env(name, default):
    v = os.environ.get(name, "")
    return v if v != "" else default


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ trace --

def make_trace(seed, seconds, mean_rate, burst, tokens, sessions):
    """[(t, tokens, session)]: Poisson arrivals whose rate alternates between a
    burst (burst x mean for 1 s) and a lull (2 s, at the rate that keeps the
    mean), starting with a lull; lengths uniform in tokens, sessions Zipf."""
    rng = random.Random(seed)
    hi_dwell, lo_dwell = 1.0, 2.0
    hi = burst * mean_rate
    lo = max(0.0, (mean_rate * (hi_dwell + lo_dwell) - hi * hi_dwell) / lo_dwell)
    weights = [1.0 / (i + 1) for i in range(sessions)]
    high = False
    t = 0.0
    state_end = lo_dwell
    out = []
    while True:
        rate = hi if high else lo
        nxt = t + (rng.expovariate(rate) if rate > 0 else math.inf)
        if nxt >= state_end:
            # memoryless: restart the clock at the switch
            t = state_end
            high = not high
            state_end = t + (hi_dwell if high else lo_dwell)
            if t >= seconds:
                break
            continue
        t = nxt
        if t >= seconds:
            break
        k = rng.randint(tokens[0], tokens[1])
        s = rng.choices(range(sessions), weights)[0]
        out.append((t, k, f"s{s:03d}"))
    return out


# ------------------------------------------------------------------ oracle --

def oracle(trace, servers, slots):
    """Greedy minimum-TTFT dispatch with exact queue knowledge.

    servers: [(name, token_s, first_s)]: a request of k tokens holds a slot for
    k x token_s; its TTFT is its wait + first_s. Returns [(name, ttft)].
    """
    free = [[0.0] * slots for _ in servers]  # heaps of slot-free times
    out = []
    for t, k, _ in trace:
        best = None
        for i, (name, tok, first) in enumerate(servers):
            start = max(t, free[i][0])
            key = (start - t + first, tok)
            if best is None or key < best[0]:
                best = (key, i, start)
        (ttft, _), i, start = best
        heapq.heapreplace(free[i], start + k * servers[i][1])
        out.append((servers[i][0], ttft))
    return out


# ------------------------------------------------------------------ client --

async def one_request(port, k, session, t_sched, t_origin):
    """One generation: a dict with the measurements, or one with 'error'."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    rec = {"sched": t_sched, "lag": t0 - (t_origin + t_sched), "tokens_asked": k, "session": session}
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            (
                "POST /v1/completions HTTP/1.1\r\nHost: sim\r\n"
                f"x-session-id: {session}\r\nx-tokens: {k}\r\n"
                "Content-Type: application/json\r\nContent-Length: 2\r\n"
                "Connection: close\r\n\r\n{}"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        if status != b"200":
            rec["error"] = f"status {status.decode()}"
            return rec
        chunked = b"transfer-encoding: chunked" in head.lower()
        buf = b""
        n = 0
        first = last = None
        backend = None
        done = False

        async def body():
            if not chunked:
                data = await reader.read(65536)
                return data
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                return b""
            data = await reader.readexactly(size + 2)
            return data[:-2]

        while not done:
            data = await body()
            if not data:
                break
            buf += data
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                if not ev.startswith(b"data: "):
                    continue
                payload = ev[6:]
                if payload == b"[DONE]":
                    done = True
                    break
                now = loop.time()
                if first is None:
                    first = now
                    backend = json.loads(payload)["backend"]
                last = now
                n += 1
        if first is None:
            rec["error"] = "no token"
            return rec
        rec.update(backend=backend, ttft=first - t0, tokens=n, decode=last - first,
                   t_first=first - t_origin, t_last=last - t_origin, t_send=t0 - t_origin)
        return rec
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    finally:
        if writer is not None:
            writer.close()


async def play(port, trace):
    loop = asyncio.get_running_loop()
    origin = loop.time() + 0.05
    tasks = []
    for t, k, s in trace:
        delay = origin + t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_request(port, k, s, t, origin)))
    return await asyncio.gather(*tasks)


# ------------------------------------------------------------------ processes --

def wait_port(port, proc, what, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"inference.py: {what} exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"inference.py: {what} did not listen on {port} in {timeout} s")


def start_sims(speeds, slots, port_base, out_dir):
    sims = []
    names = name_servers(speeds)
    for i, (name, ms) in enumerate(zip(names, speeds)):
        port = port_base + 10 + i
        logf = open(os.path.join(out_dir, f"sim-{name}.log"), "w")
        p = subprocess.Popen(
            [sys.executable, SIM, "--port", str(port), "--name", name, "--token-ms", str(ms),
             "--slots", str(slots), "--tokens-from-header"],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        sims.append((name, ms, port, p))
    for name, _, port, p in sims:
        wait_port(port, p, f"inference_sim.py {name}")
    return sims


def name_servers(speeds):
    """fast1, fast2, mid, slow for 5 5 10 20; generally by speed rank."""
    lo, hi = min(speeds), max(speeds)
    names, seen = [], {}
    for ms in speeds:
        base = "fast" if ms == lo else "slow" if ms == hi else "mid"
        seen[base] = seen.get(base, 0) + 1
        names.append(base)
    count = {}
    out = []
    for b in names:
        if seen[b] > 1:
            count[b] = count.get(b, 0) + 1
            out.append(f"{b}{count[b]}")
        else:
            out.append(b)
    return out


ALGO_CONFIG = {
    "round-robin": 'algorithm = "round-robin"\n',
    "least-connections": 'algorithm = "least-connections"\n',
    "least-load": 'algorithm = "least-load"\n',
    "least-load+affinity": 'algorithm = "least-load"\n',
    # not in the default set: least-load on flowgate's own in-flight counts
    # and learned speeds only (no [pools.load_report])
    "least-load-inflight": 'algorithm = "least-load"\n',
    "power-of-two": 'algorithm = "power-of-two"\n',
}
REPORT_INTERVAL = env("INF_REPORT_INTERVAL", "100ms")
LOAD_REPORT = f'\n[pools.load_report]\nkind = "prometheus"\npreset = "vllm"\ninterval = "{REPORT_INTERVAL}"\n'
AFFINITY = '\n[pools.affinity]\nheader = "x-session-id"\nmax_load_factor = 1.25\n'


def flowgate_config(algo, sims, port, admin_port, sock):
    backends = ", ".join(f'{{ address = "127.0.0.1:{p}" }}' for _, _, p, _ in sims)
    cfg = (
        # an upgrade socket of its own: the default one (/run/flowgate) belongs to
        # any other flowgate running on the machine, and flowgate refuses to start
        # while another answers there
        f'[runtime]\nworkers = 2\nshutdown_timeout = "1s"\nupgrade_socket = "{sock}"\n\n'
        f'[admin]\nbind = "127.0.0.1:{admin_port}"\n\n'
        f'[[listeners]]\nname = "inference"\nbind = "127.0.0.1:{port}"\npool = "p"\n'
        'protocol = "http"\nidle_timeout = "60s"\n\n'
        f'[[pools]]\nname = "p"\nbackends = [{backends}]\n' + ALGO_CONFIG[algo]
    )
    if algo in ("least-load", "least-load+affinity"):
        cfg += LOAD_REPORT
    if algo.endswith("+affinity"):
        cfg += AFFINITY
    return cfg


class Flowgate:
    def __init__(self, binary, algo, sims, port, admin_port, out_dir, tag):
        self.cfg = os.path.join(out_dir, f"flowgate-{tag}.toml")
        with open(self.cfg, "w") as f:
            f.write(flowgate_config(algo, sims, port, admin_port,
                                    os.path.join(out_dir, f"flowgate-{tag}.sock")))
        self.logf = open(os.path.join(out_dir, f"flowgate-{tag}.log"), "w")
        self.proc = subprocess.Popen([binary, "run", "--config", self.cfg], stdout=self.logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.admin_port = admin_port
        wait_port(port, self.proc, f"flowgate ({algo}; log {self.logf.name})")

    def api(self, path):
        try:
            with socket.create_connection(("127.0.0.1", self.admin_port), timeout=2) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.admin_port}\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while True:
                    d = s.recv(65536)
                    if not d:
                        break
                    data += d
            head, _, body = data.partition(b"\r\n\r\n")
            if b"chunked" in head.lower():
                out, rest = b"", body
                while rest:
                    line, _, rest = rest.partition(b"\r\n")
                    n = int(line.split(b";")[0], 16)
                    if n == 0:
                        break
                    out, rest = out + rest[:n], rest[n + 2:]
                body = out
            return body.decode(errors="replace")
        except OSError as e:
            return json.dumps({"error": str(e)})

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.logf.close()


# ------------------------------------------------------------------ stats --

def pct(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    return v[max(0, math.ceil(len(v) * p / 100) - 1)]


def med(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def figures(recs, names):
    ok = [r for r in recs if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    span = max(r["t_last"] for r in ok) - min(r["t_send"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)
    rates = [(r["tokens"] - 1) / r["decode"] for r in ok if r["tokens"] > 1 and r["decode"] > 0]
    share = {n: sum(1 for r in ok if r["backend"] == n) / len(ok) for n in names}
    return {
        "n": len(recs), "errors": len(recs) - len(ok),
        "p50": pct(ttft, 50), "p99": pct(ttft, 99),
        "tps": tokens / span if span > 0 else float("nan"),
        "stream": statistics.mean(rates) if rates else float("nan"),
        "share": share,
        "lag99": pct([r["lag"] for r in recs], 99),
    }


# ------------------------------------------------------------------ main --

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flowgate", required=True, help="the flowgate binary")
    args = ap.parse_args()
    if not os.access(args.flowgate, os.X_OK):
        raise SystemExit(f"inference.py: {args.flowgate} is not an executable")

    rounds = int(env("ROUNDS", "2"))
    seconds = float(env("INF_SECONDS", "15"))
    warmup = float(env("INF_WARMUP", "4"))
    speeds = [float(x) for x in env("INF_SPEEDS", "5 5 10 20").split()]
    slots = int(env("INF_SLOTS", "2"))
    tlo, _, thi = env("INF_TOKENS", "4-16").partition("-")
    tokens = (int(tlo), int(thi or tlo))
    load = float(env("INF_LOAD", "0.6"))
    burst = float(env("INF_BURST", "1.6"))
    sessions = int(env("INF_SESSIONS", "40"))
    seed = int(env("INF_SEED", "1"))
    algos = env("INF_ALGOS", "round-robin least-connections least-load least-load+affinity").split()
    port_base = int(env("PORT_BASE", "29500"))
    out_dir = env("OUT_DIR", os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target"),
                                          "bench", time.strftime("inference-%Y%m%dT%H%M%SZ", time.gmtime())))
    for a in algos:
        if a not in ALGO_CONFIG:
            raise SystemExit(f"inference.py: unknown algorithm {a!r} in ALGOS (one of {' '.join(ALGO_CONFIG)})")
    os.makedirs(out_dir, exist_ok=True)

    mean_tokens = (tokens[0] + tokens[1]) / 2
    capacity = sum(slots / (mean_tokens * ms / 1000) for ms in speeds)
    rate = load * capacity
    log(f"servers {speeds} ms/token, {slots} slots, {tokens[0]}..{tokens[1]} tokens: capacity "
        f"{capacity:.0f} req/s; trace {seconds:g} s at mean {rate:.0f} req/s (bursts {burst * rate:.0f}); "
        f"{rounds} round(s); output in {out_dir}")

    sims = start_sims(speeds, slots, port_base, out_dir)
    names = [s[0] for s in sims]
    fg_port, admin_port = port_base, port_base + 1
    raw = open(os.path.join(out_dir, "raw.tsv"), "w")
    raw.write("round\talgorithm\tsched_s\tlag_s\tsession\ttokens\tbackend\tttft_s\tdecode_s\terror\n")
    results = {}   # (round, algo) -> figures
    measured = {}  # round -> list of recs over all algos
    traces = {}
    try:
        # Overhead: sequential requests on idle servers through round-robin.
        fg = Flowgate(args.flowgate, "round-robin", sims, fg_port, admin_port, out_dir, "calibrate")
        try:
            cal = []
            for i in range(8 * len(sims)):
                cal.append(asyncio.run(one_request(fg_port, 8, "cal", 0.0, time.monotonic())))
        finally:
            fg.stop()
        cal_ok = [r for r in cal if "error" not in r]
        if not cal_ok:
            raise SystemExit(f"inference.py: calibration failed: {cal[0].get('error')}")
        overhead = med([r["ttft"] - r["decode"] / (r["tokens"] - 1) for r in cal_ok])
        log(f"overhead (TTFT minus one token time, idle, through flowgate): {overhead * 1000:.2f} ms")

        for rnd in range(rounds):
            trace = make_trace(seed + rnd, seconds, rate, burst, tokens, sessions)
            warm = make_trace(seed + 1000 + rnd, warmup, rate, burst, tokens, sessions)
            traces[rnd] = trace
            order = algos[rnd % len(algos):] + algos[:rnd % len(algos)]
            for algo in order:
                tag = f"r{rnd + 1}-{algo}"
                fg = Flowgate(args.flowgate, algo, sims, fg_port, admin_port, out_dir, tag)
                try:
                    if warm:
                        asyncio.run(play(fg_port, warm))
                    recs = asyncio.run(play(fg_port, trace))
                    if algo.startswith("least-load"):
                        with open(os.path.join(out_dir, f"pools-{tag}.json"), "w") as f:
                            f.write(fg.api("/api/v1/pools"))
                finally:
                    fg.stop()
                for r in recs:
                    raw.write(f"{rnd + 1}\t{algo}\t{r['sched']:.6f}\t{r['lag']:.6f}\t{r['session']}\t"
                              f"{r.get('tokens', '')}\t{r.get('backend', '')}\t{r.get('ttft', '')}\t"
                              f"{r.get('decode', '')}\t{r.get('error', '')}\n")
                f_ = figures(recs, names)
                results[(rnd, algo)] = f_
                measured.setdefault(rnd, []).extend(r for r in recs if "error" not in r)
                shares = " ".join("%s %.0f%%" % (n, f_["share"][n] * 100) for n in names)
                log(f"round {rnd + 1} {algo}: {f_['n']} requests, {f_['errors']} failed, "
                    f"p50 {f_['p50'] * 1000:.1f} ms, p99 {f_['p99'] * 1000:.1f} ms, "
                    f"shares {shares}, "
                    f"client lag p99 {f_['lag99'] * 1000:.1f} ms")
    finally:
        raw.close()
        for _, _, _, p in sims:
            p.terminate()
        for _, _, _, p in sims:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()

    # Oracles, per round.
    orc = {}
    tok_meas = {}
    for rnd in range(rounds):
        recs = measured[rnd]
        tok = {}
        for n, ms in zip(names, speeds):
            per = [r["decode"] / (r["tokens"] - 1) for r in recs if r["backend"] == n and r["tokens"] > 1]
            tok[n] = med(per) if per else ms / 1000
        tok_meas[rnd] = tok
        nominal = oracle(traces[rnd], [(n, ms / 1000, ms / 1000) for n, ms in zip(names, speeds)], slots)
        meas = oracle(traces[rnd], [(n, tok[n], tok[n] + overhead) for n in names], slots)
        for label, o in (("oracle (nominal)", nominal), ("oracle (measured)", meas)):
            orc[(rnd, label)] = {
                "p50": pct([x[1] for x in o], 50), "p99": pct([x[1] for x in o], 99),
                "share": {n: sum(1 for x in o if x[0] == n) / len(o) for n in names},
            }

    # Tables.
    lines = []
    load_note = open("/proc/loadavg").read().split()[:3]
    lines.append(f"Servers: {len(speeds)} simulated ({', '.join(f'{n} {ms:g} ms/token' for n, ms in zip(names, speeds))}), "
                 f"{slots} slots each, requests of {tokens[0]}..{tokens[1]} tokens; capacity about {capacity:.0f} req/s. "
                 f"Trace: Poisson, mean {rate:.0f} req/s ({load:g} of capacity): bursts of 1 s at {burst * rate:.0f} req/s "
                 f"after lulls of 2 s at {max(0.0, (3 * rate - burst * rate) / 2):.0f} req/s, "
                 f"{seconds:g} s (about {statistics.mean(len(t) for t in traces.values()):.0f} requests) after a "
                 f"{warmup:g} s warm-up; {sessions} sessions (Zipf). Medians over {rounds} round(s). "
                 f"Load average at the end: {' '.join(load_note)}.")
    lines.append("")
    hdr = "| algorithm | TTFT p50 ms | TTFT p99 ms | p99 / oracle | tokens/s | stream tok/s | " + \
          " | ".join(f"{n} %" for n in names) + " | failed |"
    lines.append(hdr)
    lines.append("|" + "---|" * (hdr.count("|") - 1))
    oracle_p99 = {rnd: orc[(rnd, "oracle (measured)")]["p99"] for rnd in range(rounds)}
    for algo in algos:
        rs = [results[(rnd, algo)] for rnd in range(rounds)]
        ratio = med([results[(rnd, algo)]["p99"] / oracle_p99[rnd] for rnd in range(rounds)])
        lines.append(
            f"| {algo} | {med([r['p50'] for r in rs]) * 1000:.1f} | {med([r['p99'] for r in rs]) * 1000:.1f} | "
            f"{ratio:.2f}× | {med([r['tps'] for r in rs]):.0f} | {med([r['stream'] for r in rs]):.0f} | "
            + " | ".join(f"{med([r['share'][n] for r in rs]) * 100:.1f}" for n in names)
            + f" | {sum(r['errors'] for r in rs)} |")
    for label in ("oracle (measured)", "oracle (nominal)"):
        rs = [orc[(rnd, label)] for rnd in range(rounds)]
        lines.append(
            f"| {label} | {med([r['p50'] for r in rs]) * 1000:.1f} | {med([r['p99'] for r in rs]) * 1000:.1f} | "
            f"{med([r['p99'] / oracle_p99[rnd] for rnd, r in enumerate(rs)]):.2f}× | | | "
            + " | ".join(f"{med([r['share'][n] for r in rs]) * 100:.1f}" for n in names) + " | |")
    lines.append("")
    lines.append("Measured token times (median per token, ms; the measured oracle's speeds): "
                 + "; ".join(f"round {rnd + 1}: " + ", ".join(f"{n} {tok_meas[rnd][n] * 1000:.2f}" for n in names)
                             for rnd in range(rounds))
                 + f". Fixed overhead added to the measured oracle's TTFT: {overhead * 1000:.2f} ms.")
    lines.append("Client lag (how late the client sent, p99 ms, per run): "
                 + ", ".join(f"{a} {med([results[(rnd, a)]['lag99'] for rnd in range(rounds)]) * 1000:.1f}"
                             for a in algos) + ".")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "rounds.tsv"), "w") as f:
        f.write("round\talgorithm\tp50_s\tp99_s\ttokens_per_s\tstream_tokens_per_s\t"
                + "\t".join(f"share_{n}" for n in names) + "\terrors\n")
        for (rnd, algo), r in sorted(results.items()):
            f.write(f"{rnd + 1}\t{algo}\t{r['p50']:.6f}\t{r['p99']:.6f}\t{r['tps']:.1f}\t{r['stream']:.1f}\t"
                    + "\t".join(f"{r['share'][n]:.4f}" for n in names) + f"\t{r['errors']}\n")
        for (rnd, label), r in sorted(orc.items()):
            f.write(f"{rnd + 1}\t{label}\t{r['p50']:.6f}\t{r['p99']:.6f}\t\t\t"
                    + "\t".join(f"{r['share'][n]:.4f}" for n in names) + "\t\n")
    print(text, end="")
    failed = sum(r["errors"] for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
