# SNTP (RFC 4330) and the clock gate: no TLS connection before the clock is set and sane, because
# certificate validity, Defender report ids and the rotation window all depend on it. The server's
# answer is hostile input: it must echo our transmit timestamp, be a server reply from a synchronised
# source, and land after this software was built.
import struct

NTP_DELTA = 2208988800  # 1900-01-01 to 1970-01-01
BUILD_EPOCH = 1767225600  # 2026-01-01: no honest clock reads earlier than this software


def request(nonce):
    # LI 0, version 4, mode 3 (client); the nonce goes in the transmit timestamp and must come back.
    return b"\x23" + bytes(39) + nonce


def parse(reply, nonce):
    """Unix seconds from a server reply, or None when the reply cannot be trusted."""
    if not reply or len(reply) < 48:
        return None
    li, mode, stratum = reply[0] >> 6, reply[0] & 7, reply[1]
    if mode != 4 or li == 3 or not 1 <= stratum <= 15 or reply[24:32] != nonce:
        return None
    secs, frac = struct.unpack("!II", reply[40:48])
    t = secs - NTP_DELTA + (1 if frac >= 0x80000000 else 0)
    if t < BUILD_EPOCH:
        return None
    return t


def sane(t):
    return t >= BUILD_EPOCH


async def sync(board, servers, timeout_ms=2000):
    """Ask each server in turn; set the board's clock from the first trustworthy answer."""
    for host, port in servers:
        nonce = board.random(8)
        t = parse(await board.udp_query(host, port, request(nonce), timeout_ms), nonce)
        if t is not None:
            board.set_time(t)
            return t
    return None
