#!/usr/bin/env python3
"""Summarise the raw per-round results written by scripts/bench.sh.

usage: report.py RAW_TSV "TARGET ..." [ROUNDS]

RAW_TSV has a header line and rows "round<TAB>metric<TAB>target<TAB>value",
where value is a number or "NA" (the measurement failed). Prints two Markdown
tables to stdout: the medians with flowgate/HAProxy ratios (and flowgate/
flowgate-base, the same flowgate against an older build), and the per-round
minimum..maximum so the noise can be judged. When UDP figures are present they
get two tables of their own after those, with the targets that can balance UDP
and flowgate/nginx ratios (HAProxy OSS does not balance UDP). The HTTP (L7)
figures get two more, with flowgate/HAProxy and flowgate/nginx ratios and, for
the SSE first-event time, rows with what each balancer adds over direct (its
per-round values minus direct's median). The edge figures (edge_pp, edge_sni)
are rows of the first table.
"""

import re
import statistics
import sys
from collections import defaultdict

# metric key -> (label, unit, higher_is_better, format)
METRICS = [
    ("bulk_1", "Bulk throughput, 1 stream", "Gbit/s", True, "{:.2f}"),
    ("bulk_4", "Bulk throughput, 4 streams", "Gbit/s", True, "{:.2f}"),
    ("lat_p50", "Ping-pong RTT p50 (64 B)", "µs", False, "{:.1f}"),
    ("lat_p99", "Ping-pong RTT p99 (64 B)", "µs", False, "{:.1f}"),
    ("lat_p999", "Ping-pong RTT p99.9 (64 B)", "µs", False, "{:.1f}"),
    ("cps", "New connections (HTTP, Connection: close)", "conn/s", True, "{:,.0f}"),
    ("rps", "Requests on kept-alive connections", "req/s", True, "{:,.0f}"),
    ("mem_kb", "Memory per idle established connection", "KiB/conn", False, "{:.2f}"),
    # Issue 13's edge figures: cps with a PROXY v2 header, and with a TLS ClientHello routed by SNI.
    ("edge_pp", "New connections, PROXY v2 in and out (HTTP, Connection: close)", "conn/s", True,
     "{:,.0f}"),
    ("edge_pp_cpu_us", "Balancer CPU per PROXY v2 connection (edge-pp run)", "µs", False, "{:.1f}"),
    ("edge_sni", "New connections routed by SNI (TLS ClientHello, fixed reply)", "conn/s", True,
     "{:,.0f}"),
    ("edge_sni_cpu_us", "Balancer CPU per SNI-routed connection (edge-sni run)", "µs", False, "{:.1f}"),
]

RATIO_PAIRS = [("flowgate", "haproxy"), ("flowgate", "haproxy-splice"),
               ("flowgate-shared", "haproxy"), ("flowgate-metrics", "flowgate"),
               ("flowgate", "flowgate-base"), ("flowgate-busy", "flowgate"),
               ("flowgate-busy", "haproxy-busy")]

# UDP figures: same layout as METRICS. The udp_iperf ones carry the iperf3 -b
# rate after an "@" and are added in the order the raw file first shows them.
UDP_METRICS = [
    ("udp_lat_p50", "UDP ping-pong RTT p50 (64 B)", "µs", False, "{:.1f}"),
    ("udp_lat_p99", "UDP ping-pong RTT p99 (64 B)", "µs", False, "{:.1f}"),
    ("udp_lat_p999", "UDP ping-pong RTT p99.9 (64 B)", "µs", False, "{:.1f}"),
    ("udp_pps", "UDP datagrams received (64 B, sent flat out)", "msg/s", True, "{:,.0f}"),
    ("udp_pps_loss", "UDP datagrams lost (64 B, sent flat out)", "%", False, "{:.2f}"),
]
UDP_DYNAMIC = {
    "udp_iperf_gbps": ("iperf3 UDP received (1400 B, {})", "Gbit/s", True, "{:.2f}"),
    "udp_iperf_loss": ("iperf3 UDP lost (1400 B, {})", "%", False, "{:.2f}"),
}
UDP_TARGETS = ["direct", "flowgate", "flowgate-shared", "flowgate-metrics", "flowgate-base",
               "flowgate-busy", "nginx"]
