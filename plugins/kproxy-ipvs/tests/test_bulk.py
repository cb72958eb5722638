"""`kproxy_ipvs.bulk`: hand-encoded netlink batches. Encodings are checked against pyroute2's
decoder; ipset and address batches against this host's kernel in a namespace (IPVS itself is
checked in the VM suite: ``tests/kernel``)."""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from kproxy_ipvs import bulk
from kproxy_ipvs.rules import RealServer, VirtualServer, VSKey

from kproxy_core.kernel import ipset
from kproxy_core.testing.innetns import in_netns
from kproxy_core.testing.netns import NetNS, Sandbox


def decode_ipvs(payload: bytes) -> Any:
    from pyroute2.netlink.generic.ipvs import ipvsmsg

    header = struct.pack("=IHHII", 16 + len(payload), 0x20, 1, 1, 0)
    message = ipvsmsg(header + payload)
    message.decode()
    return message


def test_ipvs_service_and_dest_decode_as_pyroute2_reads_them() -> None:
    vs = VirtualServer(VSKey("UDP", "10.96.0.10", 53), "wlc", 0x11, 600)
    message = decode_ipvs(bulk.genl_payload(bulk.IPVS_CMD_NEW_DEST, bulk.ipvs_service_attrs(
        vs.key, vs), bulk.ipvs_dest_attrs(RealServer("10.244.1.2", 5353), 3)))
    assert message["cmd"] == bulk.IPVS_CMD_NEW_DEST
    service = message.get_attr("IPVS_CMD_ATTR_SERVICE")
    assert service.get_attr("IPVS_SVC_ATTR_AF") == socket.AF_INET
    assert service.get_attr("IPVS_SVC_ATTR_PROTOCOL") == socket.IPPROTO_UDP
    assert service.get_attr("IPVS_SVC_ATTR_ADDR") == "10.96.0.10"
    assert service.get_attr("IPVS_SVC_ATTR_PORT") == 53
    assert service.get_attr("IPVS_SVC_ATTR_SCHED_NAME") == "wlc"
    assert service.get_attr("IPVS_SVC_ATTR_FLAGS")["flags"] == 0x11
    assert service.get_attr("IPVS_SVC_ATTR_TIMEOUT") == 600
    dest = message.get_attr("IPVS_CMD_ATTR_DEST")
    assert dest.get_attr("IPVS_DEST_ATTR_ADDR") == "10.244.1.2"
    assert dest.get_attr("IPVS_DEST_ATTR_PORT") == 5353
    assert dest.get_attr("IPVS_DEST_ATTR_WEIGHT") == 3
    assert dest.get_attr("IPVS_DEST_ATTR_FWD_METHOD") == bulk.FWD_MASQ
    assert dest.get_attr("IPVS_DEST_ATTR_ADDR_FAMILY") == socket.AF_INET
    six = decode_ipvs(bulk.genl_payload(bulk.IPVS_CMD_NEW_DEST, bulk.ipvs_service_attrs(
        VSKey("TCP", "fd00::10", 80)), bulk.ipvs_dest_attrs(RealServer("fd00::2", 8080))))
    assert six.get_attr("IPVS_CMD_ATTR_SERVICE").get_attr("IPVS_SVC_ATTR_ADDR") == "fd00::10"
    assert six.get_attr("IPVS_CMD_ATTR_DEST").get_attr("IPVS_DEST_ATTR_ADDR") == "fd00::2"
    assert six.get_attr("IPVS_CMD_ATTR_DEST").get_attr("IPVS_DEST_ATTR_PORT") == 8080


def test_dump_replies_parse_flags_timeout_and_connection_counts() -> None:
    # As the kernel writes them: addresses as a 16-byte union, IP_VS_SVC_F_HASHED set.
    def reply(kind: int, *attrs: bytes) -> bytes:
        return bulk.genl_payload(bulk.IPVS_CMD_NEW_SERVICE, bulk.nested(kind, *attrs))

    n = bulk.nla
    v4 = socket.inet_pton(socket.AF_INET, "10.96.0.10").ljust(16, b"\0")
    service = reply(bulk.IPVS_CMD_ATTR_SERVICE, n(1, struct.pack("=H", socket.AF_INET)),
                    n(2, struct.pack("=H", 6)), n(3, v4), n(4, struct.pack("!H", 80)),
                    n(6, b"rr\0"), n(7, struct.pack("=II", 0x3, 0xFFFFFFFF)),
                    n(8, struct.pack("=I", 600)), n(9, struct.pack("=I", 0xFFFFFFFF)))
    assert bulk.parse_service_reply(service) == VirtualServer(
        VSKey("TCP", "10.96.0.10", 80), "rr", 0x1, 600)
    fwmark = reply(bulk.IPVS_CMD_ATTR_SERVICE, n(1, struct.pack("=H", socket.AF_INET)),
                   n(5, struct.pack("=I", 7)))
    assert bulk.parse_service_reply(fwmark) is None
    v6 = socket.inet_pton(socket.AF_INET6, "fd00::2")
    dest = reply(bulk.IPVS_CMD_ATTR_DEST, n(1, v6), n(2, struct.pack("!H", 8080)),
                 n(4, struct.pack("=I", 0)), n(7, struct.pack("=I", 3)),
                 n(8, struct.pack("=I", 2)), n(11, struct.pack("=H", socket.AF_INET6)))
    assert bulk.parse_dest_reply(dest, socket.AF_INET6) == (RealServer("fd00::2", 8080), 0, 3, 2)


