"""The bounded-frequency runner, driven by a fake clock so the tests count runs, not seconds."""

from __future__ import annotations

import threading

import pytest

from kproxy_core.sync import Backoff, BoundedFrequencyRunner, Trigger


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _runner(clock: FakeClock, runs: list[Trigger], *, min_interval: float = 1.0,
            max_interval: float = 30.0, burst: int = 2) -> BoundedFrequencyRunner:
    return BoundedFrequencyRunner(runs.append, min_interval=min_interval,
                                  max_interval=max_interval, burst=burst, clock=clock)


def _due(runner: BoundedFrequencyRunner) -> Trigger | None:
    """The trigger if a run is due at the fake clock's now, else None."""
    result = runner.poll()
    return result if isinstance(result, Trigger) else None


def test_a_change_after_a_quiet_period_runs_at_once() -> None:
    clock, runs = FakeClock(), list[Trigger]()
    runner = _runner(clock, runs)
    runner.request()
    assert _due(runner) is Trigger.CHANGE


def test_bursts_are_bounded_and_later_requests_coalesce() -> None:
    clock, runs = FakeClock(), list[Trigger]()
    runner = _runner(clock, runs, burst=2)
    runner.request()
    assert _due(runner) is Trigger.CHANGE
    runner.request()
    assert _due(runner) is Trigger.CHANGE  # the second token of the burst
    for _ in range(5):
        runner.request()
    assert _due(runner) is None  # no token left: the five requests wait, coalesced
    clock.now += 1.0
    assert _due(runner) is Trigger.CHANGE
    assert _due(runner) is None  # one run served all five


def test_periodic_run_without_changes() -> None:
    clock, runs = FakeClock(), list[Trigger]()
    runner = _runner(clock, runs, max_interval=30.0)
    assert _due(runner) is None
    clock.now += 30.0
    assert _due(runner) is Trigger.PERIODIC


def test_retry_after_waits_and_respects_min_interval() -> None:
    clock, runs = FakeClock(), list[Trigger]()
    runner = _runner(clock, runs, burst=1)
    runner.request()
    assert _due(runner) is Trigger.CHANGE
    runner.retry_after(0.1)
    clock.now += 0.2
    assert _due(runner) is None  # token not back yet (min interval 1 s)
    clock.now += 1.0
    assert _due(runner) is Trigger.RETRY


def test_requested_run_wins_over_change() -> None:
    clock, runs = FakeClock(), list[Trigger]()
    runner = _runner(clock, runs)
    runner.request(Trigger.CHANGE)
    runner.request(Trigger.REQUESTED)
    assert _due(runner) is Trigger.REQUESTED


def test_loop_runs_fn_and_survives_exceptions() -> None:
    calls: list[Trigger] = []
    done = threading.Event()

    def fn(trigger: Trigger) -> None:
        calls.append(trigger)
        if len(calls) == 1:
            raise RuntimeError("boom")
        done.set()

    runner = BoundedFrequencyRunner(fn, min_interval=0.0, max_interval=60.0)
    runner.request()
    thread = threading.Thread(target=runner.loop)
    thread.start()
    # The first run raises; the loop schedules a retry (after >= 1 s) instead of dying.
    assert done.wait(10)
    runner.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert calls[0] is Trigger.CHANGE and calls[1] is Trigger.RETRY


def test_invalid_bounds_are_rejected() -> None:
    with pytest.raises(ValueError):
        BoundedFrequencyRunner(lambda t: None, min_interval=-1, max_interval=1)


def test_backoff_doubles_and_caps_and_resets() -> None:
    backoff = Backoff(initial=1.0, cap=5.0)
    assert [backoff.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.reset()
    assert backoff.next_delay() == 1.0
