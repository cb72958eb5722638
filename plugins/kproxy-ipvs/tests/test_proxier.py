"""IpvsProxier logic against `FakeKernel`: what is programmed and how little a change touches."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from fake_kernel import FakeKernel
from ipvs_helpers import FakeConfig, context, ep, key, request, svc, view
from kproxy_ipvs import plugin, rules
from kproxy_ipvs.cleanup import cleanup
from kproxy_ipvs.netlink import DestStats
from kproxy_ipvs.proxier import IpvsProxier, resolve_scheduler
from kproxy_ipvs.rules import RealServer, VSKey

from kproxy_core.backend import BackendUnavailable, SyncError
from kproxy_core.options import OptionRegistry

CONFIG = {"clusterCIDR": "10.244.0.0/16"}


def make(config: dict[str, Any] | None = None, families: tuple[int, ...] = (4,)
         ) -> tuple[IpvsProxier, FakeKernel]:
    kernel = FakeKernel()
    return IpvsProxier(context({**CONFIG, **(config or {})}, families), kernel=kernel), kernel


def reals(kernel: FakeKernel, vs: VSKey) -> dict[str, int]:
    return {str(r): s.weight for r, s in kernel.dests[vs].items()}


WEB = svc("web", "10.96.0.10", 80, (ep("10.244.1.2"), ep("10.244.2.2", local=False)),
          node_port=30080)


def test_full_sync_programs_services_addresses_sets_and_rules() -> None:
    proxier, kernel = make()
    result = proxier.sync(request(view(WEB)))
    cip = VSKey("TCP", "10.96.0.10", 80)
    assert kernel.services[cip].scheduler == "rr"
    assert reals(kernel, cip) == {"10.244.1.2:8080": 1, "10.244.2.2:8080": 1}
    # NodePort on every node address (not on kube-ipvs0), not bound to the dummy.
    assert set(kernel.services) == {cip, VSKey("TCP", "10.99.0.1", 30080),
                                    VSKey("TCP", "192.168.5.5", 30080)}
    assert kernel.links["kube-ipvs0"] == {"10.96.0.10"}
    assert kernel.sets["KUBE-CLUSTER-IP"][1] == {"10.96.0.10,tcp:80"}
    assert kernel.sets["KUBE-NODE-PORT-TCP"][1] == {"30080"}
    assert kernel.sets["KUBE-LOOP-BACK"][1] == {"10.244.1.2,tcp:8080,10.244.1.2"}
    assert kernel.sets["KUBE-IPVS-IPS"][1] == {"10.96.0.10"}
    assert len(kernel.sets) == len(rules.SETS)
    text = kernel.restored[-1].render()
    assert ("-A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for "
            "masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 "
            "-j KUBE-MARK-MASQ") in text
    assert "-A KUBE-NODE-PORT -p tcp" in text and "KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ" in text
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000" in text
    assert "KUBE-LOAD-BALANCER-LOCAL" not in text  # empty sets get no rule, as upstream
    assert (4, "nat", "PREROUTING", ("-m", "comment", "--comment", "kubernetes service portals",
                                     "-j", "KUBE-SERVICES")) in kernel.jumps
    assert kernel.sysctls["net/ipv4/vs/conntrack"] == "1"
    assert result.objects_written == len(kernel.writes) + 1  # + one iptables-restore


def test_one_endpoint_change_touches_one_real_server_per_virtual_server() -> None:
    proxier, kernel = make()
    other = svc("other", "10.96.0.20", 53, (ep("10.244.2.3", 53, local=False),), protocol="UDP")
    first = view(WEB, other)
    proxier.sync(request(first))
    kernel.writes.clear()
    restores = len(kernel.restored)
    changed = svc("web", "10.96.0.10", 80, (ep("10.244.1.2"), ep("10.244.2.2", local=False),
                                            ep("10.244.2.9", local=False)), node_port=30080)
    result = proxier.sync(request(view(changed, other), first))
    # Three virtual servers (ClusterIP + two NodePort addresses) gain one real server each.
    assert sorted(kernel.writes) == sorted(
        f"add_dest {vs} 10.244.2.9:8080" for vs in ("TCP/10.96.0.10:80", "TCP/10.99.0.1:30080",
                                                    "TCP/192.168.5.5:30080"))
    assert result.objects_written == 3
    assert result.counters["real_servers"] == 10 == sum(len(d) for d in kernel.dests.values())
    assert len(kernel.restored) == restores  # same sets in use: no iptables write


def test_removed_tcp_endpoint_drains_then_goes() -> None:
    proxier, kernel = make()
    one = svc("web", "10.96.0.10", 80, (ep("10.244.1.2"), ep("10.244.1.3")))
    two = svc("web", "10.96.0.10", 80, (ep("10.244.1.3"),))
    proxier.sync(request(view(one)))
    cip = VSKey("TCP", "10.96.0.10", 80)
    kernel.dests[cip][RealServer("10.244.1.2", 8080)] = DestStats(1, 2, 0)  # live connections
    proxier.sync(request(view(two), view(one)))
    assert reals(kernel, cip) == {"10.244.1.2:8080": 0, "10.244.1.3:8080": 1}
    assert proxier.poll_graceful() == 1
    # Coming back while draining restores weight 1 instead of adding it twice.
    proxier.sync(request(view(one), view(two)))
    assert reals(kernel, cip) == {"10.244.1.2:8080": 1, "10.244.1.3:8080": 1}
    assert proxier.poll_graceful() == 0
    proxier.sync(request(view(two), view(one)))
    assert proxier.poll_graceful() == 1
    kernel.dests[cip][RealServer("10.244.1.2", 8080)] = DestStats(0, 0, 0)
    assert proxier.poll_graceful() == 0
    assert reals(kernel, cip) == {"10.244.1.3:8080": 1}


def test_graceful_termination_timer_deletes_drained_servers_between_syncs() -> None:
    kernel = FakeKernel()
    proxier = IpvsProxier(context(CONFIG), kernel=kernel, graceful_period=0.02)
    one = svc("web", "10.96.0.10", 80, (ep("10.244.1.2"), ep("10.244.1.3")))
    two = svc("web", "10.96.0.10", 80, (ep("10.244.1.3"),))
    proxier.sync(request(view(one)))
    cip = VSKey("TCP", "10.96.0.10", 80)
    kernel.dests[cip][RealServer("10.244.1.2", 8080)] = DestStats(1, 1, 0)
    proxier.sync(request(view(two), view(one)))
    assert reals(kernel, cip) == {"10.244.1.2:8080": 0, "10.244.1.3:8080": 1}
    with proxier._lock:  # the connection ends (as the kernel would report it)
        kernel.dests[cip][RealServer("10.244.1.2", 8080)] = DestStats(0, 0, 0)
    deadline = time.monotonic() + 30
    while reals(kernel, cip) != {"10.244.1.3:8080": 1} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reals(kernel, cip) == {"10.244.1.3:8080": 1}
    assert proxier._timer is not None and proxier._timer.name == "kproxy-ipvs-graceful"
    proxier.close()
    assert proxier._timer is None


def test_idle_tcp_endpoint_goes_at_once_like_upstream() -> None:
    proxier, kernel = make()
    one = svc("web", "10.96.0.10", 80, (ep("10.244.1.2"), ep("10.244.1.3")))
    two = svc("web", "10.96.0.10", 80, (ep("10.244.1.3"), ep("10.244.1.4")))
    proxier.sync(request(view(one)))
    kernel.writes.clear()
    result = proxier.sync(request(view(two), view(one)))
    # No weight-0 step for a real server without connections: one add, one delete (and the
    # hairpin entries of both).
    cip = "TCP/10.96.0.10:80"
    assert [w for w in kernel.writes if "dest" in w] == [
        f"add_dest {cip} 10.244.1.4:8080", f"del_dest {cip} 10.244.1.2:8080"]
    assert result.counters["real_server_add"] == 1 and result.counters["real_server_del"] == 1
    assert "real_server_update" not in result.counters


def test_removed_udp_endpoint_goes_at_once() -> None:
    proxier, kernel = make()
    one = svc("dns", "10.96.0.10", 53, (ep("10.244.1.2", 53), ep("10.244.1.3", 53)),
              protocol="UDP")
    two = svc("dns", "10.96.0.10", 53, (ep("10.244.1.3", 53),), protocol="UDP")
    proxier.sync(request(view(one)))
    proxier.sync(request(view(two), view(one)))
    assert reals(kernel, VSKey("UDP", "10.96.0.10", 53)) == {"10.244.1.3:53": 1}


def test_service_removal_cleans_shared_address_only_when_unused() -> None:
    proxier, kernel = make()
    a = svc("a", "10.96.0.10", 80, (ep("10.244.1.2"),))
    b = svc("a2", "10.96.0.10", 443, (ep("10.244.1.2", 8443),))
    both = view(a, b)
    proxier.sync(request(both))
    proxier.sync(request(view(a), both))
    assert kernel.links["kube-ipvs0"] == {"10.96.0.10"}
    assert set(kernel.services) == {VSKey("TCP", "10.96.0.10", 80)}
    proxier.sync(request(view(), view(a)))
    assert kernel.links["kube-ipvs0"] == set()
    assert kernel.services == {}
    assert kernel.sets["KUBE-IPVS-IPS"][1] == set()


def test_full_sync_repairs_kernel_drift_and_keeps_excluded() -> None:
    proxier, kernel = make({"ipvs.excludeCIDRs": ("10.200.0.0/16",)})
    proxier.sync(request(view(WEB)))
    stranger = rules.VirtualServer(VSKey("TCP", "10.200.0.1", 80), "rr")
    leftover = rules.VirtualServer(VSKey("TCP", "10.96.9.9", 80), "rr")
    kernel.add_service(stranger)
    kernel.add_service(leftover)
    kernel.del_dest(VSKey("TCP", "10.96.0.10", 80), RealServer("10.244.1.2", 8080))
    kernel.sets["KUBE-CLUSTER-IP"][1].add("10.96.9.9,tcp:80")
    kernel.writes.clear()
    proxier.sync(request(view(WEB), view(WEB), full=True))
    assert stranger.key in kernel.services and leftover.key not in kernel.services
    assert "add_dest TCP/10.96.0.10:80 10.244.1.2:8080" in kernel.writes
    assert kernel.sets["KUBE-CLUSTER-IP"][1] == {"10.96.0.10,tcp:80"}


def test_affinity_scheduler_and_local_policy() -> None:
    proxier, kernel = make({"ipvs.scheduler": "lc"})
    port = svc("web", "10.96.0.10", 80, (ep("10.244.1.2"), ep("10.244.2.2", local=False)),
               node_port=30080, local_only_external=True, session_affinity_timeout=300,
               external_ips=("10.98.0.7",), load_balancer_ips=("10.98.0.1",),
               load_balancer_source_ranges=("10.99.0.0/24",), health_check_node_port=32000)
    proxier.sync(request(view(port)))
    vs = kernel.services[VSKey("TCP", "10.96.0.10", 80)]
    assert (vs.scheduler, vs.flags, vs.timeout) == ("lc", rules.FLAG_PERSISTENT, 300)
    assert reals(kernel, VSKey("TCP", "10.99.0.1", 30080)) == {"10.244.1.2:8080": 1}
    assert reals(kernel, VSKey("TCP", "10.96.0.10", 80)) == {"10.244.1.2:8080": 1,
                                                            "10.244.2.2:8080": 1}
    assert kernel.sets["KUBE-NODE-PORT-LOCAL-TCP"][1] == {"30080"}
    assert kernel.sets["KUBE-EXTERNAL-IP-LOCAL"][1] == {"10.98.0.7,tcp:80"}
    assert kernel.sets["KUBE-LOAD-BALANCER-LOCAL"][1] == {"10.98.0.1,tcp:80"}
    assert kernel.sets["KUBE-LOAD-BALANCER-SOURCE-CIDR"][1] == {"10.98.0.1,tcp:80,10.99.0.0/24"}
    # The node (10.99.0.1) is inside the range: LB traffic from the node itself is allowed.
    assert kernel.sets["KUBE-LOAD-BALANCER-SOURCE-IP"][1] == {"10.98.0.1,tcp:80,10.98.0.1"}
    assert kernel.sets["KUBE-HEALTH-CHECK-NODE-PORT"][1] == {"32000"}
    assert kernel.links["kube-ipvs0"] == {"10.96.0.10", "10.98.0.7", "10.98.0.1"}


def test_local_policy_without_local_endpoints_drops_external_clients_only() -> None:
    proxier, kernel = make()
    remote = svc("web", "10.96.0.10", 80, (ep("10.244.2.2", local=False),), node_port=30080,
                 local_only_external=True, external_ips=("10.98.0.7",))
    proxier.sync(request(view(remote)))
    # As upstream: the node and its pods still reach the cluster endpoints...
    assert reals(kernel, VSKey("TCP", "10.99.0.1", 30080)) == {"10.244.2.2:8080": 1}
    assert reals(kernel, VSKey("TCP", "10.98.0.7", 80)) == {"10.244.2.2:8080": 1}
    # ...and new connections from elsewhere are dropped before IPVS schedules them.
    text = kernel.restored[-1].render()
    tail = "! -s 10.244.0.0/16 -m addrtype ! --src-type LOCAL -j DROP"
    head = ('-A KUBE-PROXY-FIREWALL -m comment --comment "default/web:p has no local endpoints" '
            "-m conntrack --ctstate NEW")
    assert f"{head} -m addrtype --dst-type LOCAL -p tcp --dport 30080 {tail}" in text
    assert f"{head} -d 10.98.0.7 -p tcp --dport 80 {tail}" in text
    # A local endpoint appears: the drops go (one restore) and only it serves external traffic.
    restores = len(kernel.restored)
    local = svc("web", "10.96.0.10", 80, (ep("10.244.1.2"), ep("10.244.2.2", local=False)),
                node_port=30080, local_only_external=True, external_ips=("10.98.0.7",))
    proxier.sync(request(view(local), view(remote)))
    assert len(kernel.restored) == restores + 1
    assert "has no local endpoints" not in kernel.restored[-1].render()
    # (the remote one drained at once: the fake kernel has no connections to it)
    assert reals(kernel, VSKey("TCP", "10.99.0.1", 30080)) == {"10.244.1.2:8080": 1}
    # No endpoints at all: nothing to drop, the empty virtual servers reject.
    proxier.sync(request(view(svc("web", "10.96.0.10", 80, (), node_port=30080,
                                  local_only_external=True)), view(local)))
    assert "has no local endpoints" not in kernel.restored[-1].render()


CIP_MASQ = ('-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for '
            'masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst')


@pytest.mark.parametrize(("config", "pod_cidrs", "not_local"), [
    ({"detectLocalMode": "ClusterCIDR"}, (), "! -s 10.244.0.0/16"),
    ({"detectLocalMode": "NodeCIDR"}, ("fd00:244:1::/64", "10.244.1.0/24"), "! -s 10.244.1.0/24"),
    ({"detectLocalMode": "BridgeInterface", "detectLocal.bridgeInterface": "cbr0"}, (),
     "! -i cbr0"),
    ({"detectLocalMode": "InterfaceNamePrefix", "detectLocal.interfaceNamePrefix": "veth"}, (),
     "! -i veth+"),
])
def test_every_detect_local_mode_renders_the_cores_answer(
        config: dict[str, Any], pod_cidrs: tuple[str, ...], not_local: str) -> None:
    proxier, kernel = make(config)
    remote = svc("web", "10.96.0.10", 80, (ep("10.244.2.2", local=False),), node_port=30080,
                 local_only_external=True)
    proxier.sync(request(view(remote, pod_cidrs=pod_cidrs)))
    text = kernel.restored[-1].render()
    # Off-node/off-cluster traffic to a cluster IP is masqueraded (upstream's only use of the
    # detector in IPVS mode)...
    assert f"{CIP_MASQ} {not_local} -j KUBE-MARK-MASQ\n" in text
    # ...and the same "not local" decides who counts as external for eTP Local's drop.
    assert (f"--dport 30080 {not_local} -m addrtype ! --src-type LOCAL -j DROP") in text


def test_detect_local_without_an_answer_masquerades_node_traffic_only() -> None:
    # NodeCIDR before the Node object has pod CIDRs (and ClusterCIDR without clusterCIDR):
    # upstream's no-op detector, which masquerades only traffic sourced from a VIP.
    for config in ({"detectLocalMode": "NodeCIDR"}, {"clusterCIDR": ""}):
        proxier, kernel = make(config)
        proxier.sync(request(view(WEB)))
        text = kernel.restored[-1].render()
        assert f"{CIP_MASQ.replace('dst,dst', 'src,dst')} -j KUBE-MARK-MASQ" in text
        assert " ! -s " not in text and " ! -i " not in text


def test_node_pod_cidrs_arriving_later_rewrite_the_rules() -> None:
    proxier, kernel = make({"detectLocalMode": "NodeCIDR"})
    proxier.sync(request(view(WEB)))
    assert " ! -s " not in kernel.restored[-1].render()
    restores = len(kernel.restored)
    proxier.sync(request(view(WEB, pod_cidrs=("10.244.1.0/24",)), view(WEB)))
    assert len(kernel.restored) == restores + 1
    assert "dst,dst ! -s 10.244.1.0/24 -j KUBE-MARK-MASQ" in kernel.restored[-1].render()


def test_unknown_detect_local_mode_is_one_clear_error() -> None:
    with pytest.raises(BackendUnavailable, match="detectLocalMode must be one of"):
        make({"detectLocalMode": "PodCIDR"})


def test_first_sync_adds_new_objects_in_bulk_and_counts_each() -> None:
    proxier, kernel = make()
    ports = [svc(f"s{i}", f"10.96.1.{i}", 80, (ep(f"10.244.2.{i}", local=False),))
             for i in range(1, 41)]
    result = proxier.sync(request(view(*ports)))
    # Virtual + real servers, addresses, and each non-empty set: one bulk call each.
    assert kernel.bulk_calls == 4
    assert result.counters["virtual_server_add"] == 40
    assert result.counters["real_server_add"] == 40
    assert result.counters["address_add"] == 40
    assert result.counters["set_entry_add"] == 80  # KUBE-CLUSTER-IP and KUBE-IPVS-IPS
    assert result.objects_written == len(kernel.writes) + 1


def test_every_set_ensured_in_one_call_and_iptables_after_the_bulk_steps() -> None:
    proxier, kernel = make(families=(4, 6))
    kernel.sets["KUBE-CLUSTER-IP"] = ("hash:ip", set())  # someone else's set of another type
    with pytest.raises(SyncError, match="KUBE-CLUSTER-IP"):
        proxier.sync(request(view(WEB)))
    assert not kernel.restored  # nothing of iptables before the first sync gets that far
    del kernel.sets["KUBE-CLUSTER-IP"]
    kernel.steps.clear()
    proxier.sync(request(view(WEB)))
    assert set(kernel.sets) == {rules.set_name(spec.name, family)
                                for spec in rules.SETS for family in (4, 6)}
    assert kernel.restored and kernel.jumps
    # The restores (one per family, jumps included) only once the bulk netlink steps ended.
    assert sorted(kernel.steps[-2:]) == ["restore", "restore"]
    assert {"add_services", "add_addresses", "add_entries"} <= set(kernel.steps[:-2])


def test_sets_just_created_are_not_listed_and_existing_ones_are() -> None:
    proxier, kernel = make()
    kernel.sets["KUBE-CLUSTER-IP"] = ("hash:ip,port", {"10.96.9.9,tcp:80"})  # a leftover
    proxier.sync(request(view(WEB)))
    # Only the set that was there is read (and its stale entry removed); the ones created
    # by this sync are known to be empty.
    assert kernel.listed == ["KUBE-CLUSTER-IP"]
    assert "10.96.9.9,tcp:80" not in kernel.sets["KUBE-CLUSTER-IP"][1]
    kernel.listed.clear()
    proxier.sync(request(view(WEB), view(WEB), full=True))
    assert sorted(kernel.listed) == sorted(rules.set_name(spec.name, 4) for spec in rules.SETS)


def test_ipv6_sets_use_the_kube_6_prefix() -> None:
    proxier, kernel = make(families=(4, 6))
    kernel.local.append("fd00::1")
    proxier.sync(request(view(svc("v6", "fd00:96::10", 80, (ep("fd00:244::2"),)))))
    assert kernel.sets["KUBE-6-CLUSTER-IP"][1] == {"fd00:96::10,tcp:80"}
    assert kernel.sets["KUBE-CLUSTER-IP"][1] == set()
    assert {d.family for d in kernel.restored} == {4, 6}
    assert "::1/128 -j RETURN" in next(d for d in kernel.restored if d.family == 6).render()


def test_timeouts_strict_arp_and_masquerade_all() -> None:
    proxier, kernel = make({"ipvs.tcpTimeout": 900.0, "ipvs.udpTimeout": 30.0,
                            "ipvs.strictARP": True, "iptables.masqueradeAll": True})
    proxier.sync(request(view(WEB)))
    assert kernel.timeouts == (900, 0, 30)
    assert kernel.sysctls["net/ipv4/conf/all/arp_ignore"] == "1"
    assert kernel.sysctls["net/ipv4/conf/all/arp_announce"] == "2"
    assert "KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ" in kernel.restored[-1].render()


def test_scheduler_names() -> None:
    algorithms = list(context().plugins.algorithms())
    assert resolve_scheduler("", algorithms) == "rr"
    assert resolve_scheduler("wlc", algorithms) == "wlc"
    mapped = [a for a in algorithms if a.ipvs_scheduler]
    assert mapped and resolve_scheduler(mapped[0].name, algorithms) == mapped[0].ipvs_scheduler
    with pytest.raises(BackendUnavailable, match="unknown IPVS scheduler 'fastest'"):
        resolve_scheduler("fastest", algorithms)


def test_scheduler_missing_in_kernel_is_a_clear_error() -> None:
    proxier, _kernel = make({"ipvs.scheduler": "nq"})
    with pytest.raises(BackendUnavailable, match="'nq' is not available"):
        proxier.sync(request(view(WEB)))


def test_options_are_upstreams() -> None:
    registry = OptionRegistry()
    plugin.kproxy_add_options(registry)
    flags = {o.flag: o for o in registry}
    assert set(flags) == {"--ipvs-scheduler", "--ipvs-sync-period", "--ipvs-min-sync-period",
                          "--ipvs-strict-arp", "--ipvs-exclude-cidrs", "--ipvs-tcp-timeout",
                          "--ipvs-tcpfin-timeout", "--ipvs-udp-timeout"}
    assert flags["--ipvs-sync-period"].path == "ipvs.syncPeriod"
    assert flags["--ipvs-sync-period"].parse("1m0s") == 60.0
    assert flags["--ipvs-exclude-cidrs"].parse("10.0.0.0/8,fd00::/8") == ("10.0.0.0/8",
                                                                          "fd00::/8")
    assert all(o.owner == "ipvs" for o in registry)


def test_cleanup_removes_ours_and_keeps_excluded() -> None:
    proxier, kernel = make()
    proxier.sync(request(view(WEB)))
    kernel.add_service(rules.VirtualServer(VSKey("TCP", "10.200.0.1", 80), "rr"))
    removed = cleanup(FakeConfig({"ipvs.excludeCIDRs": ("10.200.0.0/16",)}),
                      logging.getLogger("t"), kernel)
    assert set(kernel.services) == {VSKey("TCP", "10.200.0.1", 80)}
    assert "kube-ipvs0" not in kernel.links and kernel.sets == {}
    assert kernel.jumps == set()
    assert "ipvs: 3 virtual servers" in removed
    assert plugin.kproxy_cleanup(FakeConfig({}), "ipvs", logging.getLogger("t")) == []


def test_plugin_module_imports_nothing_native() -> None:
    import subprocess
    import sys

    code = ("import sys, kproxy_ipvs.plugin; "
            "print([m for m in sys.modules if m.startswith(('pyroute2', 'kproxy_ipvs.netlink'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_describe_reads_the_kernel() -> None:
    proxier, _kernel = make()
    proxier.sync(request(view(WEB)))
    info = proxier.describe(key("web"))
    assert info["virtual_servers"]["TCP/10.96.0.10:80"]["10.244.2.2:8080"]["weight"] == 1
    assert info["addresses"] == ["10.96.0.10"]
