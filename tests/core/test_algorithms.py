from __future__ import annotations

import random
from collections import Counter

import pytest

from kproxy_core.algorithms import (
    BUILTIN_ALGORITHMS,
    AffinityPicker,
    AffinityTable,
    LeastConnectionsPicker,
    RandomPicker,
    RoundRobinPicker,
)
from kproxy_core.model import Endpoint
from kproxy_core.plugins import KproxyPluginManager


def ep(n: int) -> Endpoint:
    return Endpoint(f"10.244.1.{n}", 8080, is_local=True, ready=True, serving=True,
                    terminating=False)


A, B, C = ep(1), ep(2), ep(3)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_registered_through_the_core_plugin() -> None:
    pm = KproxyPluginManager(load_entrypoints=False)
    registry = pm.algorithms()
    assert registry.names() == ["least-connections", "random", "round-robin"]
    rr = registry.get("round-robin")
    lc = registry.get("least-connections")
    rand = registry.get("random")
    assert rr is not None and rr.ipvs_scheduler == "rr" and rr.distribution == "kproxy-core"
    assert lc is not None and lc.ipvs_scheduler == "lc"
    assert rand is not None and rand.ipvs_scheduler is None


@pytest.mark.parametrize("spec", BUILTIN_ALGORITHMS, ids=lambda s: s.name)
def test_every_algorithm_handles_empty_and_exhausted_sets(spec: object) -> None:
    from kproxy_core.backend import AlgorithmSpec

    assert isinstance(spec, AlgorithmSpec)
    assert spec.create([]).pick("1.2.3.4") is None
    picker = spec.create([A, B])
    assert picker.pick("1.2.3.4", exclude=[A, B]) is None
    assert picker.pick("1.2.3.4", exclude=[A]) == B


def test_round_robin_cycles_and_skips_excluded() -> None:
    picker = RoundRobinPicker([A, B, C])
    assert [picker.pick("c") for _ in range(6)] == [A, B, C, A, B, C]
    assert picker.pick("c", exclude=[A]) == B
    # The excluded endpoint is skipped without disturbing the order afterwards.
    assert picker.pick("c") == C


def test_least_connections_follows_open_connections() -> None:
    picker = LeastConnectionsPicker([A, B, C])
    first = [picker.pick("c") for _ in range(3)]
    assert set(first) == {A, B, C}  # ties rotate
    for endpoint in (A, A, B):
        picker.connection_opened(endpoint)
    assert picker.pick("c") == C
    picker.connection_opened(C)
    picker.connection_opened(C)
    assert picker.pick("c") == B
    picker.connection_closed(A)
    picker.connection_closed(A)
    assert picker.pick("c") == A
    # Closing more than was opened, or an unknown endpoint, never goes negative or raises.
    picker.connection_closed(A)
    picker.connection_closed(ep(9))
    assert picker.active[A] == 0


def test_random_is_uniform_enough() -> None:
    picker = RandomPicker([A, B, C], rng=random.Random(7))
    counts = Counter(picker.pick("c") for _ in range(3000))
    assert set(counts) == {A, B, C}
    assert all(800 < n < 1200 for n in counts.values())


def test_affinity_keeps_a_client_on_its_endpoint_until_timeout() -> None:
    clock = FakeClock()
    picker = AffinityPicker(RoundRobinPicker([A, B, C]), 10, clock=clock)
    assert picker.pick("1.1.1.1") == A
    assert picker.pick("2.2.2.2") == B
    clock.now += 9
    assert picker.pick("1.1.1.1") == A  # refreshed here
    clock.now += 9
    assert picker.pick("1.1.1.1") == A
    clock.now += 11
    assert picker.pick("1.1.1.1") == C  # expired: the inner algorithm chooses again


def test_affinity_skips_excluded_and_removed_endpoints() -> None:
    clock = FakeClock()
    table = AffinityTable(60, clock)
    picker = AffinityPicker(RoundRobinPicker([A, B]), 60, endpoints=[A, B], table=table)
    assert picker.pick("1.1.1.1") == A
    # The remembered endpoint failed for this connection: the next one is remembered instead.
    assert picker.pick("1.1.1.1", exclude=[A]) == B
    assert picker.pick("1.1.1.1") == B
    # New endpoint set without B, sharing the table: the stale entry is not used.
    rebuilt = AffinityPicker(RoundRobinPicker([A, C]), 60, endpoints=[A, C], table=table)
    assert rebuilt.pick("1.1.1.1") == A
    # A set that still has the remembered endpoint keeps the client there.
    again = AffinityPicker(RoundRobinPicker([C, A]), 60, endpoints=[C, A], table=table)
    assert again.pick("1.1.1.1") == A


def test_affinity_composes_with_least_connections_counts() -> None:
    inner = LeastConnectionsPicker([A, B])
    picker = AffinityPicker(inner, 60)
    picker.connection_opened(A)
    assert inner.active[A] == 1
    assert picker.pick("9.9.9.9") == B
    picker.connection_closed(A)
    assert inner.active[A] == 0


def test_affinity_table_sweeps_expired_entries() -> None:
    clock = FakeClock()
    table = AffinityTable(5, clock)
    for n in range(10):
        table.remember(f"10.0.0.{n}", A)
    clock.now += 6
    table.remember("10.0.1.1", B)
    table.sweep()
    assert len(table) == 1
    assert table.lookup("10.0.1.1") == B


def test_affinity_rejects_a_non_positive_timeout() -> None:
    with pytest.raises(ValueError, match="affinity timeout must be positive"):
        AffinityTable(0)
