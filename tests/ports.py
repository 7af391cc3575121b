"""Loopback ports for the servers tests start by hand (`ray start`), safe from the usual races.

A port found free by binding port 0 comes from the kernel's ephemeral range, the very range every
outgoing connection and every other `bind(("", 0))` on the machine draws from (the session's own
Ray, moto, Ray's workers): between the test picking it and the server binding it, something else
can take it, and a Ray whose agent cannot bind its port dies with its whole node. These ports come
from outside both the ephemeral range and Ray's worker-port range, so only an explicit bind to that
very number can take them, and the ones handed out in one call are distinct.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default --min/--max-worker-port
FIRST = 20000


def _ephemeral() -> range:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):  # not Linux: the IANA range macOS and Windows use
        lo, hi = 49152, 65535
    return range(lo, hi + 1)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now, none of them in the ephemeral range."""
    eph = _ephemeral()
    pool = [p for p in range(FIRST, 65536) if p not in eph and p not in RAY_WORKER_PORTS]
    random.SystemRandom().shuffle(pool)
    held: list[socket.socket] = []
    try:
        for port in pool:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) == n:
                return [h.getsockname()[1] for h in held]
        raise RuntimeError(f"fewer than {n} free loopback ports outside the ephemeral range {eph}")
    finally:
        for h in held:  # never listened or connected: no TIME_WAIT, free again at once
            h.close()
