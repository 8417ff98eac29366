#!/usr/bin/env python3
"""Writes the committed seed corpus (corpus/<target>/seed-*). Run from fuzz/."""
import os
import struct


def patch(region, off, data, xor=False, which=0):
    """One patch in the store targets' patch language (see take_patch in src/lib.rs)."""
    op = ((len(data) - 1) << 1) | int(xor)
    return bytes([region + 9 * which]) + struct.pack("<I", off)[:3] + bytes([op]) + data


def put(target, name, data):
    os.makedirs(f"corpus/{target}", exist_ok=True)
    with open(f"corpus/{target}/seed-{name}", "wb") as f:
        f.write(data)


# store_file: mode, ops, then raw file bytes or patches.
put("store_file", "raw-header", b"\x00\x00MMSESSN\x00\x01\x00\x00\x00\x00\x10\x00\x00")
put("store_file", "template", b"\x01\x00")
put("store_file", "commit-verify", b"\xd1\x99")
put("store_file", "dirty-recovery", b"\x09\xe6")
put("store_file", "entry-state", b"\x01\x55" + patch(3, 40, b"\x00\x00\x00\x00\x10\x27\x00\x00"))
put("store_file", "record-len", b"\x49\x00" + patch(6, 4, b"\xff\x0f", which=1))
put("store_file", "geometry", b"\x05\x00" + patch(0, 49, b"\x01", xor=True)
    + patch(0, 192, b"\x02"))
put("store_file", "free-head", b"\x0d\x5a" + patch(0, 512 + 8, b"\x01\x00\x00\x00", xor=True))

# store_live: commands (cmd % 8: 0..2 patch, 3 get, 4 commit, 5 remove, 6 blocking lease,
# 7 verify); key (cmd >> 3) & 3, length cmd >> 5.
def cmd(op, key=0, ln=0):
    return bytes([op | key << 3 | ln << 5])

put("store_live", "ops", cmd(3) + cmd(4, 1, 2) + cmd(3, 1) + cmd(5, 0) + cmd(6, 2) + cmd(7, 3))
put("store_live", "state-word", cmd(4, 0) + cmd(0) + patch(3, 40, b"\x07\x00\x00\x00", which=0)
    + cmd(3, 0) + cmd(6, 0) + cmd(4, 0, 1) + cmd(3, 0))
put("store_live", "free-list", cmd(1) + patch(0, 512 + 8, b"\x10\x00", xor=True) + cmd(4, 3, 1)
    + cmd(4, 2, 1) + cmd(3, 0) + cmd(3, 1) + cmd(7))
put("store_live", "record-bytes", cmd(2) + patch(6, 70, b"zz", which=1) + cmd(3, 1)
    + cmd(4, 1) + cmd(3, 1))
put("store_live", "shard-lock", cmd(0) + patch(5, 0, b"\x05\x00\x40\x00" * 2) + cmd(4, 3)
    + cmd(6, 3) + cmd(3, 3))

# cookie: sel (layer & 3, route (sel >> 2) & 7, 0x20 = raw header), then the header text.
seeded = b"ZnV6ei1zZWVkZWQtaWQwMQ"
put("cookie", "seeded", bytes([0 | 0 << 2]) + seeded)
put("cookie", "seeded-signed", bytes([1 | 0 << 2]) + seeded
    + b".LOCYGb8JokDk2hTFOzQNWLqbCSoOiDWFeo7MnV3JpFU")
put("cookie", "forged-signed", bytes([1 | 6 << 2]) + seeded + b"." + b"A" * 43)
put("cookie", "raw-many", bytes([0x20 | 2 | 1 << 2])
    + b"a=1; session=AAAAAAAAAAAAAAAAAAAAAB; session=" + seeded + b"; b=\"x\"")
put("cookie", "unknown-id", bytes([3 | 7 << 2]) + b"AAAAAAAAAAAAAAAAAAAAAA")

# record: sel (layer & 3, route (sel >> 2) & 7, 0x20 = expires in a second), then the record.
put("record", "plain", bytes([0 | 0 << 2]) + b'{"d":{"n":1}}')
put("record", "expiry-inactivity", bytes([2 | 1 << 2]) + b'{"d":{"n":2},"x":{"i":90000}}')
put("record", "expiry-at", bytes([1 | 6 << 2]) + b'{"d":{"a":[1,2,{"b":null}]},"x":{"t":1700000000000}}')
put("record", "session-end", bytes([3 | 3 << 2]) + b'{"d":{"s":"x"},"x":"s"}')
put("record", "not-json", bytes([0 | 2 << 2]) + b'{"d":{"n":')
