"""The built-in load-balancing algorithms and the ClientIP affinity wrapper.

The userspace mode picks an endpoint per connection through these; the IPVS mode maps
``ipvs_scheduler`` to a kernel scheduler instead of running them. A `Picker` is built for one
endpoint set and thrown away when the set changes, so pickers keep no state worth keeping
across changes except affinity, which lives in an `AffinityTable` that outlives its pickers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

from kproxy_core.backend import AlgorithmSpec, Picker
from kproxy_core.model import Endpoint

__all__ = [
    "BUILTIN_ALGORITHMS",
    "AffinityPicker",
    "AffinityTable",
    "LeastConnectionsPicker",
    "RandomPicker",
    "RoundRobinPicker",
]


class RoundRobinPicker(Picker):
    """Each new connection goes to the next endpoint in order (IPVS ``rr``)."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        self._next = 0

    def pick(self, client_ip: str, exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
        count = len(self.endpoints)
        for step in range(count):
            endpoint = self.endpoints[(self._next + step) % count]
            if endpoint not in exclude:
                self._next = (self._next + step + 1) % count
                return endpoint
        return None


class LeastConnectionsPicker(Picker):
    """The endpoint with the fewest open connections (IPVS ``lc``); ties rotate so that an idle
    service still spreads its first connections."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        self.active: dict[Endpoint, int] = dict.fromkeys(self.endpoints, 0)
        self._next = 0

    def pick(self, client_ip: str, exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
        count = len(self.endpoints)
        best: Endpoint | None = None
        best_index = 0
        for step in range(count):
            index = (self._next + step) % count
            endpoint = self.endpoints[index]
            if endpoint in exclude:
                continue
            if best is None or self.active[endpoint] < self.active[best]:
                best, best_index = endpoint, index
        if best is not None:
            self._next = (best_index + 1) % count
        return best

    def connection_opened(self, endpoint: Endpoint) -> None:
        if endpoint in self.active:
            self.active[endpoint] += 1

    def connection_closed(self, endpoint: Endpoint) -> None:
        if self.active.get(endpoint, 0) > 0:
            self.active[endpoint] -= 1


class RandomPicker(Picker):
    """A uniformly random endpoint (no IPVS equivalent)."""

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random | None = None) -> None:
        self.endpoints = tuple(endpoints)
        self._rng = rng or random.Random()

    def pick(self, client_ip: str, exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
        candidates = [e for e in self.endpoints if e not in exclude] if exclude else self.endpoints
        return self._rng.choice(candidates) if candidates else None


class AffinityTable:
    """Client IP → (endpoint, last use) for one service port.

    Kept by the caller across endpoint changes, as upstream's userspace proxy kept its affinity
    map: a client stays on its endpoint while that endpoint is still in the set.
    """

    #: Expired entries are swept after this many inserts, so the table stays bounded by the
    #: number of clients seen within one timeout.
    SWEEP_EVERY = 1024

    def __init__(self, timeout_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_seconds <= 0:
            raise ValueError(f"affinity timeout must be positive, got {timeout_seconds}")
        self.timeout = float(timeout_seconds)
        self.clock = clock
        self._entries: dict[str, tuple[Endpoint, float]] = {}
        self._inserts = 0

    def lookup(self, client_ip: str) -> Endpoint | None:
        entry = self._entries.get(client_ip)
        if entry is None:
            return None
        if self.clock() - entry[1] > self.timeout:
            del self._entries[client_ip]
            return None
        return entry[0]

    def remember(self, client_ip: str, endpoint: Endpoint) -> None:
        now = self.clock()
        self._entries[client_ip] = (endpoint, now)
        self._inserts += 1
        if self._inserts % self.SWEEP_EVERY == 0:
            self.sweep(now)

    def forget(self, client_ip: str) -> None:
        self._entries.pop(client_ip, None)

    def sweep(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        expired = [ip for ip, (_, used) in self._entries.items() if now - used > self.timeout]
        for ip in expired:
            del self._entries[ip]

    def __len__(self) -> int:
        return len(self._entries)


class AffinityPicker(Picker):
    """ClientIP session affinity around any algorithm: a client that connected within
    ``timeout_seconds`` goes back to the same endpoint; otherwise ``inner`` chooses.

    Pass ``table`` to keep affinity across endpoint changes, and ``endpoints`` (the set
    ``inner`` was built for) so a remembered endpoint that left the set is not used.
    """

    def __init__(
        self,
        inner: Picker,
        timeout_seconds: float,
        *,
        endpoints: Sequence[Endpoint] | None = None,
        table: AffinityTable | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.table = table if table is not None else AffinityTable(timeout_seconds, clock)
        self._allowed = frozenset(endpoints) if endpoints is not None else None

    def pick(self, client_ip: str, exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
        remembered = self.table.lookup(client_ip)
        if (
            remembered is not None
            and remembered not in exclude
            and (self._allowed is None or remembered in self._allowed)
        ):
            self.table.remember(client_ip, remembered)
            return remembered
        chosen = self.inner.pick(client_ip, exclude)
        if chosen is None:
            self.table.forget(client_ip)
        else:
            self.table.remember(client_ip, chosen)
        return chosen

    def connection_opened(self, endpoint: Endpoint) -> None:
        self.inner.connection_opened(endpoint)

    def connection_closed(self, endpoint: Endpoint) -> None:
        self.inner.connection_closed(endpoint)


BUILTIN_ALGORITHMS: list[AlgorithmSpec] = [
    AlgorithmSpec(
        "round-robin",
        RoundRobinPicker,
        help="each new connection to the next endpoint in turn",
        ipvs_scheduler="rr",
    ),
    AlgorithmSpec(
        "least-connections",
        LeastConnectionsPicker,
        help="the endpoint with the fewest open connections",
        ipvs_scheduler="lc",
    ),
    AlgorithmSpec(
        "random",
        RandomPicker,
        help="a uniformly random endpoint",
        ipvs_scheduler=None,
    ),
]
