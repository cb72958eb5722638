"""Writers that put a `RestoreData` transaction (and single rules) into the kernel.

Two implementations of one `RuleWriter` protocol:

* `RestoreWriter` pipes the rendered text into ``iptables-restore --noflush`` of the chosen
  backend (legacy x_tables or nf_tables), like upstream kube-proxy. The default.
* `LibiptcWriter` parses the same text into python-iptables objects and commits each table
  through libiptc. Legacy backend only (libiptc talks to x_tables).

Both act on the network namespace of the calling process. No shell is ever involved: every
command is an argv list and the rules go in on stdin.

The xtables lock: legacy ``iptables-restore`` takes ``/run/xtables.lock`` (or
``$XTABLES_LOCKFILE``) per table when given ``-w``; upstream passes ``-w 5`` (and ``-W 100000``
on iptables older than 1.8, where the interval still exists). The nf_tables variant accepts the
flag and ignores it: the kernel serialises nf_tables transactions itself. libiptc takes no lock,
so `LibiptcWriter` takes the same ``flock`` as iptables does, around each table's commit.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Literal, Protocol, cast

import attrs

from kproxy_core.backend import BackendUnavailable, SyncError
from kproxy_core.kernel.iptables import RestoreData

Backend = Literal["legacy", "nft"]
WriterKind = Literal["restore", "libiptc"]

#: Seconds to wait for the xtables lock (upstream ``WaitSecondsValue``).
LOCK_WAIT_SECONDS = 5
#: Upstream ``WaitIntervalUsecondsValue``; only passed to iptables < 1.8 (later ones ignore it
#: and print a deprecation warning).
LOCK_WAIT_INTERVAL_USECONDS = 100000
DEFAULT_LOCK_FILE = "/run/xtables.lock"
COMMAND_TIMEOUT = 120.0

# Hint chains kubelet / kube-proxy create so that other tools can tell which backend is in
# use (kubernetes-sigs/iptables-wrappers checks them before counting rules).
_HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")


class RestoreError(SyncError):
    """``iptables-restore`` (or the libiptc writer) rejected a transaction.

    The message names the binary, the exit code, the failing line number and its text, so
    the operator can see which rule was wrong without re-running anything.
    """

    def __init__(self, binary: str, exit_code: int, line_number: int | None,
                 line_text: str | None, detail: str) -> None:
        self.binary = binary
        self.exit_code = exit_code
        self.line_number = line_number
        self.line_text = line_text
        self.detail = detail
        where = (f"line {line_number}: {line_text!r}" if line_number is not None
                 else "no line reported")
        super().__init__(f"{binary} exited {exit_code} at {where}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (RestoreError, (self.binary, self.exit_code, self.line_number, self.line_text,
                               self.detail))


class CommandError(RuntimeError):
    """A single iptables command (not a restore) failed unexpectedly."""


class RuleWriter(Protocol):
    family: int
    backend: Backend

    def restore(self, data: RestoreData, *, noflush: bool = True) -> float: ...

    def restore_sections(self, parts: Sequence[RestoreData]) -> float: ...

    def save(self, table: str) -> str: ...

    def chain_exists(self, table: str, chain: str) -> bool: ...

    def list_rules(self, table: str, chain: str) -> list[str]: ...

    def ensure_chain(self, table: str, chain: str) -> bool: ...

    def ensure_rule(self, table: str, chain: str, args: Sequence[str], *,
                    prepend: bool = False) -> bool: ...

    def delete_rule(self, table: str, chain: str, args: Sequence[str]) -> bool: ...

    def flush_chain(self, table: str, chain: str) -> bool: ...

    def delete_chain(self, table: str, chain: str) -> bool: ...


# --------------------------------------------------------------------------------------------
# Binaries and backend detection
# --------------------------------------------------------------------------------------------


def _prefix(family: int) -> str:
    if family not in (4, 6):
        raise ValueError(f"IP family must be 4 or 6, not {family!r}")
    return "ip6tables" if family == 6 else "iptables"


@functools.cache
def _variant_reports(binary: str) -> str:
    """``binary --version`` output, e.g. ``iptables v1.8.9 (nf_tables)``; "" if it fails."""
    try:
        proc = subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=10, check=False)
    except OSError:
        return ""
    return proc.stdout + proc.stderr


def find_binary(family: int, backend: Backend, tool: str = "") -> str | None:
    """Path of ``iptables-<backend>[-<tool>]`` (tool: "", "save", "restore"), or None.

    Falls back to the unsuffixed binary (``iptables-restore``) when its ``--version`` shows it
    is that backend, for distributions that ship only one variant without suffixes.
    """
    prefix = _prefix(family)
    suffix = f"-{tool}" if tool else ""
    path = shutil.which(f"{prefix}-{backend}{suffix}")
    if path:
        return path
    plain = shutil.which(f"{prefix}{suffix}")
    if plain:
        marker = "nf_tables" if backend == "nft" else "legacy"
        if marker in _variant_reports(plain):
            return plain
    return None


#: Save outputs `detect_backend` read, for one later taker (`take_detection_save`): binary ->
#: (network namespace inode, monotonic time, text).
_detection_saves: dict[str, tuple[int, float, str]] = {}
#: Larger outputs are not kept (a big rule set: memory for the process's life, for a rare
#: taker).
DETECTION_SAVE_KEEP_BYTES = 64 * 1024
#: A kept output older than this is not handed out.
DETECTION_SAVE_MAX_AGE = 10.0


def _netns_inode() -> int:
    try:
        return os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        return -1


def take_detection_save(binary: str, max_age: float = DETECTION_SAVE_MAX_AGE) -> str | None:
    """What the save command ``binary`` printed when `detect_backend` ran it, if that was in
    this thread's network namespace less than ``max_age`` seconds ago and at most
    `DETECTION_SAVE_KEEP_BYTES` long; once (then None). A caller that needs that save right
    after building its first writer saves a process (about half a second each in the
    emulated test VM)."""
    kept = _detection_saves.pop(binary, None)
    if kept is None:
        return None
    inode, when, text = kept
    if inode != _netns_inode() or time.monotonic() - when > max_age:
        return None
    return text


#: Where the legacy (x_tables) save commands find this namespace's tables, per family.
_LEGACY_TABLE_LISTS = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}


def _no_tables(table_list: str | None) -> bool:
    """Whether ``table_list`` (a legacy save command's list of the namespace's tables) says
    there are none: that command would then print nothing, so it need not run (a process:
    about half a second in the emulated VM). False when the list cannot be read."""
    if table_list is None:
        return False
    try:
        with open(table_list) as handle:
            return not handle.read().strip()
    except FileNotFoundError:
        return True  # ip_tables is not even loaded: the command prints nothing either
    except OSError:
        return False


def _count_rules(binary: str | None, table_list: str | None = None) -> tuple[int, int, bool]:
    """(KUBE-* rules, all rules, hint chain present) in ``binary``'s save output;
    ``table_list``: the legacy table list that, when empty, makes running it pointless."""
    if binary is None or _no_tables(table_list):
        return 0, 0, False
    try:
        proc = subprocess.run([binary], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0, 0, False
    if proc.returncode == 0 and len(proc.stdout) <= DETECTION_SAVE_KEEP_BYTES:
        _detection_saves[binary] = (_netns_inode(), time.monotonic(), proc.stdout)
    kube = total = 0
    hint = False
    for line in proc.stdout.splitlines():
        if line.startswith("-"):
            total += 1
            if "KUBE-" in line:
                kube += 1
        elif line.startswith(":") and line[1:].split(" ", 1)[0] in _HINT_CHAINS:
            hint = True
    return kube, total, hint


def _detect(legacy: Sequence[str | None], nft: Sequence[str | None],
            legacy_tables: Sequence[str | None] = ()) -> Backend:
    """``legacy_tables``: per legacy binary, the file listing its tables (`_no_tables`)."""
    have_legacy = any(b is not None for b in legacy)
    have_nft = any(b is not None for b in nft)
    if not (have_legacy or have_nft):
        raise BackendUnavailable(
            "no iptables-legacy-save or iptables-nft-save found: install iptables (>= 1.8)")
    if not have_nft:
        return "legacy"
    if not have_legacy:
        return "nft"
    # The save commands run at once: each is a process start (seconds on a slow or emulated
    # machine) and this runs on the first sync's critical path.
    sides: tuple[tuple[Backend, Sequence[str | None]], ...] = (("legacy", legacy), ("nft", nft))
    lists = list(legacy_tables) + [None] * (len(legacy) - len(legacy_tables))
    jobs = [*zip(legacy, lists, strict=True), *((binary, None) for binary in nft)]
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        results = iter(list(pool.map(lambda job: _count_rules(*job), jobs)))
    counts: dict[Backend, tuple[int, int, bool]] = {}
    for name, binaries in sides:
        kube = total = 0
        hint = False
        for _binary in binaries:
            k, t, h = next(results)
            kube, total, hint = kube + k, total + t, hint or h
        counts[name] = (kube, total, hint)
    # Same order of evidence as iptables-wrappers: the hint chain kubelet leaves, then whose
    # rules look like Kubernetes', then who has any rules at all.
    if counts["nft"][2] != counts["legacy"][2]:
        return "nft" if counts["nft"][2] else "legacy"
    if counts["nft"][0] != counts["legacy"][0]:
        return "nft" if counts["nft"][0] > counts["legacy"][0] else "legacy"
    if counts["nft"][1] != counts["legacy"][1]:
        return "nft" if counts["nft"][1] > counts["legacy"][1] else "legacy"
    return "nft"


@functools.cache
def detect_backend() -> Backend:
    """The iptables backend the host already uses (cached per process; clear with
    ``detect_backend.cache_clear()``).

    Follows kubernetes-sigs/iptables-wrappers: compare what ``iptables-legacy-save`` and
    ``iptables-nft-save`` (and the ip6tables ones) hold, prefer the side with kubelet's hint
    chain, then with more KUBE-* rules, then with more rules; nft when both are empty.
    """
    legacy = [find_binary(f, "legacy", "save") for f in (4, 6)]
    nft = [find_binary(f, "nft", "save") for f in (4, 6)]
    return _detect(legacy, nft, [_LEGACY_TABLE_LISTS[f] for f in (4, 6)])


_LINE_RE = re.compile(r"\bline:? (\d+)", re.IGNORECASE)
_NAMED_RE = re.compile(r"Chain '([^']+)' does not exist")


def _parse_failure(stderr: str, lines: Sequence[str]) -> tuple[int | None, str | None, str]:
    """(line number, its text, the useful part of stderr) from a failed restore."""
    detail_lines = [
        line.strip() for line in stderr.splitlines()
        if line.strip() and not line.startswith("Try `")
        and "deprecated --wait-interval" not in line
        and not line.startswith("# Warning:")
    ]
    detail = " | ".join(detail_lines) or "(no error output)"
    match = _LINE_RE.search(stderr)
    if match is None:
        return None, None, detail
    number = int(match.group(1))
    text = lines[number - 1] if 0 < number <= len(lines) else None
    named = _NAMED_RE.search(stderr)
    if text == "COMMIT" and named is not None:
        # nf_tables finds missing chains only when the transaction commits and reports the
        # COMMIT line: point at the first rule of that table naming the missing object.
        begin = number - 1
        while begin > 0 and not lines[begin - 1].startswith("*"):
            begin -= 1
        needle = f" {named.group(1)}"
        for index in range(begin, number - 1):
            if needle in lines[index]:
                return index + 1, lines[index], detail
    return number, text, detail


def _version_tuple(report: str) -> tuple[int, ...]:
    match = re.search(r"v(\d+)\.(\d+)\.(\d+)", report)
    return tuple(int(x) for x in match.groups()) if match else (0, 0, 0)


# --------------------------------------------------------------------------------------------
# Single-rule commands shared by both writers (through the iptables binary)
# --------------------------------------------------------------------------------------------


class _CommandWriter:
    """``iptables -t T -C/-A/-I/-D/-N/-F/-X`` and ``iptables-save``."""

    family: int
    backend: Backend

    def __init__(self, family: int, backend: Backend) -> None:
        self.family = family
        self.backend = backend
        binary = find_binary(family, backend)
        save = find_binary(family, backend, "save")
        if binary is None or save is None:
            raise BackendUnavailable(
                f"{_prefix(family)}-{backend} and {_prefix(family)}-{backend}-save are needed "
                f"for the {backend} iptables backend: install iptables (>= 1.8) with "
                f"{'xtables-legacy-multi' if backend == 'legacy' else 'xtables-nft-multi'}")
        self._binary = binary
        self._save = save
        self._wait = ["-w", str(LOCK_WAIT_SECONDS)]
        if _version_tuple(_variant_reports(binary)) < (1, 8, 0):
            self._wait += ["-W", str(LOCK_WAIT_INTERVAL_USECONDS)]

    def _run(self, argv: Sequence[str], *, input: str | None = None
             ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), input=input, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT, check=False)

    def _iptables(self, table: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run([self._binary, *self._wait, "-t", table, *args])

    def _fail(self, proc: subprocess.CompletedProcess[str]) -> CommandError:
        return CommandError(f"{shlex.join(proc.args)} exited {proc.returncode}: "
                            f"{proc.stderr.strip() or proc.stdout.strip()}")

    def save(self, table: str) -> str:
        proc = self._run([self._save, "-t", table])
        if proc.returncode != 0:
            raise self._fail(proc)
        return proc.stdout

    def chain_exists(self, table: str, chain: str) -> bool:
        return self._iptables(table, "-S", chain, "1").returncode == 0

    def list_rules(self, table: str, chain: str) -> list[str]:
        """``iptables -t TABLE -S CHAIN``: the chain's policy/declaration line and its rules
        as ``-A CHAIN ...`` lines; empty when the chain (or its whole table) is gone. One chain
        only: on nf_tables that reads just the chain, unlike ``-C`` or a save of the table."""
        proc = self._iptables(table, "-S", chain)
        if proc.returncode == 0:
            return proc.stdout.splitlines()
        if any(text in proc.stderr for text in ("does not exist", "No chain/target/match",
                                                "Table does not exist")):
            return []
        raise self._fail(proc)

    def ensure_chain(self, table: str, chain: str) -> bool:
        if self.chain_exists(table, chain):
            return False
        proc = self._iptables(table, "-N", chain)
        if proc.returncode == 0:
            return True
        if "exists" in proc.stderr:  # someone created it meanwhile
            return False
        raise self._fail(proc)

    def _rule_exists(self, table: str, chain: str, args: Sequence[str]) -> bool:
        """``-C``: exit 0 present, 1 absent; anything else (lock timeout, bad rule, missing
        chain...) is an error, never "absent", or a caller would add a duplicate."""
        proc = self._iptables(table, "-C", chain, *args)
        if proc.returncode in (0, 1):
            return proc.returncode == 0
        if any(text in proc.stderr for text in ("does not exist", "No chain/target/match",
                                                "Couldn't load target")):
            return False  # the chain or the jump target is missing (exit 2): so is the rule
        raise self._fail(proc)

    def ensure_rule(self, table: str, chain: str, args: Sequence[str], *,
                    prepend: bool = False) -> bool:
        if self._rule_exists(table, chain, args):
            return False
        op = ["-I", chain, "1"] if prepend else ["-A", chain]
        proc = self._iptables(table, *op, *args)
        if proc.returncode != 0:
            raise self._fail(proc)
        return True

    def delete_rule(self, table: str, chain: str, args: Sequence[str]) -> bool:
        if not self._rule_exists(table, chain, args):
            return False
        proc = self._iptables(table, "-D", chain, *args)
        if proc.returncode != 0:
            raise self._fail(proc)
        return True

    def flush_chain(self, table: str, chain: str) -> bool:
        if not self.chain_exists(table, chain):
            return False
        proc = self._iptables(table, "-F", chain)
        if proc.returncode != 0:
            raise self._fail(proc)
        return True

    def delete_chain(self, table: str, chain: str) -> bool:
        if not self.flush_chain(table, chain):
            return False
        proc = self._iptables(table, "-X", chain)
        if proc.returncode != 0:
            raise self._fail(proc)
        return True


# --------------------------------------------------------------------------------------------
# iptables-restore
# --------------------------------------------------------------------------------------------


class RestoreWriter(_CommandWriter):
    """Applies transactions with ``ip[6]tables-<backend>-restore``."""

    def __init__(self, family: int, backend: Backend) -> None:
        super().__init__(family, backend)
        restore = find_binary(family, backend, "restore")
        if restore is None:
            raise BackendUnavailable(
                f"{_prefix(family)}-{backend}-restore not found: install iptables (>= 1.8)")
        self._restore = restore

    def restore_text(self, text: str, *, noflush: bool = True) -> float:
        """Restore already rendered text (for callers that keep text, and benchmarks)."""
        argv = [self._restore, *self._wait]
        if noflush:
            argv.append("--noflush")
        start = time.perf_counter()
        try:
            proc = self._run(argv, input=text)
        except subprocess.TimeoutExpired:
            raise RestoreError(os.path.basename(self._restore), -1, None, None,
                               f"killed after {COMMAND_TIMEOUT:.0f}s "
                               f"({text.count(chr(10))} lines)") from None
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            number, line, detail = _parse_failure(proc.stderr, text.splitlines())
            raise RestoreError(os.path.basename(self._restore), proc.returncode, number, line,
                               detail)
        return elapsed

    def restore(self, data: RestoreData, *, noflush: bool = True) -> float:
        if data.family != self.family:
            raise ValueError(f"IPv{data.family} rules given to an IPv{self.family} writer")
        if data.is_empty():
            return 0.0
        return self._restore_spooled([data], noflush=noflush)

    def restore_sections(self, parts: Sequence[RestoreData]) -> float:
        """Apply ``parts`` in order, each its own ``COMMIT`` (kernel transaction), through one
        ``--noflush`` restore process. The tool stops at the first failing section; earlier
        ones stay applied (see `kproxy_iptables.rules.assemble_sections` for why a caller
        wants this on nf_tables)."""
        for data in parts:
            if data.family != self.family:
                raise ValueError(f"IPv{data.family} rules given to an IPv{self.family} writer")
        return self._restore_spooled([p for p in parts if not p.is_empty()], noflush=True)

    def _restore_spooled(self, parts: Sequence[RestoreData], *, noflush: bool) -> float:
        """Like `restore_text`, but the input goes through an unlinked temporary file, one
        part at a time: at 10k services the text is ~30 MB, and holding it whole (plus its
        encoded copy for the pipe) was a third of kproxy's peak RSS."""
        argv = [self._restore, *self._wait]
        if noflush:
            argv.append("--noflush")
        with tempfile.TemporaryFile() as spool:
            for data in parts:
                spool.write(data.render().encode())
            size = spool.tell()
            spool.seek(0)
            start = time.perf_counter()
            try:
                proc = subprocess.run(argv, stdin=spool, capture_output=True, text=True,
                                      timeout=COMMAND_TIMEOUT, check=False)
            except subprocess.TimeoutExpired:
                raise RestoreError(os.path.basename(self._restore), -1, None, None,
                                   f"killed after {COMMAND_TIMEOUT:.0f}s "
                                   f"({size} bytes)") from None
            elapsed = time.perf_counter() - start
            if proc.returncode != 0:
                spool.seek(0)
                text = spool.read().decode(errors="replace")
                number, line, detail = _parse_failure(proc.stderr, text.splitlines())
                raise RestoreError(os.path.basename(self._restore), proc.returncode, number,
                                   line, detail)
        return elapsed


