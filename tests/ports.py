"""Ports for the servers the tests and benchmarks start, free when chosen and likely to stay so.

A port the kernel hands out for `bind(("127.0.0.1", 0))` comes from the ephemeral range, the
same range every outgoing connection (and vLLM's internal sockets) draws from while the server
that was meant to take it is still starting: a minute for `tunewatch up`. So ports are drawn
below that range, checked free by binding, and held until all of a call's ports are drawn, so
that one call never hands out the same port twice.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _candidates() -> range:
    """Registered ports below the kernel's ephemeral range (32768 when it cannot be read)."""
    ephemeral_low = int(_RANGE.read_text().split()[0]) if _RANGE.exists() else 32768
    return range(20000, min(ephemeral_low, 49152))


def free_ports(count: int) -> list[int]:
    """`count` distinct ports on 127.0.0.1, each free at the time of the call."""
    chosen: list[int] = []
    with contextlib.ExitStack() as held:
        for port in random.sample(_candidates(), k=len(_candidates())):
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"fewer than {count} free ports in {_candidates()}")


def free_port() -> int:
    return free_ports(1)[0]
