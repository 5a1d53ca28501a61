#!/usr/bin/env python3
"""Writes seed inputs for the `request` fuzz target: valid rings for each request type.

Input layout: 8 control bytes (ctl[0]: log2 queue size, ctl[1]: ring layout/event-idx flags,
ctl[5]: read-only/discard/write-zeroes), then guest memory from address 0: descriptor table at
0x0, avail ring at 0x1000, used ring at 0x2000, buffers from 0x3000.
"""
import os
import struct

HIGH = 0x1_0000_0000
NEXT, WRITE, INDIRECT = 1, 2, 4


def build(name, chains, ctl5=6, indirect=False):
    mem = bytearray(0x3800)
    descs = []  # (addr, len, flags)
    heads = []
    buf = 0x3000
    for chain in chains:
        heads.append(len(descs))
        for i, (kind, payload_or_len) in enumerate(chain):
            last = i == len(chain) - 1
            if kind == "hdr":
                t, sector = payload_or_len
                mem[buf:buf + 16] = struct.pack("<IIQ", t, 0, sector)
                d = (buf, 16, 0)
                buf += 16
            elif kind == "r":
                data = payload_or_len
                mem[buf:buf + len(data)] = data
                d = (buf, len(data), 0)
                buf += len(data)
            elif kind == "w":
                d = (buf, payload_or_len, WRITE)
                buf += payload_or_len
            elif kind == "high":
                d = (HIGH, payload_or_len, WRITE)
            flags = d[2] | (0 if last else NEXT)
            descs.append((d[0], d[1], flags))
    for i, (a, l, f) in enumerate(descs):
        nxt = i + 1 if f & NEXT else 0
        mem[i * 16:(i + 1) * 16] = struct.pack("<QIHH", a, l, f, nxt)
    mem[0x1000:0x1004] = struct.pack("<HH", 0, len(heads))
    for i, h in enumerate(heads):
        mem[0x1004 + 2 * i:0x1006 + 2 * i] = struct.pack("<H", h)
    ctl = bytes([5, 1, 0, 0, 0, ctl5, 0, 0])
    with open(os.path.join(os.path.dirname(__file__), "request", name), "wb") as f:
        f.write(ctl + bytes(mem))


seg = lambda sector, n, flags: struct.pack("<QII", sector, n, flags)
build("in", [[("hdr", (0, 8)), ("w", 4096), ("w", 1)]])
build("out", [[("hdr", (1, 16)), ("r", b"\xab" * 1024), ("w", 1)]])
build("flush", [[("hdr", (4, 0)), ("w", 1)]])
build("getid", [[("hdr", (8, 0)), ("w", 20), ("w", 1)]])
build("discard", [[("hdr", (11, 0)), ("r", seg(0, 8, 0) + seg(64, 8, 0)), ("w", 1)]])
build("wzeroes", [[("hdr", (13, 0)), ("r", seg(8, 8, 1)), ("w", 1)]])
build("mixed", [[("hdr", (0, 0)), ("w", 512), ("w", 1)], [("hdr", (1, 1)), ("r", b"x" * 512), ("w", 1)],
                [("hdr", (0, 2)), ("high", 512), ("w", 1)]])
