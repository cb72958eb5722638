"""Build ``nft -f`` transaction text: a full rewrite of one family's table, or the O(changed)
difference between two renders of the changed service ports.

Statement order inside one transaction matters to the kernel: a goto target must exist when
the rule or element naming it is added, a chain can only be deleted once nothing refers to it,
and a set only once the rules using it are flushed. Every builder emits in this order:

1. add chains (new ones are created empty);
2. flush chains whose rules change, and chains about to be deleted;
3. delete map elements that go away or change value;
4. delete affinity sets and endpoint maps that go away (or whose timeout changes), then
   add sets and maps;
5. add rules, then add map elements;
6. delete chains that went away.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import attrs

from kproxy_nftables.rules import (
    ADDRESS_MAP_PREFIX,
    CLUSTER_IPS_SET,
    ENDPOINTS_MAP_TYPE,
    HAIRPIN_SET,
    SERVICE_MAPS,
    TABLE,
    Element,
    FamilyConfig,
    PortRender,
    _addr_type,
    endpoint_map_type,
    hairpin_key,
    is_address_map,
    is_endpoints_map,
    nft_family,
    nodeport_ips_lines,
    setup_lines,
)


@attrs.define
class Plan:
    """Statements grouped by phase; `text` joins them in the safe order."""

    family: int
    #: Old kernels (before 6.2): chains that go away are only flushed now and recorded in
    #: `stale`; a later sync deletes them (upstream waits a second the same way).
    defer_deletes: bool = False
    #: Whether this plan declares the whole table (`full_plan`), not a diff.
    full: bool = False
    setup: list[str] = attrs.field(factory=list)
    add_chains: list[str] = attrs.field(factory=list)
    flush_chains: list[str] = attrs.field(factory=list)
    delete_elements: list[str] = attrs.field(factory=list)
    delete_sets: list[str] = attrs.field(factory=list)
    add_sets: list[str] = attrs.field(factory=list)
    add_rules: list[str] = attrs.field(factory=list)
    add_elements: list[str] = attrs.field(factory=list)
    delete_chains: list[str] = attrs.field(factory=list)
    stale: list[str] = attrs.field(factory=list)
    added: set[str] = attrs.field(factory=set)
    #: ``ip kube-proxy``: computed once (a full sync names it in ~100,000 statements).
    table: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.table = f"{nft_family(self.family)} {TABLE}"

    def lines(self) -> list[str]:
        return [*self.setup, *self.add_chains, *self.flush_chains, *self.delete_elements,
                *self.delete_sets, *self.add_sets, *self.add_rules, *self.add_elements,
                *(f"delete chain {self.table} {name}" for name in self.delete_chains
                  if name not in self.added)]

    @property
    def objects(self) -> int:
        """Kernel objects written or deleted (chains, rules, elements, sets)."""
        return (len(self.add_chains) + len(self.delete_elements) + len(self.delete_sets)
                + len(self.add_sets) + len(self.add_rules) + len(self.add_elements)
                + len(self.delete_chains))

    # -- statement helpers ----------------------------------------------------------------------

    def chain(self, name: str, rules: Iterable[str], *, new: bool) -> None:
        if new:
            self.added.add(name)
            self.add_chains.append(f"add chain {self.table} {name}")
        else:
            self.flush_chains.append(f"flush chain {self.table} {name}")
        self.add_rules.extend(f"add rule {self.table} {name} {rule}" for rule in rules)

    def drop_chain(self, name: str) -> None:
        self.flush_chains.append(f"flush chain {self.table} {name}")
        (self.stale if self.defer_deletes else self.delete_chains).append(name)

    def add_set(self, name: str, timeout: int) -> None:
        self.add_sets.append(
            f"add set {self.table} {name} {{ type {_addr_type(self.family)} ; "
            f"flags dynamic,timeout ; timeout {timeout}s ; }}")

    def delete_set(self, name: str) -> None:
        self.delete_sets.append(f"delete set {self.table} {name}")

    def add_map(self, name: str, elements: Mapping[str, str]) -> None:
        """Declare endpoint verdict map ``name`` and add its elements."""
        self.add_sets.append(f"add map {self.table} {name} {{ {ENDPOINTS_MAP_TYPE} ; }}")
        if elements:
            body = ", ".join(f"{key} : {value}" for key, value in elements.items())
            self.add_elements.append(f"add element {self.table} {name} {{ {body} }}")

    def delete_map(self, name: str) -> None:
        self.delete_sets.append(f"delete map {self.table} {name}")

    def update_map(self, name: str, old: Mapping[str, str], new: Mapping[str, str]) -> None:
        """Swap only the elements whose key or value changed."""
        gone = [key for key, value in old.items() if new.get(key) != value]
        if gone:
            self.delete_elements.append(
                f"delete element {self.table} {name} {{ {', '.join(gone)} }}")
        added = [(key, value) for key, value in new.items() if old.get(key) != value]
        if added:
            body = ", ".join(f"{key} : {value}" for key, value in added)
            self.add_elements.append(f"add element {self.table} {name} {{ {body} }}")

    def declare_address_map(self, name: str) -> None:
        """``add map`` of an address map (a no-op when it exists)."""
        protocol = name.removeprefix(ADDRESS_MAP_PREFIX).split("-")[0]
        self.add_sets.append(f"add map {self.table} {name} "
                             f"{{ {endpoint_map_type(self.family, protocol)} ; }}")

    def hairpin(self, ip: str, *, add: bool) -> None:
        element = f"{{ {hairpin_key(ip)} }}"
        if add:
            self.add_elements.append(f"add element {self.table} {HAIRPIN_SET} {element}")
        else:
            self.delete_elements.append(f"delete element {self.table} {HAIRPIN_SET} {element}")

    def add_element(self, element: Element) -> None:
        self.add_elements.append(f"add element {element.text(self.family)}")

    def add_elements_of(self, elements: Sequence[Element]) -> None:
        """One ``add element`` statement for ``elements`` (all of one map)."""
        if not elements:
            return
        body = ", ".join(e.item() for e in elements)
        self.add_elements.append(f"add element {self.table} {elements[0].map} {{ {body} }}")

    def delete_element(self, element: Element) -> None:
        self.delete_elements.append(
            f"delete element {self.table} {element.map} {{ {element.key} }}")

    def cluster_ip(self, ip: str, *, add: bool) -> None:
        if add:
            self.add_elements.append(f"add element {self.table} {CLUSTER_IPS_SET} {{ {ip} }}")
        else:
            self.delete_elements.append(
                f"delete element {self.table} {CLUSTER_IPS_SET} {{ {ip} }}")


def full_plan(
    cfg: FamilyConfig,
    renders: Iterable[PortRender],
    existing_chains: Iterable[str] = (),
    existing_sets: Mapping[str, int | None] | None = None,
    *,
    defer_deletes: bool = False,
) -> Plan:
    """Rewrite everything this family's table should hold; ``existing_*`` (listed once from
    the kernel) name the service chains and affinity sets to delete or re-create."""
    plan = Plan(cfg.family, defer_deletes=defer_deletes, full=True)
    plan.setup = setup_lines(cfg)
    plan.setup += [f"flush map {plan.table} {name}" for name in SERVICE_MAPS]
    plan.setup.append(f"flush set {plan.table} {CLUSTER_IPS_SET}")
    plan.setup.append(f"flush set {plan.table} {HAIRPIN_SET}")
    plan.setup += nodeport_ips_lines(cfg)
    existing = set(existing_chains)
    sets = dict(existing_sets or {})
    active_chains: set[str] = set()
    active_sets: dict[str, int] = {}
    active_maps: dict[str, Mapping[str, str]] = {}
    elements: dict[tuple[str, str], Element] = {}
    cluster_ips: dict[str, None] = {}
    hairpin: dict[str, None] = {}
    for render in renders:
        for name, rules in render.chains.items():
            if name in active_chains:
                continue  # two ports rendering one chain would be a hash collision
            active_chains.add(name)
            # "add" of an existing chain is a no-op; the flush clears its old rules.
            plan.chain(name, rules, new=True)
            if name in existing:
                plan.flush_chains.append(f"flush chain {plan.table} {name}")
        active_sets.update(render.affinity_sets)
        for name, content in render.maps.items():
            active_maps.setdefault(name, content)
        for element in render.elements:
            elements.setdefault((element.map, element.key), element)
        if render.cluster_ip:
            cluster_ips[render.cluster_ip] = None
        hairpin.update(dict.fromkeys(render.hairpin))
    for name in sorted(existing - active_chains):
        plan.drop_chain(name)
    address_maps = {e.map for e in elements.values() if is_address_map(e.map)}
    for name, timeout in sorted(sets.items()):
        if is_address_map(name):
            plan.setup.append(f"flush map {plan.table} {name}")
        elif is_endpoints_map(name):
            # Deleted even when still wanted: an earlier version may have left a map of
            # another type under this name. Every rule naming it sits in a service chain
            # flushed above.
            plan.delete_map(name)
        elif name not in active_sets:
            plan.delete_set(name)
        elif timeout is not None and timeout != active_sets[name]:
            plan.delete_set(name)
    for name, timeout in active_sets.items():
        plan.add_set(name, timeout)
    for name in sorted(address_maps - sets.keys()):
        plan.declare_address_map(name)
    for name, content in active_maps.items():
        plan.add_map(name, content)
    # One statement per map: nft's cost per statement dominates for small ones.
    by_map: dict[str, list[Element]] = {}
    for element in elements.values():
        by_map.setdefault(element.map, []).append(element)
    for group in by_map.values():
        plan.add_elements_of(group)
    # One statement per set too (50,000 statements at 10,000 services otherwise).
    if cluster_ips:
        plan.add_elements.append(
            f"add element {plan.table} {CLUSTER_IPS_SET} {{ {', '.join(cluster_ips)} }}")
    if hairpin:
        plan.add_elements.append(f"add element {plan.table} {HAIRPIN_SET} "
                                 f"{{ {', '.join(hairpin_key(ip) for ip in hairpin)} }}")
    return plan


def diff_plan(plan: Plan, old: PortRender, new: PortRender) -> None:
    """Add to ``plan`` what turns ``old`` (programmed) into ``new`` for one service port.
    Cluster IPs and hairpin endpoints are reference-counted by the caller (ports and
    services share them)."""
    changed_sets = {name for name, timeout in old.affinity_sets.items()
                    if name in new.affinity_sets and new.affinity_sets[name] != timeout}
    for name, rules in new.chains.items():
        before = old.chains.get(name)
        if before is None:
            plan.chain(name, rules, new=True)
        elif before != rules or any(f"@{s} " in " ".join(rules) + " " for s in changed_sets):
            plan.chain(name, rules, new=False)
    for name in old.chains:
        if name not in new.chains:
            plan.drop_chain(name)
    old_elements = old.element_keys
    new_elements = new.element_keys
    for key, element in old_elements.items():
        if new_elements.get(key) != element:
            plan.delete_element(element)
    for key, element in new_elements.items():
        if old_elements.get(key) != element:
            plan.add_element(element)
    for name, content in old.maps.items():
        if name not in new.maps:
            plan.delete_map(name)
        else:
            plan.update_map(name, content, new.maps[name])
    for name, content in new.maps.items():
        if name not in old.maps:
            plan.add_map(name, content)
    old_maps = {e.map for e in old.elements}
    for name in sorted({e.map for e in new.elements} - old_maps):
        if is_address_map(name):
            plan.declare_address_map(name)  # a no-op unless this port is its first user
    for name in old.affinity_sets:
        if name not in new.affinity_sets or name in changed_sets:
            plan.delete_set(name)
    for name, timeout in new.affinity_sets.items():
        if name not in old.affinity_sets or name in changed_sets:
            plan.add_set(name, timeout)
