"""The ``nftables`` backend.

Every sync sends ONE ``nft -f -`` transaction covering both families. A partial sync rewrites
only the changed service ports: it diffs the render of each changed port against the render
it programmed last time (kept in memory, never read back from the kernel), so a one-endpoint
change is a handful of statements whatever the number of services. A full sync re-declares
the table, flushes the service maps and re-adds everything; the only kernel read is one
listing of chain and set names per family, to delete what no service owns any more. Before
a partial sync the core asks `NftablesProxier.needs_full_sync`: one netlink lookup of the
table by name per family (is it there, is it still the one the last full sync declared).
"""

from __future__ import annotations

import ipaddress
import json
import platform
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kproxy_core.backend import (
    Backend,
    BackendContext,
    BackendUnavailable,
    ConfigView,
    SyncError,
    SyncRequest,
    SyncResult,
    as_list,
    config_value,
)
from kproxy_core.localtraffic import LocalTrafficDetector
from kproxy_core.model import NodeView, ResolvedServicePort, ServicePortKey
from kproxy_nftables import netlink, nft
from kproxy_nftables import rules as R
from kproxy_nftables.transaction import Plan, diff_plan, full_plan

DEFAULT_MASQUERADE_BIT = 14


class Settings:
    """The configuration this mode reads, parsed and checked once."""

    def __init__(self, config: ConfigView) -> None:
        # Upstream's flags are shared by iptables and nftables (--masquerade-all,
        # --iptables-masquerade-bit); the file's nftables section wins when it is set.
        self.masquerade_all = bool(config_value(config, "nftables.masqueradeAll", False)
                                   or config_value(config, "iptables.masqueradeAll", False))
        bit = int(config_value(config, "nftables.masqueradeBit", DEFAULT_MASQUERADE_BIT))
        if bit == DEFAULT_MASQUERADE_BIT:
            bit = int(config_value(config, "iptables.masqueradeBit", DEFAULT_MASQUERADE_BIT))
        self.masquerade_mark = R.masquerade_mark(bit)
        self.local_traffic = LocalTrafficDetector(config)
        self.nodeport_addresses = as_list(config_value(config, "nodePortAddresses", ()))

    def local_detector(self, family: int, pod_cidrs: Sequence[str] = ()) -> R.LocalDetector:
        """Render the core's detect-local answer (``pod_cidrs``: NodeView.pod_cidrs)."""
        local = self.local_traffic.for_family(family, pod_cidrs)
        if local.cidr:
            return R.LocalDetector.for_cidrs(family, [local.cidr])
        return R.LocalDetector.for_interface(
            f"{local.interface}*" if local.prefix else local.interface)

    def nodeport_ips(self, family: int, view: NodeView,
                     interface_ips: Sequence[str] | None) -> tuple[str, ...] | None:
        """Upstream's NodePortAddresses in nftables mode: unset means "primary" (this node's
        IP in the family); a CIDR matching everything means every local address (None);
        other CIDRs select the local addresses inside them."""
        primary = tuple(ip for ip in view.node_ips if (":" in ip) == (family == 6))[:1]
        values = self.nodeport_addresses
        if not values or values == ["primary"]:
            return primary
        cidrs = [ipaddress.ip_network(v, strict=False) for v in values if v != "primary"]
        cidrs = [c for c in cidrs if c.version == family]
        if any(c.prefixlen == 0 for c in cidrs):
            return None
        selected = list(primary) if "primary" in values else []
        for ip in interface_ips or ():
            address = ipaddress.ip_address(ip)
            if address.version == family and any(address in c for c in cidrs):
                selected.append(ip)
        return tuple(dict.fromkeys(selected))

    @property
    def needs_interface_ips(self) -> bool:
        return any(v != "primary" for v in self.nodeport_addresses)


def local_addresses() -> list[str]:
    """Addresses on this namespace's interfaces (for CIDR nodePortAddresses)."""
    proc = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True,
                          timeout=30, check=False)
    if proc.returncode != 0:
        return []
    out = []
    for link in json.loads(proc.stdout or "[]"):
        for info in link.get("addr_info", []):
            if "local" in info:
                out.append(str(info["local"]))
    return out


