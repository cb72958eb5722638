"""The kernel side of IPVS mode behind one small interface (`Kernel`), so that the proxier's
diffing logic is tested against `FakeKernel` (tests) and runs against `NetlinkKernel`
(hand-encoded netlink for IPVS, links, addresses and our sets, `kproxy_ipvs.bulk`;
pyroute2 only to list or destroy other sets at cleanup; iptables through the core writer).

Everything acts on the network namespace of the calling thread.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any
from typing import Protocol as _Interface

import attrs

from kproxy_core.backend import BackendUnavailable, SyncError
from kproxy_core.kernel.iptables import RestoreData, quote
from kproxy_ipvs import bulk
from kproxy_ipvs.rules import SETS, RealServer, VirtualServer, VSKey, set_name

#: Our set names (both families) -> set type.
_SET_TYPES = {set_name(spec.name, family): spec.type for spec in SETS for family in (4, 6)}


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
    def ensure_sets(self, sets: Sequence[tuple[str, str, int]]) -> list[str]: ...
    def list_set(self, name: str) -> set[str]: ...
    def add_entry(self, name: str, set_type: str, entry: str) -> None: ...
    def del_entry(self, name: str, set_type: str, entry: str) -> None: ...
    def destroy_set(self, name: str) -> bool: ...
    def list_set_names(self) -> list[str]: ...
    def restore(self, data: RestoreData) -> float: ...
    def ensure_jump(self, family: int, table: str, chain: str, args: list[str]) -> None: ...
    def ensure_jumps(self, family: int, jumps: Sequence[tuple[str, str, list[str]]]
                     ) -> int: ...
    def restore_with_jumps(self, data: RestoreData,
                           jumps: Sequence[tuple[str, str, list[str]]]) -> float: ...
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


def _modules_hint() -> str:
    return "load the ip_vs kernel module (modprobe ip_vs); a kernel without IPVS cannot run it"


class NetlinkKernel:
    """`Kernel` over netlink sockets opened in the calling thread's network namespace: IPVS,
    links, addresses, our sets and their entries hand-encoded (`kproxy_ipvs.bulk`, sockets
    kept open); listing and destroying other sets through pyroute2 (cleanup); iptables
    through the core writer, built on first use on the sync's thread (in the emulated VM,
    building them in the background took the CPU from the sync's netlink work)."""

    def __init__(self, writer_kind: str = "restore") -> None:
        self._bulk = bulk.BulkWriter()
        try:
            self._bulk.list_services()
        except OSError as exc:
            self._bulk.close()
            raise BackendUnavailable(
                f"IPVS generic netlink family is not available ({exc}): {_modules_hint()}"
            ) from exc
        self._writer_kind = writer_kind
        self._writers: dict[int, Any] = {}
        self._ipset: Any = None

    def close(self) -> None:
        self._bulk.close()
        if self._ipset is not None:
            self._ipset.close()

    # -- IPVS --------------------------------------------------------------------------------

    def list_services(self) -> dict[VSKey, VirtualServer]:
        return {vs.key: vs for vs in self._bulk.list_services()}

    def list_dests(self, key: VSKey) -> dict[RealServer, DestStats]:
        return {real: DestStats(weight, active, inactive)
                for real, weight, active, inactive in self._bulk.list_dests(key)}

    def add_service(self, vs: VirtualServer) -> None:
        self._bulk.ipvs_one(bulk.IPVS_CMD_NEW_SERVICE, bulk.ipvs_service_attrs(vs.key, vs),
                            f"adding {vs.key}")

    def update_service(self, vs: VirtualServer) -> None:
        self._bulk.ipvs_one(bulk.IPVS_CMD_SET_SERVICE, bulk.ipvs_service_attrs(vs.key, vs),
                            f"updating {vs.key}")

    def del_service(self, key: VSKey) -> None:
        self._bulk.ipvs_one(bulk.IPVS_CMD_DEL_SERVICE, bulk.ipvs_service_attrs(key),
                            f"deleting {key}", ignore=(errno.ESRCH,))

    def add_dest(self, key: VSKey, real: RealServer, weight: int) -> None:
        self._bulk.ipvs_one(bulk.IPVS_CMD_NEW_DEST,
                            bulk.ipvs_service_attrs(key) + bulk.ipvs_dest_attrs(real, weight),
                            f"adding {key} -> {real}")

    def update_dest(self, key: VSKey, real: RealServer, weight: int) -> None:
        self._bulk.ipvs_one(bulk.IPVS_CMD_SET_DEST,
                            bulk.ipvs_service_attrs(key) + bulk.ipvs_dest_attrs(real, weight),
                            f"updating {key} -> {real}")

    def del_dest(self, key: VSKey, real: RealServer) -> None:
        self._bulk.ipvs_one(bulk.IPVS_CMD_DEL_DEST,
                            bulk.ipvs_service_attrs(key) + bulk.ipvs_dest_attrs(real),
                            f"deleting {key} -> {real}", ignore=(errno.ENOENT,))

    def add_services(self, items: Sequence[tuple[VirtualServer, Sequence[RealServer]]]
                     ) -> None:
        """New virtual servers with their real servers, pipelined (`kproxy_ipvs.bulk`)."""
        self._bulk.add_services(items)

    def check_scheduler(self, scheduler: str) -> None:
        # Upstream's probe: a throw-away service on a documentation address (TEST-NET-2).
        probe = VirtualServer(VSKey("TCP", "198.51.100.0", 20000), scheduler)
        try:
            self.add_service(probe)
        except bulk.BatchError as exc:
            if exc.failures[0][1] == errno.EEXIST:
                return
            raise BackendUnavailable(
                f"IPVS scheduler {scheduler!r} is not available in this kernel ({exc}): "
                f"modprobe ip_vs_{scheduler}, or choose another --ipvs-scheduler") from exc
        self.del_service(probe.key)

    # -- links and addresses ----------------------------------------------------------------

    def _index(self, name: str) -> int | None:
        # Over netlink: if_nametoindex's ioctl tries a module load for a missing name.
        return self._bulk.link_index(name)

    def ensure_dummy(self, name: str) -> None:
        if self._index(name) is None:
            self._bulk.add_dummy(name)
        # Upstream leaves kube-ipvs0 down: the addresses are still local, and no route is
        # announced for them.

    def delete_link(self, name: str) -> bool:
        index = self._index(name)
        if index is None:
            return False
        self._bulk.delete_link(index)
        return True

    def list_addresses(self, device: str) -> set[str]:
        index = self._index(device)
        if index is None:
            return set()
        return {address for owner, address in self._bulk.list_addresses() if owner == index}

    def add_address(self, device: str, address: str) -> None:
        self.add_addresses(device, [address])

    def add_addresses(self, device: str, addresses: Sequence[str]) -> None:
        index = self._index(device)
        if index is None:
            raise SyncError(f"{device} vanished")
        self._bulk.addresses(index, addresses)

    def del_address(self, device: str, address: str) -> None:
        index = self._index(device)
        if index is not None:
            self._bulk.addresses(index, [address], add=False)

    def local_addresses(self, exclude_device: str) -> list[str]:
        skip = self._index(exclude_device)
        out: list[str] = []
        for index, address in self._bulk.list_addresses():
            if index == skip:
                continue
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

        # A header request, not the shared helper's check, which lists every entry.
        existing = self._bulk.set_type(name)
        if existing == set_type:
            return
        if existing is not None:
            raise ipset.IPSetError(f"ipset {name} exists with type {existing}, not {set_type}")
        self._bulk.create_sets([(name, set_type, family)])

    def ensure_sets(self, sets: Sequence[tuple[str, str, int]]) -> list[str]:
        """Every (name, type, family) set there, the missing ones created in one pipelined
        send; an existing set of another type is an error. Returns the names created (empty
        sets: the caller need not list them)."""
        from kproxy_core.kernel import ipset

        existing = self._bulk.set_types()
        missing: list[tuple[str, str, int]] = []
        for name, set_type, family in sets:
            have = existing.get(name)
            if have is None:
                missing.append((name, set_type, family))
            elif have != set_type:
                raise ipset.IPSetError(f"ipset {name} exists with type {have}, not {set_type}")
        if missing:
            self._bulk.create_sets(missing)
        return [name for name, _type, _family in missing]

    def list_set(self, name: str) -> set[str]:
        set_type = _SET_TYPES.get(name)
        if set_type is None:  # not one of ours: the shared helper knows every type
            from kproxy_core.kernel import ipset

            return ipset.list_entries(name, self._set_sock())
        # Hand-parsed: KUBE-CLUSTER-IP and KUBE-IPVS-IPS hold one entry per service.
        return self._bulk.list_set(name, set_type)

    def add_entry(self, name: str, set_type: str, entry: str) -> None:
        self._bulk.set_entries(name, set_type, [entry])

    def add_entries(self, name: str, set_type: str, entries: Sequence[str]) -> None:
        self._bulk.set_entries(name, set_type, entries)

    def del_entry(self, name: str, set_type: str, entry: str) -> None:
        self._bulk.set_entries(name, set_type, [entry], add=False)

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

    def ensure_jumps(self, family: int, jumps: Sequence[tuple[str, str, list[str]]]) -> int:
        """(table, built-in chain, args) rules at the top of their chains when missing: one
        ``iptables-save`` per table and at most one restore, not a check and an insert per
        rule (every command start costs; in the emulated VM, seconds). Returns how many
        were inserted."""
        writer = self._writer(family)
        missing = self._missing_jumps(writer, jumps)
        if missing:
            text = "".join(f"*{table}\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"
                           for table, lines in missing.items())
            writer.restore_text(text)
        return sum(len(lines) for lines in missing.values())

    def restore_with_jumps(self, data: RestoreData,
                           jumps: Sequence[tuple[str, str, list[str]]]) -> float:
        """`restore` of ``data`` plus the missing ``jumps`` (as `ensure_jumps` finds them) in
        the same transaction: one restore process, not two. The jump lines are added to
        ``data``. Returns the restore's seconds."""
        writer = self._writer(data.family)
        for table, lines in self._missing_jumps(writer, jumps).items():
            data.table(table).raw_rules(lines)
        return float(writer.restore(data))

    @staticmethod
    def _missing_jumps(writer: Any, jumps: Sequence[tuple[str, str, list[str]]]
                       ) -> dict[str, list[str]]:
        """Table -> ``-I chain 1 ...`` lines for the jumps the tables lack, from one
        ``iptables-save`` of every table (each process cost about half a second in the
        emulated VM)."""
        tables = list(dict.fromkeys(table for table, _chain, _args in jumps))
        saved = _saved_lines(writer, tables)
        missing: dict[str, list[str]] = {}
        for table, chain, args in jumps:
            rendered = " ".join(quote(arg) for arg in args)
            if f"-A {chain} {rendered}" not in saved[table]:
                missing.setdefault(table, []).append(f"-I {chain} 1 {rendered}")
        return missing

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


