"""PostgreSQL's extended hash (src/common/hashfn.c `hash_bytes_extended`: Bob Jenkins'
lookup3, little-endian), in plain Python, for values computed here that PostgreSQL must
agree with: the archive's content hash (tiering/content_hash.py vectorises the same
function) and advisory-lock keys that older code computed in SQL (locks.py).
"""

from __future__ import annotations

GOLDEN = 0x9E3779B9 + 3923095


def hash_bytes_extended(data: bytes, seed: int = 0) -> int:
    """hash_bytes_extended(data, seed) as a signed int8, in plain Python."""
    m = 0xFFFFFFFF

    def rot(x, k):
        return ((x << k) | (x >> (32 - k))) & m

    def mix(a, b, c):
        a = (a - c) & m; a ^= rot(c, 4); c = (c + b) & m  # noqa: E702
        b = (b - a) & m; b ^= rot(a, 6); a = (a + c) & m  # noqa: E702
        c = (c - b) & m; c ^= rot(b, 8); b = (b + a) & m  # noqa: E702
        a = (a - c) & m; a ^= rot(c, 16); c = (c + b) & m  # noqa: E702
        b = (b - a) & m; b ^= rot(a, 19); a = (a + c) & m  # noqa: E702
        c = (c - b) & m; c ^= rot(b, 4); b = (b + a) & m  # noqa: E702
        return a, b, c

    a = b = c = (GOLDEN + len(data)) & m
    seed &= 0xFFFFFFFFFFFFFFFF
    if seed:
        a, b, c = mix((a + (seed >> 32)) & m, (b + (seed & m)) & m, c)
    full = len(data) // 12 * 12
    for i in range(0, full, 12):
        a, b, c = mix((a + int.from_bytes(data[i:i + 4], "little")) & m,
                      (b + int.from_bytes(data[i + 4:i + 8], "little")) & m,
                      (c + int.from_bytes(data[i + 8:i + 12], "little")) & m)
    tail = data[full:].ljust(12, b"\0")
    a = (a + int.from_bytes(tail[0:4], "little")) & m
    b = (b + int.from_bytes(tail[4:8], "little")) & m
    c = (c + (int.from_bytes(tail[8:12], "little") << 8)) & m  # the lowest byte of c: the length
    c ^= b; c = (c - rot(b, 14)) & m  # noqa: E702
    a ^= c; a = (a - rot(c, 11)) & m  # noqa: E702
    b ^= a; b = (b - rot(a, 25)) & m  # noqa: E702
    c ^= b; c = (c - rot(b, 16)) & m  # noqa: E702
    a ^= c; a = (a - rot(c, 4)) & m  # noqa: E702
    b ^= a; b = (b - rot(a, 14)) & m  # noqa: E702
    c ^= b; c = (c - rot(b, 24)) & m  # noqa: E702
    value = (b << 32) | c
    return value - (1 << 64) if value >= 1 << 63 else value


def hashtextextended(text: str, seed: int = 0) -> int:
    """PostgreSQL's `hashtextextended(text, seed)` under a deterministic collation."""
    return hash_bytes_extended(text.encode(), seed)
