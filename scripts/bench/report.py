#!/usr/bin/env python3
"""Summarise the raw per-round results written by scripts/bench.sh.

usage: report.py RAW_TSV "TARGET ..." [ROUNDS]

RAW_TSV has a header line and rows "round<TAB>metric<TAB>target<TAB>value",
where value is a number or "NA" (the measurement failed). Prints two Markdown
tables to stdout: the medians with flowgate/HAProxy ratios, and the per-round
minimum..maximum so the noise can be judged.
"""

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
]

RATIO_PAIRS = [("flowgate", "haproxy"), ("flowgate", "haproxy-splice"),
               ("flowgate-shared", "haproxy")]


def main():
    raw, targets = sys.argv[1], sys.argv[2].split()
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else None
    values = defaultdict(list)  # (metric, target) -> [float]
    failed = defaultdict(int)
    seen_metrics = set()
    with open(raw) as f:
        next(f, None)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                continue
            _, metric, target, value = parts
            seen_metrics.add(metric)
            if value == "NA":
                failed[(metric, target)] += 1
            else:
                values[(metric, target)].append(float(value))

    metrics = [m for m in METRICS if m[0] in seen_metrics]
    ratios = [(a, b) for a, b in RATIO_PAIRS if a in targets and b in targets]

    def cell(metric, target, fmt):
        vs = values.get((metric, target))
        note = " (%d failed)" % failed[(metric, target)] if failed.get((metric, target)) else ""
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
            if meds.get(a) and meds.get(b):
                row.append("{:.2f}".format(meds[a] / meds[b]))
            else:
                row.append("—")
        print("| " + " | ".join(row) + " |")
    print()
    print("↑ higher is better, ↓ lower is better. Cells are medians over %s rounds; "
          "ratio columns divide the flowgate median by the HAProxy median."
          % (rounds if rounds is not None else "all"))
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