def kernel_deletes_chains_at_once() -> bool:
    """Kernels before 6.2 notice a chain became unreferenced only some time after the map
    element naming it is deleted, so upstream deletes stale chains a second later."""
    match = re.match(r"(\d+)\.(\d+)", platform.release())
    return match is None or (int(match[1]), int(match[2])) >= (6, 2)


class _Journal:
    """Undo log of the in-place state changes made while planning a transaction. A partial
    sync touches only what changed; copying the whole state to keep the old one for a
    failed transaction would cost O(all services) per sync."""

    __slots__ = ("_undo",)

    def __init__(self) -> None:
        self._undo: list[Callable[[], object]] = []

    def put(self, mapping: dict[Any, Any], key: Any, value: Any) -> None:
        """``mapping[key] = value``; None deletes the key."""
        if key in mapping:
            old = mapping[key]
            self._undo.append(lambda: mapping.__setitem__(key, old))
        else:
            self._undo.append(lambda: mapping.pop(key, None))
        if value is None:
            mapping.pop(key, None)
        else:
            mapping[key] = value

    def count(self, counter: dict[str, int], key: str, delta: int) -> int:
        """Add ``delta`` to ``counter[key]`` (dropped at zero); returns the new count."""
        value = counter.get(key, 0) + delta
        self.put(counter, key, value if value > 0 else None)
        return value

    def on_undo(self, undo: Callable[[], object]) -> None:
        self._undo.append(undo)

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()


class Slots:
    """Which numgen block of the address maps each service/local chain owns. A chain keeps
    its block while it exists, so its dispatch rule never changes; blocks given up in one
    transaction are handed out again only after it succeeded (`commit`)."""

    __slots__ = ("free", "journal", "owner", "released", "top")

    def __init__(self) -> None:
        self.owner: dict[str, int] = {}
        self.free: list[int] = []
        self.released: list[int] = []
        self.top = 0
        self.journal = _Journal()

    def get(self, chain: str) -> int:
        slot = self.owner.get(chain)
        if slot is None:
            if self.free:
                slot = self.free.pop()
                taken = slot
                self.journal.on_undo(lambda: self.free.append(taken))
            else:
                slot, self.top = self.top, self.top + 1
                self.journal.on_undo(lambda: setattr(self, "top", self.top - 1))
            self.journal.put(self.owner, chain, slot)
        return slot

    def release(self, chain: str) -> None:
        slot = self.owner.get(chain)
        if slot is not None:
            self.journal.put(self.owner, chain, None)
            self.released.append(slot)
            self.journal.on_undo(lambda: self.released.remove(slot))

    def copy(self) -> Slots:
        """An independent copy (to render without touching the programmed state)."""
        copy = Slots()
        copy.owner = dict(self.owner)
        copy.free = sorted(self.free + self.released, reverse=True)
        copy.top = self.top
        return copy

    def commit(self) -> None:
        if self.released:
            self.free = sorted(self.free + self.released, reverse=True)
            self.released = []


#: An address map that lost its last user is deleted by a sync at least this many seconds
#: later, in a transaction of its own (upstream's timing for stale chains): the transaction
#: that flushed the last rule naming it may not have released it yet ("Device or resource
#: busy"), and a failed delete must not fail the sync that programs services.
STALE_MAP_SECONDS = 1.0


def address_maps_of(render: R.PortRender) -> set[str]:
    """The address maps ``render``'s rules name (each service/local chain holds at least one
    endpoint, hence an element, in the map its dnat rule names)."""
    return {e.map for e in render.elements if R.is_address_map(e.map)}


