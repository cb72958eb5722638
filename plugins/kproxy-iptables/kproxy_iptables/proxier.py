"""The ``iptables`` backend: renders the resolved model with `kproxy_iptables.rules` and
writes one ``iptables-restore --noflush`` transaction per IP family and sync.

Partial syncs (upstream's design): the top-level chains are rewritten on every sync, the
per-service chains only for the service ports the core reports as changed, and the chains of
removed or shrunk ports are deleted in the same transaction. Full syncs rewrite everything,
ensure the jump rules from the built-in chains, re-create the canary chains and delete stale
service chains found in ``iptables-save``.

The canary chains (``KUBE-PROXY-CANARY`` in mangle, nat and filter) and the jump rules from
the built-in chains are watched by a `CanaryMonitor` thread every sync period, as upstream's
``iptables.Monitor`` watches its canary: a sync never waits on ``iptables -S`` under the
xtables lock for them. When a canary (a firewall reload flushed the tables) or a jump (someone
deleted ``PREROUTING -j KUBE-SERVICES``) is gone, the next sync is a full one, which alone
re-creates them (partial periodic syncs touch neither), and the core is asked for it at once
(``BackendContext.request_sync``). Upstream re-ensures jumps only on its hourly full sync.
"""

from __future__ import annotations

import ipaddress
import logging
import shlex
import subprocess
import threading
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
from kproxy_core.kernel.iptables import RestoreData, quote
from kproxy_core.localtraffic import LocalTrafficDetector
from kproxy_core.model import NodeView, ResolvedServicePort, ServicePortKey
from kproxy_core.options import ModeConfigError
from kproxy_iptables import rules as R

ROUTE_LOCALNET = "/proc/sys/net/ipv4/conf/all/route_localnet"
TCP_BE_LIBERAL = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"


class Settings:
    """The configuration this mode reads, parsed and checked once."""

    def __init__(self, config: ConfigView) -> None:
        self.writer = str(config_value(config, "iptables.writer", "restore"))
        if self.writer not in ("restore", "libiptc"):
            raise ValueError(f"iptables.writer must be 'restore' or 'libiptc', not {self.writer!r}")
        self.masquerade_all = bool(config_value(config, "iptables.masqueradeAll", False))
        self.masquerade_mark = R.masquerade_mark(
            int(config_value(config, "iptables.masqueradeBit", 14)))
        self.localhost_nodeports = bool(
            config_value(config, "iptables.localhostNodePorts", True))
        self.local_traffic = LocalTrafficDetector(config)
        self.nodeport_addresses = as_list(config_value(config, "nodePortAddresses", ()))

    def local_detector(self, family: int, pod_cidrs: Sequence[str] = ()) -> R.LocalDetector:
        """Render the core's detect-local answer (``pod_cidrs``: NodeView.pod_cidrs)."""
        local = self.local_traffic.for_family(family, pod_cidrs)
        if local.cidr:
            return R.LocalDetector.for_cidrs([local.cidr])
        return R.LocalDetector.for_interface(
            f"{local.interface}+" if local.prefix else local.interface)

    def localhost_nodeports_for(self, family: int) -> bool:
        """Upstream turns localhost NodePorts off for IPv6 and when nodePortAddresses cannot
        include 127.0.0.1."""
        if family != 4 or not self.localhost_nodeports:
            return False
        if not self.nodeport_addresses:
            return True
        loopback = ipaddress.ip_address("127.0.0.1")
        for value in self.nodeport_addresses:
            if value == "primary":
                continue
            net = ipaddress.ip_network(value, strict=False)
            if net.version == 4 and loopback in net:
                return True
        return False


class CanaryMonitor:
    """Upstream's ``iptables.Monitor``: a thread that checks every ``interval`` seconds that
    what only a full sync re-creates is still in the kernel, and calls ``on_lost`` with what
    is missing.

    ``check`` returns what is missing, one readable line each (empty: all there); an
    exception from it (iptables not answering) is logged and is not a loss, as upstream
    treats resource errors.
    """

    def __init__(self, check: Callable[[], Sequence[str]],
                 on_lost: Callable[[Sequence[str]], None],
                 interval: float, logger: logging.Logger) -> None:
        if interval <= 0:
            raise ValueError(f"canary interval must be positive, not {interval}")
        self.check = check
        self.on_lost = on_lost
        self.interval = interval
        self.logger = logger
        self.checks = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="iptables-canary",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def check_once(self) -> bool:
        """One check; True if everything is there (``on_lost`` was called otherwise)."""
        self.checks += 1
        try:
            missing = list(self.check())
        except Exception as exc:
            self.logger.warning("cannot check the canary chains and jump rules: %s", exc)
            return True
        if missing:
            self.on_lost(missing)
        return not missing

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check_once()


