"""Many kernel writes in few system calls: IPVS, rtnetlink addresses and ipset entries encoded
by hand and sent in pipelined netlink batches on sockets kept open.

Why not the tools: ``ipset restore`` sends one message per entry and, per ``hash:ip,port``
entry, reads ``/etc/protocols`` and stats ``/etc/nsswitch.conf`` (getprotobyname); ``ipvsadm``
opens a socket and resolves the IPVS family per line. On a busy node (and in the emulated
test VM, where every file access is a 9p round trip) that, not the kernel, is what a full
program of 10 000 services costs. Why not pyroute2 per object: its message classes cost
more Python per object than the kernel spends on it.

Messages in a batch carry ``NLM_F_ACK`` only on the last one of each send: the kernel handles
every message of a datagram in the sending call and answers only failures and that last one.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from kproxy_core.backend import SyncError
from kproxy_core.model import Protocol
from kproxy_ipvs.rules import RealServer, VirtualServer, VSKey

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
SOL_NETLINK = 270
NETLINK_GENERIC = 16
NETLINK_NETFILTER = 12
NETLINK_ROUTE = 0
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

#: Bytes per datagram (well under the default 208 KiB socket send buffer).
CHUNK_BYTES = 64 * 1024
#: ipset entries per message (inside one IPSET_ATTR_ADT).
IPSET_ENTRIES_PER_MESSAGE = 200

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NLA = struct.Struct("=HH")

# Generic netlink control (linux/genetlink.h) and IPVS (linux/ip_vs.h).
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
IPVS_GENL_VERSION = 1
IPVS_CMD_NEW_SERVICE = 1
IPVS_CMD_SET_SERVICE = 2
IPVS_CMD_DEL_SERVICE = 3
IPVS_CMD_GET_SERVICE = 4
IPVS_CMD_NEW_DEST = 5
IPVS_CMD_SET_DEST = 6
IPVS_CMD_DEL_DEST = 7
IPVS_CMD_GET_DEST = 8
IPVS_CMD_ATTR_SERVICE = 1
IPVS_CMD_ATTR_DEST = 2
_PROTO: dict[Protocol, int] = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP,
                               "SCTP": socket.IPPROTO_SCTP}
_PROTO_NAMES: dict[int, Protocol] = {number: name for name, number in _PROTO.items()}
#: IP_VS_SVC_F_HASHED: the kernel reports it on every service; not ours to compare.
_SVC_F_HASHED = 0x2
#: IP_VS_CONN_F_MASQ: NAT.
FWD_MASQ = 0

# rtnetlink (linux/rtnetlink.h, linux/if_addr.h).
RTM_NEWLINK = 16
RTM_GETLINK = 18
IFLA_EXT_MASK = 29
RTEXT_FILTER_SKIP_STATS = 1 << 3
RTM_DELLINK = 17
IFLA_IFNAME = 3
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
IFA_ADDRESS = 1
IFA_LOCAL = 2

# ipset (linux/netfilter/ipset/ip_set.h).
NFNL_SUBSYS_IPSET = 6
IPSET_PROTOCOL = 6  # the oldest the kernel takes; ADD/DEL did not change since
IPSET_CMD_CREATE = 2
IPSET_CMD_LIST = 7
IPSET_CMD_TYPE = 13
IPSET_CMD_HEADER = 12
IPSET_CMD_ADD = 9
IPSET_CMD_DEL = 10
IPSET_ATTR_PROTOCOL = 1
IPSET_ATTR_SETNAME = 2
IPSET_ATTR_TYPENAME = 3
IPSET_ATTR_REVISION = 4
IPSET_ATTR_FAMILY = 5
IPSET_ATTR_FLAGS = 6
IPSET_ATTR_DATA = 7
IPSET_ATTR_ADT = 8
IPSET_ATTR_LINENO = 9
IPSET_ATTR_IP = 1
IPSET_ATTR_CIDR = 3
IPSET_ATTR_PORT = 4
IPSET_ATTR_PROTO = 7
IPSET_ATTR_PORT_FROM = 4
IPSET_ATTR_PORT_TO = 5
IPSET_ATTR_CADT_FLAGS = 8
IPSET_FLAG_LIST_HEADER = 1 << 2
IPSET_FLAG_WITH_COMMENT = 1 << 4
IPSET_ATTR_IP2 = 20
IPSET_ATTR_CIDR2 = 21
IPSET_ATTR_IPADDR_IPV4 = 1
IPSET_ATTR_IPADDR_IPV6 = 2
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10
_IPSET_ERRORS = {4097: "protocol error", 4102: "set type mismatch", 4103: "element exists",
                 4106: "wrong family", 4112: "comment", 4352: "hash is full",
                 4353: "too many elements in a bucket"}
_SET_PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP,
              "sctp": socket.IPPROTO_SCTP}
_SET_PROTO_NAMES = {number: name for name, number in _SET_PROTO.items()}


def nla(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def nested(kind: int, *children: bytes) -> bytes:
    return nla(kind | NLA_F_NESTED, b"".join(children))


def _packed_ip(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


# --------------------------------------------------------------------------------------------
# Payload encoders (pure: tested on any host)
# --------------------------------------------------------------------------------------------


def ipvs_service_attrs(key: VSKey, vs: VirtualServer | None = None) -> bytes:
    """IPVS_CMD_ATTR_SERVICE: the key, plus scheduler, flags, timeout and netmask (all four
    required to create or change a service) when ``vs`` is given."""
    v6 = ":" in key.address
    af = socket.AF_INET6 if v6 else socket.AF_INET
    parts = [nla(1, struct.pack("=H", af)), nla(2, struct.pack("=H", _PROTO[key.protocol])),
             nla(3, _packed_ip(key.address)), nla(4, struct.pack("!H", key.port))]
    if vs is not None:
        parts += [nla(6, vs.scheduler.encode() + b"\0"),
                  nla(7, struct.pack("=II", vs.flags, 0xFFFFFFFF)),
                  nla(8, struct.pack("=I", vs.timeout)),
                  # An IPv4 mask, or an IPv6 prefix length (the kernel's reading of the field).
                  nla(9, struct.pack("=I", 128 if v6 else 0xFFFFFFFF))]
    return nested(IPVS_CMD_ATTR_SERVICE, *parts)


# A real server's attributes in one pack (this runs 5x per service on a first sync): nested
# header; ADDR; PORT (network order, padded); FWD_METHOD, WEIGHT, U_THRESH, L_THRESH (u32);
# ADDR_FAMILY (u16, padded).
_DEST = {4: struct.Struct("=HH HH4s HHHxx HHI HHI HHI HHI HHHxx"),
         16: struct.Struct("=HH HH16s HHHxx HHI HHI HHI HHI HHHxx")}


def ipvs_dest_attrs(real: RealServer, weight: int = 1) -> bytes:
    packed = _packed_ip(real.address)
    layout = _DEST[len(packed)]
    return layout.pack(layout.size, IPVS_CMD_ATTR_DEST | NLA_F_NESTED,
                       4 + len(packed), 1, packed, 6, 2, socket.htons(real.port),
                       8, 3, FWD_MASQ, 8, 4, weight, 8, 5, 0, 8, 6, 0,
                       6, 11, socket.AF_INET6 if len(packed) == 16 else socket.AF_INET)


def genl_payload(cmd: int, *attrs: bytes, version: int = IPVS_GENL_VERSION) -> bytes:
    return struct.pack("=BBH", cmd, version, 0) + b"".join(attrs)


def address_payload(index: int, address: str) -> bytes:
    v6 = ":" in address
    packed = _packed_ip(address)
    header = struct.pack("=BBBBI", socket.AF_INET6 if v6 else socket.AF_INET,
                         128 if v6 else 32, 0, 0, index)
    return header + nla(IFA_LOCAL, packed) + nla(IFA_ADDRESS, packed)


def _set_ip(kind: int, address: str) -> bytes:
    inner = IPSET_ATTR_IPADDR_IPV6 if ":" in address else IPSET_ATTR_IPADDR_IPV4
    return nested(kind, nla(inner | NLA_F_NET_BYTEORDER, _packed_ip(address)))


def _set_port(text: str) -> list[bytes]:
    proto, _, number = text.partition(":")
    return [nla(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", int(number))),
            nla(IPSET_ATTR_PROTO, struct.pack("=B", _SET_PROTO[proto]))]


def ipset_entry_attrs(set_type: str, entry: str) -> bytes:
    """One IPSET_ATTR_DATA for ``entry`` in ``ipset save`` form (see kproxy_core.kernel.ipset)."""
    parts = entry.split(",")
    out: list[bytes] = []
    if set_type == "bitmap:port":
        out.append(nla(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", int(entry))))
    elif set_type == "hash:ip":
        out.append(_set_ip(IPSET_ATTR_IP, entry))
    elif set_type == "hash:net":
        address, _, prefix = entry.partition("/")
        out.append(_set_ip(IPSET_ATTR_IP, address))
        out.append(nla(IPSET_ATTR_CIDR, struct.pack("=B", int(prefix or
                                                              (128 if ":" in address else 32)))))
    elif set_type in ("hash:ip,port", "hash:ip,port,ip", "hash:ip,port,net"):
        out.append(_set_ip(IPSET_ATTR_IP, parts[0]))
        out += _set_port(parts[1])
        if set_type != "hash:ip,port":
            address, _, prefix = parts[2].partition("/")
            out.append(_set_ip(IPSET_ATTR_IP2, address))
            if set_type == "hash:ip,port,net":
                out.append(nla(IPSET_ATTR_CIDR2, struct.pack(
                    "=B", int(prefix or (128 if ":" in address else 32)))))
    else:
        raise ValueError(f"unsupported ipset type {set_type!r}")
    return nested(IPSET_ATTR_DATA, *out)


def _ipset_head(name: str | None, family: int = socket.AF_UNSPEC) -> bytes:
    head = (struct.pack("=BBH", family, 0, 0)
            + nla(IPSET_ATTR_PROTOCOL, struct.pack("=B", IPSET_PROTOCOL)))
    return head if name is None else head + nla(IPSET_ATTR_SETNAME, name.encode() + b"\0")


def set_nfproto(family: int) -> int:
    return NFPROTO_IPV6 if family == 6 else NFPROTO_IPV4


def ipset_type_payload(set_type: str, family: int) -> bytes:
    """IPSET_CMD_TYPE: which revisions of ``set_type`` the kernel has (loads its module)."""
    return (_ipset_head(None) + nla(IPSET_ATTR_TYPENAME, set_type.encode() + b"\0")
            + nla(IPSET_ATTR_FAMILY, struct.pack("=B", set_nfproto(family))))


def ipset_create_payload(name: str, set_type: str, family: int, revision: int) -> bytes:
    """IPSET_CMD_CREATE of a set with the comment extension, as ``ipset create NAME TYPE
    family inet[6] comment`` (``range 0-65535`` for bitmap:port)."""
    data = [nla(IPSET_ATTR_CADT_FLAGS | NLA_F_NET_BYTEORDER,
                struct.pack("!I", IPSET_FLAG_WITH_COMMENT))]
    if set_type == "bitmap:port":
        data += [nla(IPSET_ATTR_PORT_FROM | NLA_F_NET_BYTEORDER, struct.pack("!H", 0)),
                 nla(IPSET_ATTR_PORT_TO | NLA_F_NET_BYTEORDER, struct.pack("!H", 65535))]
    return (_ipset_head(name) + nla(IPSET_ATTR_TYPENAME, set_type.encode() + b"\0")
            + nla(IPSET_ATTR_REVISION, struct.pack("=B", revision))
            + nla(IPSET_ATTR_FAMILY, struct.pack("=B", set_nfproto(family)))
            + nested(IPSET_ATTR_DATA, *data))


def ipset_payloads(name: str, set_type: str, entries: Sequence[str]) -> Iterator[bytes]:
    """nfgenmsg + attributes, ``IPSET_ENTRIES_PER_MESSAGE`` entries per message."""
    v6 = bool(entries) and ":" in entries[0].split(",", 1)[0]
    family = NFPROTO_IPV6 if v6 else NFPROTO_IPV4
    head = (struct.pack("=BBH", family, 0, 0)
            + nla(IPSET_ATTR_PROTOCOL, struct.pack("=B", IPSET_PROTOCOL))
            + nla(IPSET_ATTR_SETNAME, name.encode() + b"\0")
            # The kernel takes a list of entries only with a line number (for its errors).
            + nla(IPSET_ATTR_LINENO, struct.pack("=I", 0)))
    for start in range(0, len(entries), IPSET_ENTRIES_PER_MESSAGE):
        chunk = entries[start:start + IPSET_ENTRIES_PER_MESSAGE]
        yield head + nested(IPSET_ATTR_ADT, *(ipset_entry_attrs(set_type, e) for e in chunk))


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """Attribute type (flags masked off) -> payload."""
    out: dict[int, bytes] = {}
    while offset + _NLA.size <= len(data):
        length, kind = _NLA.unpack_from(data, offset)
        if length < _NLA.size:
            break
        out[kind & 0x3FFF] = data[offset + _NLA.size:offset + length]
        offset += (length + 3) & ~3
    return out


def _u16(raw: bytes) -> int:
    return int(struct.unpack_from("=H", raw)[0])


def _u32(raw: bytes) -> int:
    return int(struct.unpack_from("=I", raw)[0])


def _unpacked_ip(raw: bytes, af: int) -> str:
    return socket.inet_ntop(af, raw[:16] if af == socket.AF_INET6 else raw[:4])


def parse_service_reply(body: bytes) -> VirtualServer | None:
    """A dumped virtual server (genlmsghdr + attributes); None for fwmark services and unknown
    protocols (not ours)."""
    service = parse_attrs(parse_attrs(body, 4).get(IPVS_CMD_ATTR_SERVICE, b""))
    if service.get(5) and _u32(service[5]):
        return None
    proto = _PROTO_NAMES.get(_u16(service[2])) if 2 in service else None
    if proto is None or 3 not in service or 1 not in service:
        return None
    key = VSKey(proto, _unpacked_ip(service[3], _u16(service[1])),
                int(struct.unpack_from("!H", service[4])[0]) if 4 in service else 0)
    flags = _u32(service[7]) if 7 in service else 0
    return VirtualServer(key, service.get(6, b"").split(b"\0", 1)[0].decode(),
                         flags & ~_SVC_F_HASHED, _u32(service[8]) if 8 in service else 0)


def parse_dest_reply(body: bytes, service_af: int) -> tuple[RealServer, int, int, int]:
    """A dumped real server: (server, weight, active connections, inactive connections)."""
    dest = parse_attrs(parse_attrs(body, 4).get(IPVS_CMD_ATTR_DEST, b""))
    af = _u16(dest[11]) if 11 in dest else service_af
    real = RealServer(_unpacked_ip(dest[1], af), int(struct.unpack_from("!H", dest[2])[0]))
    return (real, _u32(dest[4]) if 4 in dest else 0, _u32(dest[7]) if 7 in dest else 0,
            _u32(dest[8]) if 8 in dest else 0)


def _set_address(raw: bytes) -> tuple[str, int]:
    inner = parse_attrs(raw)
    if IPSET_ATTR_IPADDR_IPV6 in inner:
        return socket.inet_ntop(socket.AF_INET6, inner[IPSET_ATTR_IPADDR_IPV6]), 128
    return socket.inet_ntop(socket.AF_INET, inner[IPSET_ATTR_IPADDR_IPV4]), 32


def _set_net(raw: bytes, cidr: bytes | None) -> str:
    address, full = _set_address(raw)
    prefix = cidr[0] if cidr else full
    # A host prefix prints as the bare address (ipset save; kproxy_core.kernel.ipset).
    return address if prefix == full else f"{address}/{prefix}"


def parse_set_entry(set_type: str, data: bytes) -> str:
    """One listed IPSET_ATTR_DATA as ``ipset save`` prints the entry."""
    attrs = parse_attrs(data)
    port = int(struct.unpack_from("!H", attrs[IPSET_ATTR_PORT])[0]) if IPSET_ATTR_PORT in \
        attrs else 0
    if set_type == "bitmap:port":
        return str(port)
    if set_type == "hash:ip":
        return _set_address(attrs[IPSET_ATTR_IP])[0]
    if set_type == "hash:net":
        return _set_net(attrs[IPSET_ATTR_IP], attrs.get(IPSET_ATTR_CIDR))
    proto = _SET_PROTO_NAMES.get(attrs[IPSET_ATTR_PROTO][0] if IPSET_ATTR_PROTO in attrs else 6,
                                 "tcp")
    head = f"{_set_address(attrs[IPSET_ATTR_IP])[0]},{proto}:{port}"
    if set_type == "hash:ip,port":
        return head
    if set_type == "hash:ip,port,ip":
        return f"{head},{_set_address(attrs[IPSET_ATTR_IP2])[0]}"
    if set_type == "hash:ip,port,net":
        return f"{head},{_set_net(attrs[IPSET_ATTR_IP2], attrs.get(IPSET_ATTR_CIDR2))}"
    raise ValueError(f"unsupported ipset type {set_type!r}")


# --------------------------------------------------------------------------------------------
# Sockets
# --------------------------------------------------------------------------------------------


def _describe(code: int) -> str:
    if code in _IPSET_ERRORS:
        return f"ipset: {_IPSET_ERRORS[code]}"
    return os.strerror(code) if code < 4096 else f"error {code}"


class BatchError(SyncError):
    """Some messages of a batch failed; ``failures`` are (what, errno) pairs."""

    def __init__(self, what: str, failures: list[tuple[str, int]]) -> None:
        shown = "; ".join(f"{item}: {_describe(code)}" for item, code in failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(f"{what}: {len(failures)} failed: {shown}{more}")
        self.what = what
        self.failures = failures

    def __reduce__(self) -> tuple[type[BatchError], tuple[str, list[tuple[str, int]]]]:
        return type(self), (self.what, self.failures)


class NetlinkBatcher:
    """One netlink socket (in the calling thread's network namespace), kept open."""

    def __init__(self, protocol: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  protocol)
        self.sock.bind((0, 0))
        # Failures of a whole datagram must fit in the receive buffer.
        for option, fallback, size in ((SO_RCVBUFFORCE, socket.SO_RCVBUF, 4 << 20),
                                       (SO_SNDBUFFORCE, socket.SO_SNDBUF, 1 << 20)):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, option, size)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, fallback, size)
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, messages: Iterable[tuple[int, int, bytes, str]], what: str,
             ignore: Collection[int] = ()) -> int:
        """Send (type, flags, payload, label) messages; raise `BatchError` naming the failed
        ones (errno not in ``ignore``) after all were tried. Returns how many were sent."""
        failures: list[tuple[str, int]] = []
        count = 0
        buffer: list[bytes] = []
        labels: dict[int, str] = {}
        size = 0
        pending: tuple[int, int, bytes, str] | None = None

        def flush(last: tuple[int, int, bytes, str]) -> None:
            nonlocal size
            kind, flags, payload, label = last
            seq = self._next_seq()
            labels[seq] = label
            buffer.append(_HEADER.pack(_HEADER.size + len(payload), kind,
                                       flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0) + payload)
            self.sock.send(b"".join(buffer))
            self._collect(seq, labels, failures)
            buffer.clear()
            labels.clear()
            size = 0

        for message in messages:
            count += 1
            if pending is not None:
                kind, flags, payload, label = pending
                length = _HEADER.size + len(payload)
                if size + length + _HEADER.size + len(message[2]) > CHUNK_BYTES:
                    flush(pending)
                else:
                    seq = self._next_seq()
                    labels[seq] = label
                    buffer.append(_HEADER.pack(length, kind, flags | NLM_F_REQUEST, seq, 0)
                                  + payload)
                    size += length
            pending = message
        if pending is not None:
            flush(pending)
        failures = [failure for failure in failures if failure[1] not in ignore]
        if failures:
            raise BatchError(what, failures)
        return count

    def dump(self, kind: int, payload: bytes, what: str) -> list[bytes]:
        """The payloads of a dump request's answers."""
        seq = self._next_seq()
        self.sock.send(_HEADER.pack(_HEADER.size + len(payload), kind,
                                    NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + payload)
        out: list[bytes] = []
        for answer, answer_seq, body in self._answers():
            if answer_seq != seq:
                continue
            if answer == NLMSG_DONE:
                return out
            if answer == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", body)
                if code:
                    raise BatchError(what, [(what, -code)])
                return out
            out.append(body)
        raise AssertionError("unreachable: _answers never ends")

    def request(self, kind: int, flags: int, payload: bytes) -> list[bytes]:
        """One request; the payloads of its replies (for lookups)."""
        seq = self._next_seq()
        self.sock.send(_HEADER.pack(_HEADER.size + len(payload), kind,
                                    flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0) + payload)
        replies: list[bytes] = []
        failures: list[tuple[str, int]] = []
        self._collect(seq, {seq: "request"}, failures, replies)
        if failures:
            raise BatchError("netlink request", failures)
        return replies

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _answers(self) -> Iterator[tuple[int, int, bytes]]:
        """(type, sequence number, payload) of every message the socket receives, forever."""
        while True:
            data = self.sock.recv(1 << 18)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _flags, seq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise SyncError("malformed netlink answer")
                yield kind, seq, data[offset + _HEADER.size:offset + length]
                offset += (length + 3) & ~3

    def _collect(self, last: int, labels: dict[int, str], failures: list[tuple[str, int]],
                 replies: list[bytes] | None = None) -> None:
        """Read answers until the ack (or error) of ``last``."""
        for kind, seq, body in self._answers():
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", body)
                if code:
                    failures.append((labels.get(seq, f"message {seq}"), -code))
                if seq == last:
                    return
            elif replies is not None and seq == last and kind != NLMSG_DONE:
                replies.append(body)


def genl_family_id(batcher: NetlinkBatcher, name: str) -> int:
    """A generic netlink family's id (OSError ENOENT when the kernel lacks it)."""
    try:
        replies = batcher.request(GENL_ID_CTRL, 0, genl_payload(
            CTRL_CMD_GETFAMILY, nla(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"), version=1))
    except BatchError as exc:
        raise OSError(exc.failures[0][1], f"generic netlink family {name}: "
                      f"{_describe(exc.failures[0][1])}") from None
    for body in replies:
        offset = 4  # genlmsghdr
        while offset + _NLA.size <= len(body):
            length, kind = _NLA.unpack_from(body, offset)
            if kind & 0x3FFF == CTRL_ATTR_FAMILY_ID:
                return int(struct.unpack_from("=H", body, offset + _NLA.size)[0])
            offset += (length + 3) & ~3
    raise OSError(errno.ENOENT, f"generic netlink family {name} not found")


def set_revision(batcher: NetlinkBatcher, set_type: str, family: int) -> int:
    """The newest revision of ``set_type`` this kernel has (what ``ipset create`` uses)."""
    try:
        replies = batcher.request((NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_TYPE, 0,
                                  ipset_type_payload(set_type, family))
    except BatchError as exc:
        raise BatchError(f"ipset type {set_type}", exc.failures) from None
    for body in replies:
        raw = parse_attrs(body, 4).get(IPSET_ATTR_REVISION)
        if raw is not None:
            return raw[0]
    raise SyncError(f"ipset type {set_type}: the kernel named no revision")


class BulkWriter:
    """The bulk paths of `kproxy_ipvs.netlink.NetlinkKernel` (sockets opened lazily)."""

    def __init__(self) -> None:
        self._sockets: dict[int, NetlinkBatcher] = {}
        self._ipvs_family: int | None = None

    def _sock(self, protocol: int) -> NetlinkBatcher:
        sock = self._sockets.get(protocol)
        if sock is None:
            sock = self._sockets[protocol] = NetlinkBatcher(protocol)
        return sock

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    def _ipvs(self) -> tuple[NetlinkBatcher, int]:
        sock = self._sock(NETLINK_GENERIC)
        if self._ipvs_family is None:
            self._ipvs_family = genl_family_id(sock, "IPVS")
        return sock, self._ipvs_family

    def ipvs(self, messages: Iterable[tuple[int, bytes, str]], what: str) -> int:
        """(IPVS command, attributes, label) messages."""
        sock, family = self._ipvs()
        return sock.send(((family, 0, genl_payload(cmd, attrs), label)
                          for cmd, attrs, label in messages), what)

    def ipvs_one(self, cmd: int, attrs: bytes, label: str, ignore: Collection[int] = ()) -> None:
        sock, family = self._ipvs()
        sock.send([(family, 0, genl_payload(cmd, attrs), label)], label, ignore)

    def list_services(self) -> list[VirtualServer]:
        sock, family = self._ipvs()
        replies = sock.dump(family, genl_payload(IPVS_CMD_GET_SERVICE), "listing IPVS services")
        return [vs for vs in map(parse_service_reply, replies) if vs is not None]

    def list_dests(self, key: VSKey) -> list[tuple[RealServer, int, int, int]]:
        sock, family = self._ipvs()
        replies = sock.dump(family, genl_payload(IPVS_CMD_GET_DEST, ipvs_service_attrs(key)),
                            f"listing real servers of {key}")
        af = socket.AF_INET6 if key.family == 6 else socket.AF_INET
        return [parse_dest_reply(body, af) for body in replies]

    def add_services(self, items: Iterable[tuple[VirtualServer, Sequence[RealServer]]]) -> int:
        def messages() -> Iterator[tuple[int, bytes, str]]:
            for vs, reals in items:
                yield IPVS_CMD_NEW_SERVICE, ipvs_service_attrs(vs.key, vs), str(vs.key)
                service = ipvs_service_attrs(vs.key)
                for real in reals:
                    yield (IPVS_CMD_NEW_DEST, service + ipvs_dest_attrs(real),
                           f"{vs.key} -> {real}")

        return self.ipvs(messages(), "adding IPVS virtual/real servers")

    def addresses(self, index: int, addresses: Iterable[str], *, add: bool = True) -> int:
        # Replace, not exclusive create: an address already there is no failure; nor is one
        # already gone.
        kind, flags = ((RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE) if add else (RTM_DELADDR, 0))
        return self._sock(NETLINK_ROUTE).send(
            ((kind, flags, address_payload(index, a), a) for a in addresses),
            "adding addresses" if add else "deleting addresses",
            () if add else (errno.EADDRNOTAVAIL, errno.ENOENT))

    def add_dummy(self, name: str) -> None:
        """A dummy interface (``ip link add NAME type dummy``); one that exists is fine."""
        payload = (struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
                   + nla(IFLA_IFNAME, name.encode() + b"\0")
                   + nested(IFLA_LINKINFO, nla(IFLA_INFO_KIND, b"dummy\0")))
        self._sock(NETLINK_ROUTE).send(
            [(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, payload, name)], f"adding {name}",
            (errno.EEXIST,))

    def link_index(self, name: str) -> int | None:
        """The index of link ``name``, None if there is none. A netlink request, not the
        ``SIOCGIFINDEX`` ioctl behind ``if_nametoindex``: for a name that does not exist the
        kernel answers that one only after trying to load a module of that name (two
        modprobe processes: seconds in the emulated VM, three times in a first sync)."""
        payload = (struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
                   + nla(IFLA_IFNAME, name.encode() + b"\0")
                   + nla(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS)))
        try:
            replies = self._sock(NETLINK_ROUTE).request(RTM_GETLINK, 0, payload)
        except BatchError as exc:
            if exc.failures[0][1] == errno.ENODEV:
                return None
            raise
        for body in replies:
            index: int = struct.unpack_from("=BxHiII", body)[2]
            return index
        return None

    def delete_link(self, index: int) -> None:
        self._sock(NETLINK_ROUTE).send(
            [(RTM_DELLINK, 0, struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0),
              f"link {index}")], "deleting a link", (errno.ENODEV,))

    def list_addresses(self) -> list[tuple[int, str]]:
        """(interface index, address) of every address in the namespace, in kernel order
        (a dump parsed by hand: kube-ipvs0 holds one per service)."""
        replies = self._sock(NETLINK_ROUTE).dump(
            RTM_GETADDR, struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0), "listing addresses")
        out: list[tuple[int, str]] = []
        for body in replies:
            family, _prefix, _flags, _scope, index = struct.unpack_from("=BBBBI", body)
            attrs = parse_attrs(body, 8)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw is not None and family in (socket.AF_INET, socket.AF_INET6):
                out.append((index, socket.inet_ntop(family, raw)))
        return out

    def set_types(self) -> dict[str, str]:
        """Name -> type of every set in the namespace (one header-only LIST dump: no
        entries)."""
        payload = _ipset_head(None) + nla(IPSET_ATTR_FLAGS | NLA_F_NET_BYTEORDER,
                                          struct.pack("!I", IPSET_FLAG_LIST_HEADER))
        replies = self._sock(NETLINK_NETFILTER).dump((NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST,
                                                     payload, "listing ipsets")
        out: dict[str, str] = {}
        for body in replies:
            attrs = parse_attrs(body, 4)
            name, kind = attrs.get(IPSET_ATTR_SETNAME), attrs.get(IPSET_ATTR_TYPENAME)
            if name is not None and kind is not None:
                out[name.split(b"\0", 1)[0].decode()] = kind.split(b"\0", 1)[0].decode()
        return out

    def create_sets(self, sets: Sequence[tuple[str, str, int]]) -> int:
        """Create (name, type, family) sets with the comment extension: one type query per
        type (at once: each may load the type's module), then every create in one pipelined
        send. A same set already there is no failure (no NLM_F_EXCL: ipset's -exist)."""
        keys = list(dict.fromkeys((set_type, 4 if set_type == "bitmap:port" else family)
                                  for _name, set_type, family in sets))

        def query(key: tuple[str, int]) -> int:
            # One socket per thread (a batcher is not shared); threads share this namespace.
            sock = NetlinkBatcher(NETLINK_NETFILTER)
            try:
                return set_revision(sock, *key)
            finally:
                sock.close()

        with ThreadPoolExecutor(max_workers=max(1, len(keys))) as pool:
            revisions = dict(zip(keys, pool.map(query, keys), strict=True))
        kind = (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_CREATE
        return self._sock(NETLINK_NETFILTER).send(
            ((kind, 0, ipset_create_payload(
                name, set_type, family,
                revisions[(set_type, 4 if set_type == "bitmap:port" else family)]),
              f"ipset {name} ({set_type})")
             for name, set_type, family in sets), "creating ipsets")

    def set_type(self, name: str) -> str | None:
        """The type of set ``name``, None if there is none (a header request: no entries)."""
        payload = _ipset_head(name)
        try:
            replies = self._sock(NETLINK_NETFILTER).request(
                (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_HEADER, 0, payload)
        except BatchError as exc:
            if exc.failures[0][1] == errno.ENOENT:
                return None
            raise
        for body in replies:
            raw = parse_attrs(body, 4).get(IPSET_ATTR_TYPENAME)
            if raw is not None:
                return raw.split(b"\0", 1)[0].decode()
        return None

    def list_set(self, name: str, set_type: str) -> set[str]:
        """Entries of set ``name`` (a LIST dump parsed by hand; `BatchError` if it does not
        exist)."""
        payload = _ipset_head(name)
        replies = self._sock(NETLINK_NETFILTER).dump((NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST,
                                                     payload, f"listing ipset {name}")
        out: set[str] = set()
        for body in replies:
            adt = parse_attrs(body, 4).get(IPSET_ATTR_ADT)
            if adt is None:
                continue
            offset = 0
            while offset + _NLA.size <= len(adt):
                length, _kind = _NLA.unpack_from(adt, offset)
                if length < _NLA.size:
                    break
                out.add(parse_set_entry(set_type, adt[offset + _NLA.size:offset + length]))
                offset += (length + 3) & ~3
        return out

    def set_entries(self, name: str, set_type: str, entries: Sequence[str], *,
                    add: bool = True) -> int:
        cmd = IPSET_CMD_ADD if add else IPSET_CMD_DEL
        kind = (NFNL_SUBSYS_IPSET << 8) | cmd
        # Without NLM_F_EXCL an existing entry is no failure (ipset's -exist).
        self._sock(NETLINK_NETFILTER).send(
            ((kind, 0, payload, f"ipset {name}") for payload in
             ipset_payloads(name, set_type, entries)),
            f"{'adding to' if add else 'deleting from'} ipset {name}")
        return len(entries)