def _render_sections(parts: Sequence[RestoreData], family: int) -> str:
    for data in parts:
        if data.family != family:
            raise ValueError(f"IPv{data.family} rules given to an IPv{family} writer")
    return "".join(data.render() for data in parts if not data.is_empty())


# --------------------------------------------------------------------------------------------
# libiptc (python-iptables)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class ParsedOption:
    """``[!] --name value...`` of a match or target."""

    name: str
    values: tuple[str, ...] = ()
    negated: bool = False


@attrs.frozen
class ParsedModule:
    name: str
    options: tuple[ParsedOption, ...] = ()


@attrs.frozen
class ParsedRule:
    """One ``-A CHAIN ...`` line, tokenized into iptables' generic rule structure."""

    chain: str
    protocol: str | None = None
    protocol_negated: bool = False
    source: str | None = None
    source_negated: bool = False
    destination: str | None = None
    destination_negated: bool = False
    in_interface: str | None = None
    in_interface_negated: bool = False
    out_interface: str | None = None
    out_interface_negated: bool = False
    matches: tuple[ParsedModule, ...] = ()
    target: ParsedModule | None = None
    goto: bool = False


class RuleSyntaxError(ValueError):
    pass


_CORE = {
    "-p": "protocol", "--protocol": "protocol",
    "-s": "source", "--source": "source", "--src": "source",
    "-d": "destination", "--destination": "destination", "--dst": "destination",
    "-i": "in_interface", "--in-interface": "in_interface",
    "-o": "out_interface", "--out-interface": "out_interface",
}
# Options that take a fixed number of values whatever they look like (a comment may start
# with "-").
_FIXED_VALUES = {"comment": 1, "name": 1, "to-destination": 1, "to-source": 1,
                 "match-set": 2, "log-prefix": 1}