class _FamilyState:
    __slots__ = ("address_map_users", "cfg", "chain_count", "cluster_ip_refs", "hairpin_refs",
                 "programmed", "slots", "stale_chains", "stale_maps")

    def __init__(self) -> None:
        self.cfg: R.FamilyConfig | None = None
        self.programmed: dict[ServicePortKey, R.PortRender] = {}
        self.chain_count = 0
        self.cluster_ip_refs: dict[str, int] = {}
        #: Endpoint IP -> number of programmed ports reaching it through an address map.
        self.hairpin_refs: dict[str, int] = {}
        self.slots = Slots()
        #: Chains flushed on an old kernel, deleted on a later sync.
        self.stale_chains: set[str] = set()
        #: Address map -> programmed ports whose rules name it.
        self.address_map_users: dict[str, int] = {}
        #: Address maps in the kernel that no rule names, -> `time.monotonic` when they lost
        #: their last user; deleted `STALE_MAP_SECONDS` later (`_delete_stale_maps`).
        self.stale_maps: dict[str, float] = {}


class NftablesProxier(Backend):
    name = "nftables"
    #: Periodic syncs are partial, full ones hourly, as upstream (see Backend).
    periodic_full_sync = False
    needs_conntrack_cleanup = True
    sync_period_options = ("nftables.syncPeriod", "nftables.minSyncPeriod")

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.settings = Settings(context.config)
        self.families: tuple[int, ...] = tuple(f for f in (4, 6) if f in context.families)
        self.state: dict[int, _FamilyState] = {family: _FamilyState() for family in self.families}
        self.delete_at_once = kernel_deletes_chains_at_once()
        self._interface_ips: list[str] | None = None
        self.last_transaction: list[str] = []
        #: Which writer sent the last transaction: "netlink" or "nft".
        self.last_writer = ""
        #: Partial syncs may bypass nft (see `netlink`); off sends everything through nft.
        self.use_netlink = True
        self._netlink = netlink.Connection()
        #: A second socket for the table lookups of `needs_full_sync`, so that they never
        #: read a batch's late answers (or a batch theirs).
        self._lookup = netlink.Connection()
        #: Per family, the kernel's handle of the table the last full sync declared (None:
        #: not known). A table deleted and created again by someone else has another one.
        self.table_handles: dict[int, int | None] = {}

    @classmethod
    def check_supported(cls, context: BackendContext) -> None:
        if nft.nft_binary() is None:
            raise BackendUnavailable(
                "nftables mode needs the nft command (install the nftables package)")
        try:
            nft.run_nft(["list", "tables"], timeout=30)
        except nft.NftError as exc:
            raise BackendUnavailable(
                f"nftables mode cannot use nf_tables on this host: {exc} (needs kernel "
                "nf_tables support and CAP_NET_ADMIN)") from None

    # -- rendering ------------------------------------------------------------------------------

    def family_config(self, family: int, view: NodeView) -> R.FamilyConfig:
        node_ip = next((ip for ip in view.node_ips if (":" in ip) == (family == 6)), "")
        return R.FamilyConfig(
            family=family,
            masquerade_mark=self.settings.masquerade_mark,
            masquerade_all=self.settings.masquerade_all,
            local=self.settings.local_detector(family, view.pod_cidrs),
            nodeport_ips=self.settings.nodeport_ips(family, view, self._interface_ips),
            node_ip=node_ip,
        )

    def render(self, port: ResolvedServicePort, cfg: R.FamilyConfig,
               slots: Slots | None = None) -> R.PortRender:
        """``slots``: the numgen blocks (a fresh numbering without)."""
        return R.render_port(port, cfg, slots.get if slots is not None else None)

    def plan(self, request: SyncRequest, family: int, journal: _Journal, *, full: bool,
             existing: tuple[set[str], dict[str, int | None]] | None = None,
             ) -> tuple[Plan, Callable[[], None]]:
        """The statements for ``family``. A partial plan updates the family's state in
        place, recording how to undo it in ``journal``; the returned function finishes the
        update once the transaction succeeded."""
        state = self.state[family]
        cfg = self.family_config(family, request.view)
        state.slots.journal = journal
        if full or state.cfg is None:
            ports = sorted(((k, v) for k, v in request.view.services.items()
                            if k.family == family), key=lambda kv: _sort_key(kv[0]))
            renders = {key: self.render(port, cfg, state.slots) for key, port in ports}
            owned = {chain for r in renders.values() for chain in r.slots}
            for chain in set(state.slots.owner) - owned:
                state.slots.release(chain)
            chains, sets = existing if existing is not None else (set(), {})
            chains = {c for c in chains if R.is_service_chain(c)}
            sets = {s: t for s, t in sets.items() if R.is_affinity_set(s)
                    or R.is_endpoints_map(s) or R.is_address_map(s)}
            plan = full_plan(cfg, renders.values(), chains, sets,
                             defer_deletes=not self.delete_at_once)
            map_users = Counter(m for r in renders.values() for m in address_maps_of(r))
            now = time.monotonic()
            # Unused address maps are flushed now (full_plan) and deleted by a later sync;
            # one already waiting keeps its time.
            stale_maps = {m: state.stale_maps.get(m, now) for m in sets
                          if R.is_address_map(m) and m not in map_users}

            def commit_full() -> None:
                state.cfg = cfg
                state.programmed = renders
                state.chain_count = sum(len(r.chains) for r in renders.values())
                state.cluster_ip_refs = dict(Counter(
                    r.cluster_ip for r in renders.values() if r.cluster_ip))
                state.hairpin_refs = dict(Counter(
                    ip for r in renders.values() for ip in r.hairpin))
                state.stale_chains = set(plan.stale)
                state.address_map_users = dict(map_users)
                state.stale_maps = stale_maps
                state.slots.commit()

            return plan, commit_full
        plan = Plan(family, defer_deletes=not self.delete_at_once)
        if cfg != state.cfg:
            if cfg.nodeport_ips != state.cfg.nodeport_ips or cfg.node_ip != state.cfg.node_ip:
                plan.setup += R.nodeport_ips_lines(cfg)
            if cfg.nodeport_ips is None or state.cfg.nodeport_ips is None or (
                    cfg.node_ip != state.cfg.node_ip):
                # A switch between "every local address" and a set, or a new node IP
                # (firewall rules allow the node): rewrite as a full sync would.
                return self.plan(request, family, journal, full=True,
                                 existing=nft.list_names(family))
        plan.delete_chains.extend(sorted(state.stale_chains))
        chains_before = state.chain_count
        now = time.monotonic()
        for key in sorted((k for k in request.changed if k.family == family), key=_sort_key):
            old = state.programmed.get(key, R.EMPTY_RENDER)
            port = request.view.services.get(key)
            new = self.render(port, cfg, state.slots) if port is not None else R.EMPTY_RENDER
            for chain in old.slots.keys() - new.slots.keys():
                state.slots.release(chain)
            if old == new:
                continue
            diff_plan(plan, old, new)
            old_maps, new_maps = address_maps_of(old), address_maps_of(new)
            for name in sorted(old_maps - new_maps):
                if journal.count(state.address_map_users, name, -1) <= 0:
                    journal.put(state.stale_maps, name, now)
            for name in sorted(new_maps - old_maps):
                # A map deleted earlier is declared again by diff_plan.
                if journal.count(state.address_map_users, name, 1) == 1:
                    journal.put(state.stale_maps, name, None)
            if old.cluster_ip != new.cluster_ip:
                if old.cluster_ip and journal.count(state.cluster_ip_refs, old.cluster_ip,
                                                    -1) <= 0:
                    plan.cluster_ip(old.cluster_ip, add=False)
                if new.cluster_ip and journal.count(state.cluster_ip_refs, new.cluster_ip,
                                                    1) == 1:
                    plan.cluster_ip(new.cluster_ip, add=True)
            for ip in sorted(set(old.hairpin) - set(new.hairpin)):
                if journal.count(state.hairpin_refs, ip, -1) <= 0:
                    plan.hairpin(ip, add=False)
            for ip in sorted(set(new.hairpin) - set(old.hairpin)):
                if journal.count(state.hairpin_refs, ip, 1) == 1:
                    plan.hairpin(ip, add=True)
            state.chain_count += len(new.chains) - len(old.chains)
            journal.put(state.programmed, key, new if port is not None else None)
        journal.on_undo(lambda: setattr(state, "chain_count", chains_before))

        def commit_partial() -> None:
            state.cfg = cfg
            state.stale_chains = set(plan.stale)
            state.slots.commit()

        return plan, commit_partial

    # -- syncing --------------------------------------------------------------------------------

    def sync(self, request: SyncRequest) -> SyncResult:
        if request.full and self.settings.needs_interface_ips:
            self._interface_ips = local_addresses()
        journal = _Journal()
        try:
            return self._sync(request, journal)
        except BaseException:
            journal.rollback()
            raise

    def _delete_stale_maps(self) -> None:
        """Delete the address maps unused for `STALE_MAP_SECONDS`, in a transaction of their
        own: if it fails they are retried by a later sync, and this one goes on."""
        now = time.monotonic()
        due: list[tuple[_FamilyState, str]] = []
        lines: list[str] = []
        for family in self.families:
            state = self.state[family]
            if state.cfg is None:
                continue
            for name, since in sorted(state.stale_maps.items()):
                if now - since >= STALE_MAP_SECONDS and not state.address_map_users.get(name):
                    due.append((state, name))
                    lines.append(f"delete map {R.nft_family(family)} {R.TABLE} {name}")
        if not lines:
            return
        try:
            messages = netlink.encode(lines) if self.use_netlink else None
            if messages is not None:
                netlink.send(lines, messages, connection=self._netlink)
            else:
                nft.apply(lines)
        except (nft.NftError, netlink.NetlinkError, OSError) as exc:
            self.context.logger.warning(
                "could not delete %d unused address map(s), will retry: %s", len(due), exc)
            for state, name in due:
                state.stale_maps[name] = now
            return
        self.context.logger.info("deleted %d unused address map(s): %s", len(due),
                                 ", ".join(name for _, name in due))
        for state, name in due:
            del state.stale_maps[name]

    def _sync(self, request: SyncRequest, journal: _Journal) -> SyncResult:
        if not request.full:
            # A full sync (also the one after someone deleted the table) re-lists the maps
            # and keeps the unused ones waiting; the next partial sync deletes them.
            self._delete_stale_maps()
        plans: list[tuple[int, Plan, Callable[[], None]]] = []
        for family in self.families:
            full = request.full or self.state[family].cfg is None
            existing = nft.list_names(family) if full else None
            plan, commit = self.plan(request, family, journal, full=full, existing=existing)
            plans.append((family, plan, commit))
        lines: list[str] = []
        for _, plan, _ in plans:
            lines += plan.lines()
        self.last_transaction = lines
        # Partial syncs go straight to the kernel when every statement has a shape the
        # netlink encoder knows: nft 1.0.6 would first dump the whole table (its cache).
        messages = None
        if self.use_netlink and not any(plan.setup for _, plan, _ in plans) and not (
                request.full or any(s.cfg is None for s in self.state.values())):
            messages = netlink.encode(lines)
        self.last_writer = "netlink" if messages is not None else "nft"
        try:
            if messages is not None:
                start = time.perf_counter()
                netlink.send(lines, messages, connection=self._netlink)
                seconds = time.perf_counter() - start
            else:
                seconds = nft.apply(lines)
        except (nft.NftError, netlink.NetlinkError, OSError) as exc:
            raise SyncError(f"nftables transaction failed: {exc}") from exc
        objects = 0
        counters: dict[str, int] = {}
        for family, plan, commit in plans:
            commit()
            if plan.full:
                self.table_handles[family] = self._table_handle(family)
            state = self.state[family]
            objects += plan.objects
            counters[f"ipv{family}_service_ports"] = len(state.programmed)
            counters[f"ipv{family}_chains"] = state.chain_count
        return SyncResult(objects_written=objects, counters=counters, external_seconds=seconds)

    def close(self) -> None:
        self._netlink.close()
        self._lookup.close()

    # -- reading back ---------------------------------------------------------------------------

    def _table_handle(self, family: int) -> int | None:
        try:
            return netlink.table_handle(family, connection=self._lookup)
        except (netlink.NetlinkError, OSError) as exc:
            self.context.logger.warning("cannot look up table %s %s over netlink: %s",
                                        R.nft_family(family), R.TABLE, exc)
            return None

    def needs_full_sync(self) -> bool:
        """Someone deleted our table (``nft delete table``, ``nft flush ruleset``) or replaced
        it (deleted and created again, e.g. a saved ruleset restored): rebuild it.

        The core asks before every sync that is not already full, so this is one netlink
        lookup of the table by name per family (microseconds at any size), never ``nft``.
        Upstream has no such check: its partial syncs list the whole table every time
        (``ListAll``) or fail on a missing one. Drift inside an existing table (a rule or
        element edited by hand) is not seen here; the hourly full sync repairs it."""
        for family in self.families:
            if self.state[family].cfg is None:
                continue  # never synced: the next sync is full anyway
            fam = R.nft_family(family)
            try:
                handle = netlink.table_handle(family, connection=self._lookup)
            except (netlink.NetlinkError, OSError) as exc:
                # Rare (netlink refused); ask nft, slow at scale but right.
                self.context.logger.warning(
                    "cannot look up table %s %s over netlink (%s); asking nft", fam,
                    R.TABLE, exc)
                if not nft.table_exists(family):
                    self.context.logger.info("table %s %s is gone: full sync", fam, R.TABLE)
                    return True
                continue
            if handle is None:
                self.context.logger.info("table %s %s is gone: full sync", fam, R.TABLE)
                return True
            expected = self.table_handles.get(family)
            if expected is not None and handle != expected:
                self.context.logger.info(
                    "table %s %s was replaced (handle %d, ours was %d): full sync", fam,
                    R.TABLE, handle, expected)
                return True
        return False

    def kernel(self, family: int) -> nft.KernelTable:
        return nft.read_table(family)

    def describe(self, key: ServicePortKey) -> Mapping[str, Any]:
        render = self.state.get(key.family, _FamilyState()).programmed.get(key)
        if render is None:
            return {"programmed": False}
        table = self.kernel(key.family)
        chains = {name: [_rule_text(expr) for expr in table.chains.get(name, ())]
                  for name in render.chains}
        missing = [name for name in render.chains if name not in table.chains]
        elements = []
        for element in render.elements:
            got = table.maps.get(element.map, {})
            present = any(_key_text(k, element.map) == element.key for k in got)
            elements.append({"map": element.map, "key": element.key, "value": element.value,
                             "present": present})
        return {
            "table": f"{R.nft_family(key.family)} {R.TABLE}",
            "chains": chains,
            "missing_chains": missing,
            "elements": elements,
            "affinity_sets": dict(render.affinity_sets),
            "endpoints": sorted(endpoints_of(table, next(
                (n for n in render.chains if n.startswith((R.SERVICE_PREFIX, R.LOCAL_PREFIX))),
                ""))),
        }

    def audit(self, view: NodeView) -> list[str]:
        problems: list[str] = []
        for family in self.families:
            table = self.kernel(family)
            if not table.exists:
                problems.append(f"table {R.nft_family(family)} {R.TABLE} is missing")
                continue
            cfg = self.family_config(family, view)
            want_chains: set[str] = set()
            want_elements: dict[str, set[str]] = {}
            slots = self.state[family].slots.copy()
            for port in [p for k, p in view.services.items() if k.family == family]:
                render = self.render(port, cfg, slots)
                want_chains.update(render.chains)
                for element in render.elements:
                    want_elements.setdefault(element.map, set()).add(element.key)
            have_chains = {c for c in table.chains if R.is_service_chain(c)}
            fam = R.nft_family(family)
            problems += [f"{fam}: missing chain {c}" for c in sorted(want_chains - have_chains)]
            problems += [f"{fam}: stale chain {c}" for c in sorted(have_chains - want_chains)]
            address_maps = {m for m in [*table.maps, *want_elements] if R.is_address_map(m)}
            for name in [*R.SERVICE_MAPS, *sorted(address_maps)]:
                have = {_key_text(k, name) for k in table.maps.get(name, {})}
                want = want_elements.get(name, set())
                problems += [f"{fam}: missing element {k} in {name}" for k in sorted(want - have)]
                problems += [f"{fam}: stale element {k} in {name}" for k in sorted(have - want)]
        return problems

    def trace(
        self, *, source_ip: str, protocol: str, dest_ip: str, dest_port: int,
        local_source: bool = False,
    ) -> Mapping[str, Any] | None:
        family = 6 if ":" in dest_ip else 4
        if family not in self.state:
            return None
        state = self.state[family]
        return trace_table(self.kernel(family), state.cfg, source_ip=source_ip,
                           protocol=protocol, dest_ip=dest_ip, dest_port=dest_port,
                           local_source=local_source)


