# ruff: noqa: E501  (fixtures are verbatim upstream-shaped iptables-save text)
"""The packet tracer on hand-written, upstream-shaped rule sets."""

from __future__ import annotations

import pytest

from kproxy_core.testing.iptables_save import check_consistency, parse_iptables_save
from kproxy_core.testing.tracer import TraceError, trace

NODE_IP = "192.168.0.2"
POD_CIDR = "10.0.0.0/8"

# svc1: ClusterIP 172.30.0.41:80, NodePort 3001, two endpoints (10.180.0.1 with affinity).
# svc2: ClusterIP 172.30.0.42:80 with no endpoints (filter REJECT).
# svc3: NodePort 3003 with externalTrafficPolicy Local and no local endpoint.
# svc5: LoadBalancer 5.6.7.8:80 with source ranges allowing 203.0.113.0/24.
RULES = """
*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns3/svc3:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3003 -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-5" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SVC-1 - [0:0]
:KUBE-EXT-1 - [0:0]
:KUBE-SEP-1A - [0:0]
:KUBE-SEP-1B - [0:0]
:KUBE-SVC-3 - [0:0]
:KUBE-EXT-3 - [0:0]
:KUBE-SEP-3A - [0:0]
:KUBE-SVC-5 - [0:0]
:KUBE-EXT-5 - [0:0]
:KUBE-FW-5 - [0:0]
:KUBE-SEP-5A - [0:0]
-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-1
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-3
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-1
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-3
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-5
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-5
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-EXT-1 -m comment --comment "masquerade traffic for ns1/svc1:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-1 -j KUBE-SVC-1
-A KUBE-SVC-1 -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-1 -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m recent --name KUBE-SEP-1A --rcheck --seconds 10800 --reap -j KUBE-SEP-1A
-A KUBE-SVC-1 -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-1A
-A KUBE-SVC-1 -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-1B
-A KUBE-SEP-1A -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-1A -m comment --comment ns1/svc1:p80 -m recent --name KUBE-SEP-1A --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-1B -m comment --comment ns1/svc1:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A KUBE-SEP-1B -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-EXT-3 -m comment --comment "pod traffic for ns3/svc3:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-3
-A KUBE-EXT-3 -m comment --comment "masquerade LOCAL traffic for ns3/svc3:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-3 -m comment --comment "route LOCAL traffic for ns3/svc3:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-3
-A KUBE-SVC-3 -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-3 -m comment --comment "ns3/svc3:p80 -> 10.180.1.1:80" -j KUBE-SEP-3A
-A KUBE-SEP-3A -m comment --comment ns3/svc3:p80 -s 10.180.1.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-3A -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.1.1:80
-A KUBE-FW-5 -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/24 -j KUBE-EXT-5
-A KUBE-FW-5 -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-EXT-5 -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-5 -j KUBE-SVC-5
-A KUBE-SVC-5 -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-5 -m comment --comment "ns5/svc5:p80 -> 10.180.2.1:80" -j KUBE-SEP-5A
-A KUBE-SEP-5A -m comment --comment ns5/svc5:p80 -s 10.180.2.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-5A -m comment --comment ns5/svc5:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.2.1:80
COMMIT
"""

TABLES = parse_iptables_save(RULES)
BOTH = ["10.180.0.1:80", "10.180.0.2:80"]


def go(source: str, dest: str, port: int, protocol: str = "TCP", *, local: bool = False
       ) -> tuple[list[str], bool, str]:
    result = trace(TABLES, source_ip=source, protocol=protocol, dest_ip=dest, dest_port=port,
                   node_ips=[NODE_IP], local_source=local)
    return result.endpoints, result.masquerade, result.verdict


def test_fixture_is_consistent() -> None:
    assert check_consistency(TABLES) == []


@pytest.mark.parametrize(("name", "source", "dest", "port", "local", "expected"), [
    ("pod to cluster IP", "10.0.0.2", "172.30.0.41", 80, False, (BOTH, False, "ACCEPT")),
    ("outside to cluster IP", "192.168.1.5", "172.30.0.41", 80, False, (BOTH, True, "ACCEPT")),
    ("wrong port", "10.0.0.2", "172.30.0.41", 81, False, ([], False, "ACCEPT")),
    ("nodeport from outside", "192.168.1.5", NODE_IP, 3001, False, (BOTH, True, "ACCEPT")),
    ("nodeport from the node", NODE_IP, NODE_IP, 3001, True, (BOTH, True, "ACCEPT")),
    ("no endpoints", "10.0.0.2", "172.30.0.42", 80, False, ([], False, "REJECT")),
    ("eTP Local without local endpoint", "192.168.1.5", NODE_IP, 3003, False,
     ([], False, "DROP")),
    ("eTP Local from a pod is short-circuited", "10.0.0.2", NODE_IP, 3003, False,
     (["10.180.1.1:80"], False, "ACCEPT")),
    ("eTP Local from the node is masqueraded", NODE_IP, NODE_IP, 3003, True,
     (["10.180.1.1:80"], True, "ACCEPT")),
    ("LB from allowed range", "203.0.113.9", "5.6.7.8", 80, False,
     (["10.180.2.1:80"], True, "ACCEPT")),
    ("LB from elsewhere", "198.51.100.1", "5.6.7.8", 80, False, ([], False, "DROP")),
])
def test_trace(name: str, source: str, dest: str, port: int, local: bool,
               expected: tuple[list[str], bool, str]) -> None:
    assert go(source, dest, port, local=local) == expected, name


