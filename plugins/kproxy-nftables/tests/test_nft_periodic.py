"""What a periodic sync does to the kernel now that it is partial (``periodic_full_sync =
False``, as upstream): with no change the transaction is empty (nothing is sent), so drift
inside the table waits for the next full sync (hourly, or at once when the table is gone or a
sync failed). The table check the core makes before every partial sync
(``needs_full_sync``) is a netlink lookup: neither it nor a partial sync starts ``nft``.
Real kernel, inside a namespace; no traffic needed (``test_nft_kernel`` sends some)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kproxy_nftables import rules as R
from kproxy_nftables.proxier import NftablesProxier
from nft_helpers import ep, key, svc
from nft_host import ProxierHost

from kproxy_core.model import ResolvedServicePort
from kproxy_core.testing.backendhost import host_in_new_netns

pytestmark = pytest.mark.root

WEB = svc(key("default", "web", "http"), "10.96.0.10", 80, node_port=30080,
          endpoints=[ep("10.244.2.2", 8080), ep("10.244.2.3", 8080)])
OTHER = svc(key("default", "other", "http"), "10.96.0.11", 80,
            endpoints=[ep("10.244.2.4", 8080)])
SERVICE_CHAIN = R.SERVICE_PREFIX + R.chain_name_base(WEB.name)


@pytest.fixture()
def host() -> Iterator[ProxierHost]:
    config = {"clusterCIDR": ("10.244.0.0/16",)}
    with host_in_new_netns(lambda node: ProxierHost(node.name, config)) as proxier:
        yield proxier


def test_the_mode_asks_for_partial_periodic_syncs() -> None:
    assert NftablesProxier.periodic_full_sync is False


def test_periodic_partial_sync_sends_nothing_and_a_full_sync_repairs_drift(
        host: ProxierHost) -> None:
    host.sync(WEB, OTHER, full=True)
    listing = host.run("nft", "list", "table", "ip", R.TABLE)
    assert f"chain {SERVICE_CHAIN} " in listing, listing
    host.run("nft", "add", "rule", "ip", R.TABLE, SERVICE_CHAIN, "counter", "comment",
             '"foreign-rule"')

    # The periodic sync of a quiet node: nothing changed, not full.
    result = host.sync(WEB, OTHER)
    assert host.call("last_transaction") == []
    assert result.objects_written == 0
    assert "foreign-rule" in host.run("nft", "list", "table", "ip", R.TABLE)

    host.sync(WEB, OTHER, full=True)
    listing = host.run("nft", "list", "table", "ip", R.TABLE)
    assert "foreign-rule" not in listing
    assert f"chain {SERVICE_CHAIN} " in listing


def _core_sync(host: ProxierHost, *ports: ResolvedServicePort) -> bool:
    """A sync as the core decides it once the table was programmed: full only if
    ``needs_full_sync`` says so. Returns whether it was full."""
    full = bool(host.call("needs_full_sync"))
    host.sync(*ports, full=full)
    return full


def test_table_check_and_partial_syncs_start_no_process(host: ProxierHost) -> None:
    host.call("commands")  # starts recording
    host.sync(WEB, OTHER, full=True)
    started = host.call("commands")
    # The recorder sees what the backend starts: a full sync runs nft (list + -f).
    assert any(argv[0].endswith("nft") and "list" in argv for argv in started), started
    assert any(argv[0].endswith("nft") and "-f" in argv for argv in started), started

    moved = svc(WEB.key, "10.96.0.10", 80, node_port=30080,
                endpoints=[ep("10.244.2.2", 8080), ep("10.244.2.9", 8080)])
    assert _core_sync(host, moved, OTHER) is False  # an endpoint change
    assert host.call("last_writer") == "netlink"
    assert host.call("last_transaction") != []
    assert _core_sync(host, moved, OTHER) is False  # a quiet periodic sync
    assert _core_sync(host, moved) is False  # a service removed
    assert host.call("commands") == []

    # A shape the netlink writer does not know (affinity sets) goes through nft -f: still
    # no listing.
    sticky = svc(key("default", "sticky", "http"), "10.96.0.12", 80,
                 session_affinity_timeout=60, endpoints=[ep("10.244.2.5", 8080)])
    assert _core_sync(host, moved, sticky) is False
    assert host.call("last_writer") == "nft"
    started = host.call("commands")
    assert started and all("list" not in argv for argv in started), started


@pytest.mark.parametrize("disturb", [
    ["nft", "delete", "table", "ip", R.TABLE],
    ["nft", "flush", "ruleset"],
])
def test_a_lost_table_makes_the_next_sync_full(host: ProxierHost, disturb: list[str]) -> None:
    host.sync(WEB, OTHER, full=True)
    before = host.call("table_handles")[4]
    assert before
    host.run(*disturb)
    host.call("commands")
    assert host.call("needs_full_sync") is True
    assert host.call("commands") == []  # noticed without nft
    assert _core_sync(host, WEB, OTHER) is True
    assert f"chain {SERVICE_CHAIN} " in host.run("nft", "list", "table", "ip", R.TABLE)
    assert host.call("needs_full_sync") is False
    assert host.call("table_handles")[4] != before  # a new table, a new handle


def test_a_replaced_table_makes_the_next_sync_full(host: ProxierHost) -> None:
    """Deleted and created again by someone else (a saved ruleset restored, say): the name
    is there but not what we built; the new handle gives it away."""
    host.sync(WEB, OTHER, full=True)
    saved = host.run("nft", "list", "table", "ip", R.TABLE)
    host.run("nft", "delete", "table", "ip", R.TABLE)
    host.run("nft", "-f", "-", stdin=saved)
    assert host.call("needs_full_sync") is True
    assert _core_sync(host, WEB, OTHER) is True
    assert host.call("needs_full_sync") is False
    # A full sync of our own keeps the table (and its handle): no sync loop.
    host.sync(WEB, OTHER, full=True)
    assert host.call("needs_full_sync") is False
