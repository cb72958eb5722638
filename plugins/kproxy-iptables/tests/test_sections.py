"""Full syncs split into bounded sections for iptables-nft-restore (`rules.assemble_sections`):
the same rules as one transaction, in an order that is safe for live traffic, and the same
kernel state once applied."""

from __future__ import annotations

from collections import Counter

import pytest
from iptables_helpers import ep, key, svc
from kproxy_iptables import rules as R

from kproxy_core.kernel.iptables import RestoreData
from kproxy_core.kernel.iptables_writers import make_writer
from kproxy_core.model import ResolvedServicePort, ServicePortKey
from kproxy_core.testing.innetns import in_netns
from kproxy_core.testing.netns import Sandbox

CFG = R.RenderConfig(local_detector=R.LocalDetector.for_cidrs(["10.0.0.0/8"]),
                     node_ip="192.168.0.2")


def ports(count: int, endpoints: int = 3) -> list[ResolvedServicePort]:
    out = []
    for i in range(count):
        eps = [ep(f"10.1.{i}.{j + 1}") for j in range(endpoints)]
        extra = {"node_port": 30000 + i} if i % 3 == 0 else {}
        out.append(svc(key("ns", f"s{i}"), f"172.30.0.{i + 1}", endpoints=eps, **extra))
    return out


def rendered(count: int) -> dict[ServicePortKey, R.ServiceRules]:
    return {p.key: R.render_service(p, CFG) for p in ports(count)}


def lines(parts: list[RestoreData]) -> Counter[str]:
    return Counter(line for part in parts for line in part.render().splitlines()
                   if line and not line.startswith("*") and line != "COMMIT")


def test_sections_hold_the_single_transaction_rules() -> None:
    r = rendered(40)
    single = R.assemble(r, CFG, delete_chains=["KUBE-SVC-OLD", "KUBE-SEP-OLD"])
    R.canary(single)
    parts = R.assemble_sections(r, CFG, delete_chains=["KUBE-SVC-OLD", "KUBE-SEP-OLD"],
                                section_chains=10)
    extra = lines(parts) - lines([single])
    # Only the lead section's KUBE-MARK-MASQ, written again by the top-level section, and
    # the stale chains' declarations (one section flushes, a later one deletes).
    assert extra == Counter({":KUBE-MARK-MASQ - [0:0]": 1,
                             f"-A {R.KUBE_MARK_MASQ} -j MARK --or-mark 0x4000": 1})
    assert not lines([single]) - lines(parts)


def test_section_order_is_safe_for_live_traffic() -> None:
    r = rendered(40)
    parts = R.assemble_sections(r, CFG, delete_chains=["KUBE-SVC-OLD", "KUBE-SEP-OLD"],
                                section_chains=10)
    lead, *middle, top, flush, remove = parts
    assert lead.tables["nat"].chains == [R.KUBE_MARK_MASQ]
    owner = {c: k for k, rules in r.items() for c in rules.chains}
    seen: set[object] = set()
    for part in middle:
        assert set(part.tables) == {"nat"}
        chains = part.tables["nat"].chains
        services = {owner[c] for c in chains}
        # whole services only, never split, at most the budget unless one service is larger
        assert not services & seen
        seen |= services
        assert len(chains) <= 10 or len(services) == 1
        assert all(line.split()[1] in chains for line in part.tables["nat"].rules)
    assert seen == set(r)
    assert R.KUBE_SERVICES in top.tables["nat"].chains
    assert R.KUBE_PROXY_CANARY in top.tables["mangle"].chains
    assert not any(R.is_service_chain(c) for c in top.tables["nat"].chains)
    assert flush.tables["nat"].chains == ["KUBE-SVC-OLD", "KUBE-SEP-OLD"]
    assert not flush.tables["nat"].deleted
    assert remove.tables["nat"].deleted == ["KUBE-SVC-OLD", "KUBE-SEP-OLD"]
    assert not remove.tables["nat"].chains


def test_top_level_jumps_in_descending_chain_order() -> None:
    parts = R.assemble_sections(rendered(30), CFG)
    targets = [line.rsplit(" ", 1)[1] for line in parts[-1].tables["nat"].rules
               if line.startswith(f"-A {R.KUBE_SERVICES} ") and "KUBE-SVC-" in line]
    assert len(targets) == 30
    assert targets == sorted(targets, reverse=True)


def test_section_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="section_chains must be at least 1"):
        R.assemble_sections(rendered(2), CFG, section_chains=0)


@pytest.mark.root
def test_sections_give_the_same_kernel_state_as_one_transaction() -> None:
    r = rendered(60)
    single = R.assemble(r, CFG)
    R.canary(single)
    parts = R.assemble_sections(r, CFG, section_chains=25)

    def apply(sectioned: bool) -> list[str]:
        writer = make_writer("restore", 4, "nft")
        if sectioned:
            writer.restore_sections(parts)
        else:
            writer.restore(single)
        return sorted(line for table in ("nat", "filter", "mangle")
                      for line in writer.save(table).splitlines()
                      if not line.startswith("#"))

    with Sandbox() as sandbox:
        one = in_netns(sandbox.netns("one").name, lambda: apply(False))
        many = in_netns(sandbox.netns("many").name, lambda: apply(True))
    assert any(line.startswith("-A KUBE-SEP-") for line in one)
    # Rules inside one chain keep their order; only KUBE-SERVICES lists services differently.
    assert many == one


def _builtin_lines(text: str) -> list[str]:
    chains = ("INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING")
    return [line for line in text.splitlines() if line.startswith(tuple(
        f"-A {c} " for c in chains))]


@pytest.mark.root
@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_full_syncs_write_missing_jumps_in_their_transaction(backend: str) -> None:
    import subprocess

    from iptables_helpers import context, view
    from kproxy_iptables.proxier import IptablesProxier

    from kproxy_core.backend import SyncRequest
    from kproxy_core.kernel.iptables_writers import detect_backend

    def pick_backend() -> None:
        if backend == "legacy":  # kubelet's hint chain makes detection pick legacy
            subprocess.run(["iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"],
                           check=True)
        detect_backend.cache_clear()

    def by_commands() -> list[str]:
        pick_backend()
        proxier = IptablesProxier(context({"clusterCIDR": "10.0.0.0/8"}))
        writer = proxier.writer(4)
        proxier._ensure_jumps(writer, 4)
        return _builtin_lines(writer.save("filter") + writer.save("nat"))

    def by_sync() -> tuple[list[str], list[str], list[str]]:
        pick_backend()
        proxier = IptablesProxier(context({"clusterCIDR": "10.0.0.0/8"}))
        v = view(*ports(3))
        writer = proxier.writer(4)
        proxier.sync(SyncRequest(v, frozenset(v.services), True))
        first = _builtin_lines(writer.save("filter") + writer.save("nat"))
        proxier.sync(SyncRequest(v, frozenset(), True))
        again = _builtin_lines(writer.save("filter") + writer.save("nat"))
        jump = R.JUMP_RULES[3]
        assert writer.delete_rule(jump.table, jump.source, jump.args())
        proxier.sync(SyncRequest(v, frozenset(), True))
        repaired = _builtin_lines(writer.save("filter") + writer.save("nat"))
        return first, again, repaired

    with Sandbox() as sandbox:
        expected = in_netns(sandbox.netns("cmd").name, by_commands)
        first, again, repaired = in_netns(sandbox.netns("sync").name, by_sync)
    assert len(expected) == len(R.JUMP_RULES) + len(R.KUBELET_JUMP_RULES)
    assert first == expected
    assert again == expected
    assert sorted(repaired) == sorted(expected)
