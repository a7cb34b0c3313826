# MicroPython (unix port) script for bench/micropython_footprint.py: one mutual-TLS session through the
# shipped board.tls() and mqtt.Client, with the C heap read at each step by bench/cheap/malloc_peak.c
# (LD_PRELOAD). Mbed TLS allocates from libc's heap on this port and the port has no ffi, so the
# script signals its own process instead: the shell's parent is this interpreter.
#   SIGUSR1  reset the peak to the live bytes      SIGUSR2  append "<live> <peak>" to PARAMS["out"]
# Run as: MICROPYPATH=.frozen:<repo>/micropython micropython -X heapsize=N tls_session.py PARAMS.json
# (parameters in a file: the port crashes on a command-line argument of 256+ characters).
import asyncio
import gc
import json
import os
import socket
import sys
import time

import board
import mqtt

with open(sys.argv[1]) as _f:
    P = json.load(_f)


def _reports():
    try:
        with open(P["out"]) as f:
            return f.read().split("\n")[:-1]
    except OSError:
        return []


def reset_peak():
    os.system("kill -USR1 $PPID")


def c_heap():
    """(live, peak) C-heap bytes; waits for the interposer's line, which a signal may deliver late."""
    n = len(_reports())
    os.system("kill -USR2 $PPID")
    for _ in range(500):
        got = _reports()
        if len(got) > n:
            live, peak = got[n].split()
            return int(live), int(peak)
        time.sleep_ms(10)
    raise OSError("the malloc interposer did not answer: is LD_PRELOAD set?")


def gc_heap():
    gc.collect()
    return gc.mem_alloc()


def report(name, live_peak, gc_bytes):
    print("tls", name, live_peak[0], live_peak[1], gc_bytes)


async def main():
    # What the first connection would pay only once (the resolver's files and modules) is paid here,
    # outside the window: a board's resolver is lwIP's, not glibc's.
    socket.getaddrinfo("localhost", P["port"], 0, socket.SOCK_STREAM)
    g = gc_heap()
    report("before", c_heap(), g)
    reset_peak()
    s = await board.tls("localhost", P["port"], P["ca"], P["cert"], P["key"])
    c = mqtt.Client(s, P["client_id"], 30)
    await c.connect(5000)
    g = gc_heap()  # collected first, so that "live" holds only what the session keeps
    report("connected", c_heap(), g)
    reset_peak()
    topic = "cmd/{}/hello".format(P["client_id"])
    await c.subscribe(topic, 1)
    await c.publish(topic, b"x" * 2000, 1)
    m = await c.msg(5000)
    assert m and len(m[1]) == 2000, m
    report("traffic", c_heap(), gc_heap())
    c.disconnect()
    s = c = m = None
    g = gc_heap()
    report("closed", c_heap(), g)


asyncio.run(main())
