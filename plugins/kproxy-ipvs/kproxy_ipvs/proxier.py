"""`IpvsProxier`: renders the resolved model into IPVS virtual/real servers, addresses on
``kube-ipvs0``, ipsets and a handful of iptables rules, touching only what changed.

Full sync: compare every desired object with what the kernel has, fix the difference, remove
our leftovers. Partial sync: compare the changed ports' new state with what the last sync
applied for them (reference counts for shared addresses and set entries), no kernel reads
except for graceful termination. Either way the number of kernel writes is reported as
``objects_written`` and, per kind, in ``counters``.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from kproxy_core.backend import (
    Backend,
    BackendContext,
    BackendUnavailable,
    SyncError,
    SyncRequest,
    SyncResult,
    config_value,
)
from kproxy_core.localtraffic import LocalTrafficDetector
from kproxy_core.model import ServicePortKey
from kproxy_core.options import ModeConfigError
from kproxy_ipvs import rules
from kproxy_ipvs.netlink import DestStats, Kernel, NetlinkKernel
from kproxy_ipvs.rules import PortState, RealServer, VirtualServer, VSKey

#: Upstream's IPVS sysctls (per network namespace).
SYSCTLS = (
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/conn_reuse_mode", "0"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
    ("net/ipv4/ip_forward", "1"),
)
STRICT_ARP_SYSCTLS = (("net/ipv4/conf/all/arp_ignore", "1"),
                      ("net/ipv4/conf/all/arp_announce", "2"))
#: Upstream's gracefulTerminationManager checks its draining real servers every minute.
GRACEFUL_PERIOD = 60.0


def resolve_scheduler(name: str, algorithms: Iterable[Any]) -> str:
    """``--ipvs-scheduler`` to a kernel scheduler: "" is rr; a registered algorithm name maps
    through its ``ipvs_scheduler``; otherwise a kernel scheduler name."""
    name = (name or "").strip()
    if not name:
        return rules.DEFAULT_SCHEDULER
    for spec in algorithms:
        if spec.name == name and name not in rules.KNOWN_SCHEDULERS:
            if spec.ipvs_scheduler is None:
                raise ModeConfigError(
                    f"--ipvs-scheduler: load-balancing algorithm {name!r} has no IPVS "
                    f"scheduler; choose one of {', '.join(rules.KNOWN_SCHEDULERS)}")
            return str(spec.ipvs_scheduler)
    if name not in rules.KNOWN_SCHEDULERS:
        raise ModeConfigError(
            f"--ipvs-scheduler: unknown IPVS scheduler {name!r}; choose one of "
            f"{', '.join(rules.KNOWN_SCHEDULERS)}")
    return name


def _seconds(value: Any) -> int:
    return round(float(value or 0))


class IpvsProxier(Backend):
    name: ClassVar[str] = "ipvs"
    sync_period_options: ClassVar[tuple[str, str]] = ("ipvs.syncPeriod", "ipvs.minSyncPeriod")

    def __init__(self, context: BackendContext, kernel: Kernel | None = None,
                 graceful_period: float = GRACEFUL_PERIOD) -> None:
        super().__init__(context)
        config = context.config
        try:
            algorithms = list(context.plugins.algorithms())
        except Exception:
            algorithms = []
        self.scheduler = resolve_scheduler(str(config_value(config, "ipvs.scheduler", "")),
                                           algorithms)
        self.strict_arp = bool(config_value(config, "ipvs.strictARP", False))
        self.exclude_cidrs = [ipaddress.ip_network(c, strict=False)
                              for c in config_value(config, "ipvs.excludeCIDRs", ())]
        self.masquerade_all = bool(config_value(config, "iptables.masqueradeAll", False))
        self.masquerade_bit = int(config_value(config, "iptables.masqueradeBit", 14))
        # detectLocalMode is node semantics, decided in the core; this mode renders it (a bad
        # value is the core's ModeConfigError).
        self.local_traffic = LocalTrafficDetector(config)
        self.node_port_addresses = list(config_value(config, "nodePortAddresses", ()))
        self.families: tuple[int, ...] = tuple(sorted(set(context.families))) or (4,)
        # The iptables writers are built by the first sync, after its netlink work: building
        # them beside it (the core's backend detection is four save processes) took the
        # CPU from that work in the emulated 2-vCPU VM and made the first sync slower.
        self.kernel: Kernel = kernel if kernel is not None else NetlinkKernel()
        self._ports: dict[ServicePortKey, PortState] = {}
        self._services: dict[VSKey, tuple[VirtualServer, frozenset[RealServer]]] = {}
        #: Real servers over ``_services`` (kept up to date: a partial sync stays O(changed)).
        self._real_count = 0
        self._addresses: Counter[str] = Counter()
        self._entries: dict[tuple[int, str], Counter[str]] = {}
        self._no_node_access: Counter[tuple[str, str, int]] = Counter()
        self._external_drops: Counter[rules.ExternalDrop] = Counter()
        #: (virtual server, real server) at weight 0 waiting for its connections to end.
        self._graceful: dict[tuple[VSKey, RealServer], float] = {}
        self._rules_text: dict[int, str] = {}
        self._rules_inputs: dict[int, tuple[object, ...]] = {}
        self._node_ips: dict[int, tuple[str, ...]] = {}
        self._ops: Counter[str] = Counter()
        self._initialised = False
        #: Real servers dumped during this sync (one dump per virtual server at most).
        self._dests: dict[VSKey, Mapping[RealServer, DestStats]] = {}
        #: Serialises syncs with the graceful-termination timer (one set of sockets).
        self._lock = threading.Lock()
        self._graceful_period = graceful_period
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def check_supported(cls, context: BackendContext) -> None:
        try:
            algorithms = list(context.plugins.algorithms())
        except Exception:
            algorithms = []
        scheduler = resolve_scheduler(str(config_value(context.config, "ipvs.scheduler", "")),
                                      algorithms)
        kernel = NetlinkKernel()
        try:
            kernel.list_services()
            kernel.check_scheduler(scheduler)
        except BackendUnavailable:
            raise
        except Exception as exc:
            raise BackendUnavailable(
                f"IPVS is not usable ({exc}): load the ip_vs kernel module (modprobe ip_vs)"
            ) from exc
        finally:
            kernel.close()

    def _initialise(self) -> None:
        for path, value in SYSCTLS:
            self.kernel.sysctl(path, value)
        if self.strict_arp:
            for path, value in STRICT_ARP_SYSCTLS:
                self.kernel.sysctl(path, value)
        config = self.context.config
        tcp = _seconds(config_value(config, "ipvs.tcpTimeout", 0))
        tcpfin = _seconds(config_value(config, "ipvs.tcpFinTimeout", 0))
        udp = _seconds(config_value(config, "ipvs.udpTimeout", 0))
        if tcp or tcpfin or udp:
            self.kernel.set_timeouts(tcp, tcpfin, udp)
        self.kernel.check_scheduler(self.scheduler)
        self._initialised = True

    def close(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=10)
            self._timer = None
        with self._lock:
            closer = getattr(self.kernel, "close", None)
            if closer is not None:
                closer()

    # -- helpers -----------------------------------------------------------------------------

    def _excluded(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self.exclude_cidrs if net.version == ip.version)

    def _compute_node_ips(self) -> None:
        local = self.kernel.local_addresses(rules.DUMMY_DEVICE)
        if self.node_port_addresses:
            nets = [ipaddress.ip_network(c, strict=False) for c in self.node_port_addresses
                    if c != "primary"]
            wanted = [a for a in local if any(ipaddress.ip_address(a) in n for n in nets
                                              if n.version == ipaddress.ip_address(a).version)]
            if "primary" in self.node_port_addresses:
                wanted += [a for a in self._view_node_ips if a in local and a not in wanted]
            local = wanted
        for family in self.families:
            self._node_ips[family] = tuple(a for a in local if (":" in a) == (family == 6))

    _view_node_ips: tuple[str, ...] = ()
    _pod_cidrs: tuple[str, ...] = ()

    def _state_for(self, key: ServicePortKey, request: SyncRequest) -> PortState | None:
        port = request.view.services.get(key)
        if port is None or key.family not in self.families:
            return None
        settings = rules.Settings(self.scheduler, self._node_ips.get(key.family, ()))
        return rules.port_state(port, settings)

    def _op(self, kind: str) -> None:
        self._ops[kind] += 1

    # -- sync --------------------------------------------------------------------------------

    def sync(self, request: SyncRequest) -> SyncResult:
        with self._lock:
            return self._sync(request)

    def _sync(self, request: SyncRequest) -> SyncResult:
        self._ops = Counter()
        self._dests = {}
        external = 0.0
        try:
            if not self._initialised:
                self._initialise()
            self._view_node_ips = tuple(request.view.node_ips)
            self._pod_cidrs = tuple(request.view.pod_cidrs)
            if request.full or (not self._ports and not self._services):
                external = self._full_sync(request)
                # Partial syncs leave earlier drains to the timer: no dumps on that path.
                self._process_graceful()
            else:
                external = self._partial_sync(request)
        except (BackendUnavailable, SyncError):
            raise
        except Exception as exc:
            raise SyncError(f"ipvs sync failed: {exc}") from exc
        finally:
            self._dests = {}
        if self._graceful:
            self._start_timer()
        counters = dict(self._ops)
        counters["virtual_servers"] = len(self._services)
        counters["real_servers"] = self._real_count
        counters["graceful_pending"] = len(self._graceful)
        counters["kernel_ops"] = sum(self._ops.values())
        return SyncResult(objects_written=counters["kernel_ops"], counters=counters,
                          external_seconds=external)

    def _desired_all(self, request: SyncRequest) -> None:
        self._ports = {}
        for key in request.view.services:
            state = self._state_for(key, request)
            if state is not None:
                self._ports[key] = state
        self._services = {}
        self._real_count = 0
        self._addresses = Counter()
        self._entries = {}
        self._no_node_access = Counter()
        self._external_drops = Counter()
        for key, state in self._ports.items():
            self._account(state, +1, key.family)

    def _account(self, state: PortState, sign: int,
                 family_of_port: int) -> tuple[set[str], set[tuple[int, str, str]]]:
        """Add (sign +1) or remove (-1) a port's contribution to the shared counts. Returns
        addresses and (family, set, entry) whose count crossed zero."""
        flipped_addresses: set[str] = set()
        flipped_entries: set[tuple[int, str, str]] = set()
        for key, value in state.services.items():
            if sign > 0:
                previous = self._services.get(key)
                self._real_count += len(value[1]) - (len(previous[1]) if previous else 0)
                self._services[key] = value
            elif self._services.get(key) == value:
                self._real_count -= len(value[1])
                del self._services[key]
        for address in state.addresses:
            before = self._addresses[address]
            self._addresses[address] += sign
            if self._addresses[address] <= 0:
                del self._addresses[address]
            if (before == 0) != (self._addresses.get(address, 0) == 0):
                flipped_addresses.add(address)
            family = 6 if ":" in address else 4
            ips = self._entries.setdefault((family, rules.IPVS_IPS.name), Counter())
            ips[address] += sign
            if ips[address] <= 0:
                del ips[address]
            if (before == 0) != (ips.get(address, 0) == 0):
                flipped_entries.add((family, rules.IPVS_IPS.name, address))
        for base, entries in state.entries.items():
            counts = self._entries.setdefault((family_of_port, base), Counter())
            for entry in entries:
                before = counts[entry]
                counts[entry] += sign
                if counts[entry] <= 0:
                    del counts[entry]
                if (before == 0) != (counts.get(entry, 0) == 0):
                    flipped_entries.add((family_of_port, base, entry))
        for item in state.no_node_access:
            self._no_node_access[item] += sign
            if self._no_node_access[item] <= 0:
                del self._no_node_access[item]
        for drop in state.external_drops:
            self._external_drops[drop] += sign
            if self._external_drops[drop] <= 0:
                del self._external_drops[drop]
        return flipped_addresses, flipped_entries

    def _ensure_sets(self) -> set[str]:
        """Our sets there; returns the names just created (empty: no need to list them)."""
        return set(self.kernel.ensure_sets([(rules.set_name(spec.name, family), spec.type,
                                             family)
                                            for family in self.families for spec in rules.SETS]))

    def _full_sync(self, request: SyncRequest) -> float:
        # The sets first (the iptables rules name them); kube-ipvs0 only when its addresses go
        # in, alongside the other bulk steps: creating a device took seconds in the emulated
        # VM. Until then it has no addresses to list, and none to leave out of the node's.
        created = self._ensure_sets()
        self._compute_node_ips()
        self._desired_all(request)
        # Virtual and real servers.
        current = self.kernel.list_services()
        for key in current:
            if key.family not in self.families or self._excluded(key.address):
                continue
            if key not in self._services:
                self.kernel.del_service(key)
                self._op("virtual_server_del")
                self._drop_graceful(key)
        new_services: list[tuple[VirtualServer, list[RealServer]]] = []
        for key, (vs, reals) in self._services.items():
            existing = current.get(key)
            if existing is None:
                new_services.append((vs, list(reals)))  # unsorted: attrs ordering is slow
                continue
            if existing != vs:
                self.kernel.update_service(vs)
                self._op("virtual_server_update")
            stats = self._dests[key] = self.kernel.list_dests(key)
            self._sync_reals(key, reals, {r: s.weight for r, s in stats.items()}, is_new=False)
        # What is new goes in bulk (on a big node's first sync that is nearly everything),
        # IPVS, addresses and set entries at once: separate kernel subsystems and sockets.
        bulk_jobs: list[Callable[[], None]] = []
        if new_services:
            bulk_jobs.append(lambda: self.kernel.add_services(new_services))
            for vs, new_reals in new_services:
                self._op("virtual_server_add")
                self._ops["real_server_add"] += len(new_reals)
                for real in new_reals:
                    self._graceful.pop((vs.key, real), None)
        # Addresses on kube-ipvs0.
        bound = self.kernel.list_addresses(rules.DUMMY_DEVICE)
        for address in sorted(bound - set(self._addresses)):
            self.kernel.del_address(rules.DUMMY_DEVICE, address)
            self._op("address_del")
        missing = sorted(set(self._addresses) - bound)

        def addresses() -> None:
            self.kernel.ensure_dummy(rules.DUMMY_DEVICE)
            if missing:
                self.kernel.add_addresses(rules.DUMMY_DEVICE, missing)

        bulk_jobs.append(addresses)
        if missing:
            self._ops["address_add"] += len(missing)
        # Set entries.
        set_adds: list[tuple[str, str, list[str]]] = []
        for family in self.families:
            for spec in rules.SETS:
                name = rules.set_name(spec.name, family)
                desired = set(self._entries.get((family, spec.name), ()))
                have = set() if name in created else self.kernel.list_set(name)
                for entry in sorted(have - desired):
                    self.kernel.del_entry(name, spec.type, entry)
                    self._op("set_entry_del")
                added = sorted(desired - have)
                if added:
                    set_adds.append((name, spec.type, added))
                    self._ops["set_entry_add"] += len(added)
        if set_adds:
            def add_entries() -> None:
                for name, set_type, entries in set_adds:
                    self.kernel.add_entries(name, set_type, entries)

            bulk_jobs.append(add_entries)
        # The bulk steps at once: separate kernel subsystems, and their work is in the kernel.
        _concurrently(bulk_jobs)
        # Then iptables: our chains (the restore creates them) and the missing jumps to them
        # in one restore. Not alongside the bulk steps: its processes (and, on first use, the
        # core's backend detection) took the CPU from them in the emulated 2-vCPU VM, and
        # the first sync got slower, not faster.
        self._rules_text = {}
        self._rules_inputs = {}
        return self._write_rules(with_jumps=True)

    def _sync_reals(self, key: VSKey, desired: frozenset[RealServer],
                    current: Mapping[RealServer, int], *, is_new: bool) -> None:
        for real in sorted(desired):
            weight = current.get(real)
            if weight is None:
                self.kernel.add_dest(key, real, 1)
                self._op("real_server_add")
            elif weight != 1:
                # Back from graceful termination (or weight changed by someone else).
                self.kernel.update_dest(key, real, 1)
                self._op("real_server_update")
            self._graceful.pop((key, real), None)
        if is_new:
            return
        for real in sorted(set(current) - desired):
            self._remove_real(key, real, current[real])

    def _remove_real(self, key: VSKey, real: RealServer, weight: int) -> None:
        """Upstream's GracefulDeleteRS: UDP/SCTP and idle TCP real servers go at once; a TCP
        one with connections gets weight 0 and waits (`_process_graceful`)."""
        if (key, real) in self._graceful:
            return
        if key.protocol == "TCP":
            stats = self._dests.get(key)
            if stats is None:
                stats = self._dests[key] = self.kernel.list_dests(key)
            stat = stats.get(real)
            if stat is not None and stat.active + stat.inactive > 0:
                if weight != 0:
                    self.kernel.update_dest(key, real, 0)
                    self._op("real_server_update")
                self._graceful[(key, real)] = time.monotonic()
                return
        self.kernel.del_dest(key, real)
        self._op("real_server_del")

    def _drop_graceful(self, key: VSKey) -> None:
        for pending in [p for p in self._graceful if p[0] == key]:
            del self._graceful[pending]

    def _process_graceful(self) -> None:
        """Delete weight-0 TCP real servers whose connections have ended (upstream checks
        active + inactive connections)."""
        by_service: dict[VSKey, list[RealServer]] = {}
        for key, real in self._graceful:
            by_service.setdefault(key, []).append(real)
        for key, reals in by_service.items():
            try:
                stats = self.kernel.list_dests(key)
            except Exception:
                stats = {}
            for real in reals:
                stat = stats.get(real)
                if stat is None:
                    self._graceful.pop((key, real), None)
                elif stat.active + stat.inactive == 0:
                    self.kernel.del_dest(key, real)
                    self._op("real_server_del")
                    self._graceful.pop((key, real), None)

    def poll_graceful(self) -> int:
        """Run graceful-termination deletions outside a sync; returns what is still pending."""
        with self._lock:
            self._process_graceful()
            return len(self._graceful)

    def _start_timer(self) -> None:
        if self._timer is None and not self._stop.is_set():
            self._timer = threading.Thread(target=self._graceful_loop, daemon=True,
                                           name="kproxy-ipvs-graceful")
            self._timer.start()

    def _graceful_loop(self) -> None:
        # A thread started by the sync thread shares its network namespace.
        while not self._stop.wait(self._graceful_period):
            try:
                self.poll_graceful()
            except Exception as exc:  # the next sync or tick retries
                self.context.logger.warning("ipvs graceful termination check failed: %s", exc)

    def _partial_sync(self, request: SyncRequest) -> float:
        for key in sorted(request.changed):
            old = self._ports.pop(key, None)
            new = self._state_for(key, request)
            old_services = dict(old.services) if old else {}
            new_services = dict(new.services) if new else {}
            flipped_a: set[str] = set()
            flipped_e: set[tuple[int, str, str]] = set()
            if old is not None:
                a, e = self._account(old, -1, key.family)
                flipped_a ^= a
                flipped_e ^= e
            if new is not None:
                self._ports[key] = new
                a, e = self._account(new, +1, key.family)
                flipped_a ^= a
                flipped_e ^= e
            for vs_key in sorted(set(old_services) - set(new_services)):
                if vs_key not in self._services:
                    self.kernel.del_service(vs_key)
                    self._op("virtual_server_del")
                    self._drop_graceful(vs_key)
            for vs_key, (vs, reals) in sorted(new_services.items()):
                previous = old_services.get(vs_key)
                if previous is None:
                    self.kernel.add_service(vs)
                    self._op("virtual_server_add")
                    self._sync_reals(vs_key, reals, {}, is_new=True)
                    continue
                if previous[0] != vs:
                    self.kernel.update_service(vs)
                    self._op("virtual_server_update")
                if previous[1] != reals:
                    current = {r: 1 for r in previous[1]}
                    current.update({r: 0 for (k, r) in self._graceful if k == vs_key})
                    self._sync_reals(vs_key, reals, current, is_new=False)
            for address in sorted(flipped_a):
                if address in self._addresses:
                    self.kernel.add_address(rules.DUMMY_DEVICE, address)
                    self._op("address_add")
                else:
                    self.kernel.del_address(rules.DUMMY_DEVICE, address)
                    self._op("address_del")
            for family, base, entry in sorted(flipped_e):
                spec = rules.SETS_BY_NAME[base]
                name = rules.set_name(base, family)
                if entry in self._entries.get((family, base), ()):
                    self.kernel.add_entry(name, spec.type, entry)
                    self._op("set_entry_add")
                else:
                    self.kernel.del_entry(name, spec.type, entry)
                    self._op("set_entry_del")
        return self._write_rules()

    def _write_rules(self, *, with_jumps: bool = False) -> float:
        """Restore each family's rules when what they depend on changed; ``with_jumps`` (full
        syncs): always, with the jumps from the built-in chains checked and the missing ones
        inserted in the same restore."""
        elapsed = 0.0
        for family in self.families:
            nonempty = frozenset(base for (fam, base), counts in self._entries.items()
                                 if fam == family and counts)
            not_local = rules.not_local_match(
                self.local_traffic.for_family(family, self._pod_cidrs))
            no_node_access = frozenset(item for item in self._no_node_access
                                       if (":" in item[0]) == (family == 6))
            drops = frozenset(drop for drop in self._external_drops if drop.family == family)
            # Everything the rules depend on: unchanged (most partial syncs), nothing to render.
            inputs = (nonempty, not_local, no_node_access, drops)
            if self._rules_inputs.get(family) == inputs and not with_jumps:
                continue
            data = rules.iptables_rules(
                rules.IptablesSettings(family, self.masquerade_all,  # type: ignore[arg-type]
                                       self.masquerade_bit, not_local),
                nonempty, no_node_access, drops)
            text = data.render()
            if with_jumps:
                elapsed += self.kernel.restore_with_jumps(data, [
                    (table, chain, rules.jump_args(target, comment))
                    for table, chain, target, comment in rules.JUMPS])
                self._op("iptables_restore")
                self._rules_text[family] = text
            elif self._rules_text.get(family) != text:
                elapsed += self.kernel.restore(data)
                self._op("iptables_restore")
                self._rules_text[family] = text
            self._rules_inputs[family] = inputs
        return elapsed

    # -- explain -----------------------------------------------------------------------------

    def describe(self, key: ServicePortKey) -> Mapping[str, Any]:
        with self._lock:  # explain runs in another thread; the sockets are shared
            return self._describe(key)

    def _describe(self, key: ServicePortKey) -> Mapping[str, Any]:
        state = self._ports.get(key)
        if state is None:
            return {}
        out: dict[str, Any] = {"virtual_servers": {}}
        for vs_key in sorted(state.services):
            try:
                dests = self.kernel.list_dests(vs_key)
            except Exception as exc:  # explain must not fail on a vanished service
                out["virtual_servers"][str(vs_key)] = f"error: {exc}"
                continue
            out["virtual_servers"][str(vs_key)] = {
                str(real): {"weight": s.weight, "active": s.active, "inactive": s.inactive}
                for real, s in sorted(dests.items())
            }
        out["addresses"] = sorted(state.addresses)
        out["ipsets"] = {base: sorted(entries) for base, entries in sorted(state.entries.items())}
        return out


def _concurrently(jobs: list[Callable[[], None]]) -> None:
    """Run ``jobs`` at once (threads share the caller's network namespace); the first error
    is raised after all have ended. The kernel work happens inside the send calls, which
    release the GIL, so independent kernel subsystems proceed in parallel."""
    if len(jobs) <= 1:
        for job in jobs:
            job()
        return
    errors: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,), name="kproxy-ipvs-bulk")
               for job in jobs[1:]]
    for thread in threads:
        thread.start()
    run(jobs[0])
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
