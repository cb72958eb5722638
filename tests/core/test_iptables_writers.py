"""Both rule writers against the real kernel, each in a namespace the test creates."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from kproxy_core.backend import BackendUnavailable
from kproxy_core.kernel.iptables import RestoreData
from kproxy_core.kernel.iptables_writers import (
    Backend,
    ParsedOption,
    RestoreError,
    RuleSyntaxError,
    WriterKind,
    _detect,
    detect_backend,
    make_writer,
    parse_rule_tokens,
    tokenize,
)
from kproxy_core.testing.innetns import in_netns
from kproxy_core.testing.netns import NetNS, Sandbox

T = TypeVar("T")

WRITERS: list[tuple[WriterKind, Backend]] = [
    ("restore", "legacy"), ("restore", "nft"), ("libiptc", "legacy")]
IDS = [f"{k}-{b}" for k, b in WRITERS]


@pytest.fixture
def ns() -> Iterator[NetNS]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root to create network namespaces")
    with Sandbox() as sandbox:
        yield sandbox.netns("ipt")


def run_in(ns: NetNS, func: Callable[[], T]) -> T:
    return in_netns(ns.name, func)


def service_rules(endpoints: list[str]) -> RestoreData:
    data = RestoreData(4)
    nat = data.table("nat")
    for chain in ("KUBE-SERVICES", "KUBE-SVC-AAAA", "KUBE-MARK-MASQ"):
        nat.chain(chain)
    nat.rule("KUBE-MARK-MASQ", "-j", "MARK", "--or-mark", "0x4000")
    nat.rule("KUBE-SERVICES", "-m", "comment", "--comment", '"ns/svc:p cluster IP"', "-m",
             "tcp", "-p", "tcp", "-d", "10.96.0.10/32", "--dport", "80", "-j", "KUBE-SVC-AAAA")
    for index, ep in enumerate(endpoints):
        sep = f"KUBE-SEP-{index}"
        nat.chain(sep)
        nat.rule(sep, "-p", "tcp", "-m", "tcp", "-j", "DNAT", "--to-destination", ep)
        left = len(endpoints) - index
        stat = ["-m", "statistic", "--mode", "random", "--probability", f"{1 / left:.10f}"]
        nat.rule("KUBE-SVC-AAAA", *(stat if left > 1 else []), "-j", sep)
    return data


def nat_rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("-A")]


# ------------------------------------------------------------------------------ pure parsing


def test_parse_rule_attaches_late_options_to_last_match() -> None:
    rule = parse_rule_tokens(tokenize(
        '-A KUBE-SERVICES -m comment --comment "a b" -m tcp -p tcp ! -d 10.0.0.1/32 '
        "--dport 80 -j DNAT --to-destination 1.2.3.4:80"))
    assert rule.chain == "KUBE-SERVICES"
    assert rule.protocol == "tcp"
    assert (rule.destination, rule.destination_negated) == ("10.0.0.1/32", True)
    assert [m.name for m in rule.matches] == ["comment", "tcp"]
    assert rule.matches[0].options == (ParsedOption("comment", ("a b",)),)
    assert rule.matches[1].options == (ParsedOption("dport", ("80",)),)
    assert rule.target is not None and rule.target.name == "DNAT"
    assert rule.target.options == (ParsedOption("to-destination", ("1.2.3.4:80",)),)


def test_parse_rule_negated_option_implicit_match_and_flags() -> None:
    rule = parse_rule_tokens(tokenize(
        "-A X -p udp --dport 53 -m addrtype ! --dst-type LOCAL -m recent --name S --rcheck "
        "--seconds 10 --reap -g Y"))
    assert [m.name for m in rule.matches] == ["udp", "addrtype", "recent"]
    assert rule.matches[1].options == (ParsedOption("dst-type", ("LOCAL",), True),)
    assert [o.name for o in rule.matches[2].options] == ["name", "rcheck", "seconds", "reap"]
    assert rule.goto and rule.target is not None and rule.target.name == "Y"


@pytest.mark.parametrize("line", ["-A X --dport 80", "-A", "-N X", "-A X -j", "-A X -s 1 !",
                                  '-A X -m comment --comment "unterminated'])
def test_parse_rule_rejects_bad_input(line: str) -> None:
    with pytest.raises(RuleSyntaxError):
        parse_rule_tokens(tokenize(line))


def test_restore_error_pickles_with_its_fields() -> None:
    err = RestoreError("iptables-restore", 2, 3, "-A X -j NOPE", "no target")
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err)
    assert "line 3" in str(err) and "-A X -j NOPE" in str(err) and "exited 2" in str(err)


def test_detect_prefers_hint_then_kube_rules_then_rules(tmp_path: object) -> None:
    def fake(name: str, body: str) -> str:
        path = os.path.join(str(tmp_path), name)
        with open(path, "w") as handle:
            handle.write(f"#!/bin/sh\ncat <<'EOF'\n{body}\nEOF\n")
        os.chmod(path, 0o755)
        return path

    kube = fake("kube", "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j RETURN\nCOMMIT")
    other = fake("other", "*filter\n-A INPUT -j ACCEPT\n-A INPUT -j DROP\nCOMMIT")
    hint = fake("hint", "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT")
    empty = fake("empty", "")
    assert _detect([kube], [other]) == "legacy"
    assert _detect([other], [kube]) == "nft"
    assert _detect([kube], [hint]) == "nft"
    assert _detect([other], [empty]) == "legacy"
    assert _detect([empty], [empty]) == "nft"
    assert _detect([None], [None, empty]) == "nft"
    assert _detect([kube], [None]) == "legacy"
    with pytest.raises(BackendUnavailable):
        _detect([None, None], [None, None])


def test_libiptc_refuses_nft_with_one_clear_line() -> None:
    with pytest.raises(BackendUnavailable, match="use --iptables-writer=restore"):
        make_writer("libiptc", 4, "nft")


# ------------------------------------------------------------------------------ kernel


@pytest.mark.root
@pytest.mark.parametrize(("kind", "backend"), WRITERS, ids=IDS)
def test_restore_semantics(ns: NetNS, kind: WriterKind, backend: Backend) -> None:
    def scenario() -> tuple[list[str], list[str], list[str]]:
        writer = make_writer(kind, 4, backend)
        # Another agent's chain and rules, and a rule in a built-in chain.
        assert writer.ensure_chain("nat", "OTHER-AGENT")
        writer.ensure_rule("nat", "OTHER-AGENT", ["-j", "RETURN"])
        writer.ensure_rule("nat", "PREROUTING", ["-j", "OTHER-AGENT"])
        writer.restore(service_rules(["10.244.1.2:80", "10.244.1.3:80", "10.244.2.2:80"]))
        first = nat_rules(writer.save("nat"))
        # Rewrite: the SVC chain is declared again with one endpoint fewer, SEP-2 is removed.
        # As upstream: a stale chain is declared (flushed) and then deleted in one go; -X alone
        # fails on a chain that still has rules.
        data = service_rules(["10.244.1.2:80", "10.244.1.3:80"])
        data.table("nat").chain("KUBE-SEP-2")
        data.table("nat").delete_chain("KUBE-SEP-2")
        writer.restore(data)
        second = nat_rules(writer.save("nat"))
        # A transaction that only touches one chain leaves the others alone.
        only = RestoreData(4)
        only.table("nat").chain("KUBE-SEP-1")
        only.table("nat").rule("KUBE-SEP-1", "-p", "tcp", "-j", "DNAT", "--to-destination",
                               "10.244.9.9:80")
        writer.restore(only)
        third = nat_rules(writer.save("nat"))
        return first, second, third

    first, second, third = run_in(ns, scenario)
    assert "-A PREROUTING -j OTHER-AGENT" in first
    assert "-A KUBE-SEP-2 -p tcp -m tcp -j DNAT --to-destination 10.244.2.2:80" in first
    assert sum(1 for r in first if r.startswith("-A KUBE-SVC-AAAA")) == 3
    assert not any("KUBE-SEP-2" in r for r in second)
    assert sum(1 for r in second if r.startswith("-A KUBE-SVC-AAAA")) == 2
    assert "-A OTHER-AGENT -j RETURN" in second and "-A PREROUTING -j OTHER-AGENT" in second
    assert "-A KUBE-SEP-1 -p tcp -j DNAT --to-destination 10.244.9.9:80" in third
    assert [r for r in third if "KUBE-SEP-1" not in r] == \
        [r for r in second if "KUBE-SEP-1" not in r]


@pytest.mark.root
@pytest.mark.parametrize(("kind", "backend"), WRITERS, ids=IDS)
def test_failing_restore_names_the_line_and_changes_nothing(
        ns: NetNS, kind: WriterKind, backend: Backend) -> None:
    def scenario() -> tuple[str, str, RestoreError]:
        writer = make_writer(kind, 4, backend)
        writer.restore(service_rules(["10.244.1.2:80"]))
        before = writer.save("nat")
        bad = service_rules(["10.244.1.5:80"])
        bad.table("nat").chain("KUBE-BROKEN")
        bad.table("nat").rule("KUBE-BROKEN", "-j", "KUBE-DOES-NOT-EXIST")
        with pytest.raises(RestoreError) as info:
            writer.restore(bad)
        return before, writer.save("nat"), info.value

    before, after, err = run_in(ns, scenario)
    assert nat_rules(before) == nat_rules(after)
    assert err.line_text == "-A KUBE-BROKEN -j KUBE-DOES-NOT-EXIST"
    assert err.line_number is not None and err.line_number > 1
    assert f"line {err.line_number}" in str(err) and "KUBE-DOES-NOT-EXIST" in str(err)
    assert err.exit_code != 0


@pytest.mark.root
@pytest.mark.parametrize(("kind", "backend"), WRITERS, ids=IDS)
def test_single_rule_operations_are_idempotent(
        ns: NetNS, kind: WriterKind, backend: Backend) -> None:
    def scenario() -> list[object]:
        writer = make_writer(kind, 4, backend)
        args = ["-m", "comment", "--comment", "kproxy canary", "-j", "KUBE-TEST"]
        return [
            writer.chain_exists("filter", "KUBE-TEST"),
            writer.ensure_chain("filter", "KUBE-TEST"),
            writer.ensure_chain("filter", "KUBE-TEST"),
            writer.chain_exists("filter", "KUBE-TEST"),
            writer.ensure_rule("filter", "INPUT", args),
            writer.ensure_rule("filter", "INPUT", args),
            writer.ensure_rule("filter", "INPUT", ["-j", "ACCEPT"], prepend=True),
            nat_rules(writer.save("filter")),
            writer.delete_rule("filter", "INPUT", args),
            writer.delete_rule("filter", "INPUT", args),
            writer.flush_chain("filter", "KUBE-TEST"),
            writer.delete_chain("filter", "KUBE-TEST"),
            writer.delete_chain("filter", "KUBE-TEST"),
            writer.flush_chain("filter", "KUBE-TEST"),
        ]

    result = run_in(ns, scenario)
    assert result[:7] == [False, True, False, True, True, False, True]
    assert result[7] == ["-A INPUT -j ACCEPT",
                         '-A INPUT -m comment --comment "kproxy canary" -j KUBE-TEST']
    assert result[8:] == [True, False, True, True, False, False]


@pytest.mark.root
@pytest.mark.parametrize(("kind", "backend"), WRITERS, ids=IDS)
def test_ipv6_restore(ns: NetNS, kind: WriterKind, backend: Backend) -> None:
    def scenario() -> list[str]:
        writer = make_writer(kind, 6, backend)
        data = RestoreData(6)
        data.table("nat").chain("KUBE-SEP-V6")
        data.table("nat").rule("KUBE-SEP-V6", "-s", "fd00::5/128", "-p", "tcp", "-j", "DNAT",
                               "--to-destination", "[fd00::5]:80")
        writer.restore(data)
        return nat_rules(writer.save("nat"))

    assert run_in(ns, scenario) == [
        "-A KUBE-SEP-V6 -s fd00::5/128 -p tcp -j DNAT --to-destination [fd00::5]:80"]


@pytest.mark.root
@pytest.mark.parametrize(("kind", "backend"), WRITERS, ids=IDS)
def test_restore_honours_the_xtables_lock(
        ns: NetNS, kind: WriterKind, backend: Backend) -> None:
    # A private lock file (iptables reads $XTABLES_LOCKFILE) so that holding it does not
    # stall other people's iptables commands on this machine.
    lock_path = tempfile.mktemp(prefix="kproxy-xtables-", suffix=".lock")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys\n"
         f"fd = os.open({lock_path!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    outcome: list[object] = []

    def restore() -> list[str]:
        os.environ["XTABLES_LOCKFILE"] = lock_path
        writer = make_writer(kind, 4, backend)
        writer.restore(service_rules(["10.244.1.2:80"]))
        return nat_rules(writer.save("nat"))

    def background() -> None:
        try:
            outcome.append(in_netns(ns.name, restore))
        except BaseException as exc:
            outcome.append(exc)

    def kernel_rules() -> list[str]:
        return nat_rules(ns.run([f"iptables-{backend}-save", "-t", "nat"]).stdout)

    worker = threading.Thread(target=background)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        worker.start()
        if backend == "legacy":
            worker.join(timeout=1.5)
            assert worker.is_alive(), f"restore finished while the lock was held: {outcome}"
            assert kernel_rules() == []
        else:
            # nf_tables has no userspace lock (the kernel serialises transactions).
            worker.join(timeout=30)
            assert not worker.is_alive() and holder.poll() is None
        holder.stdin.write("release\n")
        holder.stdin.flush()
        worker.join(timeout=30)
    finally:
        if holder.poll() is None and holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=10)
        os.unlink(lock_path)
    assert len(outcome) == 1 and isinstance(outcome[0], list), outcome
    assert "-A KUBE-SEP-0 -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:80" in outcome[0]
    assert kernel_rules() == outcome[0]


@pytest.mark.root
def test_detect_backend_follows_the_namespace_rules(ns: NetNS) -> None:
    def scenario(backend: Backend) -> Callable[[], Backend]:
        def run() -> Backend:
            writer = make_writer("restore", 4, backend)
            writer.restore(service_rules(["10.244.1.2:80"]))
            detect_backend.cache_clear()
            return detect_backend()
        return run

    assert run_in(ns, scenario("legacy")) == "legacy"
    with Sandbox() as other:
        assert in_netns(other.netns("nft").name, scenario("nft")) == "nft"


@pytest.mark.root
@pytest.mark.parametrize("first", [6, 4])
def test_libiptc_serves_both_families_in_one_process(ns: NetNS, first: int) -> None:
    """libxtables keeps one family's extensions per process; the writer runs the other
    family in a helper process, so a dual-stack proxy can use libiptc for both."""

    def both() -> list[str]:
        out = []
        for family in (first, 10 - first):
            data = RestoreData(family)
            nat = data.table("nat")
            nat.chain("KUBE-POSTROUTING")
            nat.rule("KUBE-POSTROUTING", "-j", "MASQUERADE", "--random-fully")
            make_writer("libiptc", family, "legacy").restore(data)
            binary = "ip6tables-legacy-save" if family == 6 else "iptables-legacy-save"
            out.append(subprocess.run([binary, "-t", "nat"], capture_output=True, text=True,
                                      check=True).stdout)
        return out

    for save in run_in(ns, both):
        assert "-A KUBE-POSTROUTING -j MASQUERADE --random-fully" in save


@pytest.mark.root
@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_rule_checks_treat_a_missing_jump_target_as_absent(ns: NetNS, backend: str) -> None:
    def check() -> tuple[bool, bool]:
        writer = make_writer("restore", 4, backend)  # type: ignore[arg-type]
        return (writer.delete_rule("filter", "INPUT", ["-j", "KUBE-NOT-THERE"]),
                writer.delete_rule("nat", "NO-SUCH-CHAIN", ["-j", "ACCEPT"]))

    assert run_in(ns, check) == (False, False)