_TOKEN_RE = re.compile(r'(?:"[^"]*"|[^\s"])+')
_QUOTED_RE = re.compile(r'"([^"]*)"')


def tokenize(line: str) -> list[str]:
    """Split like iptables-restore: white space, double quotes with backslash escapes."""
    if "\\" not in line and "'" not in line:
        if '"' not in line:
            return line.split()  # the common case, ~20x faster than shlex
        tokens = _TOKEN_RE.findall(line)
        if _TOKEN_RE.sub("", line).strip():
            raise RuleSyntaxError(f"cannot tokenize {line!r}: unbalanced quote")
        return [_QUOTED_RE.sub(lambda m: m.group(1), t) if '"' in t else t for t in tokens]
    try:
        return shlex.split(line, posix=True)
    except ValueError as exc:
        raise RuleSyntaxError(f"cannot tokenize {line!r}: {exc}") from None


def _is_option(token: str) -> bool:
    return token.startswith("-") and len(token) > 1 and not token[1:2].isdigit()


def parse_rule_tokens(tokens: Sequence[str]) -> ParsedRule:
    """Parse ``-A CHAIN [spec...]`` (or ``-I``) tokens into a `ParsedRule`.

    Like iptables, an extension option may come after core options (upstream writes
    ``-m tcp -p tcp -d IP --dport 80``): it belongs to the most recent ``-m`` (or to the target
    once ``-j`` was seen). ``-p tcp --dport 80`` without ``-m`` loads the protocol's match
    implicitly, as iptables does.
    """
    if len(tokens) < 2 or tokens[0] not in ("-A", "--append", "-I", "--insert"):
        raise RuleSyntaxError(f"expected '-A CHAIN ...', got {' '.join(tokens)!r}")
    fields: dict[str, Any] = {"chain": tokens[1]}
    modules: list[tuple[str, list[ParsedOption]]] = []
    target: tuple[str, list[ParsedOption]] | None = None
    i = 2
    negate = False
    count = len(tokens)
    while i < count:
        tok = tokens[i]
        if tok == "!":
            if negate:
                raise RuleSyntaxError("double '!'")
            negate = True
            i += 1
            continue
        if tok in _CORE:
            if i + 1 >= count:
                raise RuleSyntaxError(f"{tok} needs a value")
            key = _CORE[tok]
            fields[key] = tokens[i + 1]
            fields[f"{key}_negated"] = negate
            i += 2
        elif tok in ("-m", "--match"):
            if i + 1 >= count:
                raise RuleSyntaxError("-m needs a module name")
            if negate:
                raise RuleSyntaxError("'!' before -m")
            modules.append((tokens[i + 1], []))
            i += 2
        elif tok in ("-j", "--jump", "-g", "--goto"):
            if i + 1 >= count:
                raise RuleSyntaxError(f"{tok} needs a target")
            if target is not None:
                raise RuleSyntaxError("more than one target")
            target = (tokens[i + 1], [])
            fields["goto"] = tok in ("-g", "--goto")
            i += 2
        elif tok.startswith("--"):
            name = tok[2:]
            i += 1
            values: list[str] = []
            fixed = _FIXED_VALUES.get(name)
            if fixed is not None:
                if i + fixed > count:
                    raise RuleSyntaxError(f"{tok} needs {fixed} value(s)")
                values.extend(tokens[i:i + fixed])
                i += fixed
            else:
                while i < count and not _is_option(tokens[i]) and tokens[i] != "!":
                    values.append(tokens[i])
                    i += 1
                # "--opt ! value", the pre-1.4.3 syntax, negates the value
                if not values and i + 1 < count and tokens[i] == "!" and \
                        not _is_option(tokens[i + 1]):
                    negate = True
                    values.append(tokens[i + 1])
                    i += 2
            option = ParsedOption(name, tuple(values), negate)
            if target is not None:
                target[1].append(option)
            else:
                if not modules:
                    protocol = fields.get("protocol")
                    if protocol is None:
                        raise RuleSyntaxError(f"option {tok} without a -m match or -j target")
                    modules.append((protocol.lower(), []))
                modules[-1][1].append(option)
        else:
            raise RuleSyntaxError(f"unexpected {tok!r}")
        negate = False
    if negate:
        raise RuleSyntaxError("'!' at the end of the rule")
    fields["matches"] = tuple(ParsedModule(name, tuple(opts)) for name, opts in modules)
    if target is not None:
        fields["target"] = ParsedModule(target[0], tuple(target[1]))
    return ParsedRule(**fields)


