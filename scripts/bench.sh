#!/usr/bin/env bash
# Side-by-side benchmark of flowgate against HAProxy (mode tcp, with and
# without `option splice-auto`), nginx `stream` and a direct connection; for
# UDP against nginx `stream` (`listen ... udp`) and a direct connection only,
# as HAProxy OSS does not balance UDP; for HTTP (flowgate's L7 mode,
# `protocol = "http"`) against HAProxy `mode http`, nginx `http` (proxy_pass)
# and a direct connection.
#
# Everything runs on loopback (127.0.0.1) on this machine. All balancers get
# 2 workers/threads and are left unpinned. The run is interleaved: in every
# round each figure is measured for every target before moving on to the next
# figure, and the final table reports the median over the rounds together with
# flowgate/HAProxy ratios (flowgate/nginx in the UDP table, both in the HTTP
# table). Benchmarks are not tests; CI does not run this.
#
# Usage:
#   scripts/bench.sh                       # full TCP run, about 10 minutes
#   ROUNDS=1 TARGETS="direct flowgate haproxy" FIGURES="bulk1 latency" scripts/bench.sh
#   FIGURES=udp TARGETS="direct flowgate nginx" scripts/bench.sh   # UDP, about 3 minutes
#   FIGURES=http scripts/bench.sh          # HTTP (L7), about 5 minutes
#   ROUNDS=1 WRK_TIME=2 MEM_CONNS=500 SSE_REQUESTS=100 FIGURES=http scripts/bench.sh  # HTTP smoke, 1 minute
#   FIGURES=syscalls SYS_OPS=2000 scripts/bench.sh   # syscalls per operation, under a minute
#   FIGURES=edge TARGETS="direct flowgate haproxy nginx" scripts/bench.sh   # PROXY v2 and SNI cps, 2 minutes
#
# The default FIGURES are the six TCP figures, as before the UDP figures were
# added: the UDP section would add about 3 minutes (a third) to a default
# run, so it is asked for explicitly, with FIGURES=udp or FIGURES=all (or by
# naming UDP figures); the same goes for the HTTP figures (FIGURES=http). The
# HTTP figures run on direct, haproxy, nginx and the flowgate targets;
# haproxy-splice is skipped for them, with a note (splice-auto changes nothing
# for their small responses). The haproxy targets are skipped for the UDP
# figures, with a note; flowgate (and flowgate-shared) are skipped, with a note
# and without failing the run, when `flowgate check` rejects the UDP
# configuration (written to $OUT_DIR/<target>-udp/flowgate.toml). One that
# accepts it but then does not start, or dies, is skipped or fails its UDP
# figures, and the run exits 1.
#
# Environment (defaults in brackets):
#   ROUNDS         rounds to run                                          [3]
#   TARGETS        any of: direct flowgate haproxy haproxy-splice nginx  [these five]
#                  and flowgate-shared (flowgate with worker_model = "shared";
#                  plain flowgate uses the default, "per-core"), and
#                  flowgate-metrics (flowgate with [admin], so the metrics
#                  recorder is on, scraped once a second during the run; plain
#                  flowgate has no [admin] and records no histograms), and
#                  flowgate-base (plain flowgate's configuration and flags,
#                  run with $FLOWGATE_BASE_BIN: an older build to compare
#                  against in the same interleaved run; its own column, and a
#                  flowgate / flowgate-base ratio, in the report), and
#                  flowgate-busy (flowgate with runtime.busy_poll = $BUSY_POLL,
#                  the latency mode) and haproxy-busy (HAProxy with
#                  `busy-polling` in its global section)
#   FIGURES        any of: bulk1 bulk4 latency cps rps mem (TCP)          [these six]
#                  udp-latency udp-pps udp-iperf (UDP; targets direct, flowgate,
#                  flowgate-shared, flowgate-metrics, flowgate-base and
#                  nginx); http-rps http-post-rps http-h2-rps http-latency
#                  http-sse http-sse-l4 http-mem (HTTP, L7; every target but
#                  haproxy-splice); the words tcp, udp, http and all stand for
#                  the TCP figures, the UDP figures, the HTTP figures and all
#                  sixteen.
#                  edge-pp edge-sni (issue 13's edge features; the word edge
#                  stands for the two, and `all` does not include them):
#                  new connections per second, measured like cps (wrk -t
#                  WRK_THREADS -c WRK_CONNS -d WRK_TIME, one connection per
#                  request), through a separate instance of each balancer
#                  (<target>-edge) whose listeners use the feature, with
#                  scripts/bench/edge.lua choosing what each connection sends
#                  first. wrk is the client for both because it is the
#                  fastest client here and the same as cps's, so the figures
#                  measure the balancers rather than the tooling (a Python
#                  client would not reach these rates on 2 CPUs), and they
#                  can be read against cps.
#                  edge-pp: each connection starts with a PROXY protocol v2
#                    header (28 bytes, source 198.51.100.7:40000) followed by
#                    the cps request, in one write. The balancer takes the
#                    header (flowgate accept_proxy = "v2"; HAProxy `bind ...
#                    accept-proxy`; nginx `listen ... proxy_protocol`) and
#                    sends its own to the backend (flowgate pool send_proxy =
#                    "v2", which adds a 16-byte PP2_TYPE_UNIQUE_ID TLV;
#                    HAProxy `server ... send-proxy-v2`; nginx `proxy_protocol
#                    on`, which can only send v1), an nginx `listen ...
#                    proxy_protocol` server (backend 13) that answers 200 "ok".
#                    direct sends the client's header straight to it. No
#                    kept-alive PROXY figure: the header is read once per
#                    connection, so on kept-alive connections it would
#                    measure the pump, which rps already does.
#                  edge-sni: each connection sends the same real TLS 1.3
#                    ClientHello (316 bytes, server_name bench.test, captured
#                    once from openssl s_client -servername bench.test; in
#                    edge.lua) and reads the reply. The balancer routes it by
#                    SNI without terminating TLS (flowgate sni_routes with
#                    sni_required; HAProxy `tcp-request inspect-delay 3s`,
#                    `req.ssl_sni` ACLs and use_backend; nginx ssl_preread
#                    and a `map ... hostnames`), two routes each: other.bench.test
#                    and *.apps.bench.test first, then bench.test, the one
#                    taken. The backend (backend 14, nginx stream with
#                    ssl_preread on and `return`) reads the ClientHello and
#                    answers a fixed HTTP-shaped reply that wrk can count,
#                    then closes. No TLS handshake is completed: with real
#                    handshakes (openssl s_time) the TLS server's key
#                    exchange is the bottleneck for every balancer alike.
#                  Both also report the balancer's CPU time (user + system,
#                  all its processes, from /proc) per connection during the
#                  run, as http-rps does per request.
#                  The edge figures run on every target but haproxy-splice
#                  (skipped with a note: splice-auto changes nothing for
#                  these few bytes). A flowgate target whose build rejects
#                  the edge configuration (an older FLOWGATE_BASE_BIN) is
#                  skipped with a note.
#                  sys-pingpong sys-short sys-udp (the word syscalls stands
#                  for the three; `all` does not include them): system calls
#                  per operation, counted with `strace -f -c` attached to a
#                  separate one-worker instance of each balancer (<target>-sys;
#                  HAProxy nbthread 1, nginx worker_processes 1, flowgate
#                  workers = 1) while scripts/bench/sysload.py does exactly
#                  SYS_OPS operations one after another against its own echo
#                  backend, after an uncounted warm-up: sys-pingpong a 64 B
#                  round trip on one kept TCP connection, sys-short a TCP
#                  connection (connect, 64 B each way, close), sys-udp a 64 B
#                  UDP round trip on one session (not haproxy: HAProxy OSS has
#                  no UDP). Each syscall's count (failed calls included) is
#                  divided by SYS_OPS; the table gives the total and every
#                  syscall at 0.1 or more per operation. Counts are nearly
#                  deterministic, so these run once, before the rounds, not
#                  in them. With only syscall figures and no TARGETS given,
#                  TARGETS is "flowgate haproxy nginx" and the timed rounds are
#                  skipped. strace must be installed (apt-get install strace)
#                  and allowed to attach (root, or ptrace_scope 0).
#   SYS_OPS        operations per syscall figure                          [2000]
#                  udp-latency: sockperf ping-pong RTT, 64-byte datagrams
#                    (p50/p99/p99.9, like latency over TCP, with --full-rtt).
#                  udp-pps: sockperf throughput, 64-byte datagrams sent as
#                    fast as the client can; the figure is the rate at which
#                    a sockperf server (started for each measurement) received
#                    them, and the loss is the share of the sent ones it did
#                    not receive.
#                  udp-iperf: iperf3 -u with 1400-byte datagrams at each rate
#                    of UDP_IPERF_RATES: the throughput the server received
#                    and the loss % it saw. iperf3 runs its control connection
#                    over TCP on the same port, so the balancers forward TCP
#                    and UDP on that port to the same iperf3 server.
#   IPERF_TIME     seconds per iperf3 run                                 [5]
#   SOCKPERF_TIME  seconds per sockperf ping-pong run (TCP and UDP)       [5]
#   UDP_PPS_TIME   seconds per sockperf throughput run (udp-pps)          [2]
#   UDP_IPERF_TIME seconds per iperf3 -u run (udp-iperf, per rate)        [3]
#   UDP_IPERF_RATES  iperf3 -b values for udp-iperf, one run each      ["1G 0"]
#                  1G (about 89k datagrams/s) is an offered load below what
#                  the direct path carries on 2 CPUs (a few % loss there), so
#                  it compares loss at one fixed load; 0 (unlimited: the client
#                  sends as fast as it can) compares the most each can carry,
#                  the loss showing how far the client outran it. On 2 CPUs
#                  the client, the balancer and the server share the CPUs, so
#                  a sweep of higher rates would mostly measure that contention.
#                  The HTTP figures go through a separate instance of each
#                  balancer with L7 listeners (flowgate `protocol = "http"`,
#                  HAProxy `mode http`, nginx `http` + proxy_pass; the
#                  configuration is described at write_haproxy_config below),
#                  all in front of HTTP/1.1 backends, upstream connections
#                  kept alive and reused:
#                  http-rps: wrk -t WRK_THREADS -c WRK_CONNS -d WRK_TIME, HTTP/1.1
#                    on kept-alive connections to the nginx backend's tiny
#                    static response; requests/s.
#                  http-post-rps: as http-rps, each request a POST with a
#                    228-byte JSON body (scripts/bench/post.lua: an OpenAI-style
#                    chat request, what an inference client sends; wrk writes
#                    the head and body in one write), to the same backend
#                    (nginx's `return` reads and drops the body).
#                  http-h2-rps: h2load -c H2_CLIENTS -m H2_STREAMS -t WRK_THREADS
#                    -D WRK_TIME over h2c (prior knowledge); requests/s. direct
#                    is h2c to nginx's own `listen ... http2` port; the
#                    balancers translate to HTTP/1.1 (flowgate's pool has
#                    upstream_protocol = "http1": "auto" would send h2c to the
#                    backend for h2c clients).
#                    For both, also the balancer's CPU time (user + system, all
#                    its processes, from /proc) per request during the run:
#                    less disturbed by other work on the machine than the rate.
#                  http-latency: p50/p99 of HTTP/1.1 requests at a fixed rate:
#                    h2load --h1 -c HTTP_LAT_CLIENTS --rps (HTTP_LAT_RPS /
#                    HTTP_LAT_CLIENTS) -D WRK_TIME, every request's time from
#                    its --log-file (not wrk2, which is not packaged, and not
#                    wrk's latency distribution, which is measured at
#                    saturation). A client sends its next request only after
#                    the previous response (one per connection), so a slow
#                    response delays the next: no coordinated-omission
#                    correction.
#                  http-sse: time to the first event of an SSE response
#                    (scripts/bench/sse.py: an asyncio backend that sends the
#                    head and the first event at once and the last one
#                    SSE_GAP_MS later; a client that sends SSE_REQUESTS
#                    requests, plus 20 uncounted, one after another on one
#                    kept-alive connection and times each with perf_counter
#                    in-process); p50/p99 in µs, and in the report what each
#                    balancer adds over direct. Also p50/p99 of the second,
#                    mid-stream event's delay: from the backend's write (a
#                    CLOCK_MONOTONIC stamp in the event) to the client's read.
#                  http-sse-l4: the same through each balancer's L4 (TCP)
#                    mode, a tcp listener in the same instance in front of the
#                    same SSE backend: what the L7 mode adds is held to this.
#                  http-mem: like mem, but MEM_CONNS HTTP/1.1 client connections
#                    that each made one kept-alive request (to the nginx
#                    backend) and are then idle; KiB of balancer RSS per
#                    connection.
#   WRK_TIME       seconds per wrk run                                    [5]
#   WRK_THREADS    wrk threads                                            [2]
#   WRK_CONNS      wrk connections                                        [64]
#   MEM_CONNS      idle connections held for the memory figures           [4000]
#   H2_CLIENTS     h2load connections for http-h2-rps                     [16]
#   H2_STREAMS     concurrent streams per connection for http-h2-rps      [10]
#   HTTP_LAT_RPS   total request rate for http-latency (req/s)            [2000]
#   HTTP_LAT_CLIENTS  h2load connections for http-latency, each at
#                  HTTP_LAT_RPS / HTTP_LAT_CLIENTS req/s                  [4]
#   SSE_REQUESTS   counted requests per http-sse measurement              [500]
#   SSE_GAP_MS     ms between the SSE backend's first and last event      [5]
#   PORT_BASE      first port of the block of ports used                  [29000]
#   OUT_DIR        where raw results, configs and logs go
#                  [${CARGO_TARGET_DIR:-<repo>/target}/bench/<UTC timestamp>]
#   FLOWGATE_BIN   use this binary instead of `cargo build --release`
#   FLOWGATE_BASE_BIN  the binary of the flowgate-base target (never built
#                  here); required when TARGETS has flowgate-base
#   BUSY_POLL      runtime.busy_poll of the flowgate-busy target          [50us]
#   CARGO_TARGET_DIR  honoured for the cargo build                       [<repo>/target]
#   NO_INSTALL=1   never apt-get install missing tools, fail instead
#   FOREIGN_THRESHOLD  % of one CPU that processes outside the benchmark may
#                  use during a measurement before it counts as disturbed [15]
#   QUIET_WAIT     before each measurement wait up to this many seconds for
#                  the machine to be quiet (below FOREIGN_THRESHOLD)        [0]
#   RETRY_DISTURBED  measure a disturbed measurement again, up to N times [0]
#   NICE           run the benchmark (every process it starts) at this nice
#                  level; negative values need root. On a shared machine,
#                  e.g. NICE=-10 keeps other work from taking the CPUs.      [0]
#
# UDP sessions: flowgate's UDP listeners and nginx's `listen ... udp` servers
# drop a client's session after 30 s without traffic (flowgate idle_timeout,
# nginx proxy_timeout); neither limits the responses per client datagram
# (no flowgate `responses`, no nginx `proxy_responses`), as every figure is a
# flow of many datagrams. nginx gets `reuseport` on its UDP listeners, so each
# client sticks to one worker, and $LB_WORKERS (2) workers like every balancer
# here (the same as `worker_processes auto` on a 2-CPU machine).
#
# Tools (installed with `apt-get install -y` when missing): haproxy, nginx
# (+ libnginx-mod-stream, also for edge-sni's backend), iperf3, sockperf, wrk,
# h2load (nghttp2-client), strace (syscall figures);
# python3 must be present.
#
# Output: progress on stderr; the Markdown result tables on stdout, also saved
# as $OUT_DIR/results.md. Raw per-round numbers are in $OUT_DIR/raw.tsv; the CPU
# used by processes outside this benchmark during each measurement (as % of one
# CPU; warned about above FOREIGN_THRESHOLD, default 15) in $OUT_DIR/load.tsv;
# the machine and tool versions in $OUT_DIR/meta.txt; every tool's output under
# $OUT_DIR/runs/ and every server's log and config under $OUT_DIR. The
# syscall figures add $OUT_DIR/syscalls.md (their tables, also at the end of
# results.md), $OUT_DIR/syscalls.tsv (every syscall's count per figure and
# target) and each strace summary as $OUT_DIR/runs/sys-<figure>-<target>.strace.

