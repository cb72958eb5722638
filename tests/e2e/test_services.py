"""Real traffic through every Service shape, for every proxy mode, with kproxy as a separate
process fed by the fake API server. Each test creates its own Services (fresh IPs and node
ports) in the module's shared cluster."""

from __future__ import annotations

import pytest
from e2e_harness import (
    PRESERVES_CLIENT_IP,
    Cluster,
    answered,
    eventually,
    fresh_ip,
    fresh_node_port,
    pods_of,
)

from kproxy_core.demo import endpoint_slice_obj, service_obj, svc_port

pytestmark = pytest.mark.root

ALL = {"pod-1-2", "pod-1-3", "pod-2-2"}


def test_cluster_ip_from_pod_node_and_client(cluster: Cluster) -> None:
    ip = fresh_ip()
    cluster.apply(service_obj("cip", ip),
                  endpoint_slice_obj("cip", cluster.eps("pod-1-2", "pod-1-3", "pod-2-2")))
    pod = cluster.pod("pod-1-2")
    replies = cluster.wait_answered_by(pod, ip, 80, ALL, count=24)
    # Pod to another pod: no SNAT, the endpoint sees the client pod's address (the pod that
    # reaches itself is hairpin-SNATed; test_hairpin covers that).
    if cluster.mode != "userspace":
        seen = {r.split()[1] for r in replies if r.split()[0] != pod.name}
        assert seen == {pod.ip}, replies
    cluster.wait_answered_by(cluster.sb.node, ip, 80, ALL, count=24)
    cluster.wait_answered_by(cluster.sb.client, ip, 80, ALL, count=24)


def test_node_port_from_external_client(cluster: Cluster) -> None:
    ip, np = fresh_ip(), fresh_node_port()
    cluster.apply(service_obj("np", ip, [svc_port(80, node_port=np)], type="NodePort"),
                  endpoint_slice_obj("np", cluster.eps("pod-1-2", "pod-2-2")))
    replies = cluster.wait_answered_by(cluster.sb.client, cluster.sb.node_ip, np,
                                       {"pod-1-2", "pod-2-2"}, count=16)
    # externalTrafficPolicy Cluster: SNATed, the endpoints never see the client's address.
    assert all(r.split()[1] != "10.99.0.100" for r in replies), replies
    cluster.wait_answered_by(cluster.pod("pod-1-3"), cluster.sb.node_ip, np,
                             {"pod-1-2", "pod-2-2"}, count=16)


def test_load_balancer_ip_and_source_ranges(cluster: Cluster) -> None:
    allowed_ip, denied_ip = fresh_ip("10.98.0"), fresh_ip("10.98.0")
    eps = cluster.eps("pod-1-2", "pod-1-3")
    cluster.apply(
        service_obj("lb-ok", fresh_ip(), [svc_port(80, node_port=fresh_node_port())],
                    type="LoadBalancer", load_balancer_ips=[allowed_ip],
                    source_ranges=["10.99.0.100/32"]),
        endpoint_slice_obj("lb-ok", eps),
        service_obj("lb-deny", fresh_ip(), [svc_port(80, node_port=fresh_node_port())],
                    type="LoadBalancer", load_balancer_ips=[denied_ip],
                    source_ranges=["192.0.2.0/24"]),
        endpoint_slice_obj("lb-deny", eps),
    )
    cluster.wait_answered_by(cluster.sb.client, allowed_ip, 80, {"pod-1-2", "pod-1-3"})
    # Not in the source ranges: dropped (upstream's KUBE-PROXY-FIREWALL), so no answer at all.
    for _ in range(3):
        reply = cluster.send(cluster.sb.client, denied_ip, 80)[0]
        assert not answered(reply), reply
        if cluster.mode != "userspace":
            assert reply == "timeout", reply


def test_external_ips(cluster: Cluster) -> None:
    ext = fresh_ip("10.98.1")
    cluster.apply(service_obj("ext", fresh_ip(), external_ips=[ext]),
                  endpoint_slice_obj("ext", cluster.eps("pod-1-3", "pod-2-2")))
    cluster.wait_answered_by(cluster.sb.client, ext, 80, {"pod-1-3", "pod-2-2"})


def test_external_traffic_policy_local(cluster: Cluster) -> None:
    ip, np = fresh_ip(), fresh_node_port()
    cluster.apply(service_obj("etp", ip, [svc_port(80, node_port=np)], type="NodePort",
                              external_local=True),
                  endpoint_slice_obj("etp", cluster.eps("pod-1-3", "pod-2-2")))
    # External traffic: only this node's endpoint.
    replies = cluster.wait_answered_by(cluster.sb.client, cluster.sb.node_ip, np, {"pod-1-3"},
                                       count=8)
    if PRESERVES_CLIENT_IP[cluster.mode]:
        # Converged state: ipvs programs the virtual server before the ipset entry that exempts
        # it from masquerade (not atomic as a restore is); seen SNATed in that window in the VM.
        def preserved() -> list[str] | None:
            got = cluster.send(cluster.sb.client, cluster.sb.node_ip, np, 8)
            ok = all(answered(r) for r in got) and {r.split()[1] for r in got} == {"10.99.0.100"}
            return got if ok else None

        eventually("eTP Local NodePort: endpoint sees the client's address", preserved)
        assert pods_of(replies) == {"pod-1-3"}, replies
    # ClusterIP traffic still uses every endpoint.
    cluster.wait_answered_by(cluster.pod("pod-1-2"), ip, 80, {"pod-1-3", "pod-2-2"}, count=16)