@contextmanager
def xtables_lock(timeout: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    """Hold the xtables lock (``$XTABLES_LOCKFILE`` or /run/xtables.lock) like ``iptables -w``.

    The lock file lives in the mount namespace, not the network namespace: it serialises all
    legacy iptables users on the machine, which is what iptables itself does.
    """
    path = os.environ.get("XTABLES_LOCKFILE", DEFAULT_LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"another program held the xtables lock {path} for more than "
                        f"{timeout}s") from None
                time.sleep(LOCK_WAIT_INTERVAL_USECONDS / 1e6)
        yield
    finally:
        os.close(fd)  # closing releases the flock


_NFT_HOST_MESSAGE = ("the libiptc writer needs the iptables legacy backend; this host uses "
                     "nf_tables: use --iptables-writer=restore")


#: The address family whose libiptc transactions run in this process. libxtables keeps its
#: extension registry in process-global state for the first family that loads it: a second
#: family then fails with "can't find target MASQUERADE" (python-iptables issues #316, #325;
#: its maintainer: "only use one address family per process"). The other family's
#: transactions go to a helper process of its own (`_LibiptcHelper`).
_in_process_family: int | None = None


def _libiptc_helper_main() -> None:
    """Entry point of the helper process (``argv``: family, backend): apply restore texts
    for one family, one pickled request and answer at a time over stdin/stdout."""
    import pickle

    global _in_process_family
    family, backend = int(sys.argv[1]), cast(Backend, sys.argv[2])
    _in_process_family = family
    writer = LibiptcWriter(family, backend)
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            text, noflush = pickle.load(requests)
        except EOFError:
            return
        try:
            answer: tuple[str, Any] = ("ok", writer.restore_text(text, noflush=noflush))
        except RestoreError as exc:
            answer = ("error", exc)
        except Exception as exc:  # reported to the caller as a restore failure
            answer = ("error", RestoreError("libiptc", 1, None, None, str(exc)))
        pickle.dump(answer, answers)
        answers.flush()


class _LibiptcHelper:
    """A long-lived fresh interpreter (so libxtables starts clean) that runs one family's
    libiptc transactions. A child process stays in the caller's network namespace."""

    def __init__(self, family: int, backend: Backend) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c",
             "from kproxy_core.kernel.iptables_writers import _libiptc_helper_main as m; m()",
             str(family), backend],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def restore_text(self, text: str, noflush: bool) -> float:
        import pickle

        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            pickle.dump((text, noflush), self._proc.stdin)
            self._proc.stdin.flush()
            status, value = pickle.load(self._proc.stdout)
        except (OSError, EOFError) as exc:
            raise RestoreError("libiptc", 1, None, None,
                               f"the libiptc helper process failed: {exc}") from None
        if status == "error":
            raise value
        return float(value)