set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPERS=$REPO/scripts/bench
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}

# Issue 14: `scripts/bench.sh inference` (or FIGURES containing "inference")
# runs only scripts/bench/inference.py, simulated inference servers behind
# flowgate (its header documents the method and the INF_* knobs; ROUNDS [2],
# PORT_BASE, OUT_DIR and FLOWGATE_BIN are honoured).
if [[ ${1:-} == inference || " ${FIGURES:-} " == *" inference "* ]]; then
    if [[ -z ${FLOWGATE_BIN:-} ]]; then
        CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --manifest-path "$REPO/Cargo.toml" >&2
        FLOWGATE_BIN=$TARGET_DIR/release/flowgate
    fi
    exec python3 "$HELPERS/inference.py" --flowgate "$FLOWGATE_BIN"
fi

ROUNDS=${ROUNDS:-3}
TARGETS_GIVEN=${TARGETS:+1}
TARGETS=${TARGETS:-"direct flowgate haproxy haproxy-splice nginx"}
FIGURES=${FIGURES:-"bulk1 bulk4 latency cps rps mem"}
SYS_OPS=${SYS_OPS:-2000}
IPERF_TIME=${IPERF_TIME:-5}
SOCKPERF_TIME=${SOCKPERF_TIME:-5}
UDP_PPS_TIME=${UDP_PPS_TIME:-2}
UDP_IPERF_TIME=${UDP_IPERF_TIME:-3}
UDP_IPERF_RATES=${UDP_IPERF_RATES:-"1G 0"}
WRK_TIME=${WRK_TIME:-5}
WRK_THREADS=${WRK_THREADS:-2}
WRK_CONNS=${WRK_CONNS:-64}
MEM_CONNS=${MEM_CONNS:-4000}
H2_CLIENTS=${H2_CLIENTS:-16}
H2_STREAMS=${H2_STREAMS:-10}
HTTP_LAT_RPS=${HTTP_LAT_RPS:-2000}
HTTP_LAT_CLIENTS=${HTTP_LAT_CLIENTS:-4}
SSE_REQUESTS=${SSE_REQUESTS:-500}
SSE_GAP_MS=${SSE_GAP_MS:-5}
PORT_BASE=${PORT_BASE:-29000}
OUT_DIR=${OUT_DIR:-$TARGET_DIR/bench/$(date -u +%Y%m%dT%H%M%SZ)}
FLOWGATE_BIN=${FLOWGATE_BIN:-}
FLOWGATE_BASE_BIN=${FLOWGATE_BASE_BIN:-}
BUSY_POLL=${BUSY_POLL:-50us}
NO_INSTALL=${NO_INSTALL:-0}
FOREIGN_THRESHOLD=${FOREIGN_THRESHOLD:-15}
QUIET_WAIT=${QUIET_WAIT:-0}
RETRY_DISTURBED=${RETRY_DISTURBED:-0}
NICE=${NICE:-0}

LB_WORKERS=2          # workers/threads for every balancer (fixed by design)
HOST=127.0.0.1
UDP_IDLE_TIMEOUT=30s  # UDP session idle timeout, flowgate and nginx alike

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench.sh: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- arguments --

ALL_TARGETS="direct flowgate flowgate-shared flowgate-metrics flowgate-base flowgate-busy haproxy haproxy-splice haproxy-busy nginx"
TCP_FIGURES="bulk1 bulk4 latency cps rps mem"
UDP_FIGURES="udp-latency udp-pps udp-iperf"
UDP_TARGETS="direct flowgate flowgate-shared flowgate-metrics flowgate-base flowgate-busy nginx" # the targets that can measure UDP
HTTP_FIGURES="http-rps http-post-rps http-h2-rps http-latency http-sse http-sse-l4 http-mem"
# The targets that run the HTTP (L7) figures: not haproxy-splice, whose only
# difference, splice-auto, does nothing for the few bytes of these responses.
HTTP_TARGETS="direct flowgate flowgate-shared flowgate-metrics flowgate-base flowgate-busy haproxy haproxy-busy nginx"
# Issue 13's edge features (PROXY protocol v2, SNI routing): cps through a
# separate instance of each balancer (<target>-edge); not in `all`. Not
# haproxy-splice, as for HTTP.
EDGE_FIGURES="edge-pp edge-sni"
EDGE_TARGETS="$HTTP_TARGETS"
ALL_FIGURES="$TCP_FIGURES $UDP_FIGURES $HTTP_FIGURES"
# Syscalls per operation (strace -c on a one-worker instance); not in `all`:
# they need strace and measure something else than the timed figures.
SYS_FIGURES="sys-pingpong sys-short sys-udp"
FIGURES=$(for f in $FIGURES; do
    case $f in
        tcp) echo "$TCP_FIGURES" ;; udp) echo "$UDP_FIGURES" ;; http) echo "$HTTP_FIGURES" ;;
        syscalls) echo "$SYS_FIGURES" ;; edge) echo "$EDGE_FIGURES" ;;
        all) echo "$ALL_FIGURES" ;; *) echo "$f" ;;
    esac
done | tr ' ' '\n' | awk 'NF && !seen[$0]++' | paste -sd ' ')
for t in $TARGETS; do
    [[ " $ALL_TARGETS " == *" $t "* ]] || die "unknown target '$t' (known: $ALL_TARGETS)"
done
for f in $FIGURES; do
    [[ " $ALL_FIGURES $SYS_FIGURES $EDGE_FIGURES " == *" $f "* ]] ||
        die "unknown figure '$f' (known: $ALL_FIGURES $SYS_FIGURES $EDGE_FIGURES, or tcp udp http syscalls edge all)"
done
# Only syscall figures: the timed rounds are skipped, and unless TARGETS was
# given the targets are the three balancers (direct has no process to trace).
SYS_ONLY=1
for f in $FIGURES; do [[ $f == sys-* ]] || SYS_ONLY=0; done
((SYS_ONLY)) && [[ -z $TARGETS_GIVEN ]] && TARGETS="flowgate haproxy nginx"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
for v in SYS_OPS IPERF_TIME SOCKPERF_TIME UDP_PPS_TIME UDP_IPERF_TIME WRK_TIME WRK_THREADS WRK_CONNS MEM_CONNS PORT_BASE \
    H2_CLIENTS H2_STREAMS HTTP_LAT_RPS HTTP_LAT_CLIENTS SSE_REQUESTS SSE_GAP_MS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
for v in FOREIGN_THRESHOLD QUIET_WAIT RETRY_DISTURBED; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer, got '${!v}'"
done
[[ $NICE =~ ^-?[0-9]+$ ]] || die "NICE must be an integer, got '$NICE'"
for b in $UDP_IPERF_RATES; do
    [[ $b =~ ^[0-9]+(\.[0-9]+)?[KMG]?$ ]] || die "UDP_IPERF_RATES: '$b' is not an iperf3 -b rate (like 500M, 1G or 0)"
done
[[ -n ${UDP_IPERF_RATES// /} ]] || die "UDP_IPERF_RATES is empty"
((HTTP_LAT_RPS >= HTTP_LAT_CLIENTS)) || die "HTTP_LAT_RPS ($HTTP_LAT_RPS) must be at least HTTP_LAT_CLIENTS ($HTTP_LAT_CLIENTS)"
((PORT_BASE + 800 < 32768)) || die "PORT_BASE must leave room below the ephemeral port range (32768)"

# Open files. Every process started from here inherits the raised soft limit.
# The balancers' limits are sized for 20000 descriptors (less if the machine
# allows less), so that the configuration is the same on every machine that
# allows at least that many.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_BUDGET=$(ulimit -n)
[[ $FD_BUDGET == unlimited ]] || ((FD_BUDGET > 20000)) && FD_BUDGET=20000
# HAProxy: 2 fds per connection plus, with splicing, a pipe pair per 4 connections.
HAPROXY_MAXCONN=$(((FD_BUDGET - 100) * 2 / 5))
((HAPROXY_MAXCONN > 7900)) && HAPROXY_MAXCONN=7900
NGINX_RLIMIT=$FD_BUDGET
NGINX_WORKER_CONNECTIONS=$((FD_BUDGET * 19 / 20))
((MEM_CONNS <= HAPROXY_MAXCONN - 100 && 2 * MEM_CONNS + 200 <= FD_BUDGET)) ||
    die "MEM_CONNS=$MEM_CONNS is too high for the open-files limit $(ulimit -n) (HAProxy maxconn would be $HAPROXY_MAXCONN)"
[[ -n ${TARGETS// /} ]] || die "TARGETS is empty"
[[ -n ${FIGURES// /} ]] || die "FIGURES is empty"
if [[ " $TARGETS " == *" flowgate-base "* ]]; then
    [[ -n $FLOWGATE_BASE_BIN ]] || die "the flowgate-base target needs FLOWGATE_BASE_BIN (the flowgate binary to compare against)"
    [[ -x $FLOWGATE_BASE_BIN ]] || die "FLOWGATE_BASE_BIN=$FLOWGATE_BASE_BIN is not an executable"
fi

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }
has_figure() { [[ " $FIGURES " == *" $1 "* ]]; }
has_any_figure() { local f; for f in "$@"; do has_figure "$f" && return 0; done; return 1; }
is_udp_figure() { [[ $1 == udp-* ]]; }
is_http_figure() { [[ $1 == http-* ]]; }
can_udp() { [[ " $UDP_TARGETS " == *" $1 "* ]]; }
can_http() { [[ " $HTTP_TARGETS " == *" $1 "* ]]; }
is_edge_figure() { [[ $1 == edge-* ]]; }
can_edge() { [[ " $EDGE_TARGETS " == *" $1 "* ]]; }

# -------------------------------------------------------------------- ports --
# Backend services: 1 = iperf3, 2 = sockperf, 3 = HTTP (nginx), 4 = idle-hold,
# and for UDP: 5 = sockperf (UDP, udp-latency), 6 = iperf3 (UDP data and TCP
# control on the same port, udp-iperf), 7 = sockperf (UDP, udp-pps; started
# afresh for every measurement, so its exit report counts what it received).
# direct uses the backend port itself; balancer number i listens on
# PORT_BASE + 100*i + service; the memory-figure instance on PORT_BASE + 100*i + 50.
# The TCP services go through one instance of each balancer and the UDP ones
# through a second instance (<target>-udp), so that a balancer that refuses the
# UDP configuration still runs the TCP figures; its listeners are named after the
# services, and udp-iperf's TCP listener (for iperf3's control connection)
# udp-iperf-tcp.
#
# HTTP (L7) figures: 8 = an HTTP listener (HTTP/1.1 clients; http-rps,
# http-post-rps, http-latency) in front of the nginx backend (3), 9 = an HTTP listener for h2c
# clients (prior knowledge; http-h2-rps) in front of the same nginx backend,
# whose own h2c port for direct is backend port 9, 10 = an HTTP listener in
# front of the SSE backend (scripts/bench/sse.py on backend port 10). They go
# through a third instance of each balancer (<target>-l7); http-mem starts a
# fresh one per measurement on PORT_BASE + 100*i + 51, in front of the nginx
# backend. direct uses the backend ports: 3 for 8, 9 for 9, 10 for 10.
#
# Syscall figures: 11 = TCP echo, 12 = UDP echo (scripts/bench/sysload.py
# server, one process for both), through a fourth instance of each balancer
# (<target>-sys) with one worker, started and stopped around its figures.
#
# Edge figures (issue 13): 13 = edge-pp (PROXY v2 in and out; backend 13 is an
# nginx http server that takes a PROXY header), 14 = edge-sni (SNI routes; the
# pool of the route taken and the pool of the other route both use backend 14,
# nginx stream answering a ClientHello with a fixed reply). One instance of each
# balancer, <target>-edge; one nginx backend instance for both ($OUT_DIR/edge-backend).

SVC_NAMES=(none iperf sockperf http hold udp-sockperf udp-iperf udp-pps l7-http l7-h2c l7-sse sys-tcp sys-udp edge-pp edge-sni sse-l4)
target_index() {
    case $1 in
        flowgate) echo 1 ;; haproxy) echo 2 ;; haproxy-splice) echo 3 ;; nginx) echo 4 ;;
        flowgate-shared) echo 5 ;; flowgate-metrics) echo 6 ;; flowgate-base) echo 7 ;;
        flowgate-busy) echo 8 ;; haproxy-busy) echo 9 ;;
        *) die "no index for target '$1'" ;;
    esac
}
backend_port() { echo $((PORT_BASE + $1)); }
target_port() { # target service-number
    if [[ $1 == direct ]]; then backend_port "$2"; else echo $((PORT_BASE + 100 * $(target_index "$1") + $2)); fi
}
admin_port() { # instance-name: the admin API of a flowgate-metrics instance
    local base=$((PORT_BASE + 100 * $(target_index flowgate-metrics) + 90))
    case $1 in
        *-udp) echo $((base + 1)) ;; *-mem) echo $((base + 2)) ;; *-l7) echo $((base + 3)) ;;
        *-l7mem) echo $((base + 4)) ;; *-edge) echo $((base + 5)) ;; *) echo "$base" ;;
    esac
}
mem_port() { echo $((PORT_BASE + 100 * $(target_index "$1") + 50)); }
http_mem_port() { echo $((PORT_BASE + 100 * $(target_index "$1") + 51)); }
http_port() { # target service(8|9|10|15): where an HTTP figure's client connects
    if [[ $1 == direct ]]; then
        case $2 in 8) backend_port 3 ;; 15) backend_port 10 ;; *) backend_port "$2" ;; esac
    else
        target_port "$1" "$2"
    fi
}

