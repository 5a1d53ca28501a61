#!/usr/bin/env python3
"""Splits a QD-N disk run into its round trips, from `perf script` output of the tracepoints
block:block_rq_issue, sched:sched_switch, sched:sched_wakeup and raw_syscalls:sys_exit (see
scripts/trace-cycle.sh).

A batch is a run of block_rq_issue events from the backend with no gap over GAP_US. Between
the last issue of one batch and the first of the next, the script finds:
  W  the backend thread switched back in (woken by the disk's completion),
  N  the client woken (by the backend's write to the vhost-user call eventfd),
  C  the client switched in,
and reports the median of each stretch. For fio (no client) only W is looked for.

usage: trace_cycle.py PERF_SCRIPT_TXT BACKEND_COMM [CLIENT_COMM]
"""

import bisect
import re
import statistics
import sys
from collections import Counter

GAP_US = 60.0

LINE = re.compile(r"^\s*(\S.*?)\s+(\d+)\s+\[\d+\]\s+([\d.]+):\s+(\S+):\s*(.*)$")


def parse(path):
    events = []
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if m:
                comm, tid, ts, name, rest = m.groups()
                events.append((float(ts) * 1e6, comm, int(tid), name, rest))
    return events


def field(rest, key):
    m = re.search(key + r"=(\S+)", rest)
    return m.group(1) if m else None


def main():
    path, backend_comm = sys.argv[1], sys.argv[2]
    client_comm = sys.argv[3] if len(sys.argv) > 3 else None
    ev = parse(path)
    issuers = Counter(
        tid for _, comm, tid, name, _ in ev if name == "block:block_rq_issue" and comm.startswith(backend_comm)
    )
    if not issuers:
        sys.exit(f"no block_rq_issue from {backend_comm!r}")
    btid = issuers.most_common(1)[0][0]
    ctid = None
    if client_comm:
        woken = Counter(
            int(field(rest, "pid") or 0) for _, _, tid, name, rest in ev
            if name == "sched:sched_wakeup" and (field(rest, "comm") or "").startswith(client_comm)
        )
        ctid = woken.most_common(1)[0][0] if woken else None

    issues = [t for t, _, tid, name, _ in ev if name == "block:block_rq_issue" and tid == btid]
    batches = []  # (first, last, n)
    for t in issues:
        if batches and t - batches[-1][1] <= GAP_US:
            f, _, n = batches[-1]
            batches[-1] = (f, t, n + 1)
        else:
            batches.append((t, t, 1))

    # A thread is back on its CPU at its first syscall exit after it blocked (switch-ins from
    # the idle task are not reliably recorded in this VM; switch-outs are).
    switch_out = {}  # tid -> times it blocked
    sys_exit = {}  # tid -> times of its syscall exits
    wakes = []  # times the client was woken
    for t, _, tid, name, rest in ev:
        if name == "sched:sched_switch" and "prev_state=S" in rest:
            switch_out.setdefault(int(field(rest, "prev_pid") or -1), []).append(t)
        elif name == "raw_syscalls:sys_exit":
            sys_exit.setdefault(tid, []).append(t)
        elif name == "sched:sched_wakeup" and ctid and int(field(rest, "pid") or 0) == ctid:
            # Recorded on the CPU that does the wake-up: the backend's, or the client's own
            # (wake list) when it is idle.
            wakes.append(t)

    def after(times, t, limit):
        i = bisect.bisect_right(times, t)
        return times[i] if i < len(times) and times[i] < limit else None

    def back_in(tid, t, limit):
        out = after(switch_out.get(tid, []), t, limit)
        return after(sys_exit.get(tid, []), out, limit) if out is not None else None

    rows = []
    for (f, last, n), (f2, _, _) in zip(batches, batches[1:]):
        w = back_in(btid, last, f2)
        row = {"cycle": f2 - f, "n": n, "issue spread": last - f}
        if w is None:
            rows.append(row)
            continue
        row["last issue -> backend in"] = w - last
        if ctid is None:
            row["backend in -> next issue"] = f2 - w
        else:
            nt = after(wakes, w, f2)
            c = after(sys_exit.get(ctid, []), nt, f2) if nt else None
            if nt and c:
                row["backend in -> client woken"] = nt - w
                row["client woken -> client in"] = c - nt
                row["client in -> next issue"] = f2 - c
        rows.append(row)

    full = [r for r in rows if r["n"] >= 16]
    print(f"backend tid {btid}, client tid {ctid}; {len(rows)} batches, {len(full)} of 16+ requests")
    keys = []
    for r in full:
        keys += [k for k in r if k not in keys]
    for k in keys:
        v = [r[k] for r in full if k in r]
        unit = "  " if k == "n" else "us"  # n counts requests
        print(f"  {k:28s} median {statistics.median(v):7.1f} {unit}   mean {statistics.fmean(v):7.1f}   ({len(v)} batches)")
    if full:
        print(f"  => {statistics.fmean(r['n'] for r in full) / statistics.fmean(r['cycle'] for r in full) * 1e6:,.0f} I/Os per second in full batches")


if __name__ == "__main__":
    main()