def test_external_traffic_policy_local_without_local_endpoints_drops(cluster: Cluster) -> None:
    np = fresh_node_port()
    cluster.apply(service_obj("etp-none", fresh_ip(), [svc_port(80, node_port=np)],
                              type="NodePort", external_local=True),
                  endpoint_slice_obj("etp-none", cluster.eps("pod-2-2")))
    # Upstream DROPs; userspace never had eTP Local upstream, so only "no answer" is required.
    cluster.wait_not_answered(cluster.sb.client, cluster.sb.node_ip, np,
                              {"timeout"} if cluster.mode != "userspace" else None)


def test_internal_traffic_policy_local(cluster: Cluster) -> None:
    ip = fresh_ip()
    cluster.apply(service_obj("itp", ip, internal_local=True),
                  endpoint_slice_obj("itp", cluster.eps("pod-1-3", "pod-2-2")))
    cluster.wait_answered_by(cluster.pod("pod-1-2"), ip, 80, {"pod-1-3"}, count=8)


def test_session_affinity(cluster: Cluster) -> None:
    ip = fresh_ip()
    cluster.apply(service_obj("sticky", ip, affinity_timeout=300),
                  endpoint_slice_obj("sticky", cluster.eps("pod-1-2", "pod-1-3", "pod-2-2")))
    pod = cluster.pod("pod-1-2")
    eventually("sticky service answers", lambda: answered(cluster.send(pod, ip, 80)[0]))
    replies = cluster.send(pod, ip, 80, 12)
    assert all(answered(r) for r in replies), replies
    assert len(pods_of(replies)) == 1, replies
    # Another client is free to land elsewhere, but sticks too.
    other = cluster.send(cluster.sb.node, ip, 80, 8)
    assert len(pods_of(other)) == 1, other


def test_no_endpoints_rejects(cluster: Cluster) -> None:
    ip = fresh_ip()
    cluster.apply(service_obj("empty", ip), endpoint_slice_obj("empty", []))
    # REJECT: refused at once, not a timeout.
    cluster.wait_not_answered(cluster.pod("pod-1-2"), ip, 80, {"refused"})
    # Endpoints appear: the service starts answering.
    cluster.apply(endpoint_slice_obj("empty", cluster.eps("pod-2-2")))
    cluster.wait_answered_by(cluster.pod("pod-1-2"), ip, 80, {"pod-2-2"})


def test_terminating_endpoints_used_only_as_fallback(cluster: Cluster) -> None:
    ip = fresh_ip()
    terminating = cluster.eps("pod-1-3", "pod-2-2", ready=False, serving=True, terminating=True)
    cluster.apply(service_obj("term", ip),
                  endpoint_slice_obj("term", [*cluster.eps("pod-1-2"), *terminating]))
    cluster.wait_answered_by(cluster.sb.client, ip, 80, {"pod-1-2"}, count=8)
    # The last ready endpoint goes: serving-terminating endpoints take over.
    cluster.apply(endpoint_slice_obj("term", terminating))
    cluster.wait_answered_by(cluster.sb.client, ip, 80, {"pod-1-3", "pod-2-2"}, count=16)


def test_udp(cluster: Cluster) -> None:
    ip, np = fresh_ip(), fresh_node_port()
    cluster.apply(
        service_obj("dns", ip, [svc_port(53, name="dns", protocol="UDP", node_port=np)],
                    type="NodePort"),
        endpoint_slice_obj("dns", cluster.eps("pod-1-2", "pod-2-2"),
                           ports=[("dns", 8080, "UDP")]),
    )
    cluster.wait_answered_by(cluster.pod("pod-1-3"), ip, 53, {"pod-1-2", "pod-2-2"}, count=16,
                             proto="udp")
    cluster.wait_answered_by(cluster.sb.client, cluster.sb.node_ip, np, {"pod-1-2", "pod-2-2"},
                             count=16, proto="udp")


def test_hairpin(cluster: Cluster) -> None:
    ip = fresh_ip()
    pod = cluster.pod("pod-1-2")
    cluster.apply(service_obj("self", ip), endpoint_slice_obj("self", cluster.eps("pod-1-2")))
    replies = cluster.wait_answered_by(pod, ip, 80, {"pod-1-2"}, count=4)
    # A pod reaching itself through its service only works when SNATed away from its own IP.
    assert all(r.split()[1] != pod.ip for r in replies), replies


def test_endpoint_churn_converges(cluster: Cluster) -> None:
    ip = fresh_ip()
    pod = cluster.pod("pod-1-3")
    cluster.apply(service_obj("churn", ip),
                  endpoint_slice_obj("churn", cluster.eps("pod-1-2", "pod-1-3", "pod-2-2")))
    cluster.wait_answered_by(pod, ip, 80, ALL, count=24)
    for names in (("pod-2-2",), ("pod-1-2", "pod-2-2"), ("pod-1-3",), ("pod-1-2", "pod-1-3")):
        cluster.apply(endpoint_slice_obj("churn", cluster.eps(*names)))
        cluster.wait_answered_by(pod, ip, 80, set(names), count=8 * len(names))
    # Deleting the Service removes its rules: nothing answers at that IP any more.
    cluster.delete(service_obj("churn", ip))
    eventually("deleted service stops answering",
               lambda: not answered(cluster.send(pod, ip, 80)[0]))
