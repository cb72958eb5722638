"""An in-memory `Kernel` that records every write, for logic tests without IPVS."""

from __future__ import annotations

from collections.abc import Sequence

from kproxy_ipvs.netlink import DestStats
from kproxy_ipvs.rules import RealServer, VirtualServer, VSKey

from kproxy_core.kernel import ipset
from kproxy_core.kernel.iptables import RestoreData


class FakeKernel:
    def __init__(self) -> None:
        self.services: dict[VSKey, VirtualServer] = {}
        self.dests: dict[VSKey, dict[RealServer, DestStats]] = {}
        self.links: dict[str, set[str]] = {}
        self.sets: dict[str, tuple[str, set[str]]] = {}
        self.restored: list[RestoreData] = []
        self.jumps: set[tuple[int, str, str, tuple[str, ...]]] = set()
        self.sysctls: dict[str, str] = {}
        self.timeouts: tuple[int, int, int] | None = None
        self.local = ["10.99.0.1", "192.168.5.5"]
        self.writes: list[str] = []
        self.bulk_calls = 0
        #: Bulk writes and iptables restores in the order they ran.
        self.steps: list[str] = []
        #: Sets listed (their entries read).
        self.listed: list[str] = []
        self.schedulers = {"rr", "lc", "wrr", "sh", "mh"}

    def _w(self, what: str) -> None:
        self.writes.append(what)

    def list_services(self) -> dict[VSKey, VirtualServer]:
        return dict(self.services)

    def list_dests(self, key: VSKey) -> dict[RealServer, DestStats]:
        return dict(self.dests[key])

    def add_service(self, vs: VirtualServer) -> None:
        assert vs.key not in self.services, vs
        self.services[vs.key] = vs
        self.dests[vs.key] = {}
        self._w(f"add_service {vs.key}")

    def update_service(self, vs: VirtualServer) -> None:
        assert vs.key in self.services
        self.services[vs.key] = vs
        self._w(f"update_service {vs.key}")

    def del_service(self, key: VSKey) -> None:
        del self.services[key]
        del self.dests[key]
        self._w(f"del_service {key}")

    def add_dest(self, key: VSKey, real: RealServer, weight: int) -> None:
        assert real not in self.dests[key]
        self.dests[key][real] = DestStats(weight, 0, 0)
        self._w(f"add_dest {key} {real}")

    def update_dest(self, key: VSKey, real: RealServer, weight: int) -> None:
        old = self.dests[key][real]
        self.dests[key][real] = DestStats(weight, old.active, old.inactive)
        self._w(f"update_dest {key} {real} {weight}")

    def del_dest(self, key: VSKey, real: RealServer) -> None:
        del self.dests[key][real]
        self._w(f"del_dest {key} {real}")

    def add_services(self, items: Sequence[tuple[VirtualServer, Sequence[RealServer]]]
                     ) -> None:
        self.bulk_calls += 1
        self.steps.append("add_services")
        for vs, reals in items:
            self.add_service(vs)
            for real in reals:
                self.add_dest(vs.key, real, 1)

    def add_addresses(self, device: str, addresses: Sequence[str]) -> None:
        self.bulk_calls += 1
        self.steps.append("add_addresses")
        for address in addresses:
            self.add_address(device, address)

    def add_entries(self, name: str, set_type: str, entries: Sequence[str]) -> None:
        self.bulk_calls += 1
        self.steps.append("add_entries")
        for entry in entries:
            self.add_entry(name, set_type, entry)

    def ensure_dummy(self, name: str) -> None:
        self.links.setdefault(name, set())

    def delete_link(self, name: str) -> bool:
        return self.links.pop(name, None) is not None

    def list_addresses(self, device: str) -> set[str]:
        return set(self.links.get(device, set()))

    def add_address(self, device: str, address: str) -> None:
        self.links[device].add(address)
        self._w(f"add_address {address}")

    def del_address(self, device: str, address: str) -> None:
        self.links[device].discard(address)
        self._w(f"del_address {address}")

    def local_addresses(self, exclude_device: str) -> list[str]:
        return list(self.local)

    def ensure_set(self, name: str, set_type: str, family: int) -> None:
        self.sets.setdefault(name, (set_type, set()))

    def ensure_sets(self, sets: Sequence[tuple[str, str, int]]) -> list[str]:
        for name, set_type, _family in sets:
            have = self.sets.get(name)
            if have is not None and have[0] != set_type:
                raise ipset.IPSetError(f"ipset {name} exists with type {have[0]}")
        created = [name for name, _type, _family in sets if name not in self.sets]
        for name, set_type, family in sets:
            self.ensure_set(name, set_type, family)
        return created

    def list_set(self, name: str) -> set[str]:
        self.listed.append(name)
        return set(self.sets[name][1])

    def add_entry(self, name: str, set_type: str, entry: str) -> None:
        assert self.sets[name][0] == set_type
        self.sets[name][1].add(ipset.canonical_entry(set_type, entry))
        self._w(f"add_entry {name} {entry}")

    def del_entry(self, name: str, set_type: str, entry: str) -> None:
        self.sets[name][1].remove(entry)
        self._w(f"del_entry {name} {entry}")

    def destroy_set(self, name: str) -> bool:
        return self.sets.pop(name, None) is not None

    def list_set_names(self) -> list[str]:
        return list(self.sets)

    def restore(self, data: RestoreData) -> float:
        self.restored.append(data)
        self.steps.append("restore")
        return 0.001

    def restore_with_jumps(self, data: RestoreData,
                           jumps: Sequence[tuple[str, str, list[str]]]) -> float:
        self.ensure_jumps(data.family, jumps)
        return self.restore(data)

    def ensure_jump(self, family: int, table: str, chain: str, args: list[str]) -> None:
        self.jumps.add((family, table, chain, tuple(args)))

    def ensure_jumps(self, family: int, jumps: Sequence[tuple[str, str, list[str]]]) -> int:
        before = len(self.jumps)
        for table, chain, args in jumps:
            self.ensure_jump(family, table, chain, args)
        return len(self.jumps) - before

    def delete_jump(self, family: int, table: str, chain: str, args: list[str]) -> bool:
        item = (family, table, chain, tuple(args))
        if item in self.jumps:
            self.jumps.remove(item)
            return True
        return False

    def delete_chain(self, family: int, table: str, chain: str) -> bool:
        return any(d.family == family and chain in d.tables.get(table, _Empty).chains
                   for d in self.restored)

    def sysctl(self, path: str, value: str) -> None:
        self.sysctls[path] = value

    def set_timeouts(self, tcp: int, tcpfin: int, udp: int) -> None:
        self.timeouts = (tcp, tcpfin, udp)

    def check_scheduler(self, scheduler: str) -> None:
        from kproxy_core.backend import BackendUnavailable

        if scheduler not in self.schedulers:
            raise BackendUnavailable(f"IPVS scheduler {scheduler!r} is not available")


class _EmptyTable:
    chains: list[str] = []


_Empty = _EmptyTable()