_helpers: dict[int, _LibiptcHelper] = {}


class LibiptcWriter(_CommandWriter):
    """Applies transactions through libiptc (python-iptables), one commit per table.

    Single-rule operations (ensure_rule...) go through the ``iptables-legacy`` binary like the
    restore writer's, so both writers behave the same there. The first family used in a
    process runs in it; the other one in a helper process (see `_in_process_family`).
    """

    def __init__(self, family: int, backend: Backend = "legacy") -> None:
        if backend != "legacy":
            raise BackendUnavailable(_NFT_HOST_MESSAGE)
        super().__init__(family, backend)
        try:
            import iptc  # noqa: F401 - loads libxtables/libiptc, can fail at import
        except Exception as exc:  # the library raises plain Exceptions on load failures
            raise BackendUnavailable(
                f"python-iptables cannot load libiptc/libxtables ({exc}): install "
                "python-iptables and the iptables legacy libraries, or use "
                "--iptables-writer=restore") from None

    def _fail_at(self, number: int, line: str, detail: str) -> RestoreError:
        return RestoreError("libiptc", 1, number, line, detail)

    def restore(self, data: RestoreData, *, noflush: bool = True) -> float:
        if data.family != self.family:
            raise ValueError(f"IPv{data.family} rules given to an IPv{self.family} writer")
        if data.is_empty():
            return 0.0
        return self.restore_text(data.render(), noflush=noflush)

    def restore_sections(self, parts: Sequence[RestoreData]) -> float:
        """Apply ``parts`` in order, one libiptc commit per table section."""
        return self.restore_text(_render_sections(parts, self.family))

    def restore_text(self, text: str, *, noflush: bool = True) -> float:
        """Apply iptables-restore text through libiptc."""
        global _in_process_family
        if _in_process_family is None:
            _in_process_family = self.family
        if _in_process_family != self.family:
            helper = _helpers.get(self.family)
            if helper is None:
                helper = _helpers[self.family] = _LibiptcHelper(self.family, self.backend)
            return helper.restore_text(text, noflush)
        return self._restore_in_process(text, noflush)

    def _restore_in_process(self, text: str, noflush: bool) -> float:
        import iptc

        start = time.perf_counter()
        table_cls = iptc.Table6 if self.family == 6 else iptc.Table
        rule_cls = iptc.Rule6 if self.family == 6 else iptc.Rule
        lines = text.splitlines()
        table: Any = None
        lock: Any = None
        header = 0
        try:
            for number, raw in enumerate(lines, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    if line.startswith("*"):
                        if table is not None:
                            raise RuleSyntaxError("table started before COMMIT")
                        lock = xtables_lock()
                        try:
                            lock.__enter__()
                        except TimeoutError as exc:
                            lock = None
                            raise RestoreError("libiptc", 4, number, raw, str(exc)) from None
                        table = table_cls(line[1:])
                        # Tables are cached per process by python-iptables: reload the
                        # handle so it reflects this namespace's current kernel state.
                        table.autocommit = False
                        table.refresh()
                        header = number
                        if not noflush:
                            self._flush_table(table)
                    elif table is None:
                        raise RuleSyntaxError("rule outside of a *table section")
                    elif line.startswith(":"):
                        self._declare(table, line)
                    elif line == "COMMIT":
                        table.commit()
                        table.autocommit = False
                        table.refresh()
                        table = None
                        lock.__exit__(None, None, None)
                        lock = None
                    elif line.startswith("-X"):
                        parts = tokenize(line)
                        if len(parts) != 2:
                            raise RuleSyntaxError("-X takes exactly one chain")
                        table.delete_chain(parts[1])
                    else:
                        rule = parse_rule_tokens(tokenize(line))
                        table.append_entry(rule.chain, self._build(rule_cls, rule).rule)
                except RestoreError:
                    raise
                except Exception as exc:
                    raise self._fail_at(number, raw, str(exc) or type(exc).__name__) from None
            if table is not None:
                raise self._fail_at(header, lines[header - 1], "table not followed by COMMIT")
        finally:
            if table is not None:
                table.autocommit = False
                table.refresh()  # drop the uncommitted handle
            if lock is not None:
                lock.__exit__(None, None, None)
        return time.perf_counter() - start

    @staticmethod
    def _flush_table(table: Any) -> None:
        names = [chain.name for chain in table.chains]
        for name in names:
            table.flush_entries(name)
        for name in names:
            if not table.builtin_chain(name):
                table.delete_chain(name)

    @staticmethod
    def _declare(table: Any, line: str) -> None:
        parts = line[1:].split()
        if not parts:
            raise RuleSyntaxError("empty chain declaration")
        name = parts[0]
        policy = parts[1] if len(parts) > 1 else "-"
        if table.builtin_chain(name):
            # As iptables-restore --noflush: built-in chains keep their rules, only the
            # policy changes.
            if policy != "-":
                table.set_policy(name, policy)
        elif table.is_chain(name):
            table.flush_entries(name)
        else:
            table.create_chain(name)

    @staticmethod
    def _build(rule_cls: Any, parsed: ParsedRule) -> Any:
        rule = rule_cls()
        for attr, neg_attr in (("protocol", "protocol_negated"), ("source", "source_negated"),
                               ("destination", "destination_negated"),
                               ("in_interface", "in_interface_negated"),
                               ("out_interface", "out_interface_negated")):
            value = getattr(parsed, attr)
            if value is None:
                continue
            text = ("!" if getattr(parsed, neg_attr) else "") + value
            if attr == "source":
                rule.src = text
            elif attr == "destination":
                rule.dst = text
            else:
                setattr(rule, attr, text)
        for module in parsed.matches:
            match = rule.create_match(module.name)
            for option in module.options:
                values = list(option.values) or [""]
                if option.negated:
                    values.insert(0, "!")
                match.parse(option.name, values)
        if parsed.target is not None:
            target = rule.create_target(parsed.target.name, goto=parsed.goto)
            for option in parsed.target.options:
                values = list(option.values) or [""]
                if option.negated:
                    values.insert(0, "!")
                target.parse(option.name, values)
        # Rule.final_check() would also re-read every parameter through the module's save
        # function (stdout redirected into a pipe): half the time of a big restore, and
        # only useful to read parameters back. The extension checks themselves still run.
        if rule.target is not None:
            rule.target._final_check()
        for match in rule.matches:
            match._final_check()
        return rule


def make_writer(kind: WriterKind, family: int, backend: Backend | None = None) -> RuleWriter:
    """A writer of ``kind`` for IP ``family``; ``backend`` None follows `detect_backend`.

    Raises `BackendUnavailable` with one line naming what is missing.
    """
    if backend is None:
        backend = detect_backend()
    if backend not in ("legacy", "nft"):
        raise ValueError(f"iptables backend must be 'legacy' or 'nft', not {backend!r}")
    if kind == "restore":
        return RestoreWriter(family, backend)
    if kind == "libiptc":
        return LibiptcWriter(family, backend)
    raise ValueError(f"iptables writer must be 'restore' or 'libiptc', not {kind!r}")