UDP_RATIO_PAIRS = [("flowgate", "nginx"), ("flowgate-shared", "nginx"),
                   ("flowgate-metrics", "flowgate"), ("flowgate", "flowgate-base"),
                   ("flowgate-busy", "flowgate")]
NO_RATIO = re.compile(r"loss")  # a ratio of loss percentages means little (and 0 is common)


# HTTP (L7) figures: same layout as METRICS.
HTTP_METRICS = [
    ("http_rps", "HTTP/1.1 requests, kept-alive connections (wrk)", "req/s", True, "{:,.0f}"),
    ("http_rps_cpu_us", "Balancer CPU per HTTP/1.1 request (wrk run)", "µs", False, "{:.1f}"),
    ("http_post_rps", "HTTP/1.1 JSON POSTs (228 B), kept-alive connections (wrk)", "req/s", True, "{:,.0f}"),
    ("http_post_rps_cpu_us", "Balancer CPU per HTTP/1.1 POST (wrk run)", "µs", False, "{:.1f}"),
    ("http_h2_rps", "h2c requests, multiplexed streams (h2load)", "req/s", True, "{:,.0f}"),
    ("http_h2_rps_cpu_us", "Balancer CPU per h2c request (h2load run)", "µs", False, "{:.1f}"),
    ("http_lat_p50", "HTTP/1.1 latency p50 at a fixed rate (h2load --rps)", "µs", False, "{:,.0f}"),
    ("http_lat_p99", "HTTP/1.1 latency p99 at a fixed rate (h2load --rps)", "µs", False, "{:,.0f}"),
    ("http_sse_p50", "SSE time to first event p50", "µs", False, "{:,.0f}"),
    ("http_sse_p99", "SSE time to first event p99", "µs", False, "{:,.0f}"),
    ("http_sse_p50+", "SSE first event p50, added over direct", "µs", False, "{:,.0f}"),
    ("http_sse_p99+", "SSE first event p99, added over direct", "µs", False, "{:,.0f}"),
    ("http_sse_ev_p50", "SSE mid-stream event, backend write to client read, p50", "µs", False,
     "{:,.0f}"),
    ("http_sse_ev_p99", "SSE mid-stream event, backend write to client read, p99", "µs", False,
     "{:,.0f}"),
    ("http_sse_l4_p50", "SSE time to first event p50, through the L4 (TCP) mode", "µs", False,
     "{:,.0f}"),
    ("http_sse_l4_p99", "SSE time to first event p99, through the L4 (TCP) mode", "µs", False,
     "{:,.0f}"),
    ("http_sse_l4_p50+", "SSE first event p50 through the L4 mode, added over direct", "µs", False,
     "{:,.0f}"),
    ("http_sse_l4_p99+", "SSE first event p99 through the L4 mode, added over direct", "µs", False,
     "{:,.0f}"),
    ("http_sse_l4_ev_p50", "SSE mid-stream event through the L4 mode, write to read, p50", "µs",
     False, "{:,.0f}"),
    ("http_sse_l4_ev_p99", "SSE mid-stream event through the L4 mode, write to read, p99", "µs",
     False, "{:,.0f}"),
    ("http_mem_kb", "Memory per idle kept-alive HTTP/1.1 client connection", "KiB/conn", False,
     "{:.2f}"),
]
HTTP_TARGETS = ["direct", "flowgate", "flowgate-shared", "flowgate-metrics", "flowgate-base",
                "flowgate-busy", "haproxy", "haproxy-busy", "nginx"]
HTTP_RATIO_PAIRS = [("flowgate", "haproxy"), ("flowgate", "nginx"),
                    ("flowgate-shared", "haproxy"), ("flowgate-metrics", "flowgate"),
                    ("flowgate", "flowgate-base")]
ADDED = "+"  # a metric key ending in this: the base metric minus direct's median


def add_over_direct(values, targets):
    """Adds the "...+" series: each target's per-round values minus direct's median."""
    for key, *_ in HTTP_METRICS:
        if not key.endswith(ADDED):
            continue
        base = key[:-len(ADDED)]
        direct = values.get((base, "direct"))
        if not direct:
            continue
        med = statistics.median(direct)
        for t in targets:
            if t != "direct" and values.get((base, t)):
                values[(key, t)] = [v - med for v in values[(base, t)]]


