"""The kernel side of IPVS mode behind one small interface (`Kernel`), so that the proxier's
diffing logic is tested against `FakeKernel` (tests) and runs against `NetlinkKernel`
(pyroute2: IPVS generic netlink, rtnetlink, ipset netlink; iptables through the core writer).

Everything acts on the network namespace of the calling thread.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any
from typing import Protocol as _Interface

import attrs

from kproxy_core.backend import BackendUnavailable, SyncError
from kproxy_core.kernel.iptables import RestoreData
from kproxy_core.model import Protocol
from kproxy_ipvs.rules import FLAG_PERSISTENT, RealServer, VirtualServer, VSKey

_PROTO_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP,
                  "SCTP": socket.IPPROTO_SCTP}
_PROTO_NAMES: dict[int, Protocol] = {socket.IPPROTO_TCP: "TCP", socket.IPPROTO_UDP: "UDP",
                                     socket.IPPROTO_SCTP: "SCTP"}
#: IP_VS_CONN_F_MASQ: NAT forwarding (pyroute2 defaults to direct routing).
FWD_MASQ = 0


@attrs.frozen
class DestStats:
    weight: int
    active: int
    inactive: int


class Kernel(_Interface):
    """What the proxier needs from the kernel. Every mutating call is one kernel operation."""

    def list_services(self) -> dict[VSKey, VirtualServer]: ...
    def list_dests(self, key: VSKey) -> dict[RealServer, DestStats]: ...
    def add_service(self, vs: VirtualServer) -> None: ...
    def update_service(self, vs: VirtualServer) -> None: ...
    def del_service(self, key: VSKey) -> None: ...
    def add_dest(self, key: VSKey, real: RealServer, weight: int) -> None: ...
    def update_dest(self, key: VSKey, real: RealServer, weight: int) -> None: ...
    def del_dest(self, key: VSKey, real: RealServer) -> None: ...
    def ensure_dummy(self, name: str) -> None: ...
    def delete_link(self, name: str) -> bool: ...
    def list_addresses(self, device: str) -> set[str]: ...
    def add_address(self, device: str, address: str) -> None: ...
    def del_address(self, device: str, address: str) -> None: ...
    def local_addresses(self, exclude_device: str) -> list[str]: ...
    def ensure_set(self, name: str, set_type: str, family: int) -> None: ...
    def list_set(self, name: str) -> set[str]: ...
    def add_entry(self, name: str, set_type: str, entry: str) -> None: ...
    def del_entry(self, name: str, set_type: str, entry: str) -> None: ...
    def destroy_set(self, name: str) -> bool: ...
    def list_set_names(self) -> list[str]: ...
    def restore(self, data: RestoreData) -> float: ...
    def ensure_jump(self, family: int, table: str, chain: str, args: list[str]) -> None: ...
    def delete_jump(self, family: int, table: str, chain: str, args: list[str]) -> bool: ...
    def delete_chain(self, family: int, table: str, chain: str) -> bool: ...
    def sysctl(self, path: str, value: str) -> None: ...
    def set_timeouts(self, tcp: int, tcpfin: int, udp: int) -> None: ...
    def check_scheduler(self, scheduler: str) -> None: ...
    # Bulk forms for the first sync of a big node (one call; ``len`` of the input writes).
    def add_services(self, items: Sequence[tuple[VirtualServer, Sequence[RealServer]]]
                     ) -> None: ...
    def add_addresses(self, device: str, addresses: Sequence[str]) -> None: ...
    def add_entries(self, name: str, set_type: str, entries: Sequence[str]) -> None: ...


#: Below this many objects the per-object netlink calls beat starting a tool.
BULK_MIN = 32
_IPVSADM_PROTO = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def ipvsadm_restore_text(items: Iterable[tuple[VirtualServer, Sequence[RealServer]]]) -> str:
    """``ipvsadm --restore`` input adding ``items`` (NAT real servers, weight 1). Only for
    flags ipvsadm can express (none or persistence)."""
    lines = []
    for vs, reals in items:
        proto = _IPVSADM_PROTO[vs.key.protocol]
        service = _hostport(vs.key.address, vs.key.port)
        line = f"-A {proto} {service} -s {vs.scheduler}"
        if vs.flags & FLAG_PERSISTENT:
            line += f" -p {vs.timeout}"
        lines.append(line)
        lines.extend(f"-a {proto} {service} -r {_hostport(r.address, r.port)} -m -w 1"
                     for r in reals)
    return "\n".join(lines) + "\n"


def _attrs(message: Any, nla: str) -> dict[str, Any]:
    """The raw attributes of a dump message. Not pyroute2's ``from_message``: it leaves
    ``timeout``, ``flags`` and the connection counters at its defaults (0)."""
    return dict(message.get(nla)["attrs"])


def parse_service(message: Any) -> VirtualServer | None:
    """A dumped virtual server, or None for fwmark services and unknown protocols (not ours)."""
    attrs = _attrs(message, "IPVS_CMD_ATTR_SERVICE")
    if attrs.get("IPVS_SVC_ATTR_FWMARK"):
        return None
    proto = _PROTO_NAMES.get(int(attrs.get("IPVS_SVC_ATTR_PROTOCOL", 0)))
    if proto is None or "IPVS_SVC_ATTR_ADDR" not in attrs:
        return None
    key = VSKey(proto, str(attrs["IPVS_SVC_ATTR_ADDR"]), int(attrs.get("IPVS_SVC_ATTR_PORT", 0)))
    flags = attrs.get("IPVS_SVC_ATTR_FLAGS") or 0
    flag_value = int(flags.get("flags", 0)) if isinstance(flags, dict) else int(flags)
    # The kernel reports IP_VS_SVC_F_HASHED (0x2) on every service: not ours to compare.
    return VirtualServer(key, str(attrs.get("IPVS_SVC_ATTR_SCHED_NAME", "")), flag_value & ~0x2,
                         int(attrs.get("IPVS_SVC_ATTR_TIMEOUT", 0)))


def parse_dest(message: Any) -> tuple[RealServer, DestStats]:
    attrs = _attrs(message, "IPVS_CMD_ATTR_DEST")
    return (RealServer(str(attrs["IPVS_DEST_ATTR_ADDR"]), int(attrs["IPVS_DEST_ATTR_PORT"])),
            DestStats(int(attrs.get("IPVS_DEST_ATTR_WEIGHT", 0)),
                      int(attrs.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0)),
                      int(attrs.get("IPVS_DEST_ATTR_INACT_CONNS", 0))))


def _run_batch(argv: list[str], text: str, what: str) -> None:
    proc = subprocess.run(argv, input=text, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        # The next (full) sync compares with the kernel and finishes the job.
        raise SyncError(f"{what} failed: {(proc.stderr or proc.stdout).strip()[:500]}")


def _modules_hint() -> str:
    return "load the ip_vs kernel module (modprobe ip_vs); a kernel without IPVS cannot run it"


class NetlinkKernel:
    """`Kernel` over pyroute2 sockets opened in the calling thread's network namespace."""

    def __init__(self, writer_kind: str = "restore") -> None:
        try:
            from pyroute2 import IPVS, IPRoute
        except ImportError as exc:  # pragma: no cover - dependency
            raise BackendUnavailable(f"pyroute2 is missing ({exc}): pip install pyroute2") from exc
        try:
            self._ipvs: Any = IPVS()
        except Exception as exc:
            raise BackendUnavailable(
                f"IPVS generic netlink family is not available ({exc}): {_modules_hint()}"
            ) from exc
        self._ipr: Any = IPRoute()
        self._writer_kind = writer_kind
        self._writers: dict[int, Any] = {}
        self._ipset: Any = None

    def close(self) -> None:
        for sock in (self._ipvs, self._ipr, self._ipset):
            if sock is not None:
                sock.close()

    # -- IPVS --------------------------------------------------------------------------------

    @staticmethod
    def _service(vs: VirtualServer | VSKey) -> Any:
        from pyroute2 import IPVSService

        key = vs.key if isinstance(vs, VirtualServer) else vs
        fields: dict[str, Any] = {
            "af": socket.AF_INET6 if key.family == 6 else socket.AF_INET,
            "addr": key.address,
            "port": key.port,
            "protocol": _PROTO_NUMBERS[key.protocol],
        }
        if key.family == 6:
            fields["netmask"] = 128
        if isinstance(vs, VirtualServer):
            fields["sched_name"] = vs.scheduler
            fields["timeout"] = vs.timeout
            fields["flags"] = {"flags": vs.flags, "mask": 0xFFFFFFFF}
        return IPVSService(**fields)

    @staticmethod
    def _dest(real: RealServer, weight: int = 1) -> Any:
        from pyroute2 import IPVSDest

        return IPVSDest(addr=real.address, port=real.port, weight=weight, fwd_method=FWD_MASQ,
                        addr_family=socket.AF_INET6 if ":" in real.address else socket.AF_INET)

    def list_services(self) -> dict[VSKey, VirtualServer]:
        out: dict[VSKey, VirtualServer] = {}
        for message in self._ipvs.service("dump"):
            vs = parse_service(message)
            if vs is not None:
                out[vs.key] = vs
        return out

    def list_dests(self, key: VSKey) -> dict[RealServer, DestStats]:
        return dict(parse_dest(message)
                    for message in self._ipvs.dest("dump", service=self._service(key)))

    def add_service(self, vs: VirtualServer) -> None:
        self._ipvs.service("add", service=self._service(vs))

    def update_service(self, vs: VirtualServer) -> None:
        # pyroute2's "update" maps to a delete; "set" is IPVS_CMD_SET_SERVICE.
        self._ipvs.service("set", service=self._service(vs))

    def del_service(self, key: VSKey) -> None:
        self._ipvs.service("del", service=self._service(key))

    def add_dest(self, key: VSKey, real: RealServer, weight: int) -> None:
        self._ipvs.dest("add", service=self._service(key), dest=self._dest(real, weight))

    def update_dest(self, key: VSKey, real: RealServer, weight: int) -> None:
        self._ipvs.dest("set", service=self._service(key), dest=self._dest(real, weight))

    def del_dest(self, key: VSKey, real: RealServer) -> None:
        self._ipvs.dest("del", service=self._service(key), dest=self._dest(real))

    def add_services(self, items: Sequence[tuple[VirtualServer, Sequence[RealServer]]]
                     ) -> None:
        """New virtual servers with their real servers: one ``ipvsadm --restore`` (the same
        netlink calls, made from C) when there are many, else per object."""
        ipvsadm = shutil.which("ipvsadm")
        simple = [(vs, reals) for vs, reals in items if vs.flags & ~FLAG_PERSISTENT == 0]
        count = sum(1 + len(reals) for _vs, reals in simple)
        if ipvsadm is not None and count >= BULK_MIN:
            _run_batch([ipvsadm, "--restore"], ipvsadm_restore_text(simple), "ipvsadm --restore")
            done = {vs.key for vs, _reals in simple}
            items = [item for item in items if item[0].key not in done]
        for vs, reals in items:
            self.add_service(vs)
            for real in reals:
                self.add_dest(vs.key, real, 1)

    def check_scheduler(self, scheduler: str) -> None:
        # Upstream's probe: a throw-away service on a documentation address (TEST-NET-2).
        probe = VirtualServer(VSKey("TCP", "198.51.100.0", 20000), scheduler)
        try:
            self.add_service(probe)
        except Exception as exc:
            if getattr(exc, "code", 0) == errno.EEXIST:
                return
            raise BackendUnavailable(
                f"IPVS scheduler {scheduler!r} is not available in this kernel ({exc}): "
                f"modprobe ip_vs_{scheduler}, or choose another --ipvs-scheduler") from exc
        self.del_service(probe.key)

    # -- links and addresses ----------------------------------------------------------------

    def _index(self, name: str) -> int | None:
        found = self._ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def ensure_dummy(self, name: str) -> None:
        if self._index(name) is None:
            self._ipr.link("add", ifname=name, kind="dummy")
        # Upstream leaves kube-ipvs0 down: the addresses are still local, and no route is
        # announced for them.

    def delete_link(self, name: str) -> bool:
        index = self._index(name)
        if index is None:
            return False
        self._ipr.link("del", index=index)
        return True

    def list_addresses(self, device: str) -> set[str]:
        index = self._index(device)
        if index is None:
            return set()
        return {str(msg.get_attr("IFA_ADDRESS")) for msg in self._ipr.get_addr(index=index)}

    def add_address(self, device: str, address: str) -> None:
        index = self._index(device)
        if index is None:
            raise SyncError(f"{device} vanished")
        prefix = 128 if ":" in address else 32
        try:
            self._ipr.addr("add", index=index, address=address, prefixlen=prefix)
        except Exception as exc:
            if getattr(exc, "code", 0) != errno.EEXIST:
                raise

    def add_addresses(self, device: str, addresses: Sequence[str]) -> None:
        ip = shutil.which("ip")
        if ip is None or len(addresses) < BULK_MIN:
            for address in addresses:
                self.add_address(device, address)
            return
        text = "".join(f"addr add {a}/{128 if ':' in a else 32} dev {device}\n"
                       for a in addresses)
        _run_batch([ip, "-batch", "-"], text, "ip -batch (addresses)")

    def del_address(self, device: str, address: str) -> None:
        index = self._index(device)
        if index is None:
            return
        prefix = 128 if ":" in address else 32
        try:
            self._ipr.addr("del", index=index, address=address, prefixlen=prefix)
        except Exception as exc:
            if getattr(exc, "code", 0) not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                raise

    def local_addresses(self, exclude_device: str) -> list[str]:
        skip = self._index(exclude_device)
        out: list[str] = []
        for msg in self._ipr.get_addr():
            if msg["index"] == skip:
                continue
            address = str(msg.get_attr("IFA_ADDRESS"))
            if address.startswith("127.") or address == "::1" or address.startswith("fe80:"):
                continue
            if address not in out:
                out.append(address)
        return out

    # -- ipset -------------------------------------------------------------------------------

    def _set_sock(self) -> Any:
        if self._ipset is None:
            from kproxy_core.kernel import ipset

            try:
                from pyroute2 import IPSet

                self._ipset = IPSet()
                self._ipset.get_proto_version()
            except Exception as exc:
                raise BackendUnavailable(
                    f"ipset netlink is not available ({exc}): modprobe ip_set") from exc
            del ipset
        return self._ipset

    def ensure_set(self, name: str, set_type: str, family: int) -> None:
        from kproxy_core.kernel import ipset

        ipset.create_set(name, set_type, family, comment=True, sock=self._set_sock())

    def list_set(self, name: str) -> set[str]:
        from kproxy_core.kernel import ipset

        return ipset.list_entries(name, self._set_sock())

    def add_entry(self, name: str, set_type: str, entry: str) -> None:
        from kproxy_core.kernel import ipset

        ipset.add_entry(name, set_type, entry, self._set_sock())

    def add_entries(self, name: str, set_type: str, entries: Sequence[str]) -> None:
        tool = shutil.which("ipset")
        if tool is None or len(entries) < BULK_MIN:
            for entry in entries:
                self.add_entry(name, set_type, entry)
            return
        text = "".join(f"add {name} {entry}\n" for entry in entries)
        _run_batch([tool, "restore", "-exist"], text, f"ipset restore ({name})")

    def del_entry(self, name: str, set_type: str, entry: str) -> None:
        from kproxy_core.kernel import ipset

        ipset.del_entry(name, set_type, entry, self._set_sock())

    def destroy_set(self, name: str) -> bool:
        from kproxy_core.kernel import ipset

        return ipset.destroy_set(name, self._set_sock())

    def list_set_names(self) -> list[str]:
        from kproxy_core.kernel import ipset

        return ipset.list_sets(self._set_sock())

    # -- iptables ----------------------------------------------------------------------------

    def _writer(self, family: int) -> Any:
        writer = self._writers.get(family)
        if writer is None:
            from kproxy_core.kernel.iptables_writers import make_writer

            writer = self._writers[family] = make_writer(self._writer_kind, family)  # type: ignore[arg-type]
        return writer

    def restore(self, data: RestoreData) -> float:
        return float(self._writer(data.family).restore(data))

    def ensure_jump(self, family: int, table: str, chain: str, args: list[str]) -> None:
        self._writer(family).ensure_rule(table, chain, args, prepend=True)

    def delete_jump(self, family: int, table: str, chain: str, args: list[str]) -> bool:
        return bool(self._writer(family).delete_rule(table, chain, args))

    def delete_chain(self, family: int, table: str, chain: str) -> bool:
        return bool(self._writer(family).delete_chain(table, chain))

    # -- knobs -------------------------------------------------------------------------------

    def sysctl(self, path: str, value: str) -> None:
        full = os.path.join("/proc/sys", path)
        try:
            with open(full) as handle:
                if handle.read().strip() == value:
                    return
            with open(full, "w") as handle:
                handle.write(value)
        except OSError as exc:
            raise BackendUnavailable(f"cannot set sysctl {path}={value}: {exc}") from exc

    def set_timeouts(self, tcp: int, tcpfin: int, udp: int) -> None:
        # pyroute2 has no IPVS_CMD_SET_CONFIG; ipvsadm --set is the same call (0 keeps a value).
        ipvsadm = shutil.which("ipvsadm")
        if ipvsadm is None:
            raise BackendUnavailable("ipvsadm not found (needed for --ipvs-*-timeout): "
                                     "apt-get install ipvsadm")
        proc = subprocess.run([ipvsadm, "--set", str(tcp), str(tcpfin), str(udp)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SyncError(f"ipvsadm --set failed: {proc.stderr.strip()}")


def entries_of(kernel: Kernel, names: Iterable[str]) -> dict[str, set[str]]:
    existing = set(kernel.list_set_names())
    return {name: kernel.list_set(name) if name in existing else set() for name in names}
