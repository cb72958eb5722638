"""The store of API records and the change tracker between sources and the sync loop.

Sources call `ProxyState.replace` / `upsert` / `delete` from their own threads with raw
objects; the sync loop calls `take_snapshot` and gets the resolved `NodeView` plus exactly the
service ports that differ from the previous snapshot.

Work is O(changed): an event parses one object and marks one service dirty; resolution runs
lazily (at `view` / `take_snapshot`) for dirty services only, so a burst of events for one
service resolves it once. Only a change of this node's zone re-resolves everything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs

from kproxy_core.model import (
    EndpointSlice,
    Node,
    NodeView,
    ObjectKind,
    ResolvedServicePort,
    Service,
    ServicePortKey,
)
from kproxy_core.objects import (
    LABEL_HEADLESS,
    LABEL_SERVICE_PROXY_NAME,
    InvalidObject,
    object_ref,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)
from kproxy_core.resolve import NodeInfo, resolve_service

__all__ = ["ProxyState", "Snapshot"]

_log = logging.getLogger("kproxy.state")

_KINDS = frozenset(k.value for k in ObjectKind)

NamespacedName = tuple[str, str]


@attrs.frozen
class Snapshot:
    """The resolved state at one instant and what changed since the previous snapshot."""

    view: NodeView
    #: Keys whose value differs (attrs eq) from the previous snapshot: added, removed, modified.
    changed: frozenset[ServicePortKey]
    #: For each changed key, the value at the previous snapshot (None if it was added).
    previous: Mapping[ServicePortKey, ResolvedServicePort | None]
    #: ``last-change-trigger-time`` of the slices changed since the previous snapshot, for
    #: the network_programming_duration_seconds metric.
    trigger_times: tuple[float, ...]
    #: This node's addresses or zone changed since the previous snapshot. Node addresses are
    #: not part of any `ResolvedServicePort`, so a backend that renders them (NodePorts)
    #: must rewrite those when this is set.
    node_changed: bool = False


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    if isinstance(meta, Mapping):
        labels = meta.get("labels")
        if isinstance(labels, Mapping):
            return labels
    return {}


class ProxyState:
    """Thread-safe store + change tracker; implements `kproxy_core.backend.SourceEvents`."""

    def __init__(
        self,
        node_name: str,
        *,
        on_change: Callable[[], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._node_name = node_name
        self._on_change = on_change
        self._log = logger or _log
        self._lock = threading.Lock()

        self._services: dict[NamespacedName, Service] = {}
        #: (namespace, slice name) -> slice; and per service the slices that name it
        self._slices: dict[NamespacedName, EndpointSlice] = {}
        self._slices_by_service: dict[NamespacedName, dict[str, EndpointSlice]] = {}
        self._node: Node | None = None
        self._invalid: set[tuple[str, str, str]] = set()
        self._synced: set[str] = set()

        self._resolved: dict[ServicePortKey, ResolvedServicePort] = {}
        self._keys_by_service: dict[NamespacedName, tuple[ServicePortKey, ...]] = {}

        # Since the last snapshot:
        self._dirty: set[NamespacedName] = set()
        self._dirty_all = False
        #: value at the last snapshot of every key touched since (first write wins)
        self._base: dict[ServicePortKey, ResolvedServicePort | None] = {}
        self._pending_services: set[NamespacedName] = set()
        self._pending_slices: set[NamespacedName] = set()
        self._trigger_times: list[float] = []
        self._snapshot_node_ips: tuple[str, ...] = ()
        self._snapshot_zone = ""
        self._snapshot_pod_cidrs: tuple[str, ...] = ()

        self._service_total = 0
        self._endpoint_total = 0

    # ----------------------------------------------------------------------------------------
    # SourceEvents
    # ----------------------------------------------------------------------------------------

    def replace(self, kind: str, objects: Sequence[Mapping[str, Any]]) -> None:
        """The complete current list of ``kind``: diffs against what is stored, so a relist
        of unchanged objects marks nothing dirty."""
        self._check_kind(kind)
        parsed = [self._parse(kind, obj) for obj in objects]
        with self._lock:
            first = kind not in self._synced
            self._synced.add(kind)
            changed = first and kind != ObjectKind.NODE.value
            self._invalid = {i for i in self._invalid if i[0] != kind}
            if kind == ObjectKind.NODE.value:
                node: Node | None = None
                for ref, record in parsed:
                    if ref[1] == self._node_name:
                        node = self._record_node(kind, ref, record)
                changed |= self._set_node(node)
            else:
                seen: set[NamespacedName] = set()
                for ref, record in parsed:
                    seen.add(ref)
                    changed |= self._apply(kind, ref, record)
                current = self._services if kind == ObjectKind.SERVICE.value else self._slices
                for ref in [r for r in current if r not in seen]:
                    changed |= self._remove(kind, ref)
        if changed:
            self._notify()

    def upsert(self, kind: str, obj: Mapping[str, Any]) -> None:
        """An object of ``kind`` was added or modified."""
        self._check_kind(kind)
        ref, record = self._parse(kind, obj)
        with self._lock:
            if kind == ObjectKind.NODE.value:
                if ref[1] != self._node_name:
                    return
                changed = self._set_node(self._record_node(kind, ref, record))
            else:
                changed = self._apply(kind, ref, record)
        if changed:
            self._notify()

    def delete(self, kind: str, obj: Mapping[str, Any]) -> None:
        """An object of ``kind`` was deleted (``obj`` may be a tombstone: only metadata)."""
        self._check_kind(kind)
        ref = self._ref(kind, obj)
        with self._lock:
            self._invalid.discard((kind, *ref))
            if kind == ObjectKind.NODE.value:
                if ref[1] != self._node_name:
                    return
                changed = self._set_node(None)
            else:
                self._count(kind)
                changed = self._remove(kind, ref)
        if changed:
            self._notify()

    # ----------------------------------------------------------------------------------------
    # Queries
    # ----------------------------------------------------------------------------------------

    def is_synced(self) -> bool:
        """Both the Service and the EndpointSlice lists were delivered at least once."""
        with self._lock:
            return {ObjectKind.SERVICE.value, ObjectKind.ENDPOINT_SLICE.value} <= self._synced

    def node(self) -> Node | None:
        with self._lock:
            return self._node

    def view(self) -> NodeView:
        """The current resolved view; changes stay pending for the next `take_snapshot`."""
        with self._lock:
            self._flush()
            return self._make_view()

    def take_snapshot(self) -> Snapshot:
        """The current view plus what changed since the previous snapshot; resets tracking."""
        with self._lock:
            self._flush()
            previous = {k: v for k, v in self._base.items() if self._resolved.get(k) != v}
            view = self._make_view()
            node_changed = (
                view.node_ips != self._snapshot_node_ips or view.zone != self._snapshot_zone
                or view.pod_cidrs != self._snapshot_pod_cidrs
            )
            snap = Snapshot(
                view=view,
                changed=frozenset(previous),
                previous=MappingProxyType(previous),
                trigger_times=tuple(self._trigger_times),
                node_changed=node_changed,
            )
            self._base = {}
            self._pending_services.clear()
            self._pending_slices.clear()
            self._trigger_times = []
            self._snapshot_node_ips = view.node_ips
            self._snapshot_zone = view.zone
            self._snapshot_pod_cidrs = view.pod_cidrs
            return snap

    def pending(self) -> tuple[int, int]:
        """(services, endpoint slices) with changes not yet taken by a snapshot."""
        with self._lock:
            return (len(self._pending_services), len(self._pending_slices))

    def totals(self) -> tuple[int, int]:
        """(Service events, EndpointSlice events) received, like upstream's ``*_changes_total``
        (which count every update, changed or not)."""
        with self._lock:
            return (self._service_total, self._endpoint_total)

    def invalid_objects(self) -> int:
        """Objects currently skipped because they failed validation."""
        with self._lock:
            return len(self._invalid)

    # ----------------------------------------------------------------------------------------
    # Internals (callers hold the lock unless noted)
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in _KINDS:
            raise ValueError(f"unknown object kind {kind!r} (expected one of {sorted(_KINDS)})")

    @staticmethod
    def _ref(kind: str, obj: Mapping[str, Any]) -> NamespacedName:
        ns, name = object_ref(obj)
        if kind == ObjectKind.NODE.value:
            return ("", name)
        return (ns or "default", name)

    def _parse(
        self, kind: str, obj: Mapping[str, Any]
    ) -> tuple[NamespacedName, Service | EndpointSlice | Node | InvalidObject | None]:
        """Parse outside the lock. Returns the record, None for objects kproxy ignores by
        label, or the `InvalidObject` error (logged here, once)."""
        ref = self._ref(kind, obj) if isinstance(obj, Mapping) else ("", "")
        labels = _labels(obj) if isinstance(obj, Mapping) else {}
        if kind == ObjectKind.SERVICE.value and LABEL_SERVICE_PROXY_NAME in labels:
            return ref, None
        if kind == ObjectKind.ENDPOINT_SLICE.value and LABEL_HEADLESS in labels:
            return ref, None
        try:
            if kind == ObjectKind.SERVICE.value:
                return ref, parse_service(obj)
            if kind == ObjectKind.ENDPOINT_SLICE.value:
                return ref, parse_endpoint_slice(obj)
            if ref[1] != self._node_name:
                return ref, None
            return ref, parse_node(obj)
        except InvalidObject as err:
            self._log.warning("ignoring invalid object: %s", err)
            return ref, err

    def _record_node(
        self,
        kind: str,
        ref: NamespacedName,
        record: Service | EndpointSlice | Node | InvalidObject | None,
    ) -> Node | None:
        if isinstance(record, InvalidObject):
            self._invalid.add((kind, *ref))
            return None
        self._invalid.discard((kind, *ref))
        return record if isinstance(record, Node) else None

    def _count(self, kind: str) -> None:
        if kind == ObjectKind.SERVICE.value:
            self._service_total += 1
        else:
            self._endpoint_total += 1

    def _apply(
        self,
        kind: str,
        ref: NamespacedName,
        record: Service | EndpointSlice | Node | InvalidObject | None,
    ) -> bool:
        """Store one Service or EndpointSlice (None / invalid: drop it). True if dirty."""
        self._count(kind)
        if isinstance(record, InvalidObject):
            self._invalid.add((kind, *ref))
            return self._remove(kind, ref)
        self._invalid.discard((kind, *ref))
        if isinstance(record, Service):
            if self._services.get(ref) == record:
                return False
            self._services[ref] = record
            self._dirty.add(ref)
            self._pending_services.add(ref)
            return True
        if isinstance(record, EndpointSlice):
            old = self._slices.get(ref)
            if old == record:
                return False
            if old is not None and old.service_key != record.service_key:
                self._unlink_slice(old)
            self._slices[ref] = record
            self._slices_by_service.setdefault(record.service_key, {})[record.name] = record
            self._dirty.add(record.service_key)
            self._pending_slices.add(ref)
            if record.last_change_trigger_time is not None:
                self._trigger_times.append(record.last_change_trigger_time)
            return True
        return self._remove(kind, ref)

    def _remove(self, kind: str, ref: NamespacedName) -> bool:
        if kind == ObjectKind.SERVICE.value:
            if self._services.pop(ref, None) is None:
                return False
            self._dirty.add(ref)
            self._pending_services.add(ref)
            return True
        old = self._slices.pop(ref, None)
        if old is None:
            return False
        self._unlink_slice(old)
        self._dirty.add(old.service_key)
        self._pending_slices.add(ref)
        return True

    def _unlink_slice(self, old: EndpointSlice) -> None:
        siblings = self._slices_by_service.get(old.service_key)
        if siblings is not None:
            siblings.pop(old.name, None)
            if not siblings:
                del self._slices_by_service[old.service_key]
        self._dirty.add(old.service_key)

    def _set_node(self, node: Node | None) -> bool:
        old = self._node
        self._node = node
        if old == node:
            return False
        old_zone = old.zone if old else ""
        new_zone = node.zone if node else ""
        if old_zone != new_zone:
            # topology hints select by zone: every service may resolve differently
            self._dirty_all = True
        return True

    def _flush(self) -> None:
        """Re-resolve dirty services into ``_resolved``, remembering snapshot-time values."""
        info = NodeInfo(self._node_name, self._node.zone if self._node else "")
        if self._dirty_all:
            self._dirty.update(self._services)
            self._dirty.update(self._keys_by_service)
            self._dirty_all = False
        if not self._dirty:
            return
        resolved = self._resolved
        base = self._base
        for svc_ref in self._dirty:
            svc = self._services.get(svc_ref)
            new: dict[ServicePortKey, ResolvedServicePort] = {}
            if svc is not None:
                slices = self._slices_by_service.get(svc_ref, {}).values()
                new = resolve_service(svc, slices, info)
            for key in self._keys_by_service.get(svc_ref, ()):
                if key not in new:
                    if key not in base:
                        base[key] = resolved.get(key)
                    resolved.pop(key, None)
            for key, value in new.items():
                old = resolved.get(key)
                if old != value:
                    if key not in base:
                        base[key] = old
                    resolved[key] = value
                elif old is not value:
                    # equal for the dataplane; keep the fresh one for its explain details
                    resolved[key] = value
            if new:
                self._keys_by_service[svc_ref] = tuple(new)
            else:
                self._keys_by_service.pop(svc_ref, None)
        self._dirty = set()

    def _make_view(self) -> NodeView:
        node = self._node
        return NodeView(
            node_name=self._node_name,
            node_ips=node.addresses if node else (),
            zone=node.zone if node else "",
            services=MappingProxyType(dict(self._resolved)),
            pod_cidrs=node.pod_cidrs if node else (),
        )

    def _notify(self) -> None:
        """Called without the lock: the callback may call back into this object."""
        if self._on_change is not None:
            self._on_change()