# ------------------------------------------------------ process management --

PIDS=()
declare -A PID_NAME=()
OLD_AUTOGROUP_NICE=
LAST_PID=

descendants() { # pid -> all descendant pids, one per line
    local c
    for c in $(pgrep -P "$1" 2>/dev/null || true); do
        echo "$c"
        descendants "$c"
    done
}

start_bg() { # name logfile command...
    local name=$1 logf=$2
    shift 2
    "$@" >"$logf" 2>&1 </dev/null &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    PID_NAME[$LAST_PID]=$name
}

stop_pid() { # pid: TERM, wait up to 5 s, then KILL it and anything it left behind
    local pid=$1 kids i gone
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kids=$(descendants "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    gone=0
    for ((i = 0; i < 100; i++)); do
        # A zombie still answers kill -0 (bash reaps it asynchronously, or in `wait` below).
        if ! kill -0 "$pid" 2>/dev/null || [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]]; then
            gone=1
            break
        fi
        sleep 0.05
    done
    if ((!gone)); then
        log "warning: ${PID_NAME[$pid]:-pid $pid} still running 5 s after SIGTERM, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    for i in $kids; do kill -KILL "$i" 2>/dev/null || true; done
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${PIDS[i]}"
    done
    if [[ -n $OLD_AUTOGROUP_NICE ]]; then echo "$OLD_AUTOGROUP_NICE" >"/proc/$$/autogroup" 2>/dev/null || true; fi
    if ((rc != 0)); then log "stopped (exit status $rc); logs are in $OUT_DIR/logs"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ((NICE != 0)); then
    renice -n "$NICE" -p $$ >/dev/null || die "cannot renice to $NICE (negative values need root)"
    # With autogroup scheduling, nice only ranks tasks within one session;
    # between sessions the session's autogroup nice counts. Set it for the
    # duration of the run and put it back in cleanup.
    if [[ -w /proc/$$/autogroup ]] && [[ $(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null) == 1 ]]; then
        OLD_AUTOGROUP_NICE=$(awk '{ print $NF }' "/proc/$$/autogroup")
        echo "$NICE" >"/proc/$$/autogroup" || die "cannot set the autogroup nice level to $NICE"
    fi
fi

is_listening() { # port
    if command -v ss >/dev/null 2>&1; then
        [[ -n $(ss -ltnH "sport = :$1" 2>/dev/null) ]]
    else
        (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
    fi
}

is_udp_bound() { # port: is a UDP socket bound to it (on any address)?
    awk -v p="$(printf ':%04X' "$1")" 'FNR > 1 && substr($2, length($2) - 4) == p { f = 1; exit } END { exit !f }' \
        /proc/net/udp /proc/net/udp6 2>/dev/null
}

is_bound() { # tcp|udp port
    if [[ $1 == udp ]]; then is_udp_bound "$2"; else is_listening "$2"; fi
}

wait_bound() { # pid name logfile proto:port... : poll until every port is bound;
    # returns 1, after printing why, when the process exits or 20 s pass first
    local pid=$1 name=$2 logf=$3 spec proto port deadline what
    shift 3
    deadline=$((SECONDS + 20))
    for spec in "$@"; do
        proto=${spec%%:*} port=${spec#*:}
        what=$([[ $proto == udp ]] && echo "bound to UDP" || echo "listening on")
        until is_bound "$proto" "$port"; do
            if ! is_running "$pid"; then
                printf 'bench.sh: error: %s exited during startup; last lines of %s:\n' "$name" "$logf" >&2
                tail -n 20 "$logf" >&2 || true
                return 1
            fi
            if ((SECONDS >= deadline)); then
                printf 'bench.sh: error: %s is not %s %s:%s after 20 s; last lines of %s:\n' \
                    "$name" "$what" "$HOST" "$port" "$logf" >&2
                tail -n 20 "$logf" >&2 || true
                return 1
            fi
            sleep 0.05
        done
    done
}

wait_listen() { # pid name logfile port... : poll until every TCP port listens, exit if not
    local pid=$1 name=$2 logf=$3 port specs=()
    shift 3
    for port in "$@"; do specs+=("tcp:$port"); done
    wait_bound "$pid" "$name" "$logf" "${specs[@]}" || exit 1
}

is_running() { # pid: alive and not a zombie (bash reaps its children asynchronously)
    kill -0 "$1" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

check_alive() { # pid name logfile
    kill -0 "$1" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]] && return 0
    printf 'bench.sh: error: %s has died; last lines of %s:\n' "$2" "$3" >&2
    tail -n 20 "$3" >&2 || true
    exit 1
}

rss_kib() { # pid -> summed VmRSS (KiB) of the process and all its descendants
    local p total=0 v
    for p in "$1" $(descendants "$1"); do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

proc_ticks() { # pid -> user + system CPU ticks of the process and all its descendants
    local p total=0
    for p in "$1" $(descendants "$1"); do
        total=$((total + $(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }' || echo 0)))
    done
    echo "$total"
}

cpu_snapshot() { # -> "<uptime s> <busy jiffies, all CPUs> <jiffies used by this benchmark>"
    # Busy = user + nice + system + irq + softirq from /proc/stat. "Ours" is this
    # shell and all its descendants (reaped ones via cutime/cstime), plus
    # the ksoftirqd threads, which run the loopback traffic's deferred softirq
    # work. With tick-based accounting a task's stime includes the softirq ticks
    # it was interrupted for, hence softirq must be on both sides.
    local up busy ours=0 p
    read -r up _ </proc/uptime
    busy=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat)
    for p in $$ $(descendants $$) $(pgrep -x 'ksoftirqd/[0-9]+' 2>/dev/null || true); do
        ours=$((ours + $(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 + $14 + $15 }' || echo 0)))
    done
    echo "$up $busy $ours"
}

foreign_cpu_pct() { # "snapshot-before" "snapshot-after" -> % of one CPU used by other processes
    awk -v a="$1" -v b="$2" -v hz="$(getconf CLK_TCK)" 'BEGIN {
        split(a, x, " "); split(b, y, " ")
        wall = y[1] - x[1]; if (wall <= 0) { print 0; exit }
        f = ((y[2] - x[2]) - (y[3] - x[3])) / hz / wall * 100
        printf "%.0f", (f < 0 ? 0 : f) }'
}

# -------------------------------------------------------------------- tools --

ensure_tools() {
    local need=() pkgs=() cmd
    has_any_figure bulk1 bulk4 udp-iperf && need+=(iperf3)
    has_any_figure latency udp-latency udp-pps && need+=(sockperf)
    # shellcheck disable=SC2086 # word splitting intended
    has_any_figure $SYS_FIGURES && need+=(strace)
    has_any_figure cps rps && need+=(wrk nginx)
    # shellcheck disable=SC2086 # word splitting intended
    has_any_figure $EDGE_FIGURES && need+=(wrk nginx)
    has_any_figure http-rps http-post-rps http-h2-rps http-latency http-sse http-sse-l4 http-mem && need+=(nginx)
    has_any_figure http-rps http-post-rps && need+=(wrk)
    has_any_figure http-h2-rps http-latency && need+=(h2load)
    { has_target haproxy || has_target haproxy-splice || has_target haproxy-busy; } && need+=(haproxy)
    has_target nginx && need+=(nginx)
    for cmd in "${need[@]}"; do
        # h2load comes in Debian's nghttp2-client package.
        command -v "$cmd" >/dev/null 2>&1 || pkgs+=("$([[ $cmd == h2load ]] && echo nghttp2-client || echo "$cmd")")
    done
    # edge-sni's backend is an nginx stream server, whatever the targets.
    if has_target nginx || has_figure edge-sni; then
        # Debian builds the stream module as a dynamic module in its own package.
        if ! command -v nginx >/dev/null 2>&1 ||
            { nginx -V 2>&1 | grep -q -- '--with-stream=dynamic' &&
                ! [[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]]; }; then
            pkgs+=(libnginx-mod-stream)
        fi
    fi
    # Deduplicate.
    mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | awk 'NF && !seen[$0]++')
    if ((${#pkgs[@]})); then
        [[ $NO_INSTALL == 1 ]] && die "missing tools: ${pkgs[*]} (NO_INSTALL=1)"
        command -v apt-get >/dev/null 2>&1 || die "missing tools: ${pkgs[*]}, and no apt-get to install them"
        local sudo=()
        if ((EUID != 0)); then
            command -v sudo >/dev/null 2>&1 || die "missing tools: ${pkgs[*]}; run as root or install them"
            sudo=(sudo)
        fi
        log "installing: ${pkgs[*]}"
        if ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${pkgs[@]}" >"$OUT_DIR/logs/apt.log" 2>&1; then
            log "apt-get install failed, retrying after apt-get update"
            DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update >>"$OUT_DIR/logs/apt.log" 2>&1 || true
            DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${pkgs[@]}" >>"$OUT_DIR/logs/apt.log" 2>&1 ||
                die "apt-get install ${pkgs[*]} failed; see $OUT_DIR/logs/apt.log"
        fi
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 is required"
    for cmd in "${need[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || die "$cmd is still missing after installation"
    done
}

build_flowgate() {
    if [[ -n $FLOWGATE_BIN ]]; then
        [[ -x $FLOWGATE_BIN ]] || die "FLOWGATE_BIN=$FLOWGATE_BIN is not an executable"
        return
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found (or set FLOWGATE_BIN)"
    log "building flowgate: cargo build --release (CARGO_TARGET_DIR=$TARGET_DIR)"
    if ! CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --manifest-path "$REPO/Cargo.toml" \
        >"$OUT_DIR/logs/cargo-build.log" 2>&1; then
        tail -n 30 "$OUT_DIR/logs/cargo-build.log" >&2
        die "cargo build --release failed; see $OUT_DIR/logs/cargo-build.log"
    fi
    FLOWGATE_BIN=$TARGET_DIR/release/flowgate
    [[ -x $FLOWGATE_BIN ]] || die "cargo build succeeded but $FLOWGATE_BIN does not exist"
}

# ----------------------------------------------------------------- backends --

declare -A BACKEND_PID=()
declare -A BACKEND_LOG=()

start_backends() {
    local port logf dir
    if has_any_figure bulk1 bulk4; then
        port=$(backend_port 1)
        logf=$OUT_DIR/logs/iperf3-server.log
        # --idle-timeout: restart the server if an aborted client ever leaves it stuck.
        start_bg "iperf3 server" "$logf" iperf3 -s -B "$HOST" -p "$port" --idle-timeout 30
        BACKEND_PID[iperf]=$LAST_PID BACKEND_LOG[iperf]=$logf
        wait_listen "$LAST_PID" "iperf3 server" "$logf" "$port"
    fi
    if has_figure latency; then
        port=$(backend_port 2)
        logf=$OUT_DIR/logs/sockperf-server.log
        start_bg "sockperf server" "$logf" sockperf server --tcp -i "$HOST" -p "$port"
        BACKEND_PID[sockperf]=$LAST_PID BACKEND_LOG[sockperf]=$logf
        wait_listen "$LAST_PID" "sockperf server" "$logf" "$port"
    fi
    if has_any_figure cps rps http-rps http-post-rps http-h2-rps http-latency http-mem; then
        port=$(backend_port 3)
        dir=$OUT_DIR/nginx-http
        mkdir -p "$dir/tmp"
        local h2c_listen='' h2c_port=''
        if has_figure http-h2-rps; then
            # h2c with prior knowledge (nginx's `listen ... http2` without ssl),
            # for direct's http-h2-rps; the balancers talk HTTP/1.1 to port 3.
            h2c_port=$(backend_port 9)
            h2c_listen="listen $HOST:$h2c_port http2 backlog=4096;"
        fi
        cat >"$dir/nginx.conf" <<EOF
# HTTP backend for the cps/rps and HTTP (L7) figures: a tiny static response.
$(nginx_main "$dir")
http {
    access_log off;
    keepalive_timeout 350s;
    keepalive_requests 100000000;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    server {
        listen $HOST:$port backlog=4096;
        $h2c_listen
        location / {
            default_type text/plain;
            return 200 "ok\n";
        }
    }
}
EOF
        logf=$OUT_DIR/logs/nginx-http-backend.log
        start_bg "nginx HTTP backend" "$logf" nginx -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf"
        BACKEND_PID[http]=$LAST_PID BACKEND_LOG[http]=$logf
        wait_listen "$LAST_PID" "nginx HTTP backend" "$logf" "$port" ${h2c_port:+"$h2c_port"}
    fi
    if has_any_figure http-sse http-sse-l4; then
        port=$(backend_port 10)
        logf=$OUT_DIR/logs/sse-server.log
        start_bg "SSE backend" "$logf" python3 "$HELPERS/sse.py" server --bind "$HOST" --port "$port" \
            --gap-ms "$SSE_GAP_MS"
        BACKEND_PID[sse]=$LAST_PID BACKEND_LOG[sse]=$logf
        wait_listen "$LAST_PID" "SSE backend" "$logf" "$port"
    fi
    if has_figure mem; then
        port=$(backend_port 4)
        logf=$OUT_DIR/logs/hold-server.log
        start_bg "idle-hold server" "$logf" python3 "$HELPERS/holdconn.py" server --bind "$HOST" --port "$port"
        BACKEND_PID[hold]=$LAST_PID BACKEND_LOG[hold]=$logf
        wait_listen "$LAST_PID" "idle-hold server" "$logf" "$port"
    fi
    if has_figure udp-latency; then
        port=$(backend_port 5)
        logf=$OUT_DIR/logs/sockperf-udp-server.log
        start_bg "sockperf UDP server" "$logf" sockperf server -i "$HOST" -p "$port"
        BACKEND_PID[udp-sockperf]=$LAST_PID BACKEND_LOG[udp-sockperf]=$logf
        wait_bound "$LAST_PID" "sockperf UDP server" "$logf" "udp:$port" || exit 1
    fi
    if has_figure udp-iperf; then
        # The same server answers TCP and UDP tests; a UDP test's data socket is
        # bound to the control connection's port when the test starts.
        port=$(backend_port 6)
        logf=$OUT_DIR/logs/iperf3-udp-server.log
        start_bg "iperf3 UDP server" "$logf" iperf3 -s -B "$HOST" -p "$port" --idle-timeout 30
        BACKEND_PID[udp-iperf]=$LAST_PID BACKEND_LOG[udp-iperf]=$logf
        wait_listen "$LAST_PID" "iperf3 UDP server" "$logf" "$port"
    fi
    # udp-pps (service 7) starts its sockperf server in each measurement.
    # shellcheck disable=SC2086 # word splitting intended
    if has_any_figure $EDGE_FIGURES; then start_edge_backend; fi
}

# The edge figures' backend, one nginx for both (in $OUT_DIR/edge-backend): for edge-pp an
# http server that takes a PROXY header (v1 or v2, nginx detects which) and
# answers like the cps backend; for edge-sni a stream server that reads the
# whole ClientHello (ssl_preread) and answers with a fixed reply that wrk reads
# as an HTTP response, then closes, as a TLS server would send its first
# flight. Nothing is left unread, so the close is a FIN, not a reset.
EDGE_REPLY='HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n'
start_edge_backend() {
    local dir=$OUT_DIR/edge-backend logf ports=()  # not nginx-edge: the nginx target's edge instance
    mkdir -p "$dir/tmp"
    has_figure edge-pp && ports+=("$(backend_port 13)")
    has_figure edge-sni && ports+=("$(backend_port 14)")
    {
        if has_figure edge-sni && nginx -V 2>&1 | grep -q -- '--with-stream=dynamic'; then
            echo "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
        fi
        nginx_main "$dir"
        if has_figure edge-pp; then
            cat <<EOF
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    server {
        listen $HOST:$(backend_port 13) proxy_protocol backlog=4096;
        location / {
            default_type text/plain;
            return 200 "ok\n";
        }
    }
}
EOF
        fi
        if has_figure edge-sni; then
            cat <<EOF
stream {
    server {
        listen $HOST:$(backend_port 14) backlog=4096;
        ssl_preread on;
        preread_timeout 3s;
        return "$EDGE_REPLY";
    }
}
EOF
        fi
    } >"$dir/nginx.conf"
    logf=$OUT_DIR/logs/nginx-edge-backend.log
    start_bg "nginx edge backend" "$logf" nginx -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf"
    BACKEND_PID[edge]=$LAST_PID BACKEND_LOG[edge]=$logf
    wait_listen "$LAST_PID" "nginx edge backend" "$logf" "${ports[@]}"
}

check_backend() { check_alive "${BACKEND_PID[$1]}" "$1 backend" "${BACKEND_LOG[$1]}"; }

# ---------------------------------------------------------------- balancers --
# A listener spec is "service:listen_port:backend_port[:protocol]", protocol tcp
# (the default), udp, http (an L7 listener for HTTP/1.1 clients), h2c (an L7
# listener for h2c clients, prior knowledge), sse (an L7 listener for
# HTTP/1.1 clients of event streams), pp (TCP, a PROXY v2 header taken from
# the client and one sent to the backend) or sni (TCP, TLS passthrough routed
# by SNI: routes for other.bench.test and *.apps.bench.test to a pool
# <service>-other, then for bench.test to the service's pool, both pools on
# the same backend; a name no route takes is closed). The listener is named after the
# service, but with an explicit tcp the name gets "-tcp" appended, so that
# udp-iperf can have a UDP and a TCP listener on one port. Every service gets
# one pool (one upstream), which all of its listeners feed. HAProxy never gets
# UDP specs.
#
# L7, the same for every balancer: HTTP/1.1 kept alive to the backend (the
# backends speak HTTP/1.1 only; h2c clients are translated), up to 64 idle
# upstream connections kept per backend, kept-alive clients idle up to 350 s,
# no limit on requests per connection, no access log, X-Forwarded-For added.
#   flowgate: protocol = "http" (one listener serves HTTP/1.1 and h2c), pool
#     upstream_protocol = "http1" (the default "auto" would speak h2c to the
#     nginx backend for h2c clients), max_idle_per_backend and keepalive_timeout
#     at their defaults (256, 60s),
#     xff = "append" (the default: X-Forwarded-For, -Proto and -Host).
#   HAProxy: mode http, http-reuse always, keep-alive on both sides (the
#     default; no http-server-close), option forwardfor, `proto h2` on the h2c
#     bind, and `option http-no-delay` on the SSE listener: without it HAProxy
#     2.6 holds a small chunk back while it expects more of the body (it sends
#     with MSG_MORE), so the first event waited for the second one.
#   nginx: http { upstream { keepalive 64; } proxy_pass; proxy_http_version 1.1;
#     proxy_set_header Connection ""; proxy_buffering off; }, `listen ... http2`
#     (nginx 1.22: prior-knowledge h2c only) for h2c.
is_l7() { [[ $1 == http || $1 == h2c || $1 == sse ]]; }

write_flowgate_config() { # file worker_model(""=default) admin-port(""=none) spec...
    local file=$1 model=$2 admin=$3 s name lport bport proto
    local -A pooled=()
    shift 3
    {
        printf '[runtime]\nworkers = %d\nshutdown_timeout = "1s"\n' "$LB_WORKERS"
        [[ -n $model ]] && printf 'worker_model = "%s"\n' "$model"
        [[ -n $admin ]] && printf '\n[admin]\nbind = "%s:%s"\n' "$HOST" "$admin"
        for s in "$@"; do
            IFS=: read -r name lport bport proto <<<"$s"
            printf '\n[[listeners]]\nname = "%s"\nbind = "%s:%s"\nprotocol = "%s"\n' \
                "$name$([[ $proto == tcp ]] && echo -tcp)" "$HOST" "$lport" \
                "$(if is_l7 "$proto"; then echo http; elif [[ $proto == udp ]]; then echo udp; else echo tcp; fi)"
            [[ $proto == sni ]] || printf 'pool = "%s"\n' "$name"
            if [[ $proto == pp ]]; then
                # proxy_trusted: every peer (the default, as HAProxy's accept-proxy).
                printf 'connect_timeout = "3s"\nidle_timeout = "350s"\naccept_proxy = "v2"\n'
            elif [[ $proto == sni ]]; then
                # proxy_header_timeout (3s, the default) bounds the wait for the ClientHello.
                printf 'connect_timeout = "3s"\nidle_timeout = "350s"\nsni_required = true\n'
                printf '\n  [[listeners.sni_routes]]\n  server_names = ["other.bench.test", "*.apps.bench.test"]\n  pool = "%s-other"\n' "$name"
                printf '\n  [[listeners.sni_routes]]\n  server_names = ["bench.test"]\n  pool = "%s"\n' "$name"
            elif is_l7 "$proto"; then
                # idle_timeout: a kept-alive client connection between requests.
                printf 'connect_timeout = "3s"\nidle_timeout = "350s"\n'
            elif [[ $proto == udp ]]; then
                # Sessions end after this long without a datagram either way; no
                # `responses` limit (a flow of many datagrams each way).
                printf 'idle_timeout = "%s"\n' "$UDP_IDLE_TIMEOUT"
            else
                printf 'connect_timeout = "3s"\nidle_timeout = "350s"\n'
            fi
        done
        for s in "$@"; do
            IFS=: read -r name lport bport proto <<<"$s"
            [[ -n ${pooled[$name]:-} ]] && continue
            pooled[$name]=1
            printf '\n[[pools]]\nname = "%s"\nalgorithm = "round-robin"\nbackends = [ { address = "%s:%s" } ]\n' \
                "$name" "$HOST" "$bport"
            # The backends speak HTTP/1.1 only, h2c clients included.
            if is_l7 "$proto"; then printf 'upstream_protocol = "http1"\n'; fi
            if [[ $proto == pp ]]; then printf 'send_proxy = "v2"\n'; fi
            if [[ $proto == sni ]]; then
                printf '\n[[pools]]\nname = "%s-other"\nalgorithm = "round-robin"\nbackends = [ { address = "%s:%s" } ]\n' \
                    "$name" "$HOST" "$bport"
            fi
        done
    } >"$file"
}

write_haproxy_config() { # file splice(0|1) spec...
    local file=$1 splice=$2 s name lport bport proto
    shift 2
    {
        cat <<EOF
global
    nbthread $LB_WORKERS
    maxconn $HAPROXY_MAXCONN

defaults
    mode tcp
    maxconn $HAPROXY_MAXCONN
    timeout connect 3s
    timeout client 350s
    timeout server 350s
EOF
        ((splice)) && echo "    option splice-auto"
        for s in "$@"; do
            IFS=: read -r name lport bport proto <<<"$s"
            if is_l7 "$proto"; then
                # Keep-alive on both sides is HAProxy's default (no http-server-close).
                printf '\nlisten %s\n    mode http\n    bind %s:%s%s\n' "$name" "$HOST" "$lport" \
                    "$([[ $proto == h2c ]] && echo ' proto h2')"
                printf '    http-reuse always\n    option forwardfor\n    timeout http-request 10s\n'
                if [[ $proto == sse ]]; then printf '    option http-no-delay\n'; fi
                printf '    timeout http-keep-alive 350s\n    server %s %s:%s\n' "$name" "$HOST" "$bport"
            elif [[ $proto == pp ]]; then
                printf '\nlisten %s\n    bind %s:%s accept-proxy\n    server %s %s:%s send-proxy-v2\n' \
                    "$name" "$HOST" "$lport" "$name" "$HOST" "$bport"
            elif [[ $proto == sni ]]; then
                # Wait for the ClientHello up to 3 s (flowgate's proxy_header_timeout);
                # no default_backend: a name no route takes is closed.
                printf '\nfrontend %s\n    bind %s:%s\n    tcp-request inspect-delay 3s\n' "$name" "$HOST" "$lport"
                printf '    tcp-request content accept if { req.ssl_hello_type 1 }\n'
                printf '    use_backend %s-other if { req.ssl_sni -i other.bench.test } || { req.ssl_sni -i -m end .apps.bench.test }\n' "$name"
                printf '    use_backend %s if { req.ssl_sni -i bench.test }\n' "$name"
                printf '\nbackend %s-other\n    server %s-other %s:%s\n' "$name" "$name" "$HOST" "$bport"
                printf '\nbackend %s\n    server %s %s:%s\n' "$name" "$name" "$HOST" "$bport"
            else
                printf '\nlisten %s\n    bind %s:%s\n    server %s %s:%s\n' "$name" "$HOST" "$lport" "$name" "$HOST" "$bport"
            fi
        done
    } >"$file"
}

nginx_main() { # dir -> the main-context lines both nginx instances share
    cat <<EOF
daemon off;
master_process on;
worker_processes $LB_WORKERS;
worker_rlimit_nofile $NGINX_RLIMIT;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections $NGINX_WORKER_CONNECTIONS; }
EOF
}

write_nginx_config() { # dir spec...
    local dir=$1 s name lport bport proto l4=() l7=()
    local -A pooled=()
    shift
    for s in "$@"; do
        IFS=: read -r name lport bport proto <<<"$s"
        if is_l7 "$proto"; then l7+=("$s"); else l4+=("$s"); fi
    done
    {
        if ((${#l4[@]})) && nginx -V 2>&1 | grep -q -- '--with-stream=dynamic'; then
            echo "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
        fi
        nginx_main "$dir"
        if ((${#l7[@]})); then write_nginx_http_block "$dir" "${l7[@]}"; fi
        if ((${#l4[@]} == 0)); then return 0; fi
        cat <<EOF
stream {
    proxy_connect_timeout 3s;
    proxy_timeout 350s;
EOF
        for s in "${l4[@]}"; do
            IFS=: read -r name lport bport proto <<<"$s"
            if [[ -z ${pooled[$name]:-} ]]; then
                pooled[$name]=1
                printf '    upstream %s { server %s:%s; }\n' "$name" "$HOST" "$bport"
                if [[ $proto == sni ]]; then printf '    upstream %s-other { server %s:%s; }\n' "$name" "$HOST" "$bport"; fi
            fi
            if [[ $proto == pp ]]; then
                # nginx sends PROXY v1 only (proxy_protocol on); it takes v1 and v2.
                printf '    server { listen %s:%s backlog=4096 proxy_protocol; proxy_pass %s; proxy_protocol on; }\n' \
                    "$HOST" "$lport" "$name"
            elif [[ $proto == sni ]]; then
                # No default in the map: an empty proxy_pass closes the connection.
                printf '    map $ssl_preread_server_name $%s_pool { hostnames; other.bench.test %s-other; *.apps.bench.test %s-other; bench.test %s; }\n' \
                    "${name//-/_}" "$name" "$name" "$name"
                printf '    server { listen %s:%s backlog=4096; ssl_preread on; preread_timeout 3s; proxy_pass $%s_pool; }\n' \
                    "$HOST" "$lport" "${name//-/_}"
            elif [[ $proto == udp ]]; then
                # reuseport: one socket per worker, so a client's datagrams all
                # reach the worker that holds its session. No proxy_responses:
                # a session carries any number of datagrams each way and ends
                # after proxy_timeout without traffic.
                printf '    server { listen %s:%s udp reuseport; proxy_pass %s; proxy_timeout %s; }\n' \
                    "$HOST" "$lport" "$name" "$UDP_IDLE_TIMEOUT"
            else
                printf '    server { listen %s:%s backlog=4096; proxy_pass %s; }\n' "$HOST" "$lport" "$name"
            fi
        done
        echo "}"
    } >"$dir/nginx.conf"
}

write_nginx_http_block() { # dir spec... (L7 specs only): nginx's `http` block
    local dir=$1 s name lport bport proto
    local -A pooled=()
    shift
    cat <<EOF
http {
    access_log off;
    keepalive_timeout 350s;
    keepalive_requests 100000000;
    proxy_connect_timeout 3s;
    proxy_read_timeout 350s;
    proxy_send_timeout 350s;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host \$host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    proxy_buffering off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
EOF
    for s in "$@"; do
        IFS=: read -r name lport bport proto <<<"$s"
        if [[ -z ${pooled[$name]:-} ]]; then
            pooled[$name]=1
            printf '    upstream %s { server %s:%s; keepalive 64; keepalive_requests 100000000; keepalive_timeout 350s; }\n' \
                "$name" "$HOST" "$bport"
        fi
        printf '    server { listen %s:%s%s backlog=4096; location / { proxy_pass http://%s; } }\n' \
            "$HOST" "$lport" "$([[ $proto == h2c ]] && echo ' http2')" "$name"
    done
    echo "}"
}

LB_SOFT=0 # 1: start_lb returns 1 when the balancer fails to start, instead of exiting

start_lb() { # target instance-name spec... ; sets LAST_PID and LAST_LOG, waits for all ports
    local target=$1 inst=$2 dir logf s name lport bport proto ports=() bin
    shift 2
    dir=$OUT_DIR/$inst
    mkdir -p "$dir"
    logf=$OUT_DIR/logs/$inst.log
    for s in "$@"; do
        IFS=: read -r name lport bport proto <<<"$s"
        ports+=("$([[ $proto == udp ]] && echo udp || echo tcp):$lport")
    done
    case $target in
        flowgate | flowgate-shared | flowgate-metrics | flowgate-base | flowgate-busy)
            bin=$FLOWGATE_BIN
            [[ $target == flowgate-base ]] && bin=$FLOWGATE_BASE_BIN
            write_flowgate_config "$dir/flowgate.toml" "$([[ $target == flowgate-shared ]] && echo shared)" \
                "$([[ $target == flowgate-metrics ]] && admin_port "$inst")" "$@"
            [[ $target == flowgate-busy ]] && sed -i "s/^\[runtime\]\$/[runtime]\nbusy_poll = \"$BUSY_POLL\"/" "$dir/flowgate.toml"
            # Each instance its own upgrade socket (the single-instance lock, which
            # another flowgate on this machine may hold at the default path); a base
            # binary older than runtime.upgrade_socket has no lock and no such key.
            sed -i "s|^\[runtime\]\$|[runtime]\nupgrade_socket = \"$dir/flowgate.sock\"|" "$dir/flowgate.toml"
            if [[ $target == flowgate-base ]] && ! "$bin" check --config "$dir/flowgate.toml" >/dev/null 2>&1; then
                sed -i '/^upgrade_socket = /d' "$dir/flowgate.toml"
            fi
            if ((LB_SOFT)) && ! "$bin" check --config "$dir/flowgate.toml" >"$logf.check" 2>&1; then
                printf 'bench.sh: %s rejected %s:\n' "$inst" "$dir/flowgate.toml" >&2
                tail -n 20 "$logf.check" >&2 || true
                return 1
            fi
            start_bg "$inst" "$logf" "$bin" run --config "$dir/flowgate.toml"
            ;;
        haproxy | haproxy-splice | haproxy-busy)
            write_haproxy_config "$dir/haproxy.cfg" "$([[ $target == haproxy-splice ]] && echo 1 || echo 0)" "$@"
            [[ $target == haproxy-busy ]] && sed -i 's/^global$/global\n    busy-polling/' "$dir/haproxy.cfg"
            haproxy -c -f "$dir/haproxy.cfg" >"$logf.check" 2>&1 ||
                { cat "$logf.check" >&2; die "haproxy rejected $dir/haproxy.cfg"; }
            start_bg "$inst" "$logf" haproxy -db -f "$dir/haproxy.cfg"
            ;;
        nginx)
            mkdir -p "$dir/tmp"
            write_nginx_config "$dir" "$@"
            start_bg "$inst" "$logf" nginx -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf"
            ;;
        *) die "start_lb: bad target $target" ;;
    esac
    LAST_LOG=$logf
    if ! wait_bound "$LAST_PID" "$inst" "$logf" "${ports[@]}"; then
        ((LB_SOFT)) || exit 1
        stop_pid "$LAST_PID"
        return 1
    fi
}

declare -A LB_PID=()
declare -A LB_LOG=()

start_balancers() {
    local t svc svcs=() specs
    has_any_figure bulk1 bulk4 && svcs+=(1)
    has_figure latency && svcs+=(2)
    has_any_figure cps rps && svcs+=(3)
    ((${#svcs[@]})) || return 0
    for t in $TARGETS; do
        [[ $t == direct ]] && continue
        specs=()
        for svc in "${svcs[@]}"; do
            specs+=("${SVC_NAMES[svc]}:$(target_port "$t" "$svc"):$(backend_port "$svc")")
        done
        log "starting $t"
        start_lb "$t" "$t" "${specs[@]}"
        LB_PID[$t]=$LAST_PID LB_LOG[$t]=$LAST_LOG
        if [[ $t == flowgate-metrics ]]; then
            # Scraped like Prometheus would, only more often: every second.
            start_bg "$t scraper" "$OUT_DIR/logs/$t.scrape.log" bash -c \
                "while sleep 1; do curl -s -o /dev/null --max-time 2 http://$HOST:$(admin_port "$t")/metrics; done"
        fi
    done
}

check_target() { # target
    [[ $1 == direct ]] && return 0
    [[ -n ${LB_PID[$1]:-} ]] || return 0
    check_alive "${LB_PID[$1]}" "$1" "${LB_LOG[$1]}"
}

declare -A UDP_SKIP=() # target -> why it is not measured for the UDP figures
declare -A UDP_DIED=()

# The UDP instances (<target>-udp). HAProxy targets are skipped. flowgate's
# instance is started softly: when `flowgate check` rejects the configuration
# or it does not start, flowgate is skipped for the UDP figures, with a note in
# the log and the results, and the rest of the run goes on.
start_udp_balancers() {
    local t specs
    # shellcheck disable=SC2086 # word splitting intended
    has_any_figure $UDP_FIGURES || return 0
    for t in $TARGETS; do
        [[ $t == direct ]] && continue
        if ! can_udp "$t"; then
            UDP_SKIP[$t]="HAProxy OSS does not balance UDP"
            log "note: $t is skipped for the UDP figures: ${UDP_SKIP[$t]}"
            continue
        fi
        specs=()
        has_figure udp-latency && specs+=("${SVC_NAMES[5]}:$(target_port "$t" 5):$(backend_port 5):udp")
        # iperf3 needs its TCP control connection and the UDP data on one port.
        has_figure udp-iperf && specs+=("${SVC_NAMES[6]}:$(target_port "$t" 6):$(backend_port 6):tcp"
            "${SVC_NAMES[6]}:$(target_port "$t" 6):$(backend_port 6):udp")
        has_figure udp-pps && specs+=("${SVC_NAMES[7]}:$(target_port "$t" 7):$(backend_port 7):udp")
        log "starting $t-udp"
        start_lb_soft "$t" udp UDP UDP_SKIP "${specs[@]}" || continue
        LB_PID[$t-udp]=$LAST_PID LB_LOG[$t-udp]=$LAST_LOG
    done
}

declare -A HTTP_SKIP=() # target -> why it is not measured for the HTTP figures

# The HTTP (L7) instances (<target>-l7): one listener per HTTP service the
# figures need. A balancer that fails to start stops the run, as for TCP.
start_http_balancers() {
    local t specs
    # shellcheck disable=SC2086 # word splitting intended
    has_any_figure $HTTP_FIGURES || return 0
    for t in $TARGETS; do
        if ! can_http "$t"; then
            HTTP_SKIP[$t]="splice-auto changes nothing for these small HTTP responses (the haproxy target stands for HAProxy)"
            log "note: $t is skipped for the HTTP figures: ${HTTP_SKIP[$t]}"
            continue
        fi
        [[ $t == direct ]] && continue
        specs=()
        has_any_figure http-rps http-post-rps http-latency && specs+=("${SVC_NAMES[8]}:$(target_port "$t" 8):$(backend_port 3):http")
        has_figure http-h2-rps && specs+=("${SVC_NAMES[9]}:$(target_port "$t" 9):$(backend_port 3):h2c")
        has_figure http-sse && specs+=("${SVC_NAMES[10]}:$(target_port "$t" 10):$(backend_port 10):sse")
        # The same SSE backend through the balancer's L4 (TCP) mode: what L7 adds
        # is held to what L4 adds (issue 11's goal).
        has_figure http-sse-l4 && specs+=("${SVC_NAMES[15]}:$(target_port "$t" 15):$(backend_port 10)")
        ((${#specs[@]})) || continue # http-mem only: it starts its own instances
        log "starting $t-l7"
        start_lb "$t" "$t-l7" "${specs[@]}"
        LB_PID[$t-l7]=$LAST_PID LB_LOG[$t-l7]=$LAST_LOG
        if [[ $t == flowgate-metrics ]]; then
            start_bg "$t-l7 scraper" "$OUT_DIR/logs/$t-l7.scrape.log" bash -c \
                "while sleep 1; do curl -s -o /dev/null --max-time 2 http://$HOST:$(admin_port "$t-l7")/metrics; done"
        fi
    done
}

declare -A EDGE_SKIP=() # target -> why it is not measured for the edge figures

# Starts target $1's instance $1-$2 on the specs that follow $4. A flowgate target
# starts softly: a build whose `flowgate check` rejects the configuration (an
# older FLOWGATE_BASE_BIN) is skipped with a note, its reason in the associative
# array named $4 (keyed by target) and the $3 figures left out for it; one that
# accepts it and does not start fails the run. Returns 1 when it was skipped.
start_lb_soft() {
    local t=$1 inst=$1-$2 label=$3 why
    local -n skip=$4
    shift 4
    if [[ $t != flowgate* ]]; then
        start_lb "$t" "$inst" "$@"
        return 0
    fi
    LB_SOFT=1
    if start_lb "$t" "$inst" "$@"; then
        LB_SOFT=0
        return 0
    fi
    LB_SOFT=0
    if [[ -s $OUT_DIR/logs/$inst.log.check ]] && ! [[ -e $OUT_DIR/logs/$inst.log ]]; then
        why=$(grep -v '^[[:space:]]*$' "$OUT_DIR/logs/$inst.log.check" | head -n 3 | tr -s ' \n' ' ')
        skip[$t]="\`flowgate check\` rejected the $label configuration ($OUT_DIR/$inst/flowgate.toml): ${why% }"
    else
        # It accepted the configuration, so this is a failure of the run.
        skip[$t]="it did not start with the $label configuration ($OUT_DIR/$inst/flowgate.toml); see $OUT_DIR/logs/$inst.log"
        FAILED=$((FAILED + 1))
    fi
    log "note: $t is skipped for the $label figures: ${skip[$t]}"
    return 1
}

# The edge instances (<target>-edge): a pp listener for edge-pp, an sni listener
# for edge-sni. flowgate targets start softly, as for UDP: a build whose
# `flowgate check` rejects the configuration (an older FLOWGATE_BASE_BIN) is
# skipped with a note; one that accepts it and does not start fails the run.
start_edge_balancers() {
    local t specs
    # shellcheck disable=SC2086 # word splitting intended
    has_any_figure $EDGE_FIGURES || return 0
    for t in $TARGETS; do
        if ! can_edge "$t"; then
            EDGE_SKIP[$t]="splice-auto changes nothing for these few bytes (the haproxy target stands for HAProxy)"
            log "note: $t is skipped for the edge figures: ${EDGE_SKIP[$t]}"
            continue
        fi
        [[ $t == direct ]] && continue
        specs=()
        has_figure edge-pp && specs+=("${SVC_NAMES[13]}:$(target_port "$t" 13):$(backend_port 13):pp")
        has_figure edge-sni && specs+=("${SVC_NAMES[14]}:$(target_port "$t" 14):$(backend_port 14):sni")
        log "starting $t-edge"
        start_lb_soft "$t" edge edge EDGE_SKIP "${specs[@]}" || continue
        LB_PID[$t-edge]=$LAST_PID LB_LOG[$t-edge]=$LAST_LOG
        if [[ $t == flowgate-metrics ]]; then
            start_bg "$t-edge scraper" "$OUT_DIR/logs/$t-edge.scrape.log" bash -c \
                "while sleep 1; do curl -s -o /dev/null --max-time 2 http://$HOST:$(admin_port "$t-edge")/metrics; done"
        fi
    done
}

check_edge_target() { # target: exits when its edge instance has died
    [[ $1 == direct ]] && return 0
    [[ -n ${LB_PID[$1-edge]:-} ]] || return 0
    check_alive "${LB_PID[$1-edge]}" "$1-edge" "${LB_LOG[$1-edge]}"
}

check_http_target() { # target: exits when its HTTP instance has died
    [[ $1 == direct ]] && return 0
    [[ -n ${LB_PID[$1-l7]:-} ]] || return 0
    check_alive "${LB_PID[$1-l7]}" "$1-l7" "${LB_LOG[$1-l7]}"
}

check_udp_target() { # target: is its UDP instance running? exits if not, but for flowgate returns 1
    local pid
    [[ $1 == direct ]] && return 0
    pid=${LB_PID[$1-udp]}
    if [[ $1 != flowgate* ]]; then
        check_alive "$pid" "$1-udp" "${LB_LOG[$1-udp]}"
        return 0
    fi
    is_running "$pid" && return 0
    if [[ -z ${UDP_DIED[$1]:-} ]]; then
        UDP_DIED[$1]=1
        log "error: $1-udp has died; its UDP figures fail from here on; last lines of ${LB_LOG[$1-udp]}:"
        tail -n 20 "${LB_LOG[$1-udp]}" >&2 || true
    else
        log "error: $1-udp is not running (it died earlier)"
    fi
    return 1
}

# ------------------------------------------------------------- measurements --
# Each sets RESULT (space-separated numbers) and returns non-zero on failure,
# after printing why.

RESULT=
REQUESTS=0 # requests done in the last wrk or h2load run

measure_bulk() { # target streams logfile
    local port out rc
    port=$(target_port "$1" 1)
    out=$3
    rc=0
    timeout $((IPERF_TIME + 30)) iperf3 -c "$HOST" -p "$port" -t "$IPERF_TIME" -P "$2" -J \
        --connect-timeout 3000 >"$out" 2>&1 || rc=$?
    if ((rc != 0)); then
        log "error: iperf3 -P $2 via $1 exited with status $rc; see $out"
        return 1
    fi
    RESULT=$(python3 - "$out" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
if d.get("error"):
    sys.exit("iperf3: " + d["error"])
print("%.3f" % (d["end"]["sum_received"]["bits_per_second"] / 1e9))
EOF
    ) || { log "error: could not read the iperf3 result via $1; see $out"; return 1; }
}

measure_latency() { # target logfile [udp]
    local port out rc proto=(--tcp) dropped
    port=$(target_port "$1" 2)
    [[ ${3:-} == udp ]] && port=$(target_port "$1" 5) proto=()
    out=$2
    rc=0
    timeout $((SOCKPERF_TIME + 30)) sockperf ping-pong "${proto[@]}" -i "$HOST" -p "$port" -m 64 \
        -t "$SOCKPERF_TIME" --full-rtt >"$out" 2>&1 || rc=$?
    if ((rc != 0)); then
        log "error: sockperf ping-pong ${3:-tcp} via $1 exited with status $rc; see $out"
        return 1
    fi
    # Over UDP a lost request or reply is counted by sockperf as dropped.
    dropped=$(sed 's/\x1b\[[0-9;]*m//g' "$out" | awk -F'[=;]' '/# dropped messages =/ { gsub(/ /, "", $2); print $2; exit }')
    if [[ -n $dropped && $dropped != 0 ]]; then
        log "note: sockperf counted $dropped dropped messages via $1; see $out"
    fi
    RESULT=$(sed 's/\x1b\[[0-9;]*m//g' "$out" | awk '
        /percentile 50\.000 =/ { p50 = $NF }
        /percentile 99\.000 =/ { p99 = $NF }
        /percentile 99\.900 =/ { p999 = $NF }
        END { if (p50 == "" || p99 == "" || p999 == "") exit 1; print p50, p99, p999 }') ||
        { log "error: no percentiles in the sockperf output via $1; see $out"; return 1; }
}

measure_udp_pps() { # target prefix ; RESULT = "received-msg/s loss-% sent-msg/s"
    local t=$1 pre=$2 port bport slog spid rc i sent secs rcvd
    port=$(target_port "$t" 7)
    bport=$(backend_port 7)
    slog=$pre.server.log
    # A fresh server for every measurement: it reports the messages it received
    # when it is interrupted (SIGINT; sockperf installs its own handler).
    start_bg "sockperf pps server" "$slog" sockperf server -i "$HOST" -p "$bport"
    spid=$LAST_PID
    wait_bound "$spid" "sockperf pps server" "$slog" "udp:$bport" || { stop_pid "$spid"; return 1; }
    rc=0
    timeout $((UDP_PPS_TIME + 30)) sockperf throughput -i "$HOST" -p "$port" -m 64 -t "$UDP_PPS_TIME" \
        >"$pre.log" 2>&1 || rc=$?
    sleep 0.3 # what the balancer still holds reaches the server, or is lost
    kill -INT "$spid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        is_running "$spid" || break
        sleep 0.05
    done
    stop_pid "$spid"
    if ((rc != 0)); then
        log "error: sockperf throughput via $t exited with status $rc; see $pre.log"
        return 1
    fi
    read -r sent secs < <(sed 's/\x1b\[[0-9;]*m//g' "$pre.log" |
        awk '/Total of [0-9]+ messages sent in/ { for (i = 1; i <= NF; i++) if ($i == "of") n = $(i + 1); else if ($i == "in") s = $(i + 1) }
             END { if (n != "" && s > 0) print n, s }') || true
    rcvd=$(sed 's/\x1b\[[0-9;]*m//g' "$slog" | awk '/Total [0-9]+ messages received/ { for (i = 1; i < NF; i++) if ($i == "Total") print $(i + 1) }' | tail -n 1)
    if [[ -z ${sent:-} || -z ${secs:-} ]]; then
        log "error: no 'Total of N messages sent' in the sockperf client output via $t; see $pre.log"
        return 1
    fi
    if [[ -z $rcvd ]]; then
        log "error: the sockperf server did not report what it received via $t; see $slog"
        return 1
    fi
    RESULT=$(awk -v n="$sent" -v s="$secs" -v r="$rcvd" 'BEGIN {
        loss = n > 0 ? (n - r) * 100 / n : 0; if (loss < 0) loss = 0
        printf "%.0f %.3f %.0f", r / s, loss, n / s }')
}

measure_udp_iperf() { # target rate logfile ; RESULT = "received-Gbit/s loss-%"
    local port out rc
    port=$(target_port "$1" 6)
    out=$3
    rc=0
    timeout $((UDP_IPERF_TIME + 30)) iperf3 -c "$HOST" -p "$port" -u -l 1400 -b "$2" -t "$UDP_IPERF_TIME" -J \
        --connect-timeout 3000 >"$out" 2>&1 || rc=$?
    if ((rc != 0)); then
        log "error: iperf3 -u -b $2 via $1 exited with status $rc; see $out"
        return 1
    fi
    # iperf3 3.12 reports the receiver's side of a UDP test in end.sum_received;
    # versions without it only give end.sum (the sender's rate, with the loss
    # the receiver counted), from which the received rate is worked out.
    RESULT=$(python3 - "$out" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
if d.get("error"):
    sys.exit("iperf3: " + d["error"])
e = d["end"]
s = e.get("sum_received") or e["sum"]
loss = s["lost_percent"]
bps = s["bits_per_second"] if "sum_received" in e else s["bits_per_second"] * (1 - loss / 100)
print("%.3f %.3f" % (bps / 1e9, loss))
EOF
    ) || { log "error: could not read the iperf3 -u result via $1; see $out"; return 1; }
}

measure_wrk() { # target close(0|1) logfile [port [edge.lua-mode(pp|sni) | post]]
    local port out rc hdr=() script=() args=()
    port=${4:-$(target_port "$1" 3)}
    out=$3
    (($2)) && hdr=(-H 'Connection: close')
    case ${5:-} in
        '') ;;
        post) script=(-s "$HELPERS/post.lua") ;;
        *) script=(-s "$HELPERS/edge.lua") args=(-- "$5") ;;
    esac
    rc=0
    timeout $((WRK_TIME + 30)) wrk -t "$WRK_THREADS" -c "$WRK_CONNS" -d "${WRK_TIME}s" "${hdr[@]}" "${script[@]}" \
        "http://$HOST:$port/" "${args[@]}" >"$out" 2>&1 || rc=$?
    if ((rc != 0)); then
        log "error: wrk via $1 exited with status $rc; see $out"
        return 1
    fi
    RESULT=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    [[ -n $RESULT ]] || { log "error: no Requests/sec in the wrk output via $1; see $out"; return 1; }
    local total errs non2xx
    total=$(awk '/requests in/ { print $1 }' "$out")
    REQUESTS=${total:-0}
    errs=$(awk '/Socket errors:/ { gsub(",", ""); s = 0; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; print s }' "$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$out")
    if [[ -n $non2xx ]] && ((non2xx > 0)); then
        log "error: $non2xx non-2xx responses via $1; see $out"
        return 1
    fi
    if [[ -n $errs ]] && ((errs > 0)); then
        # A few errors at the very end of a Connection: close run are normal;
        # more than 1% means the number is not trustworthy.
        if ((errs * 100 > ${total:-0})); then
            log "error: $errs socket errors in $total requests via $1; see $out"
            return 1
        fi
        log "note: $errs socket errors in $total requests via $1 (under 1%, kept)"
    fi
}

measure_mem() { # target logfile-prefix [http] ; KiB of balancer RSS per idle established connection
    # With http: an L7 instance in front of the nginx backend, and every client
    # connection does one keep-alive HTTP/1.1 request before it is held idle.
    local t=$1 pre=$2 port pid before after ready cpid rc i http=()
    if [[ ${3:-} == http ]]; then
        port=$(http_mem_port "$t")
        start_lb "$t" "$t-l7mem" "l7-http:$port:$(backend_port 3):http"
        http=(--http)
    else
        port=$(mem_port "$t")
        start_lb "$t" "$t-mem" "hold:$port:$(backend_port 4)"
    fi
    pid=$LAST_PID
    # Warm up: a handful of connections so one-off lazy initialisation is not counted.
    ready=$pre.warm.ready
    rm -f "$ready"
    rc=0
    timeout 30 python3 "$HELPERS/holdconn.py" client "${http[@]}" --host "$HOST" --port "$port" --count 50 \
        --ready-file "$ready" --hold 0 >"$pre.warm.log" 2>&1 || rc=$?
    if ((rc != 0)) || [[ ! -s $ready ]]; then
        log "error: warm-up connections via $t failed (status $rc); see $pre.warm.log"
        stop_pid "$pid"
        return 1
    fi
    sleep 0.5
    check_alive "$pid" "$t-mem" "$LAST_LOG"
    before=$(rss_kib "$pid")
    ready=$pre.ready
    rm -f "$ready"
    start_bg "idle-hold client" "$pre.client.log" python3 "$HELPERS/holdconn.py" client "${http[@]}" --host "$HOST" \
        --port "$port" --count "$MEM_CONNS" --ready-file "$ready" --hold 120 --timeout 60
    cpid=$LAST_PID
    for ((i = 0; i < 1800; i++)); do # up to 90 s
        [[ -s $ready ]] && break
        kill -0 "$cpid" 2>/dev/null || break
        sleep 0.05
    done
    if [[ ! -s $ready ]]; then
        log "error: could not hold $MEM_CONNS connections via $t; see $pre.client.log and $LAST_LOG"
        stop_pid "$cpid"
        stop_pid "$pid"
        return 1
    fi
    sleep 1 # let the balancer settle
    check_alive "$pid" "$t-mem" "$LAST_LOG"
    after=$(rss_kib "$pid")
    stop_pid "$cpid"
    stop_pid "$pid"
    echo "$t before=${before}KiB after=${after}KiB conns=$MEM_CONNS" >>"$pre.rss"
    RESULT=$(awk -v a="$after" -v b="$before" -v n="$MEM_CONNS" 'BEGIN { printf "%.3f", (a - b) / n }')
}

h2load_check() { # target logfile: fails on errored, failed or non-2xx requests
    local out=$2 failed errored codes
    read -r failed errored < <(awk '/^requests:/ { for (i = 2; i <= NF; i++) { if ($i ~ /^failed/) f = $(i - 1); if ($i ~ /^errored/) e = $(i - 1) } }
        END { print f + 0, e + 0 }' "$out")
    codes=$(awk '/^status codes:/ { gsub(",", ""); print $5 + $7 + $9; exit }' "$out")
    if [[ -z $codes ]]; then
        log "error: no status codes in the h2load output via $1; see $out"
        return 1
    fi
    if ((failed + errored + codes > 0)); then
        log "error: h2load via $1: $failed failed, $errored errored, $codes non-2xx requests; see $out"
        return 1
    fi
}

measure_h2_rps() { # target logfile ; requests/s over h2c (prior knowledge)
    local port out=$2 rc
    port=$(http_port "$1" 9)
    rc=0
    timeout $((WRK_TIME + 30)) h2load -c "$H2_CLIENTS" -m "$H2_STREAMS" -t "$WRK_THREADS" -D "$WRK_TIME" \
        "http://$HOST:$port/" >"$out" 2>&1 || rc=$?
    if ((rc != 0)); then
        log "error: h2load via $1 exited with status $rc; see $out"
        return 1
    fi
    # (With -t 2 h2load's threads print at once: the protocol's name can land on
    # a line of its own, after another thread's line.)
    grep -q 'Application protocol: h2c' "$out" || grep -qx 'h2c' "$out" ||
        { log "error: h2load did not speak h2c via $1; see $out"; return 1; }
    h2load_check "$1" "$out" || return 1
    RESULT=$(awk '/^finished in/ { for (i = 1; i <= NF; i++) if ($i ~ /^req\/s/) print $(i - 1) }' "$out")
    [[ -n $RESULT ]] || { log "error: no req/s in the h2load output via $1; see $out"; return 1; }
    REQUESTS=$(awk '/^requests:/ { for (i = 2; i <= NF; i++) if ($i ~ /^succeeded/) print $(i - 1) }' "$out")
}

# http-latency: h2load --h1 with --rps, so the request rate is fixed (a timer per
# client issues requests; over HTTP/1.1 one at a time per connection, so a late
# response delays the next request: closed loop per connection, not wrk2's
# open loop with coordinated-omission correction). The latency of every request
# comes from h2load's --log-file (microseconds from the request's start to the
# end of its response).
measure_http_latency() { # target prefix ; RESULT = "p50-us p99-us achieved-req/s"
    local port pre=$2 rc per
    port=$(http_port "$1" 8)
    per=$((HTTP_LAT_RPS / HTTP_LAT_CLIENTS))
    rc=0
    timeout $((WRK_TIME + 30)) h2load --h1 -c "$HTTP_LAT_CLIENTS" -t 1 --rps "$per" -D "$WRK_TIME" \
        --log-file "$pre.tsv" "http://$HOST:$port/" >"$pre.log" 2>&1 || rc=$?
    if ((rc != 0)); then
        log "error: h2load --h1 --rps via $1 exited with status $rc; see $pre.log"
        return 1
    fi
    h2load_check "$1" "$pre.log" || return 1
    RESULT=$(sort -t $'\t' -k3,3n "$pre.tsv" | awk -F'\t' -v d="$WRK_TIME" '
        $2 == 200 { v[++n] = $3 }
        END {
            if (n == 0) exit 1
            i50 = int(n * 0.50); if (i50 < n * 0.50) i50++
            i99 = int(n * 0.99); if (i99 < n * 0.99) i99++
            printf "%d %d %.0f", v[i50], v[i99], n / d }') ||
        { log "error: no requests in the h2load log via $1; see $pre.tsv"; return 1; }
}

measure_sse() { # target logfile [service(10|15)] ; RESULT = "p50-us p99-us" of the time to the first event, then p50 and p99 of the second event's delay
    local port out=$2 rc
    port=$(http_port "$1" "${3:-10}")
    rc=0
    RESULT=$(timeout $((SSE_REQUESTS * (SSE_GAP_MS + 10) / 1000 + 60)) python3 "$HELPERS/sse.py" client --host "$HOST" --port "$port" \
        --requests "$SSE_REQUESTS" 2>"$out") || rc=$?
    echo "$RESULT" >>"$out"
    if ((rc != 0)) || [[ -z $RESULT ]]; then
        log "error: the SSE client via $1 failed (status $rc); see $out"
        return 1
    fi
    RESULT=$(awk '{ print $1, $2, $4, $5 }' <<<"$RESULT")
}

# ------------------------------------------------------- syscall figures --
# sys-pingpong, sys-short, sys-udp: the system calls a balancer makes per
# operation. Each target gets its own instance (<target>-sys) with one worker
# (LB_WORKERS=1 while its configuration is written), in front of
# scripts/bench/sysload.py's echo server. For each figure the sysload client
# warms up (uncounted), then `strace -f -c` attaches to the balancer (every
# process of it: nginx's master and worker; every thread of each), the client
# does exactly SYS_OPS operations one after another, and strace detaches
# 0.3 s after the last one (time for the proxy to finish closing the last
# short connection). Each syscall's count, failed calls included, is divided
# by SYS_OPS. A count is deterministic up to the few calls an idle balancer
# makes while strace attaches and detaches (timer wake-ups), so one round
# is enough: the syscall figures run once, outside the rounds.

declare -A SYS_SKIP=() # "figure target" -> why it was not measured

wait_file() { # file pid seconds: until the file exists; 1 if pid exits or time runs out first
    local deadline=$((SECONDS + $3))
    until [[ -s $1 ]]; do
        is_running "$2" || [[ -s $1 ]] || return 1
        ((SECONDS < deadline)) || return 1
        sleep 0.02
    done
}

all_traced() { # pid...: is every thread of every pid traced?
    local p st
    for p in "$@"; do
        for st in /proc/"$p"/task/*/status; do
            [[ -e $st ]] || continue
            [[ $(awk '/^TracerPid:/ { print $2 }' "$st" 2>/dev/null) =~ ^[1-9] ]] || return 1
        done
    done
}

measure_syscalls() { # target figure prefix ; appends to $SYS_TSV, RESULT = "ops total-calls"
    local t=$1 f=$2 pre=$3 pid mode port cpid spid ops p pids=() sargs=() deadline
    pid=${LB_PID[$t-sys]}
    case $f in
        sys-pingpong) mode=pingpong port=$(target_port "$t" 11) ;;
        sys-short) mode=short port=$(target_port "$t" 11) ;;
        sys-udp) mode=udp port=$(target_port "$t" 12) ;;
    esac
    check_alive "$pid" "$t-sys" "${LB_LOG[$t-sys]}"
    rm -f "$pre".ready "$pre".go "$pre".done "$pre".done.close "$pre".strace
    start_bg "sysload client $f $t" "$pre.client.log" python3 "$HELPERS/sysload.py" client --mode "$mode" \
        --host "$HOST" --port "$port" --ops "$SYS_OPS" --ready-file "$pre.ready" --go-file "$pre.go" \
        --done-file "$pre.done"
    cpid=$LAST_PID
    if ! wait_file "$pre.ready" "$cpid" 30; then
        log "error: the sysload client ($f via $t) did not warm up; see $pre.client.log"
        stop_pid "$cpid"
        return 1
    fi
    pids=("$pid")
    mapfile -t -O 1 pids < <(descendants "$pid")
    for p in "${pids[@]}"; do sargs+=(-p "$p"); done
    start_bg "strace $t" "$pre.strace.log" strace -f -c -o "$pre.strace" "${sargs[@]}"
    spid=$LAST_PID
    deadline=$((SECONDS + 10))
    until all_traced "${pids[@]}"; do
        if ! is_running "$spid" || ((SECONDS >= deadline)); then
            log "error: strace could not attach to $t-sys (pids ${pids[*]}); see $pre.strace.log"
            stop_pid "$spid"
            stop_pid "$cpid"
            return 1
        fi
        sleep 0.02
    done
    : >"$pre.go"
    if ! wait_file "$pre.done" "$cpid" $((60 + SYS_OPS / 100)); then
        log "error: the sysload client ($f via $t) failed; see $pre.client.log"
        stop_pid "$spid"
        stop_pid "$cpid"
        return 1
    fi
    sleep 0.3
    stop_pid "$spid" # SIGTERM: strace detaches and writes its summary
    : >"$pre.done.close"
    stop_pid "$cpid"
    ops=$(<"$pre.done")
    [[ -s $pre.strace ]] || { log "error: strace wrote no summary for $f via $t; see $pre.strace.log"; return 1; }
    # strace -c: "% time seconds usecs/call calls [errors] syscall", then a total line.
    awk -v f="$f" -v t="$t" -v ops="$ops" '
        /^%|^-|^ *$/ { next }
        NF >= 5 { printf "%s\t%s\t%s\t%s\t%s\t%s\n", f, t, ops, $NF, $4, (NF >= 6 ? $5 : 0) }' \
        "$pre.strace" >>"$SYS_TSV"
    RESULT="$ops $(awk '$NF == "total" { print $4 }' "$pre.strace")"
}

run_syscalls() { # every syscall figure for every target; the tables go to $OUT_DIR/syscalls.md
    local t f specs pre ops total port
    SYS_TSV=$OUT_DIR/syscalls.tsv
    printf 'figure\ttarget\tops\tsyscall\tcalls\terrors\n' >"$SYS_TSV"
    port=$(backend_port 11)
    start_bg "sysload echo server" "$OUT_DIR/logs/sysload-server.log" python3 "$HELPERS/sysload.py" server \
        --bind "$HOST" --tcp-port "$port" --udp-port "$(backend_port 12)"
    BACKEND_PID[sys]=$LAST_PID BACKEND_LOG[sys]=$OUT_DIR/logs/sysload-server.log
    wait_bound "$LAST_PID" "sysload echo server" "${BACKEND_LOG[sys]}" "tcp:$port" "udp:$(backend_port 12)" || exit 1
    for t in $TARGETS; do
        if [[ $t == direct ]]; then
            for f in $SYS_FIGURES; do has_figure "$f" && SYS_SKIP["$f $t"]="no balancer process to trace"; done
            continue
        fi
        specs=()
        has_any_figure sys-pingpong sys-short && specs+=("${SVC_NAMES[11]}:$(target_port "$t" 11):$(backend_port 11)")
        if has_figure sys-udp; then
            if can_udp "$t"; then
                specs+=("${SVC_NAMES[12]}:$(target_port "$t" 12):$(backend_port 12):udp")
            else
                SYS_SKIP["sys-udp $t"]="HAProxy OSS does not balance UDP"
            fi
        fi
        ((${#specs[@]})) || continue
        log "starting $t-sys (1 worker)"
        LB_WORKERS=1
        start_lb "$t" "$t-sys" "${specs[@]}"
        LB_WORKERS=2
        LB_PID[$t-sys]=$LAST_PID LB_LOG[$t-sys]=$LAST_LOG
        sleep 0.5 # let it settle (nginx starts its worker after binding)
        for f in $SYS_FIGURES; do
            has_figure "$f" || continue
            [[ -n ${SYS_SKIP["$f $t"]:-} ]] && continue
            check_backend sys
            pre=$OUT_DIR/runs/$f-$t
            if measure_syscalls "$t" "$f" "$pre"; then
                read -r ops total <<<"$RESULT"
                log "$f $t: $total syscalls in $ops operations"
            else
                FAILED=$((FAILED + 1))
            fi
        done
        stop_pid "${LB_PID[$t-sys]}"
        unset "LB_PID[$t-sys]"
    done
    stop_pid "${BACKEND_PID[sys]}"
    {
        echo "Syscalls per operation ($(date -u '+%Y-%m-%d'), $(nproc) CPUs, one worker each, SYS_OPS=$SYS_OPS;"
        echo "strace -f -c summaries in $OUT_DIR/runs/sys-*.strace, counts in $SYS_TSV):"
        echo
        python3 - "$SYS_TSV" "$TARGETS" "$FIGURES" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
targets = [t for t in sys.argv[2].split() if t != "direct"]
figures = [f for f in sys.argv[3].split() if f.startswith("sys-")]
label = {"sys-pingpong": "TCP ping-pong, 64 B round trip",
         "sys-short": "short connection: connect, 64 B each way, close",
         "sys-udp": "UDP round trip, 64 B"}
per = {}  # (figure, target) -> [(syscall, calls/op, errors/op)], total first
for r in rows:
    ops = int(r["ops"])
    per.setdefault((r["figure"], r["target"]), []).append(
        (r["syscall"], int(r["calls"]) / ops, int(r["errors"] or 0) / ops))
def total(f, t):
    for name, c, _ in per.get((f, t), []):
        if name == "total":
            return "%.1f" % c
    return "–"
print("| workload (per operation) | " + " | ".join(targets) + " |")
print("|---" * (len(targets) + 1) + "|")
for f in figures:
    print("| %s | %s |" % (label[f], " | ".join(total(f, t) for t in targets)))
print()
print("| workload | target | total | syscalls per operation (at least 0.1; failed calls in brackets) |")
print("|---|---|---|---|")
for f in figures:
    for t in targets:
        calls = per.get((f, t))
        if not calls:
            continue
        top = sorted((c for c in calls if c[0] != "total"), key=lambda c: -c[1])
        top = ", ".join("%s %.1f%s" % (n, c, " (%.1f failed)" % e if e >= 0.05 else "")
                        for n, c, e in top if c >= 0.1)
        print("| %s | %s | %s | %s |" % (f, t, total(f, t), top))
EOF
        for f in $SYS_FIGURES; do
            for t in $TARGETS; do
                if [[ -n ${SYS_SKIP["$f $t"]:-} ]]; then echo; echo "$f: $t not measured: ${SYS_SKIP["$f $t"]}."; fi
            done
        done
    } >"$OUT_DIR/syscalls.md"
}

# ------------------------------------------------------------------- main ----

mkdir -p "$OUT_DIR/logs" "$OUT_DIR/runs"
RAW=$OUT_DIR/raw.tsv
printf 'round\tmetric\ttarget\tvalue\n' >"$RAW"
FAILED=0

record() { # round metric target value
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RAW"
}

ensure_tools
{ has_target flowgate || has_target flowgate-shared || has_target flowgate-metrics || has_target flowgate-busy; } && build_flowgate

# Refuse to start if something else already uses our ports.
for svc in 1 2 3 4; do
    p=$(backend_port $svc)
    is_listening "$p" && die "port $p is already in use (set PORT_BASE to move the block)"
    for t in $TARGETS; do
        [[ $t == direct ]] && continue
        p=$(target_port "$t" $svc)
        is_listening "$p" && die "port $p is already in use (set PORT_BASE to move the block)"
        p=$(mem_port "$t")
        is_listening "$p" && die "port $p is already in use (set PORT_BASE to move the block)"
    done
done
for svc in 8 9 10 11 13 14; do # HTTP (L7), sys-tcp and edge; direct's ports 3, 9 and 10 are backend ports
    for p in $(backend_port $svc) $(for t in $TARGETS; do
        [[ $t != direct ]] && target_port "$t" $svc
        [[ $t != direct && $svc == 8 ]] && http_mem_port "$t"
    done); do
        is_listening "$p" && die "port $p is already in use (set PORT_BASE to move the block)"
    done
done
for svc in 5 6 7 12; do # UDP services; udp-iperf (6) also listens on TCP
    for p in $(backend_port $svc) $(for t in $UDP_TARGETS; do
        [[ $t != direct ]] && has_target "$t" && target_port "$t" $svc
    done); do
        for proto in udp $( ((svc == 6)) && echo tcp); do
            is_bound "$proto" "$p" && die "$proto port $p is already in use (set PORT_BASE to move the block)"
        done
    done
done

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo none) $(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo '(dirty)')"
    echo "nproc: $(nproc)"
    echo "cpu: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "kernel: $(uname -r)"
    echo "memory: $(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "loadavg at the start: $(cat /proc/loadavg)"
    echo "ROUNDS=$ROUNDS TARGETS=\"$TARGETS\" FIGURES=\"$FIGURES\" NICE=$NICE (actual: $(ps -o ni= -p $$ | tr -d ' '))"
    echo "IPERF_TIME=$IPERF_TIME SOCKPERF_TIME=$SOCKPERF_TIME WRK_TIME=$WRK_TIME WRK_THREADS=$WRK_THREADS WRK_CONNS=$WRK_CONNS MEM_CONNS=$MEM_CONNS"
    echo "UDP_PPS_TIME=$UDP_PPS_TIME UDP_IPERF_TIME=$UDP_IPERF_TIME UDP_IPERF_RATES=\"$UDP_IPERF_RATES\""
    echo "H2_CLIENTS=$H2_CLIENTS H2_STREAMS=$H2_STREAMS HTTP_LAT_RPS=$HTTP_LAT_RPS HTTP_LAT_CLIENTS=$HTTP_LAT_CLIENTS SSE_REQUESTS=$SSE_REQUESTS SSE_GAP_MS=$SSE_GAP_MS"
    command -v haproxy >/dev/null && echo "haproxy: $(haproxy -v 2>&1 | head -n1)"
    command -v nginx >/dev/null && echo "nginx: $(nginx -v 2>&1)"
    command -v iperf3 >/dev/null && echo "iperf3: $(iperf3 --version 2>&1 | head -n1)"
    command -v sockperf >/dev/null && echo "sockperf: $(sockperf --version 2>&1 | head -n1)"
    command -v wrk >/dev/null && echo "wrk: $(wrk -v 2>&1 | head -n1)"
    command -v h2load >/dev/null && echo "h2load: $(h2load --version 2>&1 | head -n1)"
    echo "python3: $(python3 --version 2>&1)"
    [[ -n $FLOWGATE_BIN ]] && echo "flowgate: $FLOWGATE_BIN ($("$FLOWGATE_BIN" --version 2>&1 | head -n1))"
    has_target flowgate-base && echo "flowgate-base: $FLOWGATE_BASE_BIN ($("$FLOWGATE_BASE_BIN" --version 2>&1 | head -n1))"
} >"$OUT_DIR/meta.txt"

log "results and logs: $OUT_DIR"
snap=$(cpu_snapshot)
sleep 1
busy_pct=$(foreign_cpu_pct "$snap" "$(cpu_snapshot)")
if ((busy_pct > 10)); then
    log "warning: other processes are using ${busy_pct}% of a CPU right now; they will distort the figures"
fi
printf 'round\tfigure\ttarget\tforeign_cpu_pct\n' >"$OUT_DIR/load.tsv"
DISTURBED=0
# shellcheck disable=SC2086 # word splitting intended
if has_any_figure $SYS_FIGURES; then
    run_syscalls
    if ((SYS_ONLY)); then
        tee "$OUT_DIR/results.md" <"$OUT_DIR/syscalls.md"
        ((FAILED == 0)) || { log "$FAILED measurement(s) failed; see the errors above"; exit 1; }
        exit 0
    fi
fi
start_backends
start_balancers
start_udp_balancers
start_http_balancers
start_edge_balancers

# measure_one figure target prefix: sets LINES to "metric value" pairs (value NA
# on failure), MSG to a human summary; returns non-zero when the tool failed.
measure_one() {
    local f=$1 t=$2 pre=$3 p50 p99 p999 rx tx loss
    LINES='' MSG=''
    case $f in
        bulk1 | bulk4)
            check_backend iperf
            if measure_bulk "$t" "${f#bulk}" "$pre.json"; then
                LINES="bulk_${f#bulk} $RESULT" MSG="$RESULT Gbit/s"
            else
                LINES="bulk_${f#bulk} NA"
                return 1
            fi
            ;;
        latency)
            check_backend sockperf
            if measure_latency "$t" "$pre.log"; then
                read -r p50 p99 p999 <<<"$RESULT"
                LINES="lat_p50 $p50"$'\n'"lat_p99 $p99"$'\n'"lat_p999 $p999"
                MSG="p50 $p50 p99 $p99 p99.9 $p999 us"
            else
                LINES="lat_p50 NA"$'\n'"lat_p99 NA"$'\n'"lat_p999 NA"
                return 1
            fi
            ;;
        cps | rps)
            check_backend http
            if measure_wrk "$t" "$([[ $f == cps ]] && echo 1 || echo 0)" "$pre.log"; then
                LINES="$f $RESULT" MSG="$RESULT /s"
            else
                LINES="$f NA"
                return 1
            fi
            ;;
        mem)
            check_backend hold
            if measure_mem "$t" "$pre"; then
                LINES="mem_kb $RESULT" MSG="$RESULT KiB/conn"
            else
                LINES="mem_kb NA"
                return 1
            fi
            ;;
        http-rps | http-post-rps | http-h2-rps)
            # Also the balancer's CPU time per request (user + system, all
            # its processes), which other work on the machine disturbs less
            # than the rate. Not for direct (no balancer).
            local key=${f//-/_} ticks0='' cpu
            check_backend http
            [[ $t == direct ]] || ticks0=$(proc_ticks "${LB_PID[$t-l7]}")
            if [[ $f == http-rps ]]; then
                measure_wrk "$t" 0 "$pre.log" "$(http_port "$t" 8)" || { LINES="$key NA"; return 1; }
            elif [[ $f == http-post-rps ]]; then
                measure_wrk "$t" 0 "$pre.log" "$(http_port "$t" 8)" post || { LINES="$key NA"; return 1; }
            else
                measure_h2_rps "$t" "$pre.log" || { LINES="$key NA"; return 1; }
            fi
            LINES="$key $RESULT" MSG="$RESULT req/s"
            if [[ -n $ticks0 ]]; then
                cpu=$(awk -v a="$ticks0" -v b="$(proc_ticks "${LB_PID[$t-l7]}")" -v hz="$(getconf CLK_TCK)" \
                    -v r="$REQUESTS" 'BEGIN { if (r > 0) printf "%.2f", (b - a) * 1e6 / hz / r }')
                if [[ -n $cpu ]]; then
                    LINES+=$'\n'"${key}_cpu_us $cpu" MSG+=", $cpu µs of balancer CPU per request"
                fi
            fi
            ;;
        http-latency)
            check_backend http
            if measure_http_latency "$t" "$pre"; then
                read -r p50 p99 rx <<<"$RESULT"
                LINES="http_lat_p50 $p50"$'\n'"http_lat_p99 $p99"
                MSG="p50 $p50 p99 $p99 us at $rx req/s"
                if ((rx * 100 < HTTP_LAT_RPS * 95)); then
                    log "note: only $rx of the $HTTP_LAT_RPS req/s asked for were done via $t"
                fi
            else
                LINES="http_lat_p50 NA"$'\n'"http_lat_p99 NA"
                return 1
            fi
            ;;
        http-sse | http-sse-l4)
            local key=${f//-/_}
            check_backend sse
            if measure_sse "$t" "$pre.log" "$([[ $f == http-sse ]] && echo 10 || echo 15)"; then
                local ev50 ev99
                read -r p50 p99 ev50 ev99 <<<"$RESULT"
                LINES="${key}_p50 $p50"$'\n'"${key}_p99 $p99"$'\n'"${key}_ev_p50 $ev50"$'\n'"${key}_ev_p99 $ev99"
                MSG="first event p50 $p50 p99 $p99 us; second event delayed p50 $ev50 p99 $ev99 us"
            else
                LINES="${key}_p50 NA"$'\n'"${key}_p99 NA"$'\n'"${key}_ev_p50 NA"$'\n'"${key}_ev_p99 NA"
                return 1
            fi
            ;;
        edge-pp | edge-sni)
            # cps with a PROXY v2 header or a ClientHello first (scripts/bench/edge.lua),
            # and, as for http-rps, the balancer's CPU time per connection during
            # the run, which other work on the machine disturbs less than the rate.
            local key=${f//-/_} svc=13 ticks0='' cpu
            [[ $f == edge-sni ]] && svc=14
            check_backend edge
            [[ $t == direct ]] || ticks0=$(proc_ticks "${LB_PID[$t-edge]}")
            if measure_wrk "$t" 1 "$pre.log" "$(target_port "$t" $svc)" "${f#edge-}"; then
                LINES="$key $RESULT" MSG="$RESULT conn/s"
            else
                LINES="$key NA"
                return 1
            fi
            if [[ -n $ticks0 ]]; then
                cpu=$(awk -v a="$ticks0" -v b="$(proc_ticks "${LB_PID[$t-edge]}")" -v hz="$(getconf CLK_TCK)" \
                    -v r="$REQUESTS" 'BEGIN { if (r > 0) printf "%.2f", (b - a) * 1e6 / hz / r }')
                if [[ -n $cpu ]]; then
                    LINES+=$'\n'"${key}_cpu_us $cpu" MSG+=", $cpu µs of balancer CPU per connection"
                fi
            fi
            ;;
        http-mem)
            check_backend http
            if measure_mem "$t" "$pre" http; then
                LINES="http_mem_kb $RESULT" MSG="$RESULT KiB/conn"
            else
                LINES="http_mem_kb NA"
                return 1
            fi
            ;;
        udp-latency)
            check_backend udp-sockperf
            if check_udp_target "$t" && measure_latency "$t" "$pre.log" udp; then
                read -r p50 p99 p999 <<<"$RESULT"
                LINES="udp_lat_p50 $p50"$'\n'"udp_lat_p99 $p99"$'\n'"udp_lat_p999 $p999"
                MSG="p50 $p50 p99 $p99 p99.9 $p999 us"
            else
                LINES="udp_lat_p50 NA"$'\n'"udp_lat_p99 NA"$'\n'"udp_lat_p999 NA"
                return 1
            fi
            ;;
        udp-pps)
            if check_udp_target "$t" && measure_udp_pps "$t" "$pre"; then
                read -r rx loss tx <<<"$RESULT"
                LINES="udp_pps $rx"$'\n'"udp_pps_loss $loss"
                MSG="received $rx msg/s of $tx sent, loss $loss %"
            else
                LINES="udp_pps NA"$'\n'"udp_pps_loss NA"
                return 1
            fi
            ;;
        udp-iperf)
            # One run per rate; metric names carry the rate (report.py labels them).
            local b failed=0
            for b in $UDP_IPERF_RATES; do
                check_backend udp-iperf
                if check_udp_target "$t" && measure_udp_iperf "$t" "$b" "$pre-b$b.json"; then
                    read -r rx loss <<<"$RESULT"
                    LINES+="udp_iperf_gbps@$b $rx"$'\n'"udp_iperf_loss@$b $loss"$'\n'
                    MSG+="${MSG:+, }-b $b: $rx Gbit/s, loss $loss %"
                else
                    LINES+="udp_iperf_gbps@$b NA"$'\n'"udp_iperf_loss@$b NA"$'\n'
                    failed=1
                fi
            done
            LINES=${LINES%$'\n'}
            ((!failed)) || return 1
            ;;
    esac
}

wait_quiet() { # wait up to QUIET_WAIT seconds for other processes to calm down
    local deadline=$((SECONDS + QUIET_WAIT)) snap pct
    ((QUIET_WAIT > 0)) || return 0
    while ((SECONDS < deadline)); do
        snap=$(cpu_snapshot)
        sleep 1
        pct=$(foreign_cpu_pct "$snap" "$(cpu_snapshot)")
        ((pct <= FOREIGN_THRESHOLD)) && return 0
    done
    log "note: other processes still use ${pct}% of a CPU after waiting ${QUIET_WAIT}s; measuring anyway"
}

START=$SECONDS
for ((r = 1; r <= ROUNDS; r++)); do
    for f in $FIGURES; do
        [[ $f == sys-* ]] && continue # measured once, before the rounds
        for t in $TARGETS; do
            [[ $f == *mem && $t == direct ]] && continue # no balancer, nothing to measure
            is_udp_figure "$f" && [[ -n ${UDP_SKIP[$t]:-} ]] && continue # noted at the start
            is_http_figure "$f" && [[ -n ${HTTP_SKIP[$t]:-} ]] && continue # noted at the start
            is_edge_figure "$f" && [[ -n ${EDGE_SKIP[$t]:-} ]] && continue # noted at the start
            for ((attempt = 0; ; attempt++)); do
                if is_http_figure "$f"; then
                    check_http_target "$t"
                elif is_edge_figure "$f"; then
                    check_edge_target "$t"
                elif ! is_udp_figure "$f"; then
                    check_target "$t" # measure_one checks the UDP instances
                fi
                wait_quiet
                pre=$OUT_DIR/runs/r$r-$f-$t
                ((attempt == 0)) || pre=$pre-retry$attempt
                snap=$(cpu_snapshot)
                ok=1
                measure_one "$f" "$t" "$pre" || ok=0
                foreign=$(foreign_cpu_pct "$snap" "$(cpu_snapshot)")
                printf '%s\t%s\t%s\t%s\n' "$r" "$f" "$t" "$foreign" >>"$OUT_DIR/load.tsv"
                ((foreign > FOREIGN_THRESHOLD)) || break
                if ((attempt < RETRY_DISTURBED)); then
                    log "other processes used ${foreign}% of a CPU during round $r $f $t; measuring it again"
                    continue
                fi
                log "warning: other processes used ${foreign}% of a CPU during round $r $f $t"
                DISTURBED=$((DISTURBED + 1))
                break
            done
            while read -r metric value; do
                record "$r" "$metric" "$t" "$value"
            done <<<"$LINES"
            if ((ok)); then
                log "round $r/$ROUNDS $f $t: $MSG"
            else
                FAILED=$((FAILED + 1))
            fi
        done
    done
done
log "measurements took $((SECONDS - START)) s"
echo "loadavg at the end: $(cat /proc/loadavg)" >>"$OUT_DIR/meta.txt"

python3 "$HELPERS/report.py" "$RAW" "$TARGETS" "$ROUNDS" >"$OUT_DIR/results.md"
if ((${#UDP_SKIP[@]})); then
    {
        echo
        for t in $TARGETS; do
            if [[ -n ${UDP_SKIP[$t]:-} ]]; then echo "UDP figures: $t not measured: ${UDP_SKIP[$t]}."; fi
        done
    } >>"$OUT_DIR/results.md"
fi
if ((${#HTTP_SKIP[@]})); then
    {
        echo
        for t in $TARGETS; do
            if [[ -n ${HTTP_SKIP[$t]:-} ]]; then echo "HTTP figures: $t not measured: ${HTTP_SKIP[$t]}."; fi
        done
    } >>"$OUT_DIR/results.md"
fi
if ((${#EDGE_SKIP[@]})); then
    {
        echo
        for t in $TARGETS; do
            if [[ -n ${EDGE_SKIP[$t]:-} ]]; then echo "Edge figures: $t not measured: ${EDGE_SKIP[$t]}."; fi
        done
    } >>"$OUT_DIR/results.md"
fi
if [[ -s $OUT_DIR/syscalls.md ]]; then
    { echo; cat "$OUT_DIR/syscalls.md"; } >>"$OUT_DIR/results.md"
fi
max_foreign=$(awk -F'\t' 'NR > 1 && $4 > m { m = $4 } END { print m + 0 }' "$OUT_DIR/load.tsv")
{
    echo
    echo "Other processes on the machine used at most ${max_foreign}% of one CPU during any single measurement;"
    echo "$DISTURBED measurement(s) exceeded ${FOREIGN_THRESHOLD}% (per-measurement figures in load.tsv)."
} >>"$OUT_DIR/results.md"
{
    echo
    echo "Results ($(date -u '+%Y-%m-%d'), $(nproc) CPUs, ROUNDS=$ROUNDS; raw numbers in $RAW):"
    echo
    cat "$OUT_DIR/results.md"
}
if ((FAILED)); then
    log "$FAILED measurement(s) failed; see the errors above"
    exit 1
fi