def test_unknown_set_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported ipset type"):
        bulk.ipset_entry_attrs("list:set", "x")


@pytest.fixture
def node() -> Iterator[NetNS]:
    with Sandbox() as sandbox:
        ns = sandbox.netns("bulk")
        # (this host's kernel has no dummy driver; any device holds addresses)
        ns.run(["ip", "link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "peer0"])
        yield ns


SETS = {
    "hash:ip": ["10.96.0.1", "10.96.0.2"],
    "hash:ip,port": ["10.96.0.1,tcp:80", "10.96.0.1,udp:53", "10.96.0.2,sctp:9"],
    "hash:ip,port,ip": ["10.244.1.2,tcp:8080,10.244.1.2"],
    "hash:ip,port,net": ["10.98.0.1,tcp:80,10.99.0.0/24", "10.98.0.1,tcp:80,10.99.1.7"],
    "hash:net": ["10.99.0.0/16", "192.0.2.1"],
    "bitmap:port": ["30080", "32000"],
}


@pytest.mark.root
def test_ipset_batches_add_and_delete_every_set_type(node: NetNS) -> None:
    from kproxy_core.kernel import ipset

    def run() -> dict[str, Any]:
        writer = bulk.BulkWriter()
        out: dict[str, Any] = {}
        for index, (set_type, entries) in enumerate(SETS.items()):
            name = f"T{index}"
            ipset.create_set(name, set_type, 4, comment=True)
            writer.set_entries(name, set_type, entries)
            writer.set_entries(name, set_type, entries)  # again: existing entries are fine
            out[set_type] = ipset.list_entries(name)
            out[set_type + " hand-parsed"] = writer.list_set(name, set_type)
            writer.set_entries(name, set_type, entries[:1], add=False)
            out[set_type + " after delete"] = ipset.list_entries(name)
        ipset.create_set("SIX", "hash:ip,port", 6)
        writer.set_entries("SIX", "hash:ip,port", ["fd00::10,tcp:80"])
        out["six"] = ipset.list_entries("SIX")
        out["six hand-parsed"] = writer.list_set("SIX", "hash:ip,port")
        many = [f"10.96.{i // 250}.{i % 250 + 1},tcp:80" for i in range(1000)]
        ipset.create_set("MANY", "hash:ip,port", 4)
        writer.set_entries("MANY", "hash:ip,port", many)
        out["many"] = ipset.list_entries("MANY") == set(many) == writer.list_set(
            "MANY", "hash:ip,port")
        out["types"] = (writer.set_type("MANY"), writer.set_type("T5"), writer.set_type("NONE"))
        try:
            writer.set_entries("MISSING", "hash:ip", ["10.0.0.1"])
        except bulk.BatchError as exc:
            out["missing"] = str(exc)
        writer.close()
        return out

    out = in_netns(node.name, run, timeout=60)
    for set_type, entries in SETS.items():
        assert out[set_type] == {ipset.canonical_entry(set_type, e) for e in entries}, set_type
        assert out[set_type + " hand-parsed"] == out[set_type], set_type
        assert out[set_type + " after delete"] == out[set_type] - {
            ipset.canonical_entry(set_type, entries[0])}, set_type
    assert out["six"] == out["six hand-parsed"] == {"fd00::10,tcp:80"}
    assert out["many"] is True
    assert out["types"] == ("hash:ip,port", "bitmap:port", None)
    assert "ipset MISSING" in out["missing"] and "1 failed" in out["missing"]


@pytest.mark.root
def test_sets_created_in_one_batch_as_ipset_create_makes_them(node: NetNS) -> None:
    """create_sets makes every type with the comment extension (what ``ipset create ...
    comment`` makes), both families; set_types lists them from headers; a set already there
    is no failure; a bad type names the set."""

    def run() -> dict[str, Any]:
        writer = bulk.BulkWriter()
        wanted = [(f"C{index}", set_type, 4) for index, set_type in enumerate(SETS)]
        wanted.append(("C6", "hash:ip,port", 6))
        for index, set_type in enumerate(SETS):  # the earlier path, for comparison
            ipset.create_set(f"P{index}", set_type, 4, comment=True)
        out: dict[str, Any] = {"sent": writer.create_sets(wanted),
                               "again": writer.create_sets(wanted[:2]),
                               "types": writer.set_types()}
        for name, set_type, _family in wanted:
            entries = SETS[set_type] if name != "C6" else ["fd00::10,tcp:80"]
            writer.set_entries(name, set_type, entries)
            out[name] = writer.list_set(name, set_type)
        try:
            writer.create_sets([("BAD", "hash:nope", 4)])
        except bulk.BatchError as exc:
            out["bad"] = str(exc)
        writer.close()
        return out

    def header(name: str) -> list[str]:
        line = next(line for line in saved if line.startswith(f"create {name} "))
        words = line.split()[2:]
        if "initval" in words:  # random per set
            del words[words.index("initval"):words.index("initval") + 2]
        return words

    out = in_netns(node.name, run, timeout=60)
    assert out["sent"] == len(SETS) + 1 and out["again"] == 2
    assert out["types"] == {**{f"C{i}": t for i, t in enumerate(SETS)}, "C6": "hash:ip,port",
                            **{f"P{i}": t for i, t in enumerate(SETS)}}
    saved = node.run(["ipset", "save"]).stdout.splitlines()
    for index, set_type in enumerate(SETS):
        assert header(f"C{index}")[0] == set_type and "comment" in header(f"C{index}")
        assert header(f"C{index}") == header(f"P{index}")
        assert out[f"C{index}"] == {ipset.canonical_entry(set_type, e) for e in SETS[set_type]}
    assert "inet6" in header("C6")
    assert out["C6"] == {"fd00::10,tcp:80"}
    assert "hash:nope" in out["bad"]


@pytest.mark.root
def test_address_batches_add_replace_and_delete(node: NetNS) -> None:
    addresses = [f"10.96.{i // 250}.{i % 250 + 1}" for i in range(600)] + ["fd00:96::10"]

    def run() -> tuple[int, int, str, list[tuple[int, str]]]:
        index = socket.if_nametoindex("kube-ipvs0")
        writer = bulk.BulkWriter()
        sent = writer.addresses(index, addresses)
        writer.addresses(index, addresses[:10])  # already there: no failure
        writer.addresses(index, addresses[:300], add=False)
        listed = writer.list_addresses()
        try:
            writer.addresses(index + 1000, ["10.0.0.1"])
            failure = ""
        except bulk.BatchError as exc:
            failure = str(exc)
        writer.close()
        return sent, index, failure, listed

    sent, index, failure, dumped = in_netns(node.name, run, timeout=60)
    assert sent == len(addresses)
    listed = node.run(["ip", "-o", "addr", "show", "dev", "kube-ipvs0"]).stdout
    have = {line.split()[3].split("/")[0] for line in listed.splitlines()
            if line.split()[2] in ("inet", "inet6")}
    assert have == set(addresses[300:])
    assert {a for i, a in dumped if i == index} == have
    assert all(i != index for i, a in dumped if a == "127.0.0.1")
    assert "10.0.0.1" in failure and "No such device" in failure


@pytest.mark.root
def test_links_and_jumps_through_the_netlink_kernel() -> None:
    """ensure_jumps inserts only what one ``iptables-save`` lacks, in one restore; the dummy
    device helper (this host has no dummy driver: the kernel's refusal is the error) and link
    deletion by index."""
    from kproxy_ipvs.netlink import NetlinkKernel
    from kproxy_ipvs.rules import JUMPS, jump_args

    jumps = [(table, chain, jump_args(target, comment))
             for table, chain, target, comment in JUMPS]

    def run() -> dict[str, Any]:
        from kproxy_core.kernel.iptables import RestoreData

        writer = bulk.BulkWriter()
        kernel = NetlinkKernel.__new__(NetlinkKernel)  # no IPVS on this host: skip its probe
        kernel._bulk, kernel._writer_kind = writer, "restore"
        kernel._writers, kernel._ipset = {}, None
        data = RestoreData(4)
        for table, chain in {("nat", "KUBE-SERVICES"), ("nat", "KUBE-POSTROUTING"),
                             ("filter", "KUBE-FORWARD"), ("filter", "KUBE-NODE-PORT"),
                             ("filter", "KUBE-PROXY-FIREWALL"), ("filter", "KUBE-IPVS-FILTER"),
                             ("filter", "KUBE-IPVS-OUT-FILTER")}:
            data.table(table).chain(chain)
        kernel.restore(data)
        out: dict[str, Any] = {"first": kernel.ensure_jumps(4, jumps),
                               "again": kernel.ensure_jumps(4, jumps)}
        try:
            writer.add_dummy("kube-ipvs0")
            out["dummy"] = "created"
        except bulk.BatchError as exc:
            out["dummy"] = str(exc)
        writer.close()
        return out

    with Sandbox() as sandbox:
        ns = sandbox.netns("jumps")
        ns.run(["ip", "link", "add", "gone0", "type", "veth", "peer", "name", "gone1"])
        out = in_netns(ns.name, run, timeout=60)
        saved = ns.run(["iptables-save"]).stdout

        def delete() -> bool:
            kernel_writer = bulk.BulkWriter()
            kernel_writer.delete_link(socket.if_nametoindex("gone0"))
            kernel_writer.close()
            try:
                socket.if_nametoindex("gone0")
                return False
            except OSError:
                return True

        gone = in_netns(ns.name, delete, timeout=60)
    assert out["first"] == len(JUMPS) and out["again"] == 0
    assert saved.count("-j KUBE-") >= len(JUMPS)
    assert ('-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
            in saved)
    assert out["dummy"] == "created" or "adding kube-ipvs0" in out["dummy"]
    assert gone


@pytest.mark.root
def test_restore_with_jumps_inserts_the_missing_jumps_in_the_same_restore() -> None:
    """The full sync's restore carries the missing jumps: all of them into an empty
    namespace, none again, and the ones someone deleted come back (never doubled)."""
    from kproxy_ipvs.netlink import NetlinkKernel
    from kproxy_ipvs.rules import JUMPS, jump_args

    jumps = [(table, chain, jump_args(target, comment))
             for table, chain, target, comment in JUMPS]
    chains = {(table, target) for table, _chain, target, _comment in JUMPS}

    def run() -> tuple[list[str], bool]:
        from kproxy_core.kernel.iptables import RestoreData
        from kproxy_core.kernel.iptables_writers import make_writer

        kernel = NetlinkKernel.__new__(NetlinkKernel)  # no IPVS on this host: skip its probe
        kernel._bulk, kernel._writer_kind = bulk.BulkWriter(), "restore"
        kernel._writers, kernel._ipset = {}, None
        saves = []
        deleted = False
        for round_ in range(3):
            data = RestoreData(4)
            for table, chain in chains:
                data.table(table).chain(chain)
            data.table("nat").rule("KUBE-SERVICES", "-j", "RETURN")
            kernel.restore_with_jumps(data, jumps)
            saves.append(make_writer("restore", 4).save("nat")
                         + make_writer("restore", 4).save("filter"))
            if round_ == 1:  # someone deletes one jump
                deleted = kernel.delete_jump(4, "nat", "OUTPUT", jumps[0][2])
        kernel._bulk.close()
        return saves, deleted

    with Sandbox() as sandbox:
        saves, deleted = in_netns(sandbox.netns("merged").name, run, timeout=60)
    assert deleted
    for saved in saves:
        lines = saved.splitlines()
        for _table, chain, args in jumps:
            rendered = "-A " + chain + " -m comment --comment \"" + args[3] + "\" -j " + args[5]
            assert lines.count(rendered) == 1, (rendered, saved)
        assert "-A KUBE-SERVICES -j RETURN" in lines


@pytest.mark.root
def test_the_first_jump_check_reuses_the_save_the_backend_detection_just_ran() -> None:
    """The core's detection keeps what its save commands printed for one taker in the same
    namespace: the first restore_with_jumps finds its jumps there (no save of its own), and
    the answer is the same as from a fresh save; a second take, or one from another
    namespace, gets nothing."""
    from kproxy_ipvs.netlink import _saved_lines

    from kproxy_core.kernel.iptables_writers import (
        detect_backend,
        find_binary,
        make_writer,
        take_detection_save,
    )

    def detect_then_take(nat_rule: bool) -> dict[str, Any]:
        writer = make_writer("restore", 4, "nft")
        if nat_rule:
            from kproxy_core.kernel.iptables import RestoreData

            data = RestoreData(4)
            data.table("nat").chain("KUBE-X")
            data.table("nat").raw_rules(["-A OUTPUT -j KUBE-X"])
            writer.restore(data)
        detect_backend.cache_clear()
        backend = detect_backend()
        binary = find_binary(4, backend, "save")
        assert binary is not None
        fresh = subprocess.run([binary], capture_output=True, text=True, check=True).stdout
        out = {"backend": backend, "lines": _saved_lines(writer, ["nat", "filter"]),
               "again": take_detection_save(binary), "fresh": fresh}
        detect_backend.cache_clear()
        detect_backend()
        return out

    with Sandbox() as sandbox:
        out = in_netns(sandbox.netns("detect").name, lambda: detect_then_take(True),
                       timeout=60)
        # Detection in one namespace, the take in another: not handed out.
        other = sandbox.netns("other")

        def across() -> str | None:
            from kproxy_core.kernel import iptables_writers

            iptables_writers.detect_backend.cache_clear()
            iptables_writers.detect_backend()
            binary = find_binary(4, "nft", "save")
            assert binary is not None
            # A child process (it inherits what was kept) in another namespace.
            return in_netns(third, lambda: take_detection_save(binary), timeout=60)

        third = sandbox.netns("third").name
        taken_across = in_netns(other.name, across, timeout=60)
    assert out["backend"] == "nft"
    assert "-A OUTPUT -j KUBE-X" in out["lines"]["nat"]
    assert out["lines"]["filter"] == set()
    assert out["lines"]["nat"] == {line for line in _table(out["fresh"], "nat")}
    assert out["again"] is None
    assert taken_across is None


def _table(saved: str, table: str) -> list[str]:
    lines: list[str] = []
    inside = False
    for line in saved.splitlines():
        if line.startswith("*"):
            inside = line[1:] == table
        elif inside:
            lines.append(line)
    return lines


@pytest.mark.root
def test_link_index_over_netlink() -> None:
    """The index of a link by name, None for a missing one (without the ioctl that tries to
    load a module of that name), and it agrees with if_nametoindex."""

    def run() -> tuple[int | None, int, int | None, int | None]:
        writer = bulk.BulkWriter()
        try:
            return (writer.link_index("lo"), socket.if_nametoindex("lo"),
                    writer.link_index("veth-a"), writer.link_index("nothere0"))
        finally:
            writer.close()

    with Sandbox() as sandbox:
        ns = sandbox.netns("links")
        ns.run(["ip", "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b"])
        lo, lo_ioctl, veth, missing = in_netns(ns.name, run, timeout=60)
        veth_ioctl = in_netns(ns.name, lambda: socket.if_nametoindex("veth-a"), timeout=60)
    assert lo == lo_ioctl == 1
    assert veth == veth_ioctl and veth is not None and veth > 1
    assert missing is None


@pytest.mark.root
def test_backend_detection_skips_legacy_saves_with_no_legacy_tables() -> None:
    """In a namespace without x_tables tables the legacy save commands would print nothing:
    the detection does not run them (same answer); once a legacy table holds rules, they
    run and decide."""

    def run() -> list[tuple[str, list[str]]]:
        from kproxy_core.kernel import iptables_writers as w
        from kproxy_core.kernel.iptables import RestoreData

        ran: list[str] = []
        real_run = subprocess.run

        def recording(argv: list[str], *args: Any, **kwargs: Any) -> Any:
            ran.append(argv[0])
            return real_run(argv, *args, **kwargs)

        out = []
        w.subprocess.run = recording  # type: ignore[assignment]
        try:
            for legacy_rules in (False, True):
                if legacy_rules:
                    data = RestoreData(4)
                    data.table("nat").chain("KUBE-SERVICES")
                    data.table("nat").raw_rules(["-A KUBE-SERVICES -j RETURN"])
                    w.make_writer("restore", 4, "legacy").restore(data)
                ran.clear()
                w.detect_backend.cache_clear()
                out.append((w.detect_backend(), list(ran)))
        finally:
            w.subprocess.run = real_run
            w.detect_backend.cache_clear()
        return out

    with Sandbox() as sandbox:
        (empty, empty_ran), (legacy, legacy_ran) = in_netns(sandbox.netns("detect").name, run,
                                                            timeout=60)
    assert empty == "nft"
    assert not [b for b in empty_ran if "legacy" in b], empty_ran
    assert legacy == "legacy"
    assert any(b.endswith("iptables-legacy-save") for b in legacy_ran), legacy_ran
