"""What a periodic sync does to the kernel now that it is partial (``periodic_full_sync =
False``, as upstream): with no change, per-service chains are left alone (their rules and
counters stay), the top-level chains are rewritten (so drift there is repaired every sync
period), and drift inside per-service chains waits for the next full sync (hourly, or at once
after a canary loss, a missing jump rule or a failed sync). Real kernel, inside a namespace;
no traffic needed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from iptables_helpers import ep, key, svc
from iptables_host import ProxierHost
from kproxy_iptables import rules as R
from kproxy_iptables.proxier import IptablesProxier

from kproxy_core.kernel.iptables_writers import RestoreError
from kproxy_core.testing.backendhost import host_in_new_netns
from kproxy_core.testing.netns import NetNS

pytestmark = pytest.mark.root

WEB = svc(key("default", "web", "http"), "10.96.0.10", 80, node_port=30080,
          endpoints=[ep("10.244.2.2", 8080), ep("10.244.2.3", 8080)])
OTHER = svc(key("default", "other", "http"), "10.96.0.11", 80,
            endpoints=[ep("10.244.2.4", 8080)])
CONFIG = {"clusterCIDR": "10.244.0.0/16"}
SEP = R.endpoint_chain(WEB.name, "10.244.2.2:8080")
# Appended after the DNAT (never reached); only its presence matters.
SEP_MARKER = ["-m", "comment", "--comment", "foreign-in-sep", "-j", "RETURN"]
TOP_MARKER = ["-m", "comment", "--comment", "foreign-in-services", "-j", "RETURN"]


@pytest.fixture()
def host() -> Iterator[ProxierHost]:
    with host_in_new_netns(lambda node: ProxierHost(node.name, CONFIG)) as proxier:
        yield proxier


@pytest.fixture(params=["nft", "legacy"])
def backend_host(request: pytest.FixtureRequest) -> Iterator[ProxierHost]:
    """A proxier on the nf_tables or the legacy backend: the monitor reads them differently."""
    def make(node: NetNS) -> ProxierHost:
        if request.param == "legacy":  # kubelet's hint chain makes detection pick legacy
            node.run(["iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"])
        return ProxierHost(node.name, CONFIG)

    with host_in_new_netns(make) as proxier:
        assert proxier.call("writer_backend") == request.param
        yield proxier


def test_the_mode_asks_for_partial_periodic_syncs() -> None:
    assert IptablesProxier.periodic_full_sync is False


def test_periodic_partial_sync_leaves_service_chains_and_rewrites_the_top_level(
        host: ProxierHost) -> None:
    full = host.sync(WEB, OTHER, full=True)
    host.call("writer", ("ensure_rule", ("nat", SEP, SEP_MARKER)))
    host.call("writer", ("ensure_rule", ("nat", "KUBE-SERVICES", TOP_MARKER)))
    assert "foreign-in-sep" in host.save("nat")

    # The periodic sync of a quiet node: nothing changed, not full.
    result = host.sync(WEB, OTHER)
    nat = host.save("nat")
    assert "foreign-in-sep" in nat, "a no-change partial sync rewrote a per-service chain"
    assert "foreign-in-services" not in nat, "the top-level chains were not rewritten"
    assert "-A KUBE-SERVICES -d 10.96.0.10/32" in nat
    assert result.objects_written < full.objects_written

    # The hourly (or canary/failure-forced) full sync repairs drift inside service chains.
    host.sync(WEB, OTHER, full=True)
    nat = host.save("nat")
    assert "foreign-in-sep" not in nat
    assert f":{SEP}" in nat


def test_a_deleted_service_chain_fails_the_partial_sync_which_forces_a_full_one(
        host: ProxierHost) -> None:
    """The one drift a partial sync trips over: the top level it rewrites jumps to a chain
    that is gone. The restore fails, the backend raises (the core then syncs in full)."""
    host.sync(WEB, OTHER, full=True)
    svc_chain = "KUBE-SVC-" + R.port_proto_hash(OTHER.name)
    assert f":{svc_chain} " in host.save("nat")
    host.call("writer", ("flush_chain", ("nat", "KUBE-SERVICES")))
    host.call("writer", ("delete_chain", ("nat", svc_chain)))
    with pytest.raises(RestoreError, match=svc_chain):
        host.sync(WEB, OTHER)
    host.sync(WEB, OTHER, full=True)
    nat = host.save("nat")
    assert f":{svc_chain}" in nat and f"-j {svc_chain}" in nat


PREROUTING_JUMP = next(j for j in R.JUMP_RULES
                       if (j.table, j.source) == ("nat", "PREROUTING"))
PREROUTING_LINE = ('-A PREROUTING -m comment --comment "kubernetes service portals" '
                   "-j KUBE-SERVICES")


def test_a_deleted_jump_is_noticed_by_the_monitor_and_the_next_sync_is_full(
        backend_host: ProxierHost) -> None:
    host = backend_host
    host.sync(WEB, OTHER, full=True)
    assert PREROUTING_LINE in host.save("nat")
    assert host.call("missing_in_kernel") == []
    host.call("writer", ("delete_rule", ("nat", "PREROUTING", PREROUTING_JUMP.args())))
    assert PREROUTING_LINE not in host.save("nat")

    # A partial (periodic) sync does not ensure jumps, as upstream's; the sync path does not
    # look at the kernel either.
    host.sync(WEB, OTHER)
    assert PREROUTING_LINE not in host.save("nat")
    assert host.call("needs_full_sync") is False

    # The monitor's round (its thread waits a sync period) finds exactly that jump.
    assert host.call("missing_in_kernel") == [
        "jump rule is gone: IPv4 nat PREROUTING -m comment --comment "
        "'kubernetes service portals' -j KUBE-SERVICES"]
    assert host.call("canary_check") is False
    assert host.call("needs_full_sync") is True

    # What the core does with the answer: the next sync is full, and it puts the jump back.
    host.sync(WEB, OTHER, full=host.call("needs_full_sync"))
    nat = host.save("nat")
    assert nat.count(PREROUTING_LINE) == 1, nat
    assert host.call("needs_full_sync") is False
    assert host.call("canary_check") is True


def test_a_flushed_nat_table_is_reported_jumps_and_canary_alike(
        backend_host: ProxierHost) -> None:
    host = backend_host
    host.sync(WEB, OTHER, full=True)
    binary = f"iptables-{host.call('writer_backend')}"
    host.run(binary, "-t", "nat", "-F")
    host.run(binary, "-t", "nat", "-X")
    missing = host.call("missing_in_kernel")
    assert missing[0] == ("canary chain KUBE-PROXY-CANARY is gone from the IPv4 nat table "
                          "(tables flushed?)")
    assert sorted(m.split(" -")[0] for m in missing[1:]) == [
        "jump rule is gone: IPv4 nat OUTPUT", "jump rule is gone: IPv4 nat POSTROUTING",
        "jump rule is gone: IPv4 nat PREROUTING"]
    host.sync(WEB, OTHER, full=True)
    assert host.call("missing_in_kernel") == []