def _sort_key(key: ServicePortKey) -> tuple[int, str, str, str, str]:
    """A plain tuple: sorting 10,000 attrs keys by their generated ``__lt__`` costs ~1 s."""
    name = key.name
    return (key.family, name.namespace, name.name, name.port, name.protocol)


# --------------------------------------------------------------------------------------------
# Interpreting the kernel's table (explain, audit, tests)
# --------------------------------------------------------------------------------------------


def _key_text(key: tuple[Any, ...], map_name: str = "") -> str:
    """A key read back from ``map_name`` as the renderer spells it."""
    if R.is_address_map(map_name):
        return f"{key[0]}-{key[-1]}"  # nft prints a one-value range as the value
    return " . ".join(str(part) for part in key)


def _rule_text(expr: Any) -> str:
    return json.dumps(expr, separators=(",", ":"))


def endpoints_of(table: nft.KernelTable, chain: str) -> set[str]:
    """Endpoints a new connection entering ``chain`` (service-/local-/external-) can reach."""
    if not chain or chain not in table.chains:
        return set()
    rules = table.chains[chain]
    if chain.startswith(R.EXTERNAL_PREFIX):
        target = next((t for t in (nft.is_plain_goto(r) for r in reversed(rules)) if t), None)
        return endpoints_of(table, target) if target else set()
    found: set[str] = set()
    for rule in rules:
        found.update(nft.dnat_map_targets(rule, table.maps))
        targets = nft.vmap_targets(rule, table.maps)
        for target in targets or ():
            for endpoint_rule in table.chains.get(target, ()):
                dnat = nft.dnat_target(endpoint_rule)
                if dnat:
                    found.add(dnat)
    return found