def udp_metrics(order):
    """The UDP metric rows for the metric keys in `order` (first-seen order)."""
    rows = [m for m in UDP_METRICS if m[0] in order]
    rates = []
    for key in order:
        base, _, rate = key.partition("@")
        if base in UDP_DYNAMIC and rate and rate not in rates:
            rates.append(rate)
    for rate in rates:
        for base, (label, unit, higher, fmt) in UDP_DYNAMIC.items():
            key = base + "@" + rate
            if key in order:
                shown = "sent flat out" if rate == "0" else "sent at " + rate + "bit/s"
                rows.append((key, label.format(shown), unit, higher, fmt))
    return rows


def main():
    raw, targets = sys.argv[1], sys.argv[2].split()
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else None
    values = defaultdict(list)  # (metric, target) -> [float]
    failed = defaultdict(int)
    seen_metrics = {}  # metric -> None, in first-seen order
    with open(raw) as f:
        next(f, None)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                continue
            _, metric, target, value = parts
            seen_metrics.setdefault(metric, None)
            if value == "NA":
                failed[(metric, target)] += 1
            else:
                values[(metric, target)].append(float(value))

    metrics = [m for m in METRICS if m[0] in seen_metrics]
    ratios = [(a, b) for a, b in RATIO_PAIRS if a in targets and b in targets]
    udp_rows = udp_metrics(list(seen_metrics))
    udp_targets = [t for t in targets if t in UDP_TARGETS]
    udp_ratios = [(a, b) for a, b in UDP_RATIO_PAIRS if a in udp_targets and b in udp_targets]
    http_targets = [t for t in targets if t in HTTP_TARGETS]
    add_over_direct(values, http_targets)
    http_rows = [m for m in HTTP_METRICS
                 if m[0] in seen_metrics or (m[0].endswith(ADDED) and m[0][:-len(ADDED)] in seen_metrics
                                             and "direct" in http_targets)]
    http_ratios = [(a, b) for a, b in HTTP_RATIO_PAIRS if a in http_targets and b in http_targets]
    printed = False
    if metrics or not (udp_rows or http_rows):
        tables(metrics, targets, ratios, "HAProxy", rounds, values, failed)
        printed = True
    if udp_rows:
        if printed:
            print()
        print("UDP (HAProxy OSS does not balance UDP):")
        print()
        tables(udp_rows, udp_targets, udp_ratios, "nginx", rounds, values, failed)
        printed = True
    if http_rows:
        if printed:
            print()
        print("HTTP (L7):")
        print()
        tables(http_rows, http_targets, http_ratios, "HAProxy or nginx", rounds, values, failed)


def tables(metrics, targets, ratios, versus, rounds, values, failed):
    def cell(metric, target, fmt):
        vs = values.get((metric, target))
        base = metric[:-len(ADDED)] if metric.endswith(ADDED) else metric
        note = " (%d failed)" % failed[(base, target)] if failed.get((base, target)) else ""
        if not vs:
            return ("failed" if note else "—"), None
        med = statistics.median(vs)
        return fmt.format(med) + note, med

    head = ["Figure", "Unit"] + targets + ["%s / %s" % r for r in ratios]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
    for key, label, unit, higher, fmt in metrics:
        row = [label, unit + (" ↑" if higher else " ↓")]
        meds = {}
        for t in targets:
            text, med = cell(key, t, fmt)
            row.append(text)
            meds[t] = med
        for a, b in ratios:
            if key.endswith(ADDED) and not (meds.get(a) and meds.get(b) and meds[a] > 0 and meds[b] > 0):
                row.append("—")  # a ratio of differences near or below zero means nothing
            elif meds.get(a) and meds.get(b) and not NO_RATIO.search(key):
                row.append("{:.2f}".format(meds[a] / meds[b]))
            else:
                row.append("—")
        print("| " + " | ".join(row) + " |")
    print()
    print("↑ higher is better, ↓ lower is better. Cells are medians over %s rounds; "
          "ratio columns divide the flowgate median by the %s median "
          "(an A / B column: A's median by B's)."
          % (rounds if rounds is not None else "all", versus))
    print()
    print("Spread (min .. max over rounds):")
    print()
    head = ["Figure"] + targets
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] + ["---:"] * len(targets)) + "|")
    for key, label, unit, higher, fmt in metrics:
        row = [f"{label} ({unit})"]
        for t in targets:
            vs = values.get((key, t))
            if not vs:
                row.append("—")
            else:
                row.append(fmt.format(min(vs)) + " .. " + fmt.format(max(vs)))
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
