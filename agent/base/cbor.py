"""A minimal CBOR codec (RFC 8949): ints, floats, text, bytes, lists, maps, bools; Defender reports and Commands.

Small documents are all the agent encodes and decodes, so a hundred lines beat a dependency in the daemon.
"""

from __future__ import annotations

import struct
from typing import Any


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for code, fmt, limit in ((24, ">B", 0xFF), (25, ">H", 0xFFFF), (26, ">I", 0xFFFFFFFF), (27, ">Q", 2**64 - 1)):
        if n <= limit:
            return bytes([major << 5 | code]) + struct.pack(fmt, n)
    raise ValueError("integer too large for CBOR")


def dumps(v: Any) -> bytes:
    if v is True:
        return b"\xf5"
    if v is False:
        return b"\xf4"
    if v is None:
        return b"\xf6"
    if isinstance(v, int):
        return _head(0, v) if v >= 0 else _head(1, -1 - v)
    if isinstance(v, float):
        return b"\xfb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode("utf-8")
        return _head(3, len(b)) + b
    if isinstance(v, (bytes, bytearray)):
        return _head(2, len(v)) + bytes(v)
    if isinstance(v, (list, tuple)):
        return _head(4, len(v)) + b"".join(dumps(x) for x in v)
    if isinstance(v, dict):
        return _head(5, len(v)) + b"".join(dumps(k) + dumps(x) for k, x in v.items())
    raise TypeError(f"cannot CBOR-encode {type(v).__name__}")


def loads(data: bytes, max_depth: int = 16) -> Any:
    """Decode definite-length CBOR (what AWS sends back). Hostile input raises ValueError."""
    v, i = _dec(memoryview(data), 0, max_depth)
    if i != len(data):
        raise ValueError("trailing bytes after CBOR item")
    return v


def loads_map(data: bytes) -> dict:
    v = loads(data)
    if not isinstance(v, dict):
        raise ValueError("CBOR item is not a map")
    return v


def _arg(buf: memoryview, i: int, info: int) -> tuple[int, int]:
    if info < 24:
        return info, i
    size = {24: 1, 25: 2, 26: 4, 27: 8}.get(info)
    if size is None or i + size > len(buf):
        raise ValueError("bad CBOR length")
    return int.from_bytes(buf[i : i + size], "big"), i + size


def _dec(buf: memoryview, i: int, depth: int) -> tuple[Any, int]:
    if depth < 0:
        raise ValueError("CBOR nested too deeply")
    if i >= len(buf):
        raise ValueError("truncated CBOR")
    major, info = buf[i] >> 5, buf[i] & 0x1F
    i += 1
    if major == 7:
        if info == 20:
            return False, i
        if info == 21:
            return True, i
        if info == 22:
            return None, i
        if info in (25, 26, 27):
            size = {25: 2, 26: 4, 27: 8}[info]
            if i + size > len(buf):
                raise ValueError("truncated CBOR float")
            raw = bytes(buf[i : i + size])
            return struct.unpack({2: ">e", 4: ">f", 8: ">d"}[size], raw)[0], i + size
        raise ValueError("unsupported CBOR simple value")
    n, i = _arg(buf, i, info)
    if major == 0:
        return n, i
    if major == 1:
        return -1 - n, i
    if major in (2, 3):
        if i + n > len(buf):
            raise ValueError("truncated CBOR string")
        raw = bytes(buf[i : i + n])
        return (raw if major == 2 else raw.decode("utf-8")), i + n
    if major == 4:
        if n > len(buf):
            raise ValueError("CBOR array longer than the input")
        out = []
        for _ in range(n):
            v, i = _dec(buf, i, depth - 1)
            out.append(v)
        return out, i
    if major == 5:
        if n > len(buf):
            raise ValueError("CBOR map longer than the input")
        d = {}
        for _ in range(n):
            k, i = _dec(buf, i, depth - 1)
            v, i = _dec(buf, i, depth - 1)
            if not isinstance(k, (str, int)):
                raise ValueError("unsupported CBOR map key")
            d[k] = v
        return d, i
    raise ValueError("unsupported CBOR major type (tags, indefinite lengths)")
