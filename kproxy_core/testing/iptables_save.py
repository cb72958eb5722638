"""Parse ``iptables-save`` output (or `RestoreData.render` text) into tables → chains → rules.

Pure Python, no root: mode tests render their rules, parse them here and check them with
`check_consistency` and the packet tracer (`kproxy_core.testing.tracer`), like upstream's
proxier tests do with their iptables-save parser.

    tables = parse_iptables_save(writer.save("nat") + writer.save("filter"))
    rule = tables["nat"].chains["KUBE-SERVICES"].rules[0]
    rule.spec.destination, rule.option("tcp", "dport"), rule.target
    # -> "10.96.0.1/32", ("80",), "KUBE-SVC-..."

`apply_noflush` replays a ``--noflush`` transaction on parsed state, so partial syncs can be
tested without a kernel.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import attrs

from kproxy_core.kernel.iptables import TABLE_ORDER, quote
from kproxy_core.kernel.iptables_writers import (
    ParsedModule,
    ParsedOption,
    ParsedRule,
    RuleSyntaxError,
    parse_rule_tokens,
    tokenize,
)

BUILTIN_CHAINS: Mapping[str, tuple[str, ...]] = {
    "raw": ("PREROUTING", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}

#: Targets that are extensions or verdicts, never chains.
STANDARD_TARGETS = frozenset({
    "ACCEPT", "DROP", "RETURN", "QUEUE", "REJECT", "DNAT", "SNAT", "MASQUERADE", "REDIRECT",
    "MARK", "CONNMARK", "LOG", "NFLOG", "NOTRACK", "CT", "TPROXY", "TRACE", "CHECKSUM",
    "TCPMSS", "SET", "NETMAP", "CLASSIFY", "DSCP", "TOS", "TTL", "HL", "NFQUEUE", "AUDIT",
})

#: KUBE-* chains upstream creates that may legitimately be empty.
DEFAULT_ALLOWED_EMPTY = frozenset({
    "KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL", "KUBE-PROXY-CANARY", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT",
    "KUBE-FIREWALL", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-MARK-DROP",
    "KUBE-LOAD-BALANCER", "KUBE-NODE-PORT", "KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST",
    "KUBE-NODEPORT-CONTAINER", "KUBE-NODEPORT-HOST",
})
#: The jumps kube-proxy ensures from built-in chains with single ``iptables -I`` commands
#: (upstream ``iptablesJumpChains``), so they are absent from restore text. Each entry is
#: (table, built-in chain) → chains in order; the filter jumps carry ``--ctstate NEW``
#: except KUBE-NODEPORTS and KUBE-FORWARD.
DEFAULT_JUMPS: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("nat", "PREROUTING"): ("KUBE-SERVICES",),
    ("nat", "OUTPUT"): ("KUBE-SERVICES",),
    ("nat", "POSTROUTING"): ("KUBE-POSTROUTING",),
    ("filter", "INPUT"): ("KUBE-PROXY-FIREWALL", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES",
                          "KUBE-FIREWALL"),
    ("filter", "FORWARD"): ("KUBE-PROXY-FIREWALL", "KUBE-FORWARD", "KUBE-SERVICES",
                            "KUBE-EXTERNAL-SERVICES"),
    ("filter", "OUTPUT"): ("KUBE-PROXY-FIREWALL", "KUBE-SERVICES", "KUBE-FIREWALL"),
}

#: KUBE-* chains nothing in restore text jumps to by design: markers for other tools, and
#: the targets of `DEFAULT_JUMPS`.
DEFAULT_ALLOWED_UNREFERENCED = frozenset({
    "KUBE-PROXY-CANARY", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT",
    *(chain for chains in DEFAULT_JUMPS.values() for chain in chains),
})


class SaveSyntaxError(ValueError):
    """Input that is not iptables-save/restore text; names the line."""


@attrs.frozen
class Rule:
    """One ``-A`` line."""

    spec: ParsedRule

    @property
    def chain(self) -> str:
        return self.spec.chain

    @property
    def target(self) -> str | None:
        return self.spec.target.name if self.spec.target is not None else None

    @property
    def target_options(self) -> tuple[ParsedOption, ...]:
        return self.spec.target.options if self.spec.target is not None else ()

    def match(self, name: str) -> ParsedModule | None:
        """The first ``-m name`` of this rule."""
        for module in self.spec.matches:
            if module.name == name:
                return module
        return None

    def option(self, module: str, name: str) -> tuple[str, ...] | None:
        """Values of ``--name`` in match ``module`` (or in the target when ``module`` is the
        target's name), None if absent."""
        modules = list(self.spec.matches)
        if self.spec.target is not None:
            modules.append(self.spec.target)
        for mod in modules:
            if mod.name == module:
                for opt in mod.options:
                    if opt.name == name:
                        return opt.values
        return None

    @property
    def comment(self) -> str | None:
        values = self.option("comment", "comment")
        return values[0] if values else None

    def render(self) -> str:
        """The rule in iptables-save's canonical order (core options, matches, target)."""
        return render_rule(self.spec)


@attrs.frozen
class Chain:
    name: str
    #: ``ACCEPT``/``DROP`` for built-in chains, ``-`` for user chains.
    policy: str = "-"
    rules: tuple[Rule, ...] = ()


@attrs.frozen
class Table:
    name: str
    chains: Mapping[str, Chain] = attrs.field(factory=dict)
    #: Chains deleted with ``-X`` (restore text only).
    deleted: tuple[str, ...] = ()

    def rules(self, chain: str) -> tuple[Rule, ...]:
        found = self.chains.get(chain)
        return found.rules if found is not None else ()


Tables = Mapping[str, Table]


def _value(text: str) -> str:
    return quote(text) if text else '""'


def _render_options(options: Iterable[ParsedOption]) -> list[str]:
    out: list[str] = []
    for opt in options:
        if opt.negated:
            out.append("!")
        out.append(f"--{opt.name}")
        out.extend(_value(v) for v in opt.values)
    return out


def render_rule(spec: ParsedRule) -> str:
    parts = ["-A", spec.chain]
    for flag, value, negated in (("-s", spec.source, spec.source_negated),
                                 ("-d", spec.destination, spec.destination_negated),
                                 ("-i", spec.in_interface, spec.in_interface_negated),
                                 ("-o", spec.out_interface, spec.out_interface_negated),
                                 ("-p", spec.protocol, spec.protocol_negated)):
        if value is not None:
            parts += ["!", flag, value] if negated else [flag, value]
    for module in spec.matches:
        parts += ["-m", module.name, *_render_options(module.options)]
    if spec.target is not None:
        parts += ["-g" if spec.goto else "-j", spec.target.name,
                  *_render_options(spec.target.options)]
    return " ".join(parts)


class _Builder:
    def __init__(self) -> None:
        self.chains: dict[str, tuple[str, list[Rule]]] = {}
        self.deleted: list[str] = []

    @classmethod
    def from_table(cls, table: Table) -> _Builder:
        builder = cls()
        for name, chain in table.chains.items():
            builder.chains[name] = (chain.policy, list(chain.rules))
        return builder

    def freeze(self, name: str) -> Table:
        return Table(name, {n: Chain(n, p, tuple(r)) for n, (p, r) in self.chains.items()},
                     tuple(self.deleted))


def _parse(text: str, base: Tables | None, noflush_semantics: bool) -> dict[str, Table]:
    builders: dict[str, _Builder] = {}
    if base is not None:
        builders = {name: _Builder.from_table(t) for name, t in base.items()}
    current: _Builder | None = None
    current_name = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if line.startswith("*"):
                if current is not None:
                    raise SaveSyntaxError("table started before COMMIT")
                current_name = line[1:]
                if current_name not in TABLE_ORDER:
                    raise SaveSyntaxError(f"unknown table {current_name!r}")
                current = builders.setdefault(current_name, _Builder())
                for builtin in BUILTIN_CHAINS[current_name]:
                    current.chains.setdefault(builtin, ("ACCEPT", []))
            elif current is None:
                raise SaveSyntaxError("line outside of a *table section")
            elif line == "COMMIT":
                current = None
            elif line.startswith(":"):
                parts = line[1:].split()
                if not parts:
                    raise SaveSyntaxError("empty chain declaration")
                name = parts[0]
                policy = parts[1] if len(parts) > 1 else "-"
                previous = current.chains.get(name)
                if name in BUILTIN_CHAINS[current_name]:
                    # --noflush leaves built-in chains' rules alone.
                    kept = previous[1] if previous is not None and noflush_semantics else []
                    current.chains[name] = (
                        policy if policy != "-" else (previous or ("ACCEPT", []))[0], kept)
                else:
                    current.chains[name] = ("-", [])
            elif line.startswith("-X"):
                parts = tokenize(line)
                if len(parts) != 2:
                    raise SaveSyntaxError("-X takes one chain name")
                if noflush_semantics:
                    if parts[1] not in current.chains:
                        raise SaveSyntaxError(f"-X of missing chain {parts[1]}")
                    if current.chains[parts[1]][1]:
                        raise SaveSyntaxError(f"-X of non-empty chain {parts[1]}")
                    del current.chains[parts[1]]
                current.deleted.append(parts[1])
            elif line.startswith("-A"):
                rule = Rule(parse_rule_tokens(tokenize(line)))
                if rule.chain not in current.chains:
                    raise SaveSyntaxError(f"rule for undeclared chain {rule.chain}")
                current.chains[rule.chain][1].append(rule)
            else:
                raise SaveSyntaxError("unrecognised line")
        except (SaveSyntaxError, RuleSyntaxError) as exc:
            raise SaveSyntaxError(f"line {number}: {exc}: {raw!r}") from None
    if current is not None:
        raise SaveSyntaxError(f"table {current_name} not followed by COMMIT")
    return {name: b.freeze(name) for name, b in builders.items()}


def parse_iptables_save(text: str) -> dict[str, Table]:
    """Parse iptables-save (or restore) text; the tables may appear in any order, more than
    once (they merge). Raises `SaveSyntaxError` naming the bad line."""
    return _parse(text, None, noflush_semantics=False)


def apply_noflush(tables: Tables, text: str) -> dict[str, Table]:
    """The state after ``iptables-restore --noflush`` of ``text`` on ``tables``: declared
    chains are emptied (created if missing) and refilled, others untouched, ``-X`` deletes an
    empty chain. Raises `SaveSyntaxError` where the kernel would refuse (e.g. -X of a chain
    that still has rules)."""
    result = _parse(text, tables, noflush_semantics=True)
    return {name: attrs.evolve(table, deleted=()) for name, table in result.items()}


def render_tables(tables: Tables) -> str:
    """iptables-save-like text (no counters, no comments), tables in kernel order."""
    out: list[str] = []
    for name in sorted(tables, key=TABLE_ORDER.index):
        table = tables[name]
        out.append(f"*{name}")
        out.extend(f":{c.name} {c.policy} [0:0]" for c in table.chains.values())
        for chain in table.chains.values():
            out.extend(rule.render() for rule in chain.rules)
        out.extend(f"-X {chain}" for chain in table.deleted)
        out.append("COMMIT")
    out.append("")
    return "\n".join(out)


def sorted_rules(tables: Tables, table: str) -> list[str]:
    """Rendered rules of one table grouped by chain name (chain order sorted, rule order
    kept): a stable form for golden comparisons."""
    found = tables.get(table)
    if found is None:
        return []
    return [rule.render() for name in sorted(found.chains) for rule in found.chains[name].rules]


def _is_chain_target(table: Table, target: str) -> bool:
    return target in table.chains or (target not in STANDARD_TARGETS and
                                      not target.isupper()) or target.startswith("KUBE-")


def check_consistency(tables: Tables, *, allow_empty: Collection[str] = (),
                      allow_unreferenced: Collection[str] = (),
                      prefixes: Sequence[str] = ("KUBE-",)) -> list[str]:
    """Problems in a rule set, as readable strings (empty list: consistent).

    * every jump/goto target that is not a standard target is a declared chain of the table,
      and no rule jumps to a chain deleted with -X;
    * no declared chain with one of ``prefixes`` is empty, except upstream's top-level chains
      and ``allow_empty``;
    * every declared chain with one of ``prefixes`` is jumped to from somewhere, except
      ``allow_unreferenced`` and the marker chains (canaries, hints).
    """
    problems: list[str] = []
    empty_ok = DEFAULT_ALLOWED_EMPTY | set(allow_empty)
    unreferenced_ok = DEFAULT_ALLOWED_UNREFERENCED | set(allow_unreferenced)
    for name in sorted(tables, key=lambda n: TABLE_ORDER.index(n)):
        table = tables[name]
        referenced: set[str] = set()
        deleted = set(table.deleted)
        for chain in table.chains.values():
            for rule in chain.rules:
                target = rule.target
                if target is None:
                    continue
                if target in table.chains:
                    referenced.add(target)
                    if target in deleted:
                        problems.append(f"{name}: {rule.render()!r} jumps to chain {target} "
                                        "which is deleted (-X)")
                elif _is_chain_target(table, target):
                    problems.append(f"{name}: {rule.render()!r} jumps to undeclared chain "
                                    f"{target}")
        for chain in table.chains.values():
            if not chain.name.startswith(tuple(prefixes)) or chain.name in deleted:
                continue
            if not chain.rules and chain.name not in empty_ok:
                problems.append(f"{name}: chain {chain.name} is empty")
            if chain.name not in referenced and chain.name not in unreferenced_ok and \
                    chain.name not in BUILTIN_CHAINS[name]:
                problems.append(f"{name}: chain {chain.name} is declared but nothing jumps "
                                "to it")
    return problems
