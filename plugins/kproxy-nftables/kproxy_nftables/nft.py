"""Running ``nft`` and reading its JSON output back into plain Python values.

Everything runs in the calling process's network namespace, like kube-proxy. The reader is
for full syncs (one listing of chain and set names), ``kproxy explain`` and tests; the sync
hot path never lists the table.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from kproxy_nftables.rules import TABLE, nft_family

NFT_TIMEOUT = 120.0


class NftError(RuntimeError):
    """``nft`` failed; the message carries its stderr."""


def nft_binary() -> str | None:
    return shutil.which("nft")


def run_nft(argv: Sequence[str], *, stdin: str | None = None,
            timeout: float = NFT_TIMEOUT) -> tuple[str, float]:
    """Run ``nft ARGV`` (no shell); returns (stdout, seconds spent)."""
    binary = nft_binary()
    if binary is None:
        raise NftError("the nft binary is not installed (package nftables)")
    start = time.perf_counter()
    try:
        proc = subprocess.run([binary, *argv], input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise NftError(f"nft {' '.join(argv)} did not finish in {timeout}s") from exc
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise NftError(f"nft {' '.join(argv)} exited {proc.returncode}: "
                       f"{_first_lines(proc.stderr.strip() or proc.stdout.strip())}")
    return proc.stdout, elapsed


def _first_lines(text: str, limit: int = 12) -> str:
    lines = text.splitlines()
    if len(lines) > limit:
        lines = [*lines[:limit], f"... ({len(lines) - limit} more lines)"]
    return "\n".join(lines)


def apply(lines: Sequence[str]) -> float:
    """Send ``lines`` as one transaction (``nft -f FILE``); returns seconds spent.

    The lines are streamed to a private temporary file rather than joined into one string
    and piped: a 10,000-service full sync is ~25 MB of text, held twice (str and bytes)
    by a pipe."""
    if not lines:
        return 0.0
    with tempfile.NamedTemporaryFile("w", prefix="kproxy-nft-", suffix=".nft",
                                     encoding="utf-8") as handle:
        handle.writelines(f"{line}\n" for line in lines)
        handle.flush()
        _, elapsed = run_nft(["-f", handle.name])
    return elapsed


def _is_missing(error: NftError) -> bool:
    text = str(error)
    return "No such file or directory" in text or "does not exist" in text


def list_names(family: int) -> tuple[set[str], dict[str, int | None]]:
    """Chain names and set and map names (sets with their timeouts, maps with None) of our
    table in ``family``; empty when the table does not exist."""
    fam = nft_family(family)
    chains: set[str] = set()
    sets: dict[str, int | None] = {}
    try:
        out, _ = run_nft(["-j", "list", "chains", fam])
        for item in json.loads(out).get("nftables", []):
            chain = item.get("chain")
            if chain and chain.get("table") == TABLE:
                chains.add(str(chain["name"]))
        out, _ = run_nft(["-j", "-t", "list", "sets", fam])
        for item in json.loads(out).get("nftables", []):
            found = item.get("set")
            if found and found.get("table") == TABLE:
                timeout = found.get("timeout")
                sets[str(found["name"])] = int(timeout) if timeout is not None else None
        out, _ = run_nft(["-j", "-t", "list", "maps", fam])
        for item in json.loads(out).get("nftables", []):
            found = item.get("map")
            if found and found.get("table") == TABLE:
                sets[str(found["name"])] = None
    except NftError as exc:
        if not _is_missing(exc):
            raise
    return chains, sets


def delete_table(family: int) -> bool:
    """Delete our table in ``family``; False if it did not exist."""
    fam = nft_family(family)
    try:
        run_nft(["-f", "-"], stdin=f"add table {fam} {TABLE}\ndelete table {fam} {TABLE}\n")
    except NftError:
        return False
    return True


def table_exists(family: int) -> bool:
    try:
        run_nft(["list", "table", nft_family(family), TABLE])
    except NftError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Reading the table back
# --------------------------------------------------------------------------------------------


@attrs.frozen
class KernelTable:
    """One family's ``kube-proxy`` table as the kernel has it."""

    family: int
    #: chain name -> rule expression lists (JSON, as nft prints them)
    chains: Mapping[str, tuple[Any, ...]]
    #: map name -> {key: verdict}; keys are tuples ("10.96.0.1", "tcp", 80) or ("tcp", 30080)
    maps: Mapping[str, Mapping[tuple[Any, ...], Mapping[str, Any]]]
    #: set name -> elements (as nft prints them)
    sets: Mapping[str, tuple[Any, ...]]
    #: set name -> timeout (seconds) or None
    set_timeouts: Mapping[str, int | None]
    #: base chain name -> (type, hook, priority)
    hooks: Mapping[str, tuple[str, str, int]]

    @property
    def exists(self) -> bool:
        return bool(self.chains or self.maps or self.sets)


