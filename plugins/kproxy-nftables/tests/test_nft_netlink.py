"""The netlink writer: partial syncs sent over netlink leave exactly the table ``nft -f``
leaves (same `nft -j list ruleset`, element order aside), and unknown shapes fall back."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from kproxy_nftables import netlink
from kproxy_nftables.proxier import NftablesProxier
from nft_helpers import context, ep, key, svc

from kproxy_core.backend import SyncError, SyncRequest
from kproxy_core.model import NodeView, ResolvedServicePort, ServicePortKey
from kproxy_core.testing.innetns import in_netns
from kproxy_core.testing.netns import Sandbox

T = "ip kube-proxy"
CHAIN = "service-ULMVA6XW-ns1/svc1/tcp/p80"
EP = "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"


def test_hot_path_shapes_encode() -> None:
    lines = [
        f"add chain {T} {EP}",
        f"flush chain {T} {CHAIN}",
        f"delete element {T} endpoints-X {{ 1, 2 }}",
        f"add map {T} endpoints-X {{ typeof numgen random mod 2 : verdict ; }}",
        f"add rule {T} {EP} ip saddr 10.180.0.1 jump mark-for-masquerade",
        f"add rule {T} {EP} meta l4proto tcp dnat to 10.180.0.1:80",
        f"add rule {T} {CHAIN} ip daddr 10.96.0.1 udp dport 53 ip saddr != 10.0.0.0/8 "
        "jump mark-for-masquerade",
        f"add rule {T} {CHAIN} numgen random mod 3 vmap @endpoints-X",
        f"add element {T} endpoints-X {{ 1 : goto {EP}, 2 : goto {EP} }}",
        f'add element {T} no-endpoint-services {{ 10.96.0.1 . tcp . 80 comment "a/b:c" '
        ": goto reject-chain }",
        f"add element {T} service-nodeports {{ sctp . 30000 : goto {CHAIN} }}",
        f"delete element {T} cluster-ips {{ 10.96.0.1 }}",
        "add rule ip6 kube-proxy x meta l4proto tcp dnat to [fd00::1]:80",
        f"delete chain {T} {EP}",
        f"add map {T} endpoint-addrs-sctp-1 {{ typeof numgen random mod 2 : ip daddr . sctp "
        "dport ; flags interval ; }",
        "add map ip6 kube-proxy endpoint-addrs-udp-2 { typeof numgen random mod 2 : ip6 daddr "
        ". udp dport ; flags interval ; }",
        f"add element {T} endpoint-addrs-tcp-0 {{ 0-9 : 10.0.0.1 . 80, "
        "10-4294967294 : 10.0.0.2 . 8080 }",
        "add element ip6 kube-proxy endpoint-addrs-udp-0 { 0-4294967294 : fd00::1 . 53 }",
        f"delete element {T} endpoint-addrs-tcp-0 {{ 0-9, 10-4294967294 }}",
        f"add rule {T} {CHAIN} meta l4proto sctp dnat ip addr . port to numgen random mod "
        "16777216 offset 0 map @endpoint-addrs-sctp-0",
        "add rule ip6 kube-proxy x meta l4proto udp dnat ip6 addr . port to numgen random mod "
        "16777216 offset 33554432 map @endpoint-addrs-udp-1",
        f"add element {T} hairpin-endpoints {{ 10.0.0.1 . 10.0.0.1, 10.0.0.2 . 10.0.0.2 }}",
        "delete element ip6 kube-proxy hairpin-endpoints { fd00::1 . fd00::1 }",
    ]
    messages = netlink.encode(lines)
    assert messages is not None and len(messages) == len(lines)


@pytest.mark.parametrize("line", [
    f"add set {T} affinity-x {{ type ipv4_addr ; flags dynamic,timeout ; timeout 60s ; }}",
    f"add rule {T} firewall-x ip saddr != {{ 10.0.0.0/8, 1.2.3.4 }} drop",
    f'add rule {T} external-x fib saddr type local jump mark-for-masquerade comment "m"',
    f"add rule {T} service-x ip saddr @affinity-x goto endpoint-x",
    f"add rule {T} x ip6 saddr 10.0.0.1 jump y",  # family mismatch
    f"flush set {T} nodeport-ips",
    f"add element {T} service-ips {{ tcp . 80 : goto x }}",  # wrong key for the map
    f"add map {T} endpoint-addrs-tcp-0 {{ typeof numgen random mod 2 : ip daddr . th dport ; "
    "flags interval ; }",
    f"add map {T} service-ips {{ typeof numgen random mod 2 : ip daddr . tcp dport ; "
    "flags interval ; }",
    f"add element {T} endpoint-addrs-tcp-0 {{ 0-4294967295 : 10.0.0.1 . 80 }}",  # end too far
    f"add element {T} endpoint-addrs-tcp-0 {{ 0-9 : 10.0.0.1 . 70000 }}",
    f"add element {T} endpoint-addrs-tcp-0 {{ 7 : 10.0.0.1 . 80 }}",
    f"add rule {T} x meta l4proto tcp dnat ip6 addr . port to numgen random mod 9 offset 0 "
    "map @m",
    "add chain ip other-table x",
])
def test_unknown_shapes_fall_back_to_nft(line: str) -> None:
    assert netlink.encode([f"add chain {T} {EP}", line]) is None


# --------------------------------------------------------------------------------------------
# Against the kernel: the same scenario through both writers
# --------------------------------------------------------------------------------------------

A = key("ns1", "svc1")
B = key("ns1", "empty", "dns", "UDP")
V6 = key("ns2", "six", family=6)
NEW = key("ns3", "new")


def _scenario() -> list[tuple[list[ResolvedServicePort], bool]]:
    a = [ep("10.180.0.1"), ep("10.180.0.2")]
    six = [ep("fd00:10::1", 8080), ep("fd00:10::2", 8080)]
    base = [svc(A, "172.30.0.41", endpoints=a, node_port=30001),
            svc(B, "172.30.0.42", 53, node_port=30002, external_ips=("192.0.2.9",)),
            svc(V6, "fd00:96::1", endpoints=six)]
    swap = [ep("10.180.0.1"), ep("10.180.0.3")]
    grow = [*swap, ep("10.180.0.4")]
    return [
        (base, True),
        ([svc(A, "172.30.0.41", endpoints=swap, node_port=30001), *base[1:]], False),
        ([svc(A, "172.30.0.41", endpoints=grow, node_port=30001), *base[1:]], False),
        ([svc(A, "172.30.0.41", endpoints=grow, node_port=30001),
          svc(B, "172.30.0.42", 53, node_port=30002, external_ips=("192.0.2.9",),
              endpoints=[ep("10.180.0.9", 5353)]),
          svc(V6, "fd00:96::1", endpoints=[six[0], ep("fd00:10::3", 8080)]),
          svc(NEW, "172.30.0.43", endpoints=[ep("10.180.0.5")])], False),
        ([svc(A, "172.30.0.41", node_port=30001),
          svc(NEW, "172.30.0.43", endpoints=[ep("10.180.0.5"), ep("10.180.0.6")])], False),
    ]


def _normalized(text: str) -> list[Any]:
    """``nft -j list ruleset`` without handles, set elements sorted (hash order varies)."""
    items = []
    for item in json.loads(text)["nftables"]:
        if "metainfo" in item:
            continue
        for body in item.values():
            body.pop("handle", None)
            if "elem" in body:
                body["elem"] = sorted(body["elem"], key=json.dumps)
        items.append(item)
    return items


def _run(use_netlink: bool) -> tuple[list[list[Any]], list[str]]:
    import subprocess

    proxier = NftablesProxier(context({"clusterCIDR": ("10.180.0.0/14",
                                                        "fd00:10::/60")}, (4, 6)))
    proxier.use_netlink = use_netlink
    previous: dict[ServicePortKey, ResolvedServicePort] = {}
    tables, writers = [], []
    for ports, full in _scenario():
        current = {p.key: p for p in ports}
        changed = {k for k in current.keys() | previous.keys()
                   if current.get(k) != previous.get(k)}
        proxier.sync(SyncRequest(view=NodeView("node", ("10.99.0.1", "fd00:99::1"), "",
                                               current),
                                 changed=frozenset(changed), full=full,
                                 previous={k: previous.get(k) for k in changed}))
        previous = current
        out = subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True,
                             check=True).stdout
        tables.append(_normalized(out))
        writers.append(proxier.last_writer)
    return tables, writers


def _in_fresh_netns(func: Callable[[], Any]) -> Any:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root (they create network namespaces)")
    with Sandbox() as sandbox:
        ns = sandbox.netns("nftnl")
        return in_netns(ns.name, func, timeout=120)


@pytest.mark.root
def test_netlink_and_nft_leave_the_same_table() -> None:
    by_netlink, writers = _in_fresh_netns(lambda: _run(True))
    by_nft, nft_writers = _in_fresh_netns(lambda: _run(False))
    assert writers == ["nft", "netlink", "netlink", "netlink", "netlink"]
    assert set(nft_writers) == {"nft"}
    for step, (got, want) in enumerate(zip(by_netlink, by_nft, strict=True)):
        assert got == want, f"step {step} differs"


@pytest.mark.root
def test_rejected_batch_changes_nothing_and_names_the_statement() -> None:
    def attempt() -> tuple[str, str, str]:
        import subprocess

        def listing() -> str:
            return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True,
                                  check=True).stdout

        proxier = NftablesProxier(context({}))
        port = svc(A, "172.30.0.41", endpoints=[ep("10.180.0.1")])
        proxier.sync(SyncRequest(view=NodeView("node", ("10.99.0.1",), "", {A: port}),
                                 changed=frozenset({A}), full=True))
        before = listing()
        lines = [f"add chain {T} fresh", f"add rule {T} fresh jump no-such-chain"]
        messages = netlink.encode(lines)
        assert messages is not None
        try:
            netlink.send(lines, messages)
        except netlink.NetlinkError as exc:
            error = str(exc)
        else:
            error = ""
        after = listing()
        # A partial sync on a table someone deleted fails cleanly (the core then resyncs).
        subprocess.run(["nft", "delete", "table", "ip", "kube-proxy"], check=True)
        moved = svc(A, "172.30.0.41", endpoints=[ep("10.180.0.2")])
        try:
            proxier.sync(SyncRequest(view=NodeView("node", ("10.99.0.1",), "", {A: moved}),
                                     changed=frozenset({A}), full=False, previous={A: port}))
        except SyncError as exc:
            sync_error = str(exc)
        else:
            sync_error = ""
        return before, after, error + "|" + sync_error

    before, after, errors = _in_fresh_netns(attempt)
    error, sync_error = errors.split("|")
    assert "jump no-such-chain" in error and "No such file or directory" in error
    assert before == after
    assert "nftables transaction failed" in sync_error


@pytest.mark.root
def test_table_lookup_per_family_and_handle() -> None:
    """`netlink.table_handle` against the kernel: absent, present per family (another
    table of the same name in the other family does not count), a new handle once the
    table is deleted and created again, and other tables ignored."""
    def lookups() -> list[int | None]:
        import subprocess

        def nft(text: str) -> None:
            subprocess.run(["nft", "-f", "-"], input=text, text=True, check=True)

        conn = netlink.Connection()
        try:
            seen = [netlink.table_handle(4, connection=conn)]
            nft("add table ip other\nadd table ip6 kube-proxy\n")
            seen += [netlink.table_handle(4, connection=conn),
                     netlink.table_handle(6, connection=conn)]
            nft("add table ip kube-proxy\nadd chain ip kube-proxy c\n")
            seen.append(netlink.table_handle(4, connection=conn))
            nft("delete table ip kube-proxy\nadd table ip kube-proxy\n")
            seen.append(netlink.table_handle(4))  # a one-off socket works too
        finally:
            conn.close()
        return seen

    absent, v4_missing, v6, first, second = _in_fresh_netns(lookups)
    assert absent is None and v4_missing is None
    assert isinstance(v6, int) and isinstance(first, int) and isinstance(second, int)
    assert first != second
