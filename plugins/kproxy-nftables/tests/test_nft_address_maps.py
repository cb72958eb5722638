"""Real kernel: an address map that loses its last user is flushed at once and deleted by a
later sync (`STALE_MAP_SECONDS` on), while traffic to the services still using other maps
keeps flowing; a map deleted that way comes back when a service needs it again."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator

import pytest
from kproxy_nftables import rules as R
from kproxy_nftables.proxier import STALE_MAP_SECONDS
from nft_helpers import ep, key, svc
from nft_host import ProxierHost

from kproxy_core.model import ResolvedServicePort
from kproxy_core.testing.netns import ClusterSandbox, NetNS

pytestmark = pytest.mark.root

LOCAL, REMOTE = "10.244.1.2", "10.244.2.2"
ENDPOINTS = (ep(LOCAL, 8080, True), ep(REMOTE, 8080))
WEB = svc(key("default", "web", "http"), "10.96.1.10", 80, endpoints=ENDPOINTS)
DNS = svc(key("default", "dns", "dns", "UDP"), "10.96.1.11", 53, endpoints=ENDPOINTS)
# Enough TCP ports that the last ones own blocks in the second TCP address map: the first
# full sync numbers blocks in key order, DNS (udp-0) 0, WEB 1, FILLER[i] i + 2.
FILLER = tuple(svc(key("fill", f"s{i:03d}", "http"), f"10.96.{2 + i // 200}.{i % 200 + 1}", 80,
                   endpoints=[ep(REMOTE, 8080)]) for i in range(R.SLOTS_PER_MAP + 1))
#: Every port whose block is in tcp-0.
KEEP = (WEB, *FILLER[:R.SLOTS_PER_MAP - 2])


class Env:
    def __init__(self, cluster: ClusterSandbox, host: ProxierHost) -> None:
        self.cluster = cluster
        self.host = host

    @property
    def pod(self) -> NetNS:
        return next(p.ns for p in self.cluster.pods if p.ip == LOCAL)

    def ask(self, ip: str, port: int, proto: str = "tcp", count: int = 4) -> list[str]:
        proc = self.pod.run([sys.executable, "-m", "kproxy_core.testing.echo", proto, ip,
                             str(port), "--timeout", "1", "--count", str(count)], check=False)
        return proc.stdout.split("\n")[:-1]

    def address_maps(self) -> dict[str, int]:
        """Address map name -> number of elements, as the kernel has them."""
        out = json.loads(self.host.run("nft", "-j", "list", "maps", "ip"))
        names = [m["map"]["name"] for m in out["nftables"]
                 if "map" in m and m["map"]["table"] == R.TABLE
                 and R.is_address_map(m["map"]["name"])]
        counts = {}
        for name in names:
            listing = json.loads(self.host.run("nft", "-j", "list", "map", "ip", R.TABLE, name))
            found = next(m["map"] for m in listing["nftables"] if "map" in m)
            counts[name] = len(found.get("elem", []))
        return counts

    def later_sync(self, *ports: ResolvedServicePort) -> None:
        """A partial sync once the stale maps are due (as the periodic sync would be)."""
        time.sleep(STALE_MAP_SECONDS + 0.2)
        self.host.sync(*ports)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root (they create network namespaces)")
    cluster = ClusterSandbox(local_pods=1, remote_pods=1)
    host: ProxierHost | None = None
    try:
        for pod in cluster.pods:
            cluster.start_echo(pod)
        host = ProxierHost(cluster.node.name, {"clusterCIDR": ("10.244.0.0/16",)})
        host.sync(WEB, DNS, *FILLER, full=True)
        yield Env(cluster, host)
    finally:
        if host is not None:
            host.close()
        cluster.close()


def _served(replies: list[str]) -> set[str]:
    """Who answered (a request nobody answered shows as "timeout")."""
    assert replies, "the echo client printed nothing"
    return {r.split()[0] for r in replies}


BOTH = {"pod-1-2", "pod-2-2"}  # a random 4 of them may all land on one


def test_all_maps_in_use_at_start(env: Env) -> None:
    maps = env.address_maps()
    assert set(maps) == {"endpoint-addrs-tcp-0", "endpoint-addrs-tcp-1", "endpoint-addrs-udp-0"}
    assert all(maps.values()), maps
    assert _served(env.ask("10.96.1.11", 53, "udp")) <= BOTH


def test_removed_services_leave_no_empty_map(env: Env) -> None:
    # DNS was the only UDP port; the last filler ports own the only blocks of tcp-1.
    rest = KEEP
    env.host.sync(*rest)
    assert env.host.call("last_writer") == "netlink"
    # Not at once: the map the removed rules named is only emptied in that transaction.
    maps = env.address_maps()
    assert maps["endpoint-addrs-udp-0"] == 0 and maps["endpoint-addrs-tcp-1"] == 0, maps
    assert not any(line.startswith("delete map") for line in env.host.call("last_transaction"))
    assert _served(env.ask("10.96.1.10", 80)) <= BOTH

    env.later_sync(*rest)
    assert env.address_maps() == {"endpoint-addrs-tcp-0": 2 + R.SLOTS_PER_MAP - 2}
    # The services still programmed kept working through the deletion.
    assert _served(env.ask("10.96.1.10", 80)) <= BOTH
    assert _served(env.ask(FILLER[5].cluster_ip, 80)) == {"pod-2-2"}
    # The removed one is no service any more.
    assert env.ask("10.96.1.11", 53, "udp", count=1) == ["timeout"]

    # Needed again: declared again in the partial sync that brings the port back.
    env.host.sync(*rest, DNS)
    assert env.address_maps()["endpoint-addrs-udp-0"] == 2
    assert _served(env.ask("10.96.1.11", 53, "udp")) <= BOTH
    assert env.host.call("audit", env.host.view(*rest, DNS)) == []


def test_full_sync_defers_deleting_unused_maps_too(env: Env) -> None:
    env.host.sync(*KEEP, DNS)
    env.host.sync(*KEEP, full=True)
    assert env.address_maps()["endpoint-addrs-udp-0"] == 0
    env.later_sync(*KEEP)
    assert "endpoint-addrs-udp-0" not in env.address_maps()
    assert _served(env.ask("10.96.1.10", 80)) <= BOTH


def test_a_map_from_an_earlier_run_is_deleted_too(env: Env) -> None:
    # Left by a previous process: the first (full) sync of a new one finds it unused.
    env.host.run("nft", "add", "map", "ip", R.TABLE, "endpoint-addrs-sctp-3",
                 "{ typeof numgen random mod 2 : ip daddr . sctp dport ; flags interval ; }")
    env.host.sync(*KEEP, full=True)
    assert "endpoint-addrs-sctp-3" in env.address_maps()
    env.later_sync(*KEEP)
    assert set(env.address_maps()) == {"endpoint-addrs-tcp-0"}