def _key(value: Any) -> tuple[Any, ...]:
    if isinstance(value, Mapping) and "elem" in value:
        value = value["elem"]["val"]
    if isinstance(value, Mapping) and "concat" in value:
        return tuple(value["concat"])
    if isinstance(value, Mapping) and "range" in value:
        return tuple(value["range"])
    return (value,)


def read_table(family: int) -> KernelTable:
    """``nft -j list table`` parsed; an empty `KernelTable` when the table does not exist."""
    fam = nft_family(family)
    try:
        out, _ = run_nft(["-j", "list", "table", fam, TABLE])
    except NftError as exc:
        if _is_missing(exc):
            return KernelTable(family, {}, {}, {}, {}, {})
        raise
    chains: dict[str, list[Any]] = {}
    maps: dict[str, dict[tuple[Any, ...], Mapping[str, Any]]] = {}
    sets: dict[str, tuple[Any, ...]] = {}
    timeouts: dict[str, int | None] = {}
    hooks: dict[str, tuple[str, str, int]] = {}
    for item in json.loads(out).get("nftables", []):
        if "chain" in item:
            chain = item["chain"]
            chains.setdefault(chain["name"], [])
            if "hook" in chain:
                hooks[chain["name"]] = (chain["type"], chain["hook"], int(chain["prio"]))
        elif "rule" in item:
            rule = item["rule"]
            chains.setdefault(rule["chain"], []).append(rule["expr"])
        elif "map" in item:
            found = item["map"]
            maps[found["name"]] = {_key(k): v for k, v in found.get("elem", [])}
        elif "set" in item:
            found = item["set"]
            sets[found["name"]] = tuple(found.get("elem", []))
            timeout = found.get("timeout")
            timeouts[found["name"]] = int(timeout) if timeout is not None else None
    return KernelTable(family, {k: tuple(v) for k, v in chains.items()}, maps, sets, timeouts,
                       hooks)


def goto_target(verdict: Mapping[str, Any]) -> str | None:
    for kind in ("goto", "jump"):
        if kind in verdict:
            return str(verdict[kind]["target"])
    return None


def dnat_target(rule: Sequence[Mapping[str, Any]]) -> str | None:
    """``ip:port`` (``[ip]:port`` for IPv6) of a dnat statement in ``rule``, if any."""
    for expr in rule:
        if "dnat" in expr:
            addr = str(expr["dnat"]["addr"])
            port = expr["dnat"].get("port")
            host = f"[{addr}]" if ":" in addr else addr
            return f"{host}:{port}" if port is not None else host
    return None


def dnat_map_targets(rule: Sequence[Mapping[str, Any]],
                     maps: Mapping[str, Mapping[tuple[Any, ...], Any]]) -> list[str]:
    """``ip:port`` (``[ip]:port``) of every element a ``dnat … to numgen … map @m``
    statement in ``rule`` can pick from its block of the address map; empty for other
    rules."""
    for expr in rule:
        dnat = expr.get("dnat") if isinstance(expr, Mapping) else None
        addr = dnat.get("addr") if isinstance(dnat, Mapping) else None
        lookup = addr.get("map") if isinstance(addr, Mapping) else None
        if not isinstance(lookup, Mapping) or not str(lookup.get("data", "")).startswith("@"):
            continue
        numgen = lookup.get("key", {}).get("numgen", {}) if isinstance(
            lookup.get("key"), Mapping) else {}
        # The map is shared: this rule owns the numgen block offset … offset + mod - 1.
        low = int(numgen.get("offset", 0))
        high = low + (int(numgen.get("mod", 0)) & 0xFFFFFFFF)
        out = []
        for key, value in maps.get(str(lookup["data"])[1:], {}).items():
            if not (isinstance(key[0], int) and low <= key[0] < high):
                continue
            if isinstance(value, Mapping) and len(value.get("concat", ())) == 2:
                ip, port = value["concat"]
                out.append(f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}")
        return out
    return []


def vmap_targets(rule: Sequence[Mapping[str, Any]],
                 maps: Mapping[str, Mapping[tuple[Any, ...], Mapping[str, Any]]] | None = None,
                 ) -> list[str] | None:
    """The goto targets of a ``numgen random mod N vmap { … }`` or ``… vmap @map`` rule
    (the named map's elements looked up in ``maps``), else None."""
    for expr in rule:
        vmap = expr.get("vmap") if isinstance(expr, Mapping) else None
        if not vmap or "numgen" not in vmap.get("key", {}):
            continue
        data = vmap["data"]
        if isinstance(data, str) and data.startswith("@"):
            verdicts = list((maps or {}).get(data[1:], {}).values())
        else:
            verdicts = [entry[1] for entry in data["set"]]
        targets = []
        for verdict in verdicts:
            target = goto_target(verdict)
            if target:
                targets.append(target)
        return targets
    return None


def is_plain_goto(rule: Sequence[Mapping[str, Any]]) -> str | None:
    """The target of a rule that is nothing but ``goto X``."""
    if len(rule) == 1 and "goto" in rule[0]:
        return str(rule[0]["goto"]["target"])
    return None