class _FamilyState:
    __slots__ = ("cfg", "ports", "programmed", "rendered")

    def __init__(self) -> None:
        self.cfg: R.RenderConfig | None = None
        self.rendered: dict[ServicePortKey, R.ServiceRules] = {}
        self.ports: dict[ServicePortKey, ResolvedServicePort] = {}
        #: Per-service chains known to be in the kernel after the last successful sync.
        self.programmed: dict[ServicePortKey, tuple[str, ...]] = {}


def _read_sysctl(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return ""


class IptablesProxier(Backend):
    name = "iptables"
    #: Periodic syncs are partial, full ones hourly, as upstream (see Backend).
    periodic_full_sync = False

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        try:
            self.settings = Settings(context.config)
        except ValueError as exc:
            raise ModeConfigError(f"iptables mode: {exc}") from None
        self.families = tuple(f for f in context.families if f in (4, 6))
        self._writers: dict[int, Any] = {}
        self._state = {family: _FamilyState() for family in self.families}
        self._force_full = True
        #: Set by the canary monitor when a canary chain or a jump rule is gone, cleared when
        #: a full sync starts (it re-creates them).
        self._canary_lost = threading.Event()
        self.canary_monitor = CanaryMonitor(
            self.missing_in_kernel, self._on_canary_lost,
            float(config_value(context.config, "iptables.syncPeriod", 30.0)), context.logger)
        self._tcp_liberal = _read_sysctl(TCP_BE_LIBERAL) not in ("", "0")
        if 4 in self.families and self.settings.localhost_nodeports_for(4):
            # Upstream's trade-off (issue 90259): NodePorts on 127.0.0.1 need route_localnet;
            # the KUBE-FIREWALL rule blocks martian traffic to 127/8 from outside.
            if _read_sysctl(ROUTE_LOCALNET) != "1":
                context.logger.info("setting route_localnet=1 to allow NodePorts on localhost; "
                                    "disable with --iptables-localhost-nodeports=false")
                try:
                    with open(ROUTE_LOCALNET, "w") as handle:
                        handle.write("1")
                except OSError as exc:
                    raise BackendUnavailable(
                        f"cannot set net.ipv4.conf.all.route_localnet=1 ({exc}); run as root "
                        "or pass --iptables-localhost-nodeports=false") from None

    @classmethod
    def check_supported(cls, context: BackendContext) -> None:
        from kproxy_core.kernel.iptables_writers import detect_backend

        detect_backend()  # raises BackendUnavailable without iptables binaries

    # -- writers ---------------------------------------------------------------------------------

    def writer(self, family: int) -> Any:
        writer = self._writers.get(family)
        if writer is None:
            from kproxy_core.kernel.iptables_writers import make_writer

            if self.settings.writer == "libiptc":
                # libiptc speaks only x_tables: the legacy backend, whatever the host uses.
                writer = make_writer("libiptc", family, "legacy")
            else:
                writer = make_writer("restore", family)
            self._writers[family] = writer
        return writer

    # -- rendering ---------------------------------------------------------------------------------

    def render_config(self, view: NodeView, family: int,
                      services: Mapping[ServicePortKey, ResolvedServicePort]) -> R.RenderConfig:
        node_ips = [ip for ip in view.node_ips
                    if ipaddress.ip_address(ip).version == family]
        total_endpoints = sum(len(p.all_reachable_endpoints) or len(p.cluster_endpoints)
                              for p in services.values())
        s = self.settings
        return R.RenderConfig(
            family=family,
            masquerade_mark=s.masquerade_mark,
            masquerade_all=s.masquerade_all,
            local_detector=s.local_detector(family, view.pod_cidrs),
            localhost_nodeports=s.localhost_nodeports_for(family),
            nodeport_ips=R.nodeport_addresses(s.nodeport_addresses, view.node_ips, family),
            node_ip=node_ips[0] if node_ips else "",
            conntrack_tcp_liberal=self._tcp_liberal,
            large_cluster=total_endpoints > R.LARGE_CLUSTER_ENDPOINTS_THRESHOLD,
            targetless_rules=s.writer != "libiptc",
        )

    def plan(self, request: SyncRequest, family: int, *, full: bool,
             existing_nat_chains: Sequence[str] = (),
             sections: bool = False) -> tuple[Any, dict[str, Any]]:
        """Build the transaction for ``family`` without touching the kernel.

        Returns (RestoreData, bookkeeping to commit with `_commit` once it was applied). With
        ``sections`` (the nf_tables backend), a full sync is a list of RestoreData applied in
        order instead: see `rules.assemble_sections`.
        """
        st = self._state[family]
        services = request.view.family(family)  # type: ignore[arg-type]
        cfg = self.render_config(request.view, family, services)
        if cfg != st.cfg:
            # Mark, node IP or comment mode changed: every chain may read differently.
            full = True
        changed = {k for k in request.changed if k.family == family}
        rendered: dict[ServicePortKey, R.ServiceRules] = {}
        data: RestoreData | list[RestoreData]
        cache_ok = cfg == st.cfg
        for key, port in services.items():
            old = st.rendered.get(key) if cache_ok else None
            if old is not None and key not in changed and (not full or st.ports.get(key) == port):
                rendered[key] = old
            else:
                rendered[key] = R.render_service(port, cfg)
        if full:
            active = {c for r in rendered.values() for c in r.chains}
            delete = sorted(c for c in existing_nat_chains
                            if R.is_service_chain(c) and c not in active)
            if sections:
                data = R.assemble_sections(rendered, cfg, delete_chains=delete)
            else:
                single = R.assemble(rendered, cfg, delete_chains=delete)
                R.canary(single)
                data = single
            written = set(rendered)
        else:
            delete_set: set[str] = set()
            for key in changed:
                before = st.programmed.get(key)
                if before is None:
                    previous = request.previous.get(key)
                    before = R.render_service(previous, cfg).chains if previous else ()
                now = set(rendered[key].chains) if key in rendered else set()
                delete_set.update(c for c in before if c not in now)
            # On nf_tables the top-level jumps go in descending target order, which keeps
            # iptables-nft-restore's per-command chain-list walk short (rules.assemble_sections).
            data = R.assemble(R.nft_order(rendered) if sections else rendered, cfg,
                              write_chains_for=changed, delete_chains=sorted(delete_set))
            written = changed & set(rendered)
        book = {"cfg": cfg, "rendered": rendered, "services": services, "full": full,
                "written": written, "removed": changed - set(rendered)}
        return data, book

    def _commit(self, family: int, book: Mapping[str, Any]) -> None:
        st = self._state[family]
        st.cfg = book["cfg"]
        st.rendered = book["rendered"]
        st.ports = dict(book["services"])
        if book["full"]:
            st.programmed = {k: r.chains for k, r in st.rendered.items()}
        else:
            for key in book["removed"]:
                st.programmed.pop(key, None)
            for key in book["written"]:
                st.programmed[key] = st.rendered[key].chains

    # -- Backend -----------------------------------------------------------------------------------

    def sync(self, request: SyncRequest) -> SyncResult:
        from kproxy_core.kernel.iptables_writers import RestoreError

        full = request.full or self._force_full
        if full:
            # Cleared before the restore that re-creates the canaries: a loss seen during
            # this sync is then acted on by the next one (at worst a spare full sync).
            self._canary_lost.clear()
        objects = 0
        external = 0.0
        counters: dict[str, int] = {}
        try:
            for family in self.families:
                writer = self.writer(family)
                existing: list[str] = []
                missing: list[R.JumpRule] = []
                family_full = full or self._state[family].cfg is None
                if family_full:
                    builtin = _builtin_prefixes(self._jumps(family))
                    existing, nat_jumps = _read_saved(writer, "nat", builtin)
                    _, filter_jumps = _read_saved(writer, "filter", builtin)
                    missing = self._missing_jumps(
                        family, {"nat": nat_jumps, "filter": filter_jumps})
                    if self.settings.writer == "libiptc":
                        self._ensure_jumps(writer, family, missing)
                        missing = []
                sections = writer.backend == "nft"
                data, book = self.plan(request, family, full=family_full,
                                       existing_nat_chains=existing, sections=sections)
                if book["full"] and not family_full:
                    # Settings changed under a partial sync: stale chains need a listing.
                    self._ensure_jumps(writer, family)
                    data, book = self.plan(request, family, full=True,
                                           existing_nat_chains=_read_saved(writer, "nat")[0],
                                           sections=sections)
                if missing:
                    missing = _insert_jumps(data if isinstance(data, list) else [data],
                                            missing)
                    self._ensure_jumps(writer, family, missing)
                if isinstance(data, list):
                    parts = data
                    external += writer.restore_sections(parts)
                else:
                    parts = [data]
                    external += writer.restore(data)
                self._commit(family, book)
                objects += sum(part.line_count() for part in parts)
                nat_tables = [p.tables["nat"] for p in parts if "nat" in p.tables]
                flt_tables = [p.tables["filter"] for p in parts if "filter" in p.tables]
                counters[f"ipv{family}_nat_rules"] = sum(len(t.rules) for t in nat_tables)
                counters[f"ipv{family}_filter_rules"] = sum(len(t.rules) for t in flt_tables)
                counters[f"ipv{family}_nat_chains_deleted"] = sum(
                    len(t.deleted) for t in nat_tables)
        except RestoreError:
            self._force_full = True
            raise
        except SyncError:
            self._force_full = True
            raise
        except Exception as exc:
            self._force_full = True
            raise SyncError(f"iptables sync failed: {exc}") from exc
        self._force_full = False
        # Started after the first full sync created the canaries.
        self.canary_monitor.start()
        return SyncResult(objects_written=objects, counters=counters, external_seconds=external)

    def _jumps(self, family: int) -> list[R.JumpRule]:
        jumps = list(R.JUMP_RULES)
        if self.settings.localhost_nodeports_for(family):
            jumps += R.KUBELET_JUMP_RULES
        return jumps

    def _missing_jumps(self, family: int, saved: Mapping[str, Sequence[str]]
                       ) -> list[R.JumpRule]:
        """The jump rules absent from ``saved`` (iptables-save lines per table; only the
        built-in chains' rules matter).

        Checking ~14 rules with ``iptables -C`` (and ``-S`` for their chains) cost ~40
        processes per full sync, up to half of a 1k-service sync on a loaded node; two saves
        (the nat one is needed anyway for stale chains) answer the same question. A jump
        counts as present when its built-in chain has a rule ending in ``-j TARGET`` that
        carries its comment, which is what ``-C`` would find for rules kproxy wrote.
        """
        jumps = self._jumps(family)
        prefixes = _builtin_prefixes(jumps)
        by_chain: dict[tuple[str, str], list[str]] = {}
        for table, lines in saved.items():
            for line in lines:
                if line.startswith(prefixes):
                    chain = line.split(" ", 2)[1]
                    by_chain.setdefault((table, chain), []).append(line.rstrip())
        missing = []
        for jump in jumps:
            lines = by_chain.get((jump.table, jump.source), [])
            if not any(line.endswith(f"-j {jump.target}") and jump.comment in line
                       for line in lines):
                missing.append(jump)
        return missing

    def _ensure_jumps(self, writer: Any, family: int,
                      jumps: Sequence[R.JumpRule] | None = None) -> None:
        if jumps is None:
            jumps = self._jumps(family)
        for jump in jumps:
            writer.ensure_chain(jump.table, jump.target)
            writer.ensure_rule(jump.table, jump.source, jump.args(), prepend=True)

    def needs_full_sync(self) -> bool:
        """Whether the canary monitor saw a canary chain or a jump rule vanish since the last
        full sync (no kernel access: the monitor thread did that off the sync path)."""
        return self._canary_lost.is_set()

    def missing_in_kernel(self) -> list[str]:
        """What only a full sync re-creates and is gone from the kernel, in every family: the
        canary chains (all three tables; upstream looks at mangle only, so a reload of just
        nat or filter counts too) and the jump rules from the built-in chains (upstream does
        not look; its hourly full sync re-ensures them). One line each, for the log.

        Cost per family and check, measured at 10,000 services (see docs/modes/iptables.md):
        on nf_tables ``iptables -S PREROUTING`` reads that chain only (~4 ms) while ``-C`` or
        ``-S`` of a big chain read the whole nat table (~0.2 s) and ``iptables-save -t nat``
        takes ~9 s, so one ``-S`` per built-in chain; on legacy every nat command loads the
        whole table (~0.5 s) and ``iptables-save -t nat`` costs about the same, so one save
        per table answers the canary and all its jumps.
        """
        missing: list[str] = []
        for family in self.families:
            writer = self.writer(family)
            jumps = self._jumps(family)
            lines: dict[str, list[str]] = {}
            for table in ("mangle", "nat", "filter"):
                builtins = sorted({j.source for j in jumps if j.table == table})
                present, lines[table] = _monitor_listing(writer, table, builtins)
                if not present:
                    missing.append(f"canary chain {R.KUBE_PROXY_CANARY} is gone from the "
                                   f"IPv{family} {table} table (tables flushed?)")
            missing += [f"jump rule is gone: IPv{family} {jump.table} {jump.source} "
                        f"{shlex.join(jump.args())}"
                        for jump in self._missing_jumps(family, lines)]
        return missing

    def _on_canary_lost(self, missing: Sequence[str]) -> None:
        if self._canary_lost.is_set():
            return  # already reported; waiting for the full sync
        self._canary_lost.set()
        self.context.logger.info("iptables %s: the next sync is a full one",
                                 "; ".join(missing) or "canary check failed")
        # The repair does not wait for the next change or periodic sync.
        if self.context.request_sync is not None:
            self.context.request_sync()

    def close(self) -> None:
        self.canary_monitor.stop()

    def describe(self, key: ServicePortKey) -> Mapping[str, Any]:
        st = self._state.get(key.family)
        if st is None or key not in st.rendered:
            return {"programmed": False}
        own = set(st.rendered[key].chains)
        name = str(key.name)
        tables: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for table in ("nat", "filter"):
            text = self._save_with_counters(key.family, table)
            chains: dict[str, list[dict[str, Any]]] = {}
            for line in text.splitlines():
                packets, byte_count, rule = _split_counters(line)
                if not rule.startswith("-A "):
                    continue
                chain = rule.split(" ", 2)[1]
                mine = chain in own or (not R.is_service_chain(chain) and (
                    f"--comment {name} " in rule or f'"{name} ' in rule))
                if mine:
                    chains.setdefault(chain, []).append(
                        {"rule": rule, "packets": packets, "bytes": byte_count})
            tables[table] = chains
        return {"programmed": True, "family": key.family, "chains": sorted(own),
                "tables": tables}

    def trace(
        self, *, source_ip: str, protocol: str, dest_ip: str, dest_port: int,
        local_source: bool = False,
    ) -> Mapping[str, Any] | None:
        """Walk the live nat and filter tables with the core's packet tracer."""
        from kproxy_core.testing.iptables_save import parse_iptables_save
        from kproxy_core.testing.tracer import trace

        family = 6 if ":" in dest_ip else 4
        writer = self.writer(family)
        tables = parse_iptables_save(writer.save("nat") + writer.save("filter"))
        cfg = self._state[family].cfg if family in self._state else None
        # addrtype LOCAL is judged against the node addresses the last sync rendered with.
        node_ips = [ip for ip in dict.fromkeys([cfg.node_ip, *(cfg.nodeport_ips or ())])
                    if ip and "/" not in ip] if cfg is not None else []
        result = trace(tables, source_ip=source_ip, protocol=protocol, dest_ip=dest_ip,
                       dest_port=dest_port, node_ips=node_ips, local_source=local_source)
        return {"verdict": result.verdict, "endpoints": list(result.endpoints),
                "masquerade": result.masquerade, "chains": list(result.chains_visited)}

    def audit(self, view: NodeView) -> list[str]:
        """Per-service chains in the kernel that no synced service owns, and the reverse."""
        lines: list[str] = []
        for family, st in self._state.items():
            if st.cfg is None:
                continue
            existing = {c for c in _read_saved(self.writer(family), "nat")[0]
                        if R.is_service_chain(c)}
            expected = {c for chains in st.programmed.values() for c in chains}
            lines += [f"IPv{family} nat chain {c} is programmed but no service owns it"
                      for c in sorted(existing - expected)]
            lines += [f"IPv{family} nat chain {c} is missing from the kernel"
                      for c in sorted(expected - existing)]
            for table, chain in (("nat", R.KUBE_SERVICES), ("filter", R.KUBE_SERVICES)):
                if not self.writer(family).chain_exists(table, chain):
                    lines.append(f"IPv{family} {table} chain {chain} is missing")
        return lines

    def _save_with_counters(self, family: int, table: str) -> str:
        from kproxy_core.kernel.iptables_writers import find_binary

        writer = self.writer(family)
        binary = find_binary(family, writer.backend, "save")
        if binary is None:
            return str(writer.save(table))
        proc = subprocess.run([binary, "-c", "-t", table], capture_output=True, text=True,
                              timeout=60, check=False)
        return proc.stdout if proc.returncode == 0 else str(writer.save(table))


def _insert_jumps(parts: Sequence[RestoreData], jumps: Sequence[R.JumpRule]
                  ) -> list[R.JumpRule]:
    """Put ``-I SOURCE 1 ...`` for ``jumps`` into the part that declares their target chain,
    so a missing jump comes back in the same kernel transaction that fills its chain (one
    ``iptables -I`` each, in the same order, would leave the same rule order). Returns the
    jumps no part declares a target for (left to `IptablesProxier._ensure_jumps`)."""
    left = []
    for jump in jumps:
        for part in parts:
            table = part.tables.get(jump.table)
            if table is not None and table.has_chain(jump.target):
                table.raw_rules([" ".join(["-I", jump.source, "1", *(
                    quote(arg) for arg in jump.args())])])
                break
        else:
            left.append(jump)
    return left


def _builtin_prefixes(jumps: Sequence[R.JumpRule]) -> tuple[str, ...]:
    return tuple(sorted({f"-A {jump.source} " for jump in jumps}))


def _read_saved(writer: Any, table: str, keep: tuple[str, ...] = ()
                ) -> tuple[list[str], list[str]]:
    """(chains, lines starting with one of ``keep``) of ``table`` in the kernel.

    ``iptables-save`` is read as a stream: at 10k services the nat table's text is ~25 MB and
    its lines as a list twice that, which made every periodic full sync kproxy's peak memory.
    """
    from kproxy_core.kernel.iptables_writers import COMMAND_TIMEOUT, find_binary

    binary = find_binary(writer.family, writer.backend, "save")
    if binary is None:  # cannot happen with a working writer; keep its own error path
        text = str(writer.save(table))
        return _chains_in(text), [line for line in text.splitlines() if line.startswith(keep)]
    chains: list[str] = []
    kept: list[str] = []
    with subprocess.Popen([binary, "-t", table], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            if line.startswith(":"):
                chains.append(line[1:].split(" ", 1)[0])
            elif keep and line.startswith(keep):
                kept.append(line.rstrip("\n"))
        error = proc.stderr.read()
        code = proc.wait(timeout=COMMAND_TIMEOUT)
    if code != 0:
        raise SyncError(f"{binary} -t {table} exited {code}: {error.strip()}")
    return chains, kept


def _monitor_listing(writer: Any, table: str, builtins: Sequence[str]
                     ) -> tuple[bool, list[str]]:
    """(canary chain present, the rules of ``builtins`` as ``-A CHAIN ...`` lines) of
    ``table``, the cheapest way for the writer's backend (`IptablesProxier.missing_in_kernel`
    has the numbers)."""
    if writer.backend == "legacy":
        prefixes = tuple(f"-A {chain} " for chain in builtins)
        chains, saved = _read_saved(writer, table, prefixes)
        return R.KUBE_PROXY_CANARY in chains, saved
    present = bool(writer.chain_exists(table, R.KUBE_PROXY_CANARY))
    kept: list[str] = []
    for chain in builtins:
        kept += [line for line in writer.list_rules(table, chain) if line.startswith("-A ")]
    return present, kept


def _chains_in(save_text: str) -> list[str]:
    return [line[1:].split(" ", 1)[0] for line in save_text.splitlines() if line.startswith(":")]


def _split_counters(line: str) -> tuple[int, int, str]:
    if line.startswith("["):
        end = line.find("]")
        packets, _, byte_count = line[1:end].partition(":")
        try:
            return int(packets), int(byte_count), line[end + 1:].strip()
        except ValueError:
            return 0, 0, line
    return 0, 0, line


__all__ = ["IptablesProxier", "Settings", "config_value"]