def _saved_lines(writer: Any, tables: Sequence[str]) -> dict[str, set[str]]:
    """Table -> the lines ``iptables-save`` prints for it (none for a table not there), from
    one save of every table: the one the core's backend detection just ran when the writer
    was built by this call (the first sync), else a new one; the writer's per-table saves if
    its save binary is not found."""
    from kproxy_core.kernel.iptables_writers import (
        COMMAND_TIMEOUT,
        find_binary,
        take_detection_save,
    )

    binary = find_binary(writer.family, writer.backend, "save")
    if binary is None:
        return {table: set(writer.save(table).splitlines()) for table in tables}
    text = take_detection_save(binary)
    if text is None:
        proc = subprocess.run([binary], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT, check=False)
        if proc.returncode != 0:
            raise SyncError(f"{os.path.basename(binary)} exited {proc.returncode}: "
                            f"{proc.stderr.strip()}")
        text = proc.stdout
    out: dict[str, set[str]] = {table: set() for table in tables}
    lines: set[str] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            lines = out.get(line[1:].strip())
        elif lines is not None:
            lines.add(line)
    return out


def entries_of(kernel: Kernel, names: Iterable[str]) -> dict[str, set[str]]:
    existing = set(kernel.list_set_names())
    return {name: kernel.list_set(name) if name in existing else set() for name in names}