def test_udp_does_not_match_tcp_service() -> None:
    assert go("10.0.0.2", "172.30.0.41", 80, "UDP") == ([], False, "ACCEPT")


def test_hairpin_is_masqueraded_only_on_its_own_path() -> None:
    result = trace(TABLES, source_ip="10.180.0.1", protocol="TCP", dest_ip="172.30.0.41",
                   dest_port=80, node_ips=[NODE_IP])
    assert result.endpoints == BOTH and result.masquerade
    per_endpoint = {p.endpoint: p.masquerade for p in result.paths}
    assert per_endpoint == {"10.180.0.1:80": True, "10.180.0.2:80": False}
    assert result.chains_visited[:3] == ["nat/KUBE-SERVICES", "nat/KUBE-SVC-1",
                                         "nat/KUBE-SEP-1A"]
    assert "filter/KUBE-FORWARD" in result.chains_visited


IPVS = """
*nat
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-NODE-PORT - [0:0]
-A KUBE-SERVICES ! -s 10.0.0.0/8 -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade purpose" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -j MASQUERADE
COMMIT
"""


@pytest.mark.parametrize(("source", "dest", "port", "masq"), [
    ("192.168.1.5", "172.30.0.41", 80, True),
    ("10.0.0.2", "172.30.0.41", 80, False),
    ("192.168.1.5", "172.30.0.41", 81, False),
    ("10.0.0.2", NODE_IP, 30080, True),
    ("10.0.0.2", NODE_IP, 30081, False),
])
def test_ipsets(source: str, dest: str, port: int, masq: bool) -> None:
    result = trace(parse_iptables_save(IPVS), source_ip=source, protocol="TCP", dest_ip=dest,
                   dest_port=port, node_ips=[NODE_IP],
                   ipsets={"KUBE-CLUSTER-IP": ["172.30.0.41,tcp:80", "172.30.0.50,udp:53"],
                           "KUBE-NODE-PORT-TCP": ["30080"]})
    assert (result.endpoints, result.masquerade, result.verdict) == ([], masq, "ACCEPT")


def test_missing_ipset_and_unknown_match_are_errors() -> None:
    with pytest.raises(TraceError, match="ipset KUBE-CLUSTER-IP is not in the ipsets"):
        trace(parse_iptables_save(IPVS), source_ip="1.2.3.4", protocol="TCP",
              dest_ip="172.30.0.41", dest_port=80, node_ips=[NODE_IP])
    odd = parse_iptables_save("*nat\n:KUBE-SERVICES - [0:0]\n"
                              "-A KUBE-SERVICES -m time --timestart 09:00 -j RETURN\nCOMMIT\n")
    with pytest.raises(TraceError, match="cannot evaluate -m time --timestart"):
        trace(odd, source_ip="1.2.3.4", protocol="TCP", dest_ip="172.30.0.41", dest_port=80,
              node_ips=[NODE_IP])
    with pytest.raises(ValueError, match="protocol must be"):
        trace(odd, source_ip="1.2.3.4", protocol="ICMP", dest_ip="1.1.1.1", dest_port=0,
              node_ips=[])


def test_explicit_builtin_jumps_policies_goto_and_redirect() -> None:
    tables = parse_iptables_save("""
*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-OK - [0:0]
-A INPUT -p udp -m udp --dport 53 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-PORTALS-CONTAINER - [0:0]
:KUBE-G - [0:0]
-A PREROUTING -j KUBE-PORTALS-CONTAINER
-A KUBE-PORTALS-CONTAINER -d 172.30.0.41/32 -p tcp -m tcp --dport 80 -g KUBE-G
-A KUBE-PORTALS-CONTAINER -d 172.30.0.53/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 40053
-A KUBE-G -j RETURN
COMMIT
""")
    # goto then RETURN skips the rest of KUBE-PORTALS-CONTAINER; INPUT's policy drops it
    # only if it is for the node: 172.30.0.41 is forwarded (FORWARD policy ACCEPT).
    forwarded = trace(tables, source_ip="10.0.0.2", protocol="TCP", dest_ip="172.30.0.41",
                      dest_port=80, node_ips=[NODE_IP])
    assert (forwarded.endpoints, forwarded.verdict) == ([], "ACCEPT")
    redirected = trace(tables, source_ip="10.0.0.2", protocol="UDP", dest_ip="172.30.0.53",
                       dest_port=53, node_ips=[NODE_IP])
    # REDIRECT lands on the node, where INPUT accepts only port 53: 40053 hits policy DROP.
    assert (redirected.endpoints, redirected.verdict) == ([f"{NODE_IP}:40053"], "DROP")
    to_node = trace(tables, source_ip="10.0.0.2", protocol="UDP", dest_ip=NODE_IP,
                    dest_port=53, node_ips=[NODE_IP])
    assert to_node.verdict == "ACCEPT"