def dispatch(table: nft.KernelTable, protocol: str, address: str | None,
             port: int) -> tuple[str, str | None]:
    """("verdict", chain) for a new connection to ``address:port`` (None: a node port) as
    the filter and dispatch maps decide it: ("reject" | "drop" | "accept", target chain)."""
    proto = protocol.lower()
    if address is None:
        key: tuple[Any, ...] = (proto, port)
        blocked = table.maps.get(R.NO_ENDPOINT_NODEPORTS_MAP, {}).get(key)
        dispatch_map = table.maps.get(R.SERVICE_NODEPORTS_MAP, {})
    else:
        key = (address, proto, port)
        blocked = table.maps.get(R.NO_ENDPOINT_SERVICES_MAP, {}).get(key)
        dispatch_map = table.maps.get(R.SERVICE_IPS_MAP, {})
    if blocked is not None:
        return ("reject" if nft.goto_target(blocked) == R.REJECT_CHAIN else "drop"), None
    verdict = dispatch_map.get(key)
    if verdict is None:
        return "accept", None
    return "accept", nft.goto_target(verdict)


def trace_table(table: nft.KernelTable, cfg: R.FamilyConfig | None, *, source_ip: str,
                protocol: str, dest_ip: str, dest_port: int,
                local_source: bool = False) -> Mapping[str, Any]:
    """A small evaluator of our own rule shapes for ``kproxy explain --from``."""
    proto = protocol.lower()
    source = ipaddress.ip_address(source_ip)
    fw = table.maps.get(R.FIREWALL_IPS_MAP, {}).get((dest_ip, proto, dest_port))
    if fw is not None:
        for rule in table.chains.get(nft.goto_target(fw) or "", ()):
            allowed = _saddr_not_in(rule)
            if allowed is not None and not any(source in net for net in allowed):
                return {"verdict": "DROP", "endpoints": [], "masquerade": False,
                        "reason": "loadBalancerSourceRanges"}
    verdict, chain = dispatch(table, proto, dest_ip, dest_port)
    nodeport = False
    if verdict == "accept" and chain is None and cfg is not None and (
            cfg.nodeport_ips is None or dest_ip in cfg.nodeport_ips):
        verdict, chain = dispatch(table, proto, None, dest_port)
        nodeport = chain is not None or verdict != "accept"
    if verdict != "accept":
        return {"verdict": verdict.upper(), "endpoints": [], "masquerade": False,
                "nodeport": nodeport}
    if chain is None:
        return {"verdict": "ACCEPT", "endpoints": [], "masquerade": False,
                "reason": "not a service"}
    masquerade = False
    steps = [chain]
    for _ in range(4):
        if not chain.startswith(R.EXTERNAL_PREFIX):
            break
        next_chain = None
        for rule in table.chains.get(chain, ()):
            match_ok = _matches(rule, source, local_source, cfg)
            if not match_ok:
                continue
            target = _verdict_target(rule)
            if target == ("jump", R.MARK_MASQ_CHAIN):
                masquerade = True
            elif target is not None and target[0] == "goto":
                next_chain = target[1]
                break
        if next_chain is None:
            return {"verdict": "DROP", "endpoints": [], "masquerade": masquerade,
                    "chains": steps}
        chain = next_chain
        steps.append(chain)
    for rule in table.chains.get(chain, ()):
        if _verdict_target(rule) == ("jump", R.MARK_MASQ_CHAIN) and _matches(
                rule, source, local_source, cfg):
            masquerade = True
    endpoints = sorted(endpoints_of(table, chain))
    return {"verdict": "ACCEPT", "endpoints": endpoints, "masquerade": masquerade,
            "chains": steps, "nodeport": nodeport}


