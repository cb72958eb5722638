"""The iptables rule model shared by every mode that writes iptables rules (iptables, ipvs,
userspace): the text of one ``iptables-restore --noflush`` transaction.

Rules are kept as text because that is what the kernel transaction takes: building 5000
services through python-iptables objects took ~4.9 s, generating text and restoring it ~0.2 s.
The writers (restore and libiptc) live in `kproxy_core.kernel.iptables_writers`.

Semantics of a ``--noflush`` restore, which the model follows:

* a chain declared with `TableData.chain` (``:NAME - [0:0]``) is created if missing and
  flushed, then gets exactly the rules added to it in this transaction;
* chains not declared are left alone (so other agents' rules and unchanged service chains
  survive), and `TableData.delete_chain` removes one (``-X``, after its referrers are gone).
"""

from __future__ import annotations

from collections.abc import Iterable

TABLE_ORDER = ("raw", "mangle", "filter", "nat", "security")

#: Modes whose rules share upstream's top-level chain names (KUBE-SERVICES, KUBE-POSTROUTING,
#: KUBE-MARK-MASQ, KUBE-NODEPORTS...). As upstream's start-up cleanup (``platformCleanup``),
#: starting one of them does not run the other's cleanup: it would delete chains and jumps the
#: starting mode is about to use, and traffic would stop until its first sync. The starting
#: mode's first full sync rewrites the shared chains instead.
SHARED_CHAIN_MODES = frozenset({"iptables", "ipvs"})


def quote(text: str) -> str:
    """Quote a value (e.g. a ``--comment``) for iptables-restore's tokenizer.

    iptables-restore splits on white space and understands double quotes with backslash
    escapes; anything from the API must go through here so a service name can never become an
    option.
    """
    if text and all(ch.isalnum() or ch in "-_./:=,@+[]" for ch in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


class TableData:
    """Chains and rules for one table within one transaction."""

    __slots__ = ("_chain_set", "chains", "deleted", "name", "rules")

    def __init__(self, name: str) -> None:
        self.name = name
        self.chains: list[str] = []
        self._chain_set: set[str] = set()
        self.rules: list[str] = []
        self.deleted: list[str] = []

    def chain(self, name: str) -> None:
        """Declare (create or flush) a chain; declaring twice is harmless."""
        if name not in self._chain_set:
            self._chain_set.add(name)
            self.chains.append(name)

    def has_chain(self, name: str) -> bool:
        return name in self._chain_set

    def rule(self, chain: str, *parts: str) -> None:
        """Append ``-A chain parts...``; ``parts`` are already tokenized/quoted."""
        self.rules.append(f"-A {chain} {' '.join(parts)}" if parts else f"-A {chain}")

    def raw_rules(self, lines: Iterable[str]) -> None:
        """Append prebuilt ``-A ...`` lines (the fast path for large rule sets)."""
        self.rules.extend(lines)

    def delete_chain(self, name: str) -> None:
        """Delete a chain in this transaction. It is declared too (flushed first), because
        ``-X`` fails on a chain that still has rules: upstream's pattern for stale chains."""
        self.chain(name)
        self.deleted.append(name)

    def is_empty(self) -> bool:
        return not (self.chains or self.rules or self.deleted)

    def render_into(self, out: list[str]) -> None:
        out.append(f"*{self.name}")
        out.extend(f":{chain} - [0:0]" for chain in self.chains)
        out.extend(self.rules)
        out.extend(f"-X {chain}" for chain in self.deleted)
        out.append("COMMIT")


class RestoreData:
    """One ``iptables-restore --noflush`` transaction for one IP family."""

    __slots__ = ("family", "tables")

    def __init__(self, family: int = 4) -> None:
        self.family = family
        self.tables: dict[str, TableData] = {}

    def table(self, name: str) -> TableData:
        if name not in TABLE_ORDER:
            raise ValueError(f"unknown iptables table {name!r}")
        data = self.tables.get(name)
        if data is None:
            data = self.tables[name] = TableData(name)
        return data

    def is_empty(self) -> bool:
        return all(table.is_empty() for table in self.tables.values())

    def line_count(self) -> int:
        return sum(len(t.chains) + len(t.rules) + len(t.deleted) + 2 for t in self.tables.values())

    def render(self) -> str:
        out: list[str] = []
        for name in TABLE_ORDER:
            table = self.tables.get(name)
            if table is not None and not table.is_empty():
                table.render_into(out)
        out.append("")
        return "\n".join(out)
