"""A packet tracer over parsed iptables rules (upstream proxier_test.go ``tracePacket``, in
Python): which endpoints can a new connection reach, is it masqueraded, is it dropped?

    result = trace(parse_iptables_save(text), source_ip="10.0.0.2", protocol="TCP",
                   dest_ip="172.30.0.41", dest_port=80, node_ips=["192.168.0.2"])
    result.endpoints == ["10.180.0.1:80"]; result.masquerade; result.verdict == "ACCEPT"

The walk follows the kernel's hooks for the first packet of a connection: nat PREROUTING (nat
OUTPUT with ``local_source``), then filter INPUT (destination local after DNAT) or FORWARD
(filter OUTPUT with ``local_source``), then nat POSTROUTING. A built-in chain without rules
gets kube-proxy's standard jumps (`DEFAULT_JUMPS`), because those are added with single
commands and are absent from restore text.

Probabilistic rules fork the walk instead of rolling dice: ``-m statistic`` and
``-m recent --rcheck/--update`` (affinity) both "may match", so every endpoint a connection
could reach appears in ``endpoints``. ``masquerade`` is true if any path is masqueraded.
Anything the tracer does not understand raises `TraceError` rather than guessing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Literal

import attrs

from kproxy_core.testing.iptables_save import DEFAULT_JUMPS, Rule, Table, Tables

Verdict = Literal["ACCEPT", "DROP", "REJECT"]
MASQ_MARK = 0x4000
MAX_PATHS = 10000


class TraceError(ValueError):
    """The rule set uses something the tracer cannot evaluate (named in the message)."""


@attrs.frozen
class TracePath:
    """One way through the rules."""

    endpoint: str | None
    masquerade: bool
    verdict: Verdict
    chains_visited: tuple[str, ...]


@attrs.frozen
class TraceResult:
    #: ``ip:port`` (``[ip]:port`` for IPv6) of every DNAT/REDIRECT destination reachable, in
    #: rule order, without duplicates.
    endpoints: list[str]
    masquerade: bool
    #: ACCEPT if any path is accepted, else the verdict of the first path.
    verdict: Verdict
    #: ``table/chain`` in first-visit order over all paths.
    chains_visited: list[str]
    paths: list[TracePath] = attrs.field(factory=list)


@attrs.frozen
class _State:
    src: str
    dst: str
    dport: int
    mark: int = 0
    endpoint: str | None = None
    masquerade: bool = False
    visited: tuple[str, ...] = ()


# Outcome of walking a chain: "return" (fell off the end or RETURN), or a verdict.
_Outcome = Literal["return", "ACCEPT", "DROP", "REJECT"]


def _addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def _in_net(ip: str, cidr: str) -> bool:
    net = ipaddress.ip_network(cidr, strict=False)
    addr = _addr(ip)
    return addr.version == net.version and addr in net


def _port_in(port: int, spec: str) -> bool:
    """``80``, ``80:90`` (iptables) or ``80-90`` (ipset)."""
    for sep in (":", "-"):
        if sep in spec:
            low, high = spec.split(sep, 1)
            return int(low or 0) <= port <= int(high or 65535)
    return port == int(spec)


def _split_hostport(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port.split("-")[0])
    return text, None


def _format_endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _parse_mark(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF


class _Tracer:
    def __init__(self, tables: Tables, protocol: str, node_ips: Sequence[str],
                 local_source: bool, ipsets: Mapping[str, Sequence[str]]) -> None:
        self.tables = tables
        self.protocol = protocol.lower()
        self.node_ips = {str(_addr(ip)) for ip in node_ips}
        self.local_source = local_source
        self.ipsets = ipsets
        self.paths = 0

    # ------------------------------------------------------------------ matches

    def is_local(self, ip: str) -> bool:
        return str(_addr(ip)) in self.node_ips or _addr(ip).is_loopback

    def match(self, rule: Rule, st: _State) -> Literal["yes", "no", "maybe"]:
        spec = rule.spec
        checks: list[tuple[bool, bool]] = []
        if spec.protocol is not None:
            checks.append((spec.protocol.lower() in (self.protocol, "all"),
                           spec.protocol_negated))
        if spec.source is not None:
            checks.append((_in_net(st.src, spec.source), spec.source_negated))
        if spec.destination is not None:
            checks.append((_in_net(st.dst, spec.destination), spec.destination_negated))
        for iface, negated in ((spec.in_interface, spec.in_interface_negated),
                               (spec.out_interface, spec.out_interface_negated)):
            if iface is not None:
                # The tracer knows no interfaces: a rule that needs one cannot match, which
                # is what a packet from an unrelated interface would see.
                checks.append((False, negated))
        for ok, negated in checks:
            if ok == negated:
                return "no"
        maybe = False
        for module in spec.matches:
            result = self.match_module(rule, module.name, st)
            if result == "no":
                return "no"
            maybe = maybe or result == "maybe"
        return "maybe" if maybe else "yes"

    def match_module(self, rule: Rule, name: str, st: _State) -> Literal["yes", "no", "maybe"]:
        module = rule.match(name)
        assert module is not None
        maybe = False
        for opt in module.options:
            value = opt.values[0] if opt.values else ""
            result: bool | None
            if name == "comment":
                result = True
            elif name in ("tcp", "udp", "sctp") and opt.name in ("dport", "destination-port"):
                result = self.protocol == name and _port_in(st.dport, value)
            elif name == "multiport" and opt.name in ("dports", "destination-ports", "ports"):
                result = any(_port_in(st.dport, p) for p in value.split(","))
            elif name == "statistic":
                result = None  # both branches
            elif name == "recent":
                if opt.name in ("rcheck", "update"):
                    result = None
                elif opt.name in ("set", "name", "seconds", "reap", "mask", "rsource",
                                  "rdest", "hitcount", "rttl"):
                    result = True
                else:
                    raise TraceError(f"recent option --{opt.name} in {rule.render()!r}")
            elif name == "mark" and opt.name == "mark":
                want, mask = _parse_mark(value)
                result = (st.mark & mask) == want
            elif name == "addrtype" and opt.name in ("dst-type", "src-type"):
                ip = st.dst if opt.name == "dst-type" else st.src
                types = value.split(",")
                if not set(types) <= {"LOCAL"}:
                    raise TraceError(f"addrtype {value} in {rule.render()!r}")
                result = self.is_local(ip)
            elif name == "addrtype" and opt.name in ("limit-iface-in", "limit-iface-out"):
                result = True
            elif name == "conntrack" and opt.name == "ctstate":
                result = "NEW" in value.split(",")  # the first packet of a connection
            elif name == "set" and opt.name == "match-set":
                result = self.match_set(rule, opt.values, st)
            elif name == "set" and opt.name in ("return-nomatch", "update-counters"):
                result = True
            elif name in ("tcp", "udp", "sctp") and opt.name in ("sport", "source-port"):
                raise TraceError(f"source port matches are not traced: {rule.render()!r}")
            else:
                raise TraceError(f"cannot evaluate -m {name} --{opt.name} in {rule.render()!r}")
            if result is None:
                maybe = True
            elif result == opt.negated:
                return "no"
        if name in ("tcp", "udp", "sctp") and self.protocol != name:
            return "no"
        return "maybe" if maybe else "yes"

    def match_set(self, rule: Rule, values: Sequence[str], st: _State) -> bool:
        if len(values) != 2:
            raise TraceError(f"--match-set needs NAME FLAGS: {rule.render()!r}")
        name, flags = values
        if name not in self.ipsets:
            raise TraceError(f"ipset {name} is not in the ipsets mapping ({rule.render()!r})")
        dims = flags.split(",")
        for entry in self.ipsets[name]:
            parts = entry.split(",")
            if len(parts) < len(dims):
                continue
            if all(self.set_part(part, dim, st) for part, dim in zip(parts, dims, strict=False)):
                return True
        return False

    def set_part(self, part: str, dim: str, st: _State) -> bool:
        ip = st.src if dim == "src" else st.dst
        try:
            return _in_net(ip, part)
        except ValueError:
            pass
        proto, _, port = part.rpartition(":")
        if proto and proto.lower() != self.protocol:
            return False
        if not proto and self.protocol != "tcp":  # ipset's default protocol is tcp
            return False
        if dim == "src":
            raise TraceError("source ports in ipsets are not traced")
        return _port_in(st.dport, port)

    # ------------------------------------------------------------------ walking

    def walk(self, table: Table, chain: str, start: int, st: _State, depth: int
             ) -> list[tuple[_State, _Outcome]]:
        if depth > 64:
            raise TraceError(f"jump loop through {table.name}/{chain}")
        found = table.chains.get(chain)
        if found is None:
            raise TraceError(f"jump to missing chain {table.name}/{chain}")
        if start == 0:
            st = attrs.evolve(st, visited=(*st.visited, f"{table.name}/{chain}"))
        results: list[tuple[_State, _Outcome]] = []
        # Paths that skipped a "maybe" rule; listed after the paths that took it, so that
        # endpoints come out in rule order.
        skipped: list[tuple[_State, _Outcome]] = []
        rules = found.rules
        index = start
        while index < len(rules):
            rule = rules[index]
            index += 1
            matched = self.match(rule, st)
            if matched == "no":
                continue
            if matched == "maybe":
                self.paths += 1
                if self.paths > MAX_PATHS:
                    raise TraceError(f"more than {MAX_PATHS} paths: rule set too branchy")
                skipped = self.walk(table, chain, index, st, depth) + skipped
            target = rule.target
            if target is None:
                continue
            if target in table.chains and target not in ("ACCEPT", "DROP", "RETURN"):
                for sub_state, outcome in self.walk(table, target, 0, st, depth + 1):
                    if outcome == "return" and not rule.spec.goto:
                        results.extend(self.walk(table, chain, index, sub_state, depth))
                    else:
                        results.append((sub_state, outcome))
                return results + skipped
            new_state, verdict = self.apply_target(table, rule, st)
            if verdict is None:
                st = new_state
                continue
            results.append((new_state, verdict))
            return results + skipped
        results.append((st, "return"))
        return results + skipped

    def apply_target(self, table: Table, rule: Rule, st: _State
                     ) -> tuple[_State, _Outcome | None]:
        target = rule.target
        if target in ("ACCEPT", "DROP", "REJECT"):
            return st, target  # type: ignore[return-value]
        if target == "RETURN":
            return st, "return"
        if target == "MARK":
            mark = st.mark
            for opt in rule.target_options:
                value, mask = _parse_mark(opt.values[0])
                if opt.name == "set-xmark":
                    mark = (mark & ~mask & 0xFFFFFFFF) ^ value
                elif opt.name == "set-mark":
                    mark = (mark & ~mask & 0xFFFFFFFF) | value
                elif opt.name == "or-mark":
                    mark |= value
                elif opt.name == "xor-mark":
                    mark ^= value
                elif opt.name == "and-mark":
                    mark &= value
                else:
                    raise TraceError(f"MARK --{opt.name} in {rule.render()!r}")
            return attrs.evolve(st, mark=mark), None
        if target in ("LOG", "NFLOG"):
            return st, None
        if target == "DNAT":
            values = rule.option("DNAT", "to-destination")
            if not values:
                raise TraceError(f"DNAT without --to-destination: {rule.render()!r}")
            ip, port = _split_hostport(values[0])
            port = st.dport if port is None else port
            return attrs.evolve(st, dst=ip, dport=port,
                                endpoint=_format_endpoint(ip, port)), "ACCEPT"
        if target == "REDIRECT":
            values = rule.option("REDIRECT", "to-ports")
            port = int(values[0].split("-")[0]) if values else st.dport
            ip = "127.0.0.1" if self.local_source else sorted(self.node_ips)[0] \
                if self.node_ips else "127.0.0.1"
            return attrs.evolve(st, dst=ip, dport=port,
                                endpoint=_format_endpoint(ip, port)), "ACCEPT"
        if target in ("MASQUERADE", "SNAT"):
            return attrs.evolve(st, masquerade=True), "ACCEPT"
        raise TraceError(f"cannot evaluate target {target} in {table.name}: {rule.render()!r}")

    def hook(self, table_name: str, hook: str, st: _State) -> list[tuple[_State, _Outcome]]:
        """Run a built-in chain (or kube-proxy's default jumps when it has no rules)."""
        table = self.tables.get(table_name)
        if table is None:
            return [(st, "ACCEPT")]
        builtin = table.chains.get(hook)
        policy: _Outcome = "ACCEPT"
        if builtin is not None and builtin.policy in ("ACCEPT", "DROP"):
            policy = builtin.policy  # type: ignore[assignment]
        if builtin is not None and builtin.rules:
            results = self.walk(table, hook, 0, st, 0)
        else:
            results = [(st, "return")]
            for chain in DEFAULT_JUMPS.get((table_name, hook), ()):
                if chain not in table.chains:
                    continue
                step: list[tuple[_State, _Outcome]] = []
                for state, outcome in results:
                    if outcome == "return":
                        step.extend(self.walk(table, chain, 0, state, 1))
                    else:
                        step.append((state, outcome))
                results = step
        return [(s, policy if o == "return" else o) for s, o in results]


def trace(tables: Tables, *, source_ip: str, protocol: str, dest_ip: str, dest_port: int,
          node_ips: Sequence[str], local_source: bool = False,
          ipsets: Mapping[str, Sequence[str]] | None = None) -> TraceResult:
    """Trace the first packet of a connection through ``tables`` (see the module docstring).

    ``ipsets`` maps set names to entries in ``ipset list`` syntax (``10.96.0.1,tcp:80``,
    ``10.0.0.0/8``, ``30080``) for rules with ``-m set``.
    """
    if protocol.upper() not in ("TCP", "UDP", "SCTP"):
        raise ValueError(f"protocol must be TCP, UDP or SCTP, not {protocol!r}")
    tracer = _Tracer(tables, protocol, node_ips, local_source, ipsets or {})
    start = _State(src=str(_addr(source_ip)), dst=str(_addr(dest_ip)), dport=dest_port)
    paths: list[TracePath] = []
    nat_hook = "OUTPUT" if local_source else "PREROUTING"
    for nat_state, nat_outcome in tracer.hook("nat", nat_hook, start):
        if nat_outcome in ("DROP", "REJECT"):
            paths.append(_path(nat_state, nat_outcome))
            continue
        if local_source:
            filter_hook = "OUTPUT"
        else:
            filter_hook = "INPUT" if tracer.is_local(nat_state.dst) else "FORWARD"
        for f_state, f_outcome in tracer.hook("filter", filter_hook, nat_state):
            if f_outcome != "ACCEPT":
                paths.append(_path(f_state, f_outcome))
                continue
            if not _has_rules(tables, "nat", "POSTROUTING", "KUBE-POSTROUTING"):
                # No POSTROUTING rules to walk: the masquerade mark decides.
                paths.append(_path(attrs.evolve(
                    f_state, masquerade=bool(f_state.mark & MASQ_MARK)), "ACCEPT"))
                continue
            for p_state, p_outcome in tracer.hook("nat", "POSTROUTING", f_state):
                paths.append(_path(p_state, "ACCEPT" if p_outcome == "ACCEPT" else p_outcome))
    endpoints: list[str] = []
    visited: list[str] = []
    for path in paths:
        if path.endpoint is not None and path.endpoint not in endpoints:
            endpoints.append(path.endpoint)
        visited.extend(c for c in path.chains_visited if c not in visited)
    verdict: Verdict = "ACCEPT" if any(p.verdict == "ACCEPT" for p in paths) else \
        paths[0].verdict
    return TraceResult(endpoints=endpoints, masquerade=any(p.masquerade for p in paths),
                       verdict=verdict, chains_visited=visited, paths=paths)


def _path(st: _State, outcome: _Outcome) -> TracePath:
    verdict: Verdict = "ACCEPT" if outcome in ("ACCEPT", "return") else outcome  # type: ignore[assignment]
    return TracePath(st.endpoint, st.masquerade, verdict, st.visited)


def _has_rules(tables: Tables, table: str, *chains: str) -> bool:
    found = tables.get(table)
    return found is not None and any(found.rules(chain) for chain in chains)
