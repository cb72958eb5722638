"""kproxy_core.kernel.ipset: entry parsing without root, and real sets inside a namespace."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kproxy_core.kernel import ipset
from kproxy_core.testing.innetns import in_netns
from kproxy_core.testing.netns import NetNS, Sandbox


@pytest.mark.parametrize(
    ("set_type", "entry", "family", "expected"),
    [
        ("hash:ip,port", "10.0.0.1,TCP:0080", 4, "10.0.0.1,tcp:80"),
        ("hash:ip,port", "fd00:0::1,udp:53", 6, "fd00::1,udp:53"),
        ("hash:ip,port,ip", "10.0.0.1,sctp:80,10.0.0.2", 4, "10.0.0.1,sctp:80,10.0.0.2"),
        ("hash:ip,port,net", "10.0.0.1,tcp:80,10.1.0.7/24", 4, "10.0.0.1,tcp:80,10.1.0.0/24"),
        ("hash:net", "10.1.2.3/32", 4, "10.1.2.3"),
        ("hash:net", "fd00::/64", 6, "fd00::/64"),
        ("bitmap:port", "30080", None, "30080"),
        ("hash:ip", "10.0.0.9", 4, "10.0.0.9"),
    ],
)
def test_canonical_entry(set_type: str, entry: str, family: int | None, expected: str) -> None:
    assert ipset.canonical_entry(set_type, entry, family) == expected


@pytest.mark.parametrize(
    ("set_type", "entry", "message"),
    [
        ("hash:ip,port", "10.0.0.1", "does not fit"),
        ("hash:ip,port", "10.0.0.1,icmp:80", "PROTOCOL:PORT"),
        ("hash:ip,port", "10.0.0.300,tcp:80", "not an IP address"),
        ("bitmap:port", "70000", "not a port"),
        ("hash:net", "fd00::/64", "not an IPv4"),
        ("list:set", "x", "unsupported ipset type"),
    ],
)
def test_bad_entries_are_rejected(set_type: str, entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ipset.canonical_entry(set_type, entry, 4)


@pytest.fixture
def ns() -> Iterator[NetNS]:
    with Sandbox() as sandbox:
        yield sandbox.netns("ipset")


def _lifecycle() -> dict[str, object]:
    out: dict[str, object] = {}
    out["created"] = ipset.create_set("T-CIP", "hash:ip,port", 4, comment=True)
    out["created_again"] = ipset.create_set("T-CIP", "hash:ip,port", 4, comment=True)
    out["first"] = ipset.sync_set("T-CIP", "hash:ip,port", {"10.96.0.1,tcp:80", "10.96.0.2,udp:53"})
    out["same"] = ipset.sync_set("T-CIP", "hash:ip,port", {"10.96.0.1,tcp:80", "10.96.0.2,udp:53"})
    out["change"] = ipset.sync_set("T-CIP", "hash:ip,port",
                                   {"10.96.0.1,tcp:80", "10.96.0.3,sctp:9"})
    out["entries"] = sorted(ipset.list_entries("T-CIP"))
    out["ports"] = ipset.sync_set("T-NP", "bitmap:port", {"30080", "30081"})
    out["port_entries"] = sorted(ipset.list_entries("T-NP"))
    out["v6"] = ipset.sync_set("T-6-CIP", "hash:ip,port", {"fd00::10,tcp:443"}, 6)
    out["v6_entries"] = sorted(ipset.list_entries("T-6-CIP"))
    out["lb"] = ipset.sync_set("T-SRC", "hash:ip,port,net",
                               {"10.98.0.1,tcp:80,192.0.2.0/24", "10.98.0.1,tcp:80,10.0.0.5/32"})
    out["lb_entries"] = sorted(ipset.list_entries("T-SRC"))
    out["loop"] = ipset.sync_set("T-LOOP", "hash:ip,port,ip", {"10.244.1.2,tcp:8080,10.244.1.2"})
    out["nets"] = ipset.sync_set("T-NET", "hash:net", {"10.0.0.0/8", "fd00::/8"} - {"fd00::/8"})
    out["sets"] = sorted(ipset.list_sets())
    try:
        ipset.create_set("T-NP", "hash:ip", 4)
    except ipset.IPSetError as exc:
        out["wrong_type"] = str(exc)
    out["destroyed"] = [ipset.destroy_set(name) for name in ("T-CIP", "T-NP", "T-NOPE")]
    out["after"] = sorted(ipset.list_sets())
    return out


@pytest.mark.root
def test_sets_in_a_namespace(ns: NetNS) -> None:
    out = in_netns(ns.name, _lifecycle)
    assert out["created"] is True
    assert out["created_again"] is False
    assert out["first"] == (2, 0)
    assert out["same"] == (0, 0)
    assert out["change"] == (1, 1)
    assert out["entries"] == ["10.96.0.1,tcp:80", "10.96.0.3,sctp:9"]
    assert out["ports"] == (2, 0)
    assert out["port_entries"] == ["30080", "30081"]
    assert out["v6_entries"] == ["fd00::10,tcp:443"]
    assert out["lb_entries"] == ["10.98.0.1,tcp:80,10.0.0.5", "10.98.0.1,tcp:80,192.0.2.0/24"]
    assert out["loop"] == (1, 0)
    assert out["nets"] == (1, 0)
    assert out["sets"] == ["T-6-CIP", "T-CIP", "T-LOOP", "T-NET", "T-NP", "T-SRC"]
    assert "exists with type bitmap:port" in str(out["wrong_type"])
    assert out["destroyed"] == [True, True, False]
    assert out["after"] == ["T-6-CIP", "T-LOOP", "T-NET", "T-SRC"]
    # The CLI sees the same entries (the save format is the contract).
    saved = ns.run(["ipset", "save", "T-SRC"]).stdout
    assert "add T-SRC 10.98.0.1,tcp:80,192.0.2.0/24" in saved
