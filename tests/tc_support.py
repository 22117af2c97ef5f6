"""Shaping one UDP destination port on the loopback interface with `tc` (iproute2; needs root).

`install(rate, latency)` puts an `htb` qdisc at the root of `lo`: every packet goes to class 1:1
(20 Gbit/s, a pfifo: loopback as usual) except those the `u32` filters of `shape(port)` (IPv4
and IPv6) send to class 1:4, limited to ``rate`` with a byte FIFO of ``latency`` at that rate
(a full queue delays by ``latency``, then drops): a path narrower than what is sent to it.
`unshape()` removes the filters (what is queued still drains: ending the shaping drops
nothing). On exit the root qdisc is deleted, whatever happened in the test.

htb rather than the `prio` + `tbf`/`netem` usually shown for this: the kernels of these
machines (Firecracker guests) have no sch_prio and no sch_netem, but do have sch_htb, bfifo and
the u32 classifier. Rate shaping is also the right model here: a viewer whose path is narrower
than the top layer (random loss would be just as bad on every layer).

Nothing here skips: without `tc`, or without the right to change `lo`, the test fails loudly.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

DEV = "lo"
SHAPED = "1:4"
IPV4_PRIO, IPV6_PRIO = 1, 2


def tc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    path = shutil.which("tc")
    if path is None:
        raise AssertionError("tc not found: the shaped-viewer test needs iproute2 "
                             "(apt-get install iproute2) and root")
    done = subprocess.run([path, *args], capture_output=True, text=True, timeout=10, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"tc {' '.join(args)} failed ({done.returncode}): "
                             f"{done.stderr.strip() or done.stdout.strip()}")
    return done


class LoopbackShaper:
    """The qdisc tree on `lo`; shapes at most one port at a time."""

    def __init__(self) -> None:
        self.port: int | None = None

    def install(self, rate_kbit: int, latency_ms: int) -> None:
        # replace: a root qdisc left by a killed run must not make this one fail
        tc("qdisc", "replace", "dev", DEV, "root", "handle", "1:", "htb", "default", "1")
        tc("class", "add", "dev", DEV, "parent", "1:", "classid", "1:1", "htb", "rate",
           "20gbit", "quantum", "60000")
        tc("qdisc", "add", "dev", DEV, "parent", "1:1", "handle", "10:", "pfifo", "limit",
           "10000")
        tc("class", "add", "dev", DEV, "parent", "1:", "classid", SHAPED, "htb", "rate",
           f"{rate_kbit}kbit", "ceil", f"{rate_kbit}kbit", "burst", "8kb", "quantum", "1514")
        limit = max(8000, rate_kbit * 1000 // 8 * latency_ms // 1000)
        tc("qdisc", "add", "dev", DEV, "parent", SHAPED, "handle", "40:", "bfifo", "limit",
           str(limit))

    def shape(self, port: int) -> None:
        assert self.port is None, f"already shaping port {self.port}"
        tc("filter", "add", "dev", DEV, "parent", "1:", "protocol", "ip", "prio", str(IPV4_PRIO),
           "u32", "match", "ip", "protocol", "17", "0xff", "match", "ip", "dport", str(port),
           "0xffff", "flowid", SHAPED)
        tc("filter", "add", "dev", DEV, "parent", "1:", "protocol", "ipv6", "prio",
           str(IPV6_PRIO), "u32", "match", "ip6", "dport", str(port), "0xffff", "flowid", SHAPED)
        self.port = port

    def unshape(self) -> None:
        for proto, prio in (("ip", IPV4_PRIO), ("ipv6", IPV6_PRIO)):
            tc("filter", "del", "dev", DEV, "parent", "1:", "protocol", proto, "prio", str(prio))
        self.port = None

    def stats(self) -> str:
        """`tc -s qdisc` of the shaped band (sent, dropped, backlog), for failure messages."""
        return tc("-s", "qdisc", "show", "dev", DEV, check=False).stdout.strip()


@contextmanager
def shaped_loopback() -> Iterator[LoopbackShaper]:
    """A shaper for `lo` (`install` it, then `shape` a port); its qdiscs are removed on exit,
    always."""
    tc("qdisc", "show", "dev", DEV)  # tc present and usable, before anything else
    shaper = LoopbackShaper()
    try:
        yield shaper
    finally:
        tc("qdisc", "del", "dev", DEV, "root", check=False)
        left = tc("qdisc", "show", "dev", DEV, check=False).stdout
        assert "prio" not in left and "tbf" not in left, f"qdisc left on {DEV}: {left}"
