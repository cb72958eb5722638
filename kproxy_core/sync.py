"""The bounded-frequency runner that paces syncs, and the report every sync produces.

Upstream's runner (``pkg/util/async/bounded_frequency_runner.go``) is the model: changes ask
for a run; runs are at least ``min_interval`` apart (a small burst allowed, so one change after
a quiet period is programmed at once); with no changes, a run happens every ``max_interval``
anyway; a failed run is retried after a backoff.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable

import attrs

from kproxy_core.backend import SyncResult

log = logging.getLogger(__name__)


class Trigger(enum.Enum):
    """Why a run happens."""

    CHANGE = "change"
    PERIODIC = "periodic"
    RETRY = "retry"
    REQUESTED = "requested"


@attrs.frozen
class SyncReport:
    """One sync attempt, as the ``kproxy_sync_finished`` hook and the logs see it."""

    mode: str
    trigger: Trigger
    full: bool
    #: Wall-clock start (Unix time).
    started: float
    duration: float
    #: Service ports (per family) handed to the backend as changed.
    changed: int
    services: int
    result: SyncResult | None = None
    error: str | None = None
    #: Why the sync was full ("first sync", "after a failed sync", "requested", "node
    #: changed", "periodic", "full-sync period elapsed", "backend asked"); "" when partial.
    full_reason: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


class BoundedFrequencyRunner:
    """Calls ``fn(trigger)`` from one thread, never more often than the bounds allow.

    ``burst`` runs may happen back to back (a token bucket refilled every ``min_interval``),
    as upstream's iptables proxier allows two; after that runs are ``min_interval`` apart and
    requests in between coalesce into one run.
    """

    def __init__(
        self,
        fn: Callable[[Trigger], None],
        *,
        min_interval: float,
        max_interval: float,
        burst: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_interval < 0 or max_interval <= 0:
            raise ValueError("min_interval must be >= 0 and max_interval > 0")
        self._fn = fn
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._burst = max(1, burst)
        self._tokens = float(self._burst)
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: Trigger | None = None
        self._retry_at = math.inf
        self._last_run = clock()
        self._last_refill = self._last_run
        self._stopped = False
        self.runs = 0

    # -- requests (any thread) -------------------------------------------------------------

    def request(self, trigger: Trigger = Trigger.CHANGE) -> None:
        """Ask for a run as soon as the bounds allow; requests coalesce."""
        with self._cond:
            if self._pending is None or trigger is Trigger.REQUESTED:
                self._pending = trigger
            self._cond.notify()

    def retry_after(self, delay: float) -> None:
        """Schedule a retry ``delay`` seconds from now (earliest wins)."""
        with self._cond:
            self._retry_at = min(self._retry_at, self._clock() + delay)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    # -- the loop (one thread) -----------------------------------------------------------------

    def _refill(self, now: float) -> None:
        if self.min_interval <= 0:
            self._tokens = float(self._burst)
        else:
            self._tokens = min(
                float(self._burst), self._tokens + (now - self._last_refill) / self.min_interval
            )
        self._last_refill = now

    def poll(self) -> Trigger | float:
        """The trigger of a run that is due now (and consume it), or seconds until one may be.

        Non-blocking; `loop` waits on it. Tests drive it with a fake clock."""
        with self._cond:
            now = self._clock()
            self._refill(now)
            token_at = now if self._tokens >= 1 else now + (1 - self._tokens) * self.min_interval
            candidates: list[tuple[float, Trigger]] = [
                (self._last_run + self.max_interval, Trigger.PERIODIC)
            ]
            if self._pending is not None:
                candidates.append((token_at, self._pending))
            if self._retry_at < math.inf:
                candidates.append((max(self._retry_at, token_at), Trigger.RETRY))
            due, trigger = min(candidates, key=lambda item: item[0])
            if due > now:
                return due - now
            self._tokens = max(0.0, self._tokens - 1)
            self._last_run = now
            self._pending = None
            self._retry_at = math.inf
            return trigger

    def _next(self) -> Trigger | None:
        """Wait until a run is due; return its trigger, or None when stopped."""
        with self._cond:
            while not self._stopped:
                due = self.poll()
                if isinstance(due, Trigger):
                    return due
                self._cond.wait(timeout=due)
            return None

    def loop(self) -> None:
        """Run until `stop`. Exceptions from ``fn`` are logged and retried after
        ``min_interval`` (``fn`` is expected to handle its own errors and call `retry_after`)."""
        while (trigger := self._next()) is not None:
            self.runs += 1
            try:
                self._fn(trigger)
            except Exception:
                log.exception("sync run failed unexpectedly; retrying")
                self.retry_after(max(self.min_interval, 1.0))


class Backoff:
    """Exponential backoff for failed syncs: 1 s, 2 s, 4 s... capped, reset on success."""

    def __init__(self, initial: float = 1.0, cap: float = 60.0) -> None:
        self.initial = initial
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        delay = float(min(self.cap, self.initial * 2.0**self.failures))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
