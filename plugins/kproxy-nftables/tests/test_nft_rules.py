"""Golden tests: the resolved model rendered to nft transaction text (no kernel)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import pytest
from kproxy_nftables import netlink, nft
from kproxy_nftables import rules as R
from kproxy_nftables.proxier import NftablesProxier, Settings
from kproxy_nftables.transaction import full_plan
from nft_helpers import context, ep, key, svc, view

from kproxy_core.backend import SyncError, SyncRequest
from kproxy_core.model import NodeView, ResolvedServicePort, ServicePortKey

CIDR = {"clusterCIDR": ("10.0.0.0/8",)}
WEB = key("ns1", "svc1")
WEB_CHAIN = "service-ULMVA6XW-ns1/svc1/tcp/p80"
WEB_BASE = "ULMVA6XW-ns1/svc1/tcp/p80"
WEB_EP1 = "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"


class Recorder:
    """Stands in for the kernel: records every transaction, lists nothing."""

    def __init__(self) -> None:
        self.transactions: list[list[str]] = []

    def apply(self, lines: list[str]) -> float:
        self.transactions.append(list(lines))
        return 0.0


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    rec = Recorder()
    monkeypatch.setattr(nft, "apply", rec.apply)
    # Partial syncs bypass nft through the netlink writer: record those too (nothing here
    # may reach the host's kernel).
    monkeypatch.setattr(netlink, "send",
                        lambda lines, messages, **_: rec.apply(list(lines)))
    monkeypatch.setattr(nft, "list_names", lambda family: (set(), {}))
    yield rec


class Driver:
    def __init__(self, config: dict[str, object] | None = None,
                 families: tuple[int, ...] = (4,)) -> None:
        self.proxier = NftablesProxier(context(config if config is not None else CIDR,
                                               families))
        self.previous: dict[ServicePortKey, ResolvedServicePort] = {}

    def sync(self, *ports: ResolvedServicePort, full: bool = False,
             node_ips: tuple[str, ...] = ("10.99.0.1",)) -> None:
        current = {p.key: p for p in ports}
        changed = {k for k in current.keys() | self.previous.keys()
                   if current.get(k) != self.previous.get(k)}
        self.proxier.sync(SyncRequest(
            view=NodeView("node", node_ips, "", current), changed=frozenset(changed),
            full=full, previous={k: self.previous.get(k) for k in changed}))
        self.previous = current


def test_upstream_chain_names() -> None:
    assert R.chain_name_base(WEB.name) == "ULMVA6XW-ns1/svc1/tcp/p80"
    assert (R.endpoint_chain_base(WEB.name, ep("10.180.0.1"))
            == "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80")
    assert R.masquerade_mark(14) == "0x004000"
    long = R.hash_and_truncate("x" * 300)
    assert len(long) == 240 and long.endswith("...")


def test_cluster_ip_golden() -> None:
    cfg = R.FamilyConfig(4, local=R.LocalDetector.for_cidrs(4, ["10.0.0.0/8"]))
    render = R.render_port(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")]), cfg)
    assert dict(render.chains) == {
        WEB_CHAIN: ("ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 "
                    "jump mark-for-masquerade",
                    "meta l4proto tcp dnat ip addr . port to numgen random mod 16777216 offset 0 "
                    "map @endpoint-addrs-tcp-0"),
    }
    assert render.maps == {}
    assert render.slots == {WEB_CHAIN: 0}
    assert render.hairpin == ("10.180.0.1",)
    assert [e.text(4) for e in render.elements] == [
        f"ip kube-proxy service-ips {{ 172.30.0.41 . tcp . 80 : goto {WEB_CHAIN} }}",
        "ip kube-proxy endpoint-addrs-tcp-0 { 0-16777215 : 10.180.0.1 . 80 }"]
    assert render.cluster_ip == "172.30.0.41"
    # Another numgen block: another offset, and past the first map's blocks another map.
    later = R.render_port(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")]), cfg,
                          lambda chain: R.SLOTS_PER_MAP + 2)
    assert later.chains[WEB_CHAIN][-1].endswith(
        "mod 16777216 offset 33554432 map @endpoint-addrs-tcp-1")
    assert later.elements[-1].text(4) == (
        "ip kube-proxy endpoint-addrs-tcp-1 { 33554432-50331647 : 10.180.0.1 . 80 }")


def test_endpoint_ranges_split_numgen_values_evenly() -> None:
    assert R.endpoint_ranges(1) == [(0, 16777215)]
    assert R.endpoint_ranges(3, 16777216) == [(16777216, 22369620), (22369621, 27962025),
                                              (27962026, 33554431)]
    for count in (2, 5, 7, 1000, 65536):
        ranges = R.endpoint_ranges(count, 2 * R.SLOT_VALUES)
        assert ranges[0][0] == 2 * R.SLOT_VALUES and ranges[-1][1] == 3 * R.SLOT_VALUES - 1
        assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))
        sizes = {end - start + 1 for start, end in ranges}
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="1 to 16777216 endpoints"):
        R.endpoint_ranges(0)
    with pytest.raises(ValueError, match="1 to 16777216 endpoints"):
        R.endpoint_ranges(R.SLOT_VALUES + 1)
    # Every block of a map fits below 2^32 with room for the end of its last range.
    assert R.slot_offset(R.SLOTS_PER_MAP - 1) + R.SLOT_VALUES < 1 << 32
    assert R.address_map("UDP", R.SLOTS_PER_MAP - 1) == "endpoint-addrs-udp-0"
    assert R.address_map("udp", R.SLOTS_PER_MAP) == "endpoint-addrs-udp-1"


def test_affinity_keeps_endpoint_chains_and_a_verdict_map() -> None:
    render = R.render_port(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")],
                               session_affinity_timeout=10800), R.FamilyConfig(4))
    affinity = f"affinity-{WEB_EP1.removeprefix('endpoint-')}"
    assert dict(render.chains) == {
        WEB_EP1: ("ip saddr 10.180.0.1 jump mark-for-masquerade",
                  f"update @{affinity} {{ ip saddr }}",
                  "meta l4proto tcp dnat to 10.180.0.1:80"),
        WEB_CHAIN: (f"ip saddr @{affinity} goto {WEB_EP1}",
                    f"numgen random mod 1 vmap @endpoints-{WEB_BASE}"),
    }
    assert render.maps == {f"endpoints-{WEB_BASE}": {"0": f"goto {WEB_EP1}"}}
    assert render.affinity_sets == {affinity: 10800}
    assert render.hairpin == () and render.slots == {}


def test_external_traffic_policy_local_golden() -> None:
    cfg = R.FamilyConfig(4, local=R.LocalDetector.for_cidrs(4, ["10.0.0.0/8"]),
                         node_ip="192.168.0.2")
    port = svc(key("ns2", "svc2"), "172.30.0.42", endpoints=[ep("10.180.0.2", local=True),
                                                              ep("10.180.0.3")],
               node_port=3001, load_balancer_ips=("1.2.3.4",),
               load_balancer_source_ranges=("192.168.0.0/24",), external_policy_local=True)
    render = R.render_port(port, cfg)
    base = "42NFTM6N-ns2/svc2/tcp/p80"
    assert render.chains[f"external-{base}"] == (
        f'ip saddr 10.0.0.0/8 goto service-{base} comment "short-circuit pod traffic"',
        'fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"',
        f'fib saddr type local goto service-{base} comment "short-circuit local traffic"',
        f"goto local-{base}",
    )
    # The node is inside the source ranges: the LB IP is allowed too (hairpin via the VIP).
    assert render.chains[f"firewall-{base}"] == (
        "ip saddr != { 192.168.0.0/24, 1.2.3.4 } drop",)
    assert render.chains[f"local-{base}"][-1] == (
        "meta l4proto tcp dnat ip addr . port to numgen random mod 16777216 offset 16777216 "
        "map @endpoint-addrs-tcp-0")
    assert render.slots == {f"service-{base}": 0, f"local-{base}": 1}
    assert render.hairpin == ("10.180.0.2", "10.180.0.3")
    assert [e.text(4) for e in render.elements if R.is_address_map(e.map)] == [
        "ip kube-proxy endpoint-addrs-tcp-0 { 0-8388607 : 10.180.0.2 . 80 }",
        "ip kube-proxy endpoint-addrs-tcp-0 { 8388608-16777215 : 10.180.0.3 . 80 }",
        "ip kube-proxy endpoint-addrs-tcp-0 { 16777216-33554431 : 10.180.0.2 . 80 }",
    ]
    assert [e.text(4) for e in render.elements if not R.is_address_map(e.map)] == [
        f"ip kube-proxy service-ips {{ 172.30.0.42 . tcp . 80 : goto service-{base} }}",
        f"ip kube-proxy service-ips {{ 1.2.3.4 . tcp . 80 : goto external-{base} }}",
        f'ip kube-proxy firewall-ips {{ 1.2.3.4 . tcp . 80 comment "ns2/svc2:p80" '
        f": goto firewall-{base} }}",
        f"ip kube-proxy service-nodeports {{ tcp . 3001 : goto external-{base} }}",
    ]


def test_no_endpoints_reject_and_no_local_endpoints_drop() -> None:
    cfg = R.FamilyConfig(4)
    none = R.render_port(svc(WEB, "172.30.0.41", node_port=30001,
                             external_ips=("192.0.2.1",)), cfg)
    assert dict(none.chains) == {}
    assert [e.text(4) for e in none.elements] == [
        'ip kube-proxy no-endpoint-services { 172.30.0.41 . tcp . 80 comment "ns1/svc1:p80" '
        ": goto reject-chain }",
        'ip kube-proxy no-endpoint-services { 192.0.2.1 . tcp . 80 comment "ns1/svc1:p80" '
        ": goto reject-chain }",
        'ip kube-proxy no-endpoint-nodeports { tcp . 30001 comment "ns1/svc1:p80" '
        ": goto reject-chain }",
    ]
    remote_only = R.render_port(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.9")],
                                    node_port=30001, external_policy_local=True), cfg)
    texts = [e.text(4) for e in remote_only.elements]
    assert 'ip kube-proxy no-endpoint-nodeports { tcp . 30001 comment "ns1/svc1:p80" : drop }' \
        in texts
    ext = remote_only.chains["external-ULMVA6XW-ns1/svc1/tcp/p80"]
    assert not any(rule.startswith("goto ") for rule in ext), "no fallthrough without endpoints"


def test_internal_traffic_policy_local_without_local_endpoints_drops() -> None:
    render = R.render_port(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.9")],
                               internal_policy_local=True), R.FamilyConfig(4))
    assert [e.text(4) for e in render.elements if not R.is_address_map(e.map)] == [
        'ip kube-proxy no-endpoint-services { 172.30.0.41 . tcp . 80 comment "ns1/svc1:p80" '
        ": drop }"]


def test_ipv6_names_and_dnat() -> None:
    k = key("ns1", "svc1", family=6)
    render = R.render_port(svc(k, "fd00::41", endpoints=[ep("fd00:10::1")]),
                           R.FamilyConfig(6, masquerade_all=True))
    chain = WEB_CHAIN.replace("ULMVA6XW", R.chain_name_base(k.name)[:8])
    assert render.chains[chain] == (
        "ip6 daddr fd00::41 tcp dport 80 jump mark-for-masquerade",
        "meta l4proto tcp dnat ip6 addr . port to numgen random mod 16777216 offset 0 "
        "map @endpoint-addrs-tcp-0")
    assert render.elements[-1].text(6) == (
        "ip6 kube-proxy endpoint-addrs-tcp-0 { 0-16777215 : fd00:10::1 . 80 }")
    assert ("add map ip6 kube-proxy endpoint-addrs-tcp-0 { typeof numgen random mod 2 : "
            "ip6 daddr . tcp dport ; flags interval ; }") in full_plan(
                R.FamilyConfig(6), [render]).lines()
    with_affinity = R.render_port(svc(k, "fd00::41", endpoints=[ep("fd00:10::1")],
                                      session_affinity_timeout=60), R.FamilyConfig(6))
    ep_chain = next(c for c in with_affinity.chains if c.startswith("endpoint-"))
    assert ep_chain.endswith("-ns1/svc1/tcp/p80__fd00.10..1/80")
    assert with_affinity.chains[ep_chain][-1] == "meta l4proto tcp dnat to [fd00:10::1]:80"


def test_setup_golden() -> None:
    lines = R.setup_lines(R.FamilyConfig(4, nodeport_ips=None))
    assert lines[0] == 'add table ip kube-proxy { comment "rules for kube-proxy" ; }'
    assert "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }" \
        in lines
    assert "add rule ip kube-proxy nat-prerouting jump services" in lines
    assert "add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check" \
        in lines
    assert ("add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 "
            "meta l4proto . th dport vmap @service-nodeports") in lines
    assert ("add rule ip kube-proxy masquerading mark and 0x004000 == 0 return") in lines
    hairpin = ("add rule ip kube-proxy masquerading ct status dnat ip saddr . ip daddr "
               "@hairpin-endpoints jump mark-for-masquerade")
    assert lines.index(hairpin) < lines.index(
        "add rule ip kube-proxy masquerading mark and 0x004000 == 0 return")
    with_set = R.setup_lines(R.FamilyConfig(4, nodeport_ips=("10.99.0.1",)))
    assert ("add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport "
            "vmap @service-nodeports") in with_set


def _targets(lines: list[str]) -> tuple[set[str], set[str]]:
    declared = {m[1] for line in lines for m in [re.match(r"add chain ip kube-proxy (\S+)", line)]
                if m}
    used = set(re.findall(r"(?:goto|jump) ([\w./-]+)", "\n".join(lines)))
    return declared, used


def test_full_transaction_is_consistent(recorder: Recorder) -> None:
    d = Driver()
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1"), ep("10.180.0.2")],
               node_port=30080, session_affinity_timeout=60),
           svc(key("ns2", "empty"), "172.30.0.50"), full=True)
    (lines,) = recorder.transactions
    declared, used = _targets(lines)
    assert used - declared == set(), "every goto/jump target is declared in the transaction"
    assert ("add set ip kube-proxy affinity-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 "
            "{ type ipv4_addr ; flags dynamic,timeout ; timeout 60s ; }") in lines
    assert "flush map ip kube-proxy service-ips" in lines
    assert "add element ip kube-proxy nodeport-ips { 10.99.0.1 }" in lines


def test_endpoint_changes_are_map_elements_only(recorder: Recorder) -> None:
    d = Driver()
    other = svc(key("ns2", "other"), "172.30.0.50", endpoints=[ep("10.180.0.7")])
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")]), other, full=True)
    assert ("add element ip kube-proxy hairpin-endpoints { 10.180.0.1 . 10.180.0.1, "
            "10.180.0.7 . 10.180.0.7 }") in recorder.transactions[-1]
    assert ("add element ip kube-proxy cluster-ips { 172.30.0.41, 172.30.0.50 }"
            in recorder.transactions[-1])
    eps = "ip kube-proxy endpoint-addrs-tcp-0"
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1"), ep("10.180.0.2")]), other)
    assert recorder.transactions[-1] == [
        f"delete element {eps} {{ 0-16777215 }}",
        f"add element {eps} {{ 0-8388607 : 10.180.0.1 . 80 }}",
        f"add element {eps} {{ 8388608-16777215 : 10.180.0.2 . 80 }}",
        "add element ip kube-proxy hairpin-endpoints { 10.180.0.2 . 10.180.0.2 }",
    ]
    # Replacing an endpoint swaps one element; the shared hairpin element of an endpoint
    # other ports still reach stays.
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1"), ep("10.180.0.7")]), other)
    assert recorder.transactions[-1] == [
        f"delete element {eps} {{ 8388608-16777215 }}",
        "delete element ip kube-proxy hairpin-endpoints { 10.180.0.2 . 10.180.0.2 }",
        f"add element {eps} {{ 8388608-16777215 : 10.180.0.7 . 80 }}",
    ]
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")]), other)
    assert not any("hairpin" in line for line in recorder.transactions[-1])
    assert not any("other" in line for line in recorder.transactions[-1])
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")]))
    assert "delete element ip kube-proxy hairpin-endpoints { 10.180.0.7 . 10.180.0.7 }" in (
        recorder.transactions[-1])
    # Switching ClientIP affinity on moves to a verdict map; the block is given back (and
    # handed out again only by a later transaction).
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")],
               session_affinity_timeout=60))
    last = recorder.transactions[-1]
    assert f"delete element {eps} {{ 0-16777215 }}" in last
    assert (f"add map ip kube-proxy endpoints-{WEB_BASE} {{ {R.ENDPOINTS_MAP_TYPE} ; }}"
            in last)
    assert "delete element ip kube-proxy hairpin-endpoints { 10.180.0.1 . 10.180.0.1 }" in last
    third = svc(key("ns3", "third"), "172.30.0.51", endpoints=[ep("10.180.0.8")])
    d.sync(third)
    assert f"add element {eps} {{ 0-16777215 : 10.180.0.8 . 80 }}" in recorder.transactions[-1]


def test_partial_sync_with_affinity_touches_only_the_changed_port(recorder: Recorder) -> None:
    d = Driver()
    other = svc(key("ns2", "other"), "172.30.0.50", endpoints=[ep("10.180.0.7")],
                session_affinity_timeout=60)
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")], session_affinity_timeout=60),
           other, full=True)
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1"), ep("10.180.0.2")],
               session_affinity_timeout=60), other)
    ep2 = "endpoint-2ZNDXFAB-ns1/svc1/tcp/p80__10.180.0.2/80"
    aff1 = "affinity-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    aff2 = "affinity-2ZNDXFAB-ns1/svc1/tcp/p80__10.180.0.2/80"
    assert R.ENDPOINT_PREFIX + R.endpoint_chain_base(WEB.name, ep("10.180.0.2")) == ep2
    set2 = "{ type ipv4_addr ; flags dynamic,timeout ; timeout 60s ; }"
    assert recorder.transactions[-1] == [
        f"add chain ip kube-proxy {ep2}",
        f"flush chain ip kube-proxy {WEB_CHAIN}",
        f"add set ip kube-proxy {aff2} {set2}",
        f"add rule ip kube-proxy {ep2} ip saddr 10.180.0.2 jump mark-for-masquerade",
        f"add rule ip kube-proxy {ep2} update @{aff2} {{ ip saddr }}",
        f"add rule ip kube-proxy {ep2} meta l4proto tcp dnat to 10.180.0.2:80",
        f"add rule ip kube-proxy {WEB_CHAIN} ip daddr 172.30.0.41 tcp dport 80 "
        "ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
        f"add rule ip kube-proxy {WEB_CHAIN} ip saddr @{aff1} goto {WEB_EP1}",
        f"add rule ip kube-proxy {WEB_CHAIN} ip saddr @{aff2} goto {ep2}",
        f"add rule ip kube-proxy {WEB_CHAIN} numgen random mod 2 vmap @endpoints-{WEB_BASE}",
        f"add element ip kube-proxy endpoints-{WEB_BASE} {{ 1 : goto {ep2} }}",
    ]
    # Removing the endpoint again deletes its chain after the service chain stops using it.
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")], session_affinity_timeout=60),
           other)
    last = recorder.transactions[-1]
    assert last[0] == f"flush chain ip kube-proxy {WEB_CHAIN}"
    assert last[-1] == f"delete chain ip kube-proxy {ep2}"
    assert last.index(f"flush chain ip kube-proxy {ep2}") < last.index(
        f"delete set ip kube-proxy {aff2}")
    assert last.index(f"delete element ip kube-proxy endpoints-{WEB_BASE} {{ 1 }}") < (
        len(last) - 1)
    assert not any("other" in line for line in last)


def test_removing_a_service_cleans_everything_and_keeps_shared_cluster_ip(
        recorder: Recorder) -> None:
    d = Driver()
    p80 = svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")], session_affinity_timeout=60)
    p443 = svc(key("ns1", "svc1", "p443"), "172.30.0.41", 443, endpoints=[ep("10.180.0.1", 443)])
    d.sync(p80, p443, full=True)
    d.sync(p443)
    last = recorder.transactions[-1]
    assert "delete element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 }" in last
    assert f"delete chain ip kube-proxy {WEB_CHAIN}" in last
    assert f"delete chain ip kube-proxy {WEB_EP1}" in last
    assert ("delete set ip kube-proxy affinity-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
            in last)
    assert last.index(f"flush chain ip kube-proxy {WEB_EP1}") < last.index(
        "delete set ip kube-proxy affinity-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80")
    assert not any("cluster-ips" in line for line in last), "p443 still uses the ClusterIP"
    d.sync()
    assert ("delete element ip kube-proxy cluster-ips { 172.30.0.41 }"
            in recorder.transactions[-1])


def test_affinity_timeout_change_recreates_sets(recorder: Recorder) -> None:
    d = Driver()
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")], session_affinity_timeout=60),
           full=True)
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")], session_affinity_timeout=30))
    last = recorder.transactions[-1]
    aff = "affinity-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    assert last.index(f"flush chain ip kube-proxy {WEB_EP1}") < last.index(
        f"delete set ip kube-proxy {aff}") < last.index(
        f"add set ip kube-proxy {aff} {{ type ipv4_addr ; flags dynamic,timeout ; "
        "timeout 30s ; }")


def test_full_sync_deletes_stale_listed_objects() -> None:
    cfg = R.FamilyConfig(4)
    plan = full_plan(cfg, [], {"service-OLD-ns/gone/tcp/p"}, {"affinity-OLD-x/y/tcp/p__a/1": 60})
    lines = plan.lines()
    assert lines[-1] == "delete chain ip kube-proxy service-OLD-ns/gone/tcp/p"
    assert "delete set ip kube-proxy affinity-OLD-x/y/tcp/p__a/1" in lines


def test_old_kernels_defer_chain_deletion(recorder: Recorder) -> None:
    d = Driver()
    d.proxier.delete_at_once = False
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")], session_affinity_timeout=9),
           full=True)
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.2")], session_affinity_timeout=9))
    assert not any(line.startswith("delete chain") for line in recorder.transactions[-1])
    assert f"flush chain ip kube-proxy {WEB_EP1}" in recorder.transactions[-1]
    d.sync(svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.2")], node_port=30001,
               session_affinity_timeout=9))
    assert f"delete chain ip kube-proxy {WEB_EP1}" in recorder.transactions[-1]


def test_settings() -> None:
    s = Settings(context({"nodePortAddresses": ("0.0.0.0/0",)}).config)
    assert s.nodeport_ips(4, view(), None) is None
    assert Settings(context({}).config).nodeport_ips(4, view(), None) == ("10.99.0.1",)
    s = Settings(context({"nodePortAddresses": ("10.99.0.0/24",)}).config)
    assert s.nodeport_ips(4, view(), ["10.99.0.1", "192.168.1.1"]) == ("10.99.0.1",)
    shared = Settings(context({"iptables.masqueradeBit": 5, "iptables.masqueradeAll": True})
                      .config)
    assert shared.masquerade_mark == "0x000020" and shared.masquerade_all
    with pytest.raises(ValueError, match="detectLocalMode"):
        Settings(context({"detectLocalMode": "Nope"}).config)
    bridge = Settings(context({"detectLocalMode": "InterfaceNamePrefix",
                               "detectLocal.interfaceNamePrefix": "veth"}).config)
    assert bridge.local_detector(4) == R.LocalDetector('iifname "veth*"', 'iifname != "veth*"')


def test_failed_partial_sync_leaves_the_state_as_it_was(
        recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Driver()
    a = svc(WEB, "172.30.0.41", endpoints=[ep("10.180.0.1")])
    b = svc(key("ns2", "b"), "172.30.0.42", endpoints=[ep("10.180.0.2")])
    d.sync(a, b, full=True)
    state = d.proxier.state[4]

    def snapshot() -> tuple[object, ...]:
        return (dict(state.programmed), dict(state.cluster_ip_refs), dict(state.hairpin_refs),
                dict(state.slots.owner), list(state.slots.free), list(state.slots.released),
                state.slots.top, state.chain_count)

    before = snapshot()

    def fail(lines: list[str], messages: list[bytes], **_: object) -> None:
        raise netlink.NetlinkError("rejected")

    monkeypatch.setattr(netlink, "send", fail)
    c = svc(key("ns3", "c"), "172.30.0.43", endpoints=[ep("10.180.0.1"), ep("10.180.0.3")])
    with pytest.raises(SyncError, match="rejected"):
        d.proxier.sync(SyncRequest(view=view(b, c), changed=frozenset({WEB, c.key}),
                                   full=False, previous={WEB: a, c.key: None}))
    assert snapshot() == before


def test_numgen_blocks_are_stable_and_reused_only_after_a_commit(recorder: Recorder) -> None:
    d = Driver()
    ports = [svc(key("ns", f"s{i}"), f"172.30.0.{i + 1}", endpoints=[ep("10.180.0.1")])
             for i in range(3)]
    d.sync(*ports, full=True)
    owner = dict(d.proxier.state[4].slots.owner)
    assert sorted(owner.values()) == [0, 1, 2]
    d.sync(*ports, full=True)
    assert d.proxier.state[4].slots.owner == owner, "a resync keeps every block"
    fresh = svc(key("ns", "new"), "172.30.0.9", endpoints=[ep("10.180.0.1")])
    d.sync(ports[0], ports[2], fresh)  # s1's block is given up in the same transaction
    new_chain = R.SERVICE_PREFIX + R.chain_name_base(fresh.key.name)
    assert d.proxier.state[4].slots.owner[new_chain] == 3
    later = svc(key("ns", "later"), "172.30.0.10", endpoints=[ep("10.180.0.1")])
    d.sync(ports[0], ports[2], fresh, later)
    assert d.proxier.state[4].slots.owner[
        R.SERVICE_PREFIX + R.chain_name_base(later.key.name)] == owner[
        R.SERVICE_PREFIX + R.chain_name_base(ports[1].key.name)]
