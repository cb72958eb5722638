"""ipset through netlink (pyroute2 ``IPSet``), for every mode that matches sets from iptables.

Entries are strings in the form ``ipset save`` prints them, so that a desired set computed by
a mode, the kernel's contents and an operator's ``ipset list`` all compare as plain strings:

==================  ==================================
type                entry
==================  ==================================
``hash:ip``         ``10.0.0.1``
``hash:ip,port``    ``10.0.0.1,tcp:80``
``hash:ip,port,ip`` ``10.0.0.1,tcp:80,10.0.0.2``
``hash:ip,port,net````10.0.0.1,tcp:80,10.1.0.0/24``
``hash:net``        ``10.1.0.0/24`` (a host prefix prints as the bare address)
``bitmap:port``     ``30080``
==================  ==================================

pyroute2 is imported inside functions: this module is imported by plugins whose hooks run on
hosts without it. Everything acts on the network namespace of the calling thread.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from kproxy_core.backend import BackendUnavailable

SetType = Literal[
    "hash:ip", "hash:ip,port", "hash:ip,port,ip", "hash:ip,port,net", "hash:net", "bitmap:port"
]
SET_TYPES: tuple[str, ...] = (
    "hash:ip", "hash:ip,port", "hash:ip,port,ip", "hash:ip,port,net", "hash:net", "bitmap:port"
)
_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "sctp": socket.IPPROTO_SCTP}
_PROTOCOL_NAMES = {number: name for name, number in _PROTOCOLS.items()}
# ipset(8) gives new sets this range when asked for "bitmap:port range 0-65535".
_PORT_RANGE = (0, 65535)
# Kernel IPSET_ERR_EXIST / ENOENT-like codes pyroute2 passes through.
_ERR_EXIST = 4103
_ERR_NOT_EXIST = 4097  # IPSET_ERR_PROTOCOL+... "The set with the given name does not exist"


class IPSetError(RuntimeError):
    """An ipset operation failed; the message names the set and the entry."""


def _etype(set_type: str) -> str:
    if set_type not in SET_TYPES:
        raise ValueError(f"unsupported ipset type {set_type!r} (one of {', '.join(SET_TYPES)})")
    return set_type.split(":", 1)[1]


def _family_number(family: int) -> int:
    if family == 4:
        return socket.AF_INET
    if family == 6:
        return socket.AF_INET6
    raise ValueError(f"family must be 4 or 6, not {family!r}")


# --------------------------------------------------------------------------------------------
# Entry text <-> pyroute2 values
# --------------------------------------------------------------------------------------------


def _canonical_ip(text: str, family: int | None) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    if family is not None and address.version != family:
        raise ValueError(f"{text} is not an IPv{family} address")
    return str(address)


def _canonical_net(text: str, family: int | None) -> str:
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a CIDR") from None
    if family is not None and network.version != family:
        raise ValueError(f"{text} is not an IPv{family} CIDR")
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _canonical_port(text: str, with_protocol: bool) -> str:
    if with_protocol:
        proto, sep, number = text.partition(":")
        if not sep or proto.lower() not in _PROTOCOLS:
            raise ValueError(f"{text!r} is not PROTOCOL:PORT with tcp, udp or sctp")
        text = number
        prefix = proto.lower() + ":"
    else:
        prefix = ""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port number")
    return f"{prefix}{int(text)}"


def canonical_entry(set_type: str, entry: str, family: int | None = None) -> str:
    """``entry`` as ``ipset save`` prints it for a set of ``set_type`` (raises ValueError for
    anything malformed, naming the part)."""
    parts = entry.split(",")
    kinds = _etype(set_type).split(",")
    if len(parts) != len(kinds):
        raise ValueError(f"{entry!r} does not fit ipset type {set_type}")
    out: list[str] = []
    for kind, part in zip(kinds, parts, strict=True):
        part = part.strip()
        if kind == "ip":
            out.append(_canonical_ip(part, family))
        elif kind == "net":
            out.append(_canonical_net(part, family))
        else:
            out.append(_canonical_port(part, with_protocol=set_type != "bitmap:port"))
    return ",".join(out)


def _to_pyroute2(set_type: str, entry: str) -> Any:
    from pyroute2.ipset import PortEntry

    values: list[Any] = []
    for kind, part in zip(_etype(set_type).split(","), entry.split(","), strict=True):
        if kind == "port":
            if set_type == "bitmap:port":
                values.append(int(part))
            else:
                proto, _, number = part.partition(":")
                values.append(PortEntry(int(number), _PROTOCOLS[proto]))
        else:
            values.append(part)
    return tuple(values) if len(values) > 1 else values[0]


def _from_data(set_type: str, data: Any) -> str:
    attrs = {name: value for name, value, *_ in data["attrs"]}

    def address(key: str) -> str:
        nested = attrs[key]["attrs"]
        return str(nested[0][1])

    parts: list[str] = []
    ip_index = 0
    for kind in _etype(set_type).split(","):
        if kind in ("ip", "net"):
            ip_index += 1
            value = address("IPSET_ATTR_IP_FROM" if ip_index == 1 else "IPSET_ATTR_IP2")
            if kind == "net":
                cidr = attrs.get("IPSET_ATTR_CIDR" if ip_index == 1 else "IPSET_ATTR_CIDR2")
                if cidr is not None:
                    value = _canonical_net(f"{value}/{cidr}", None)
            parts.append(value)
        elif set_type == "bitmap:port":
            parts.append(str(attrs["IPSET_ATTR_PORT_FROM"]))
        else:
            proto = _PROTOCOL_NAMES.get(attrs.get("IPSET_ATTR_PROTO", 0), "tcp")
            parts.append(f"{proto}:{attrs['IPSET_ATTR_PORT_FROM']}")
    return ",".join(parts)


# --------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------


@contextmanager
def ipset_socket() -> Iterator[Any]:
    """An open pyroute2 ``IPSet`` socket; `BackendUnavailable` if ip_set netlink is missing."""
    try:
        from pyroute2 import IPSet
    except ImportError as exc:  # pragma: no cover - pyroute2 is a dependency
        raise BackendUnavailable(
            f"pyroute2 is not installed ({exc}): pip install pyroute2") from exc
    try:
        sock = IPSet()
        sock.get_proto_version()
    except Exception as exc:
        raise BackendUnavailable(
            f"ipset netlink is not available ({exc}): load the ip_set kernel module "
            "(modprobe ip_set)"
        ) from exc
    try:
        yield sock
    finally:
        sock.close()


def _code(exc: BaseException) -> int:
    return int(getattr(exc, "code", 0) or 0)


def list_sets(sock: Any | None = None) -> list[str]:
    """Names of every set in this network namespace."""
    if sock is None:
        with ipset_socket() as own:
            return list_sets(own)
    names: list[str] = []
    for message in sock.list():
        name = message.get_attr("IPSET_ATTR_SETNAME")
        if name and name not in names:
            names.append(str(name))
    return names



def set_exists(name: str, sock: Any | None = None) -> bool:
    return name in list_sets(sock)


def create_set(name: str, set_type: str, family: int = 4, *, comment: bool = False,
               sock: Any | None = None) -> bool:
    """Create ``name`` unless it exists; True if created. An existing set of another type is
    an `IPSetError` (the caller must destroy it first)."""
    _etype(set_type)
    if sock is None:
        with ipset_socket() as own:
            return create_set(name, set_type, family, comment=comment, sock=own)
    existing_type = set_type_of(name, sock)
    if existing_type is not None:
        if existing_type != set_type:
            raise IPSetError(f"ipset {name} exists with type {existing_type}, not {set_type}")
        return False
    kwargs: dict[str, Any] = {"stype": set_type, "exclusive": True, "comment": comment}
    if set_type == "bitmap:port":
        kwargs["bitmap_ports_range"] = _PORT_RANGE
    else:
        kwargs["family"] = _family_number(family)
    try:
        sock.create(name, **kwargs)
    except Exception as exc:
        raise IPSetError(f"cannot create ipset {name} ({set_type}): {exc}") from exc
    return True


def destroy_set(name: str, sock: Any | None = None) -> bool:
    """Destroy ``name``; False if it did not exist. A set still referenced by an iptables
    rule cannot be destroyed (IPSetError)."""
    if sock is None:
        with ipset_socket() as own:
            return destroy_set(name, own)
    if not set_exists(name, sock):
        return False
    try:
        sock.destroy(name)
    except Exception as exc:
        raise IPSetError(f"cannot destroy ipset {name}: {exc}") from exc
    return True


def _messages_of(name: str, request: Any, what: str) -> list[Any] | None:
    """The kernel's answer to ``request(name)`` (a list or header dump), or None if there is
    no such set."""
    try:
        return list(request(name))
    except Exception as exc:
        if "not exist" in str(exc).lower() or _code(exc) in (_ERR_NOT_EXIST, 2):
            return None
        raise IPSetError(f"cannot {what} ipset {name}: {exc}") from exc


def set_type_of(name: str, sock: Any) -> str | None:
    """The type of set ``name``, or None if there is no such set. Asks for the set's header
    only: listing a set of 10k entries to learn that it exists cost seconds."""
    for message in _messages_of(name, sock.headers, "read the header of") or ():
        set_type = message.get_attr("IPSET_ATTR_TYPENAME")
        if set_type:
            return str(set_type)
    return None


def list_entries_typed(name: str, sock: Any) -> tuple[str, set[str]] | None:
    """(type, entries) of set ``name``, or None if there is no such set."""
    messages = _messages_of(name, sock.list, "list")
    if messages is None:
        return None
    set_type = ""
    entries: set[str] = set()
    for message in messages:
        set_type = str(message.get_attr("IPSET_ATTR_TYPENAME") or set_type)
        adt = message.get_attr("IPSET_ATTR_ADT")
        if not adt:
            continue
        for data in adt.get_attrs("IPSET_ATTR_DATA"):
            entries.add(_from_data(set_type, data))
    if not set_type:
        return None
    return set_type, entries


def list_entries(name: str, sock: Any | None = None) -> set[str]:
    """Entries of set ``name`` (IPSetError if it does not exist)."""
    if sock is None:
        with ipset_socket() as own:
            return list_entries(name, own)
    typed = list_entries_typed(name, sock)
    if typed is None:
        raise IPSetError(f"ipset {name} does not exist")
    return typed[1]


def _family_of(set_type: str, entry: str) -> int | None:
    if set_type == "bitmap:port":
        return None
    first = entry.split(",", 1)[0]
    return socket.AF_INET6 if ":" in first else socket.AF_INET


def _change_entry(operation: str, name: str, set_type: str, entry: str,
                  sock: Any | None) -> None:
    if sock is None:
        with ipset_socket() as own:
            _change_entry(operation, name, set_type, entry, own)
            return
    entry = canonical_entry(set_type, entry)
    try:
        getattr(sock, operation)(name, _to_pyroute2(set_type, entry), etype=_etype(set_type),
                                 family=_family_of(set_type, entry), exclusive=False)
    except Exception as exc:
        verb, prep = ("add", "to") if operation == "add" else ("delete", "from")
        raise IPSetError(f"cannot {verb} {entry} {prep} ipset {name}: {exc}") from exc


def add_entry(name: str, set_type: str, entry: str, sock: Any | None = None) -> None:
    _change_entry("add", name, set_type, entry, sock)


def del_entry(name: str, set_type: str, entry: str, sock: Any | None = None) -> None:
    _change_entry("delete", name, set_type, entry, sock)


def sync_set(name: str, set_type: str, desired: Iterable[str], family: int = 4, *,
             comment: bool = False, sock: Any | None = None) -> tuple[int, int]:
    """Make set ``name`` hold exactly ``desired`` (creating the set if needed), touching only
    the entries that differ. Returns (added, removed)."""
    if sock is None:
        with ipset_socket() as own:
            return sync_set(name, set_type, desired, family, comment=comment, sock=own)
    wanted = {canonical_entry(set_type, entry, None if set_type == "bitmap:port" else family)
              for entry in desired}
    create_set(name, set_type, family, comment=comment, sock=sock)
    current = list_entries(name, sock)
    removed = current - wanted
    added = wanted - current
    for entry in sorted(removed):
        del_entry(name, set_type, entry, sock)
    for entry in sorted(added):
        add_entry(name, set_type, entry, sock)
    return len(added), len(removed)


__all__ = [
    "SET_TYPES",
    "IPSetError",
    "SetType",
    "add_entry",
    "canonical_entry",
    "create_set",
    "del_entry",
    "destroy_set",
    "ipset_socket",
    "list_entries",
    "list_sets",
    "set_exists",
    "sync_set",
]
