"""What a periodic sync does to the kernel now that it is partial (``periodic_full_sync =
False``, as upstream): with no change the transaction is empty (nothing is sent), so drift
inside the table waits for the next full sync (hourly, or at once when the table is gone or a
sync failed). Real kernel, inside a namespace; no traffic needed."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from kproxy_nftables import rules as R
from kproxy_nftables.proxier import NftablesProxier
from nft_helpers import ep, key, svc
from nft_host import ProxierHost

from kproxy_core.testing.netns import Sandbox

pytestmark = pytest.mark.root

WEB = svc(key("default", "web", "http"), "10.96.0.10", 80, node_port=30080,
          endpoints=[ep("10.244.2.2", 8080), ep("10.244.2.3", 8080)])
OTHER = svc(key("default", "other", "http"), "10.96.0.11", 80,
            endpoints=[ep("10.244.2.4", 8080)])
SERVICE_CHAIN = R.SERVICE_PREFIX + R.chain_name_base(WEB.name)


@pytest.fixture()
def host() -> Iterator[ProxierHost]:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root (they create network namespaces)")
    sandbox = Sandbox()
    proxier: ProxierHost | None = None
    try:
        node = sandbox.netns("node")
        proxier = ProxierHost(node.name, {"clusterCIDR": ("10.244.0.0/16",)})
        yield proxier
    finally:
        if proxier is not None:
            proxier.close()
        sandbox.close()


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