def _verdict_target(rule: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    for expr in rule:
        for kind in ("goto", "jump"):
            if kind in expr:
                return kind, str(expr[kind]["target"])
    return None


def _prefix_nets(right: Any) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    values = right.get("set", [right]) if isinstance(right, Mapping) else [right]
    nets = []
    for value in values:
        if isinstance(value, Mapping) and "prefix" in value:
            nets.append(ipaddress.ip_network(
                f"{value['prefix']['addr']}/{value['prefix']['len']}", strict=False))
        elif isinstance(value, str):
            nets.append(ipaddress.ip_network(value, strict=False))
    return nets


def _saddr_not_in(rule: Sequence[Mapping[str, Any]]) -> list[Any] | None:
    for expr in rule:
        match = expr.get("match")
        if match and match.get("op") == "!=" and match["left"].get("payload", {}).get(
                "field") == "saddr":
            return _prefix_nets(match["right"])
    return None


def _matches(rule: Sequence[Mapping[str, Any]], source: Any, local_source: bool,
             cfg: R.FamilyConfig | None) -> bool:
    """Whether ``rule``'s conditions hold for a packet from ``source`` (only the shapes
    this mode writes: saddr prefix or address, fib saddr type local, iifname; daddr and
    dport conditions hold by construction of the dispatch)."""
    for expr in rule:
        match = expr.get("match")
        if not match:
            continue
        left = match["left"]
        op = match.get("op", "==")
        if "fib" in left:
            result = local_source
        elif left.get("payload", {}).get("field") == "saddr":
            nets = _prefix_nets(match["right"])
            result = any(source in net for net in nets)
        elif "meta" in left and left["meta"].get("key") == "iifname":
            result = False  # the interface is unknown to a trace: treat as not local
        else:
            continue
        if op == "!=":
            result = not result
        if not result:
            return False
    return True
