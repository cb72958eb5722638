"""Golden tests of the renderer: hand-built resolved ports in, upstream's rule text out."""

from __future__ import annotations

import pytest
from iptables_helpers import check_consistency, ep, key, svc, table_lines
from kproxy_iptables import rules as R

from kproxy_core.model import ResolvedServicePort, ServicePortName

K = key("ns1", "svc1")
SVC = "KUBE-SVC-XPGD46QRK7WJZT7O"
CFG = R.RenderConfig(local_detector=R.LocalDetector.for_cidrs(["10.0.0.0/8"]),
                     node_ip="192.168.0.2")


def render(*ports: ResolvedServicePort, cfg: R.RenderConfig = CFG) -> str:
    text = R.render_all({p.key: p for p in ports}, cfg).render()
    check_consistency(text)
    return text


def sep(address: str, name: ServicePortName = K.name) -> str:
    return R.endpoint_chain(name, address)


def test_chain_names_match_upstream() -> None:
    assert R.port_proto_hash(K.name) == "XPGD46QRK7WJZT7O"
    assert R.endpoint_chain(K.name, "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    unnamed = ServicePortName("ns1", "svc1", "", "TCP")
    assert str(unnamed) == "ns1/svc1"
    assert R.port_proto_hash(unnamed) != R.port_proto_hash(K.name)


def test_probabilities_have_ten_decimals() -> None:
    assert R.probability(3) == "0.3333333333"
    assert R.probability(2) == "0.5000000000"
    assert R.probability(7) == "0.1428571429"


def test_cluster_ip_one_endpoint_golden() -> None:
    text = render(svc(K, "172.30.0.41", endpoints=[ep("10.180.0.1")]))
    s1 = sep("10.180.0.1:80")
    assert sorted(table_lines(text, "nat")) == sorted([
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
        " -j MASQUERADE --random-fully",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp'
        f" -d 172.30.0.41 --dport 80 -j {SVC}",
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must'
        ' be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
        f'-A {SVC} -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp'
        " -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
        f'-A {SVC} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j {s1}',
        f"-A {s1} -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ",
        f"-A {s1} -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT"
        " --to-destination 10.180.0.1:80",
    ])
    assert table_lines(text, "nat")[-1].endswith("-j KUBE-NODEPORTS")
    assert sorted(table_lines(text, "filter")) == sorted([
        '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections"'
        " -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT"
        " -j DROP",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules"'
        " -m mark --mark 0x4000/0x4000 -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule"'
        " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ])


def test_no_endpoints_rejects_in_filter_and_writes_no_nat_chains() -> None:
    port = svc(K, "172.30.0.41", node_port=3001, external_ips=("192.168.99.11",),
               load_balancer_ips=("1.2.3.4",))
    text = render(port)
    assert not [line for line in table_lines(text, "nat") if "ns1/svc1" in line]
    assert sorted(line for line in table_lines(text, "filter") if "ns1/svc1" in line) == sorted([
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no endpoints" -m tcp -p tcp'
        " -d 172.30.0.41 --dport 80 -j REJECT",
        '-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no endpoints"'
        " -m tcp -p tcp -d 192.168.99.11 --dport 80 -j REJECT",
        '-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no endpoints"'
        " -m tcp -p tcp -d 1.2.3.4 --dport 80 -j REJECT",
        '-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no endpoints"'
        " -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j REJECT",
    ])


def test_external_local_without_local_endpoints_drops_but_short_circuits() -> None:
    port = svc(K, "172.30.0.41", node_port=3001, external_policy_local=True,
               endpoints=[ep("10.180.1.1")])
    text = render(port)
    ext = "KUBE-EXT-XPGD46QRK7WJZT7O"
    nat = [line for line in table_lines(text, "nat") if line.startswith(f"-A {ext}")]
    assert nat == [
        f'-A {ext} -m comment --comment "pod traffic for ns1/svc1:p80 external destinations"'
        f" -s 10.0.0.0/8 -j {SVC}",
        f'-A {ext} -m comment --comment "masquerade LOCAL traffic for ns1/svc1:p80 external'
        ' destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ',
        f'-A {ext} -m comment --comment "route LOCAL traffic for ns1/svc1:p80 external'
        f' destinations" -m addrtype --src-type LOCAL -j {SVC}',
    ]
    assert ('-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no local'
            ' endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP'
            in table_lines(text, "filter"))
    assert "KUBE-SVL-XPGD46QRK7WJZT7O" not in text


def test_external_local_with_local_endpoint_uses_svl() -> None:
    port = svc(K, "172.30.0.41", node_port=3001, external_policy_local=True,
               endpoints=[ep("10.180.1.1"), ep("10.180.0.2", local=True)])
    text = render(port)
    svl = "KUBE-SVL-XPGD46QRK7WJZT7O"
    assert f"-A KUBE-EXT-XPGD46QRK7WJZT7O -j {svl}" in text
    assert f'-A {svl} -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j ' \
           f'{sep("10.180.0.2:80")}' in text
    # both endpoints get SEP chains (the SVC chain serves short-circuited pod traffic)
    assert f":{sep('10.180.1.1:80')} - [0:0]" in text


def test_internal_local_without_local_endpoints_drops_cluster_ip() -> None:
    port = svc(K, "172.30.0.41", internal_policy_local=True, endpoints=[ep("10.180.1.1")])
    text = render(port)
    assert ('-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints"'
            " -m tcp -p tcp -d 172.30.0.41 --dport 80 -j DROP") in table_lines(text, "filter")
    assert "KUBE-SVC-" not in text and "KUBE-SEP-" not in text
    rendered = R.render_service(port, CFG)
    assert rendered.no_local_internal and not rendered.no_local_external


def test_affinity_and_probabilities() -> None:
    eps = [ep("10.180.0.1"), ep("10.180.0.2"), ep("10.180.0.3")]
    port = svc(K, "172.30.0.41", endpoints=eps, session_affinity_timeout=10800)
    lines = [line for line in table_lines(render(port), "nat") if line.startswith(f"-A {SVC}")]
    seps = [sep(e.address) for e in eps]
    assert lines[1:] == [
        *(f'-A {SVC} -m comment --comment "ns1/svc1:p80 -> {e.address}" -m recent --name {s}'
          f" --rcheck --seconds 10800 --reap -j {s}" for e, s in zip(eps, seps, strict=True)),
        f'-A {SVC} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic'
        f" --mode random --probability 0.3333333333 -j {seps[0]}",
        f'-A {SVC} -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -m statistic'
        f" --mode random --probability 0.5000000000 -j {seps[1]}",
        f'-A {SVC} -m comment --comment "ns1/svc1:p80 -> 10.180.0.3:80" -j {seps[2]}',
    ]
    assert (f"-A {seps[0]} -m comment --comment ns1/svc1:p80 -m recent --name {seps[0]} --set"
            " -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80") in render(port)


@pytest.mark.parametrize("node_ip, allowed_from_node", [("192.168.0.2", False),
                                                        ("203.0.113.7", True)])
def test_load_balancer_source_ranges(node_ip: str, allowed_from_node: bool) -> None:
    port = svc(K, "172.30.0.41", load_balancer_ips=("1.2.3.4",),
               load_balancer_source_ranges=("203.0.113.0/25",), endpoints=[ep("10.180.0.1")])
    cfg = R.RenderConfig(local_detector=CFG.local_detector, node_ip=node_ip)
    text = render(port, cfg=cfg)
    fw = "KUBE-FW-XPGD46QRK7WJZT7O"
    ext = "KUBE-EXT-XPGD46QRK7WJZT7O"
    expected = [f'-A {fw} -m comment --comment "ns1/svc1:p80 loadbalancer IP"'
                f" -s 203.0.113.0/25 -j {ext}"]
    if allowed_from_node:
        expected.append(f'-A {fw} -m comment --comment "ns1/svc1:p80 loadbalancer IP"'
                        f" -s 1.2.3.4 -j {ext}")
    expected.append(f'-A {fw} -m comment --comment "other traffic to ns1/svc1:p80 will be'
                    ' dropped by KUBE-PROXY-FIREWALL"')
    assert [line for line in table_lines(text, "nat") if line.startswith(f"-A {fw}")] == expected
    assert ('-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 loadbalancer IP" -m tcp -p tcp'
            f" -d 1.2.3.4 --dport 80 -j {fw}") in text
    assert ('-A KUBE-PROXY-FIREWALL -m comment --comment "ns1/svc1:p80 traffic not accepted by'
            f' {fw}" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP') in text
    assert f'-A {ext} -m comment --comment "masquerade traffic for ns1/svc1:p80 external' \
           ' destinations" -j KUBE-MARK-MASQ' in text


def test_masquerade_all_and_interface_detector() -> None:
    port = svc(K, "172.30.0.41", endpoints=[ep("10.180.0.1")])
    text = render(port, cfg=R.RenderConfig(masquerade_all=True, masquerade_mark="0x8000"))
    assert (f'-A {SVC} -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp'
            " -d 172.30.0.41 --dport 80 -j KUBE-MARK-MASQ") in text
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x8000" in text
    text = render(port, cfg=R.RenderConfig(
        local_detector=R.LocalDetector.for_interface("veth+")))
    assert "--dport 80 ! -i veth+ -j KUBE-MARK-MASQ" in text
    # no detector, no masquerade-all: upstream writes no masquerade rule for the cluster IP
    text = render(port, cfg=R.RenderConfig())
    assert not [line for line in text.splitlines()
                if line.startswith(f"-A {SVC}") and "KUBE-MARK-MASQ" in line]


def test_nodeport_addresses_and_localhost() -> None:
    port = svc(K, "172.30.0.41", node_port=3001, endpoints=[ep("10.180.0.1")])
    ips = R.nodeport_addresses(["10.99.0.0/24", "127.0.0.0/8"], ["10.99.0.1", "fd00::1"], 4)
    assert ips == ("10.99.0.1", "127.0.0.1")
    text = render(port, cfg=R.RenderConfig(nodeport_ips=ips))
    tail = [line for line in table_lines(text, "nat") if "KUBE-NODEPORTS" in line
            and line.startswith("-A KUBE-SERVICES")]
    assert [line.split(" -d ")[1] for line in tail] == ["10.99.0.1 -j KUBE-NODEPORTS",
                                                        "127.0.0.1 -j KUBE-NODEPORTS"]
    text = render(port, cfg=R.RenderConfig(nodeport_ips=ips, localhost_nodeports=False))
    assert "-d 127.0.0.1 -j KUBE-NODEPORTS" not in text
    assert "KUBE-FIREWALL" not in text
    text = render(port, cfg=R.RenderConfig(localhost_nodeports=False))
    assert "-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS" in text
    assert R.nodeport_addresses(["primary"], ["10.99.0.1", "fd00::1"], 6) == ("fd00::1",)
    assert R.nodeport_addresses([], ["10.99.0.1"], 4) is None


def test_ipv6() -> None:
    k6 = key("ns1", "svc1", family=6)
    port = svc(k6, "fd00:10:96::1", node_port=3001, endpoints=[ep("fd00:10:244::5")])
    text = render(port, cfg=R.RenderConfig(family=6, localhost_nodeports=False))
    s = R.endpoint_chain(k6.name, "[fd00:10:244::5]:80")
    assert (f"-A {s} -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT"
            " --to-destination [fd00:10:244::5]:80") in text
    assert "-m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS" in text
    assert "KUBE-FIREWALL" not in text


def test_health_check_node_port_and_udp() -> None:
    ku = key("ns2", "dns", "dns", "UDP")
    port = svc(ku, "172.30.0.10", 53, health_check_node_port=30000,
               endpoints=[ep("10.180.0.9", 53)])
    text = render(port)
    assert ('-A KUBE-NODEPORTS -m comment --comment "ns2/dns:dns health check node port"'
            " -m tcp -p tcp --dport 30000 -j ACCEPT") in text
    assert "-m udp -p udp -d 172.30.0.10 --dport 53" in text


def test_large_cluster_mode_drops_endpoint_comments() -> None:
    port = svc(K, "172.30.0.41", endpoints=[ep("10.180.0.1"), ep("10.180.0.2")])
    text = render(port, cfg=R.RenderConfig(large_cluster=True))
    s1 = sep("10.180.0.1:80")
    assert f"-A {SVC} -m statistic --mode random --probability 0.5000000000 -j {s1}" in text
    assert f"-A {s1} -s 10.180.0.1 -j KUBE-MARK-MASQ" in text


def test_hostile_names_are_quoted() -> None:
    k = key("ns", "a", 'x" -j ACCEPT')
    text = render(svc(k, "172.30.0.41", endpoints=[ep("10.180.0.1")]))
    assert '"ns/a:x\\" -j ACCEPT cluster IP"' in text


def test_assemble_partial_writes_only_changed_chains_and_deletes() -> None:
    a = svc(K, "172.30.0.41", endpoints=[ep("10.180.0.1")])
    kb = key("ns1", "svc2")
    b = svc(kb, "172.30.0.42", endpoints=[ep("10.180.0.2")])
    rendered = {a.key: R.render_service(a, CFG), b.key: R.render_service(b, CFG)}
    old_sep = sep("10.180.9.9:80")
    data = R.assemble(rendered, CFG, write_chains_for={kb}, delete_chains=[old_sep])
    text = data.render()
    assert f":{SVC} - [0:0]" not in text  # unchanged: not declared, so not flushed
    assert "-A KUBE-SERVICES" in text and f"-j {SVC}" in text  # but still dispatched to
    assert f":{old_sep} - [0:0]" in text and f"-X {old_sep}" in text
    assert R.render_service(b, CFG).chains[0] in text


def test_node_cidr_detector_uses_the_nodes_pod_cidrs() -> None:
    from kproxy_iptables.proxier import Settings

    class Config:
        def get(self, path: str) -> object:
            return {"detectLocalMode": "NodeCIDR"}.get(path)

    settings = Settings(Config())  # type: ignore[arg-type]
    cidrs = ("10.244.1.0/24", "fd00:1::/64")
    assert settings.local_detector(4, cidrs) == R.LocalDetector.for_cidrs(["10.244.1.0/24"])
    assert settings.local_detector(6, cidrs) == R.LocalDetector.for_cidrs(["fd00:1::/64"])
    assert settings.local_detector(4, ()) == R.LocalDetector()  # no Node yet: no-op
