"""State from a directory of YAML/JSON manifests instead of an API server.

For demos, tests and nodes without API access: every ``*.yaml``, ``*.yml`` and ``*.json``
under ``--manifests`` is read (multi-document YAML, ``List`` kinds flattened) and the Services,
EndpointSlices and this node's Node are delivered with ``replace()``. The directory is polled
for changes: only files whose (mtime, size, inode) changed are read again, and only the objects
whose content changed are delivered (``upsert()`` / ``delete()``), so an edit of one object in
a 10k-service directory costs the core one object. Between scans the source keeps a
fingerprint per object, not the documents.

The same filters as the watch selectors kube-proxy uses are applied (Services labelled
``service.kubernetes.io/service-proxy-name`` or headless, EndpointSlices labelled
``service.kubernetes.io/headless``), so a manifest set means the same thing here as when
loaded into an API server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kproxy_core.backend import ConfigView, Source, SourceEvents

log = logging.getLogger(__name__)

JSONObj = dict[str, Any]

KINDS = ("Service", "EndpointSlice", "Node")
_API_VERSIONS = {"Service": "v1", "EndpointSlice": "discovery.k8s.io/v1", "Node": "v1"}
_SUFFIXES = (".yaml", ".yml", ".json")

#: libyaml's loader when PyYAML was built with it (several times faster on large files).
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

LABEL_SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS = "service.kubernetes.io/headless"


class ManifestError(ValueError):
    """A manifest file that cannot be used; the message names the file."""


class ManifestSourceError(RuntimeError):
    """The manifests source cannot start (e.g. the directory is missing)."""


def _flatten(doc: Any, path: Path, index: int) -> list[JSONObj]:
    if not isinstance(doc, Mapping):
        raise ManifestError(f"{path}: document {index} is a {type(doc).__name__}, "
                            "expected a mapping with apiVersion and kind")
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and "items" in doc:
        items = doc.get("items") or []
        if not isinstance(items, list):
            raise ManifestError(f"{path}: document {index}: {kind}.items is not a list")
        # Typed lists (ServiceList) carry items without kind, as the API returns them.
        item_kind = kind[: -len("List")] if kind != "List" else None
        out: list[JSONObj] = []
        for item in items:
            if item_kind and isinstance(item, Mapping) and "kind" not in item:
                item = {"kind": item_kind, "apiVersion": doc.get("apiVersion", ""), **item}
            out.extend(_flatten(item, path, index))
        return out
    return [dict(doc)]


def load_file(path: Path) -> list[JSONObj]:
    """Every object in one manifest file, in order. Raises `ManifestError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from exc
    try:
        if path.suffix == ".json":
            docs: list[Any] = [json.loads(text)]
        else:
            docs = list(yaml.load_all(text, Loader=_YAML_LOADER))
    except (yaml.YAMLError, ValueError) as exc:
        raise ManifestError(f"{path}: {exc}".replace("\n", " ")) from exc
    objects: list[JSONObj] = []
    for index, doc in enumerate(docs):
        if doc is not None:
            objects.extend(_flatten(doc, path, index))
    return objects


def manifest_files(directory: Path) -> list[Path]:
    """Manifest files under ``directory``, sorted. Hidden entries are skipped, which also
    skips the ``..data`` copies inside a mounted ConfigMap."""
    found: list[Path] = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root, f) for f in files
                     if not f.startswith(".") and f.endswith(_SUFFIXES))
    return sorted(found)


def classify(obj: Mapping[str, Any], origin: str = "") -> str | None:
    """The kind this source delivers ``obj`` as, or None (logged at debug) if it ignores it."""
    kind = obj.get("kind")
    api_version = obj.get("apiVersion")
    if kind in _API_VERSIONS and api_version == _API_VERSIONS[kind]:
        return str(kind)
    log.debug("manifests: ignoring %s/%s in %s", api_version, kind, origin or "<input>")
    return None


def selected(kind: str, obj: Mapping[str, Any]) -> bool:
    """Whether kube-proxy's watch selectors would return ``obj``."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if kind == "Service":
        spec = obj.get("spec") or {}
        return LABEL_SERVICE_PROXY_NAME not in labels and spec.get("clusterIP") != "None"
    if kind == "EndpointSlice":
        return LABEL_HEADLESS not in labels
    return True


def _with_defaults(kind: str, obj: JSONObj) -> JSONObj:
    # Shallow copies: the caller's document is not modified, and a deep copy of 10k
    # objects would double the parsed data for nothing.
    meta = obj.get("metadata")
    meta = dict(meta) if isinstance(meta, Mapping) else {}
    if kind != "Node":
        # As kubectl does for namespace-less manifests.
        meta.setdefault("namespace", "default")
    return {**obj, "metadata": meta}


def group_objects(objects: list[tuple[str, JSONObj]]) -> dict[str, list[JSONObj]]:
    """Objects (with their origin) grouped by delivered kind; later duplicates win."""
    by_kind: dict[str, dict[tuple[str, str], JSONObj]] = {k: {} for k in KINDS}
    for origin, obj in objects:
        kind = classify(obj, origin)
        if kind is None:
            continue
        obj = _with_defaults(kind, obj)
        meta = obj["metadata"]
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        if key in by_kind[kind]:
            log.warning("manifests: %s %s/%s defined again in %s; the later one wins",
                        kind, key[0], key[1], origin)
        by_kind[kind][key] = obj
    return {kind: list(objs.values()) for kind, objs in by_kind.items()}


def load_directory(directory: Path) -> dict[str, list[JSONObj]]:
    """Every Service, EndpointSlice and Node under ``directory`` (no selector filtering).
    Raises `ManifestError` for the first unreadable file."""
    objects: list[tuple[str, JSONObj]] = []
    for path in manifest_files(directory):
        objects.extend((str(path), obj) for obj in load_file(path))
    return group_objects(objects)


ObjKey = tuple[str, str, str]
"""(delivered kind, namespace, name)"""


def object_key(kind: str, obj: Mapping[str, Any]) -> ObjKey:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    return (kind, str(meta.get("namespace", "")), str(meta.get("name", "")))


def digest(obj: Mapping[str, Any]) -> bytes:
    """A fingerprint of an object's content (key order does not matter; YAML timestamps and
    other non-JSON scalars are compared by their text)."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError):  # YAML allows keys JSON cannot sort (ints beside strings)
        text = repr(obj)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def index_objects(path: Path, objects: list[JSONObj]) -> dict[ObjKey, JSONObj]:
    """The objects of one file this source delivers, by key (defaults applied; a later
    definition in the same file wins)."""
    out: dict[ObjKey, JSONObj] = {}
    for obj in objects:
        kind = classify(obj, str(path))
        if kind is None:
            continue
        obj = _with_defaults(kind, obj)
        key = object_key(kind, obj)
        if key in out:
            log.warning("manifests: %s %s/%s defined again in %s; the later one wins",
                        kind, key[1], key[2], path)
        out[key] = obj
    return out


class _File:
    """What is remembered of one manifest file between scans: no object content, only which
    objects it defines and their fingerprints (at 10k services the parsed documents were a
    quarter of kproxy's memory)."""

    __slots__ = ("digests", "signature")

    def __init__(self, signature: tuple[int, int, int], digests: dict[ObjKey, bytes]) -> None:
        self.signature = signature
        self.digests = digests


class ManifestSource(Source):
    """Delivers the objects of a manifest directory; see the module docstring."""

    name = "manifests"

    def __init__(self, config: ConfigView, node_name: str, events: SourceEvents) -> None:
        super().__init__(config, node_name, events)
        #: Seconds between directory scans.
        self.poll_interval = 1.0
        self._directory: Path | None = None
        #: path -> signature and fingerprints of the objects last parsed successfully
        self._files: dict[Path, _File] = {}
        #: path -> signature whose parse failed (so the error is logged once per change)
        self._failed: dict[Path, tuple[int, int, int]] = {}
        #: object -> files defining it (the last one in path order wins, as kubectl apply of
        #: the sorted files would leave it)
        self._defined_in: dict[ObjKey, tuple[Path, ...]] = {}
        #: object -> fingerprint of what the core was last given
        self._delivered: dict[ObjKey, bytes] = {}
        self._initial = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        raw = self.config.get("manifests")
        if not raw:
            raise ManifestSourceError("the manifests source needs --manifests DIR")
        directory = Path(str(raw))
        if not directory.is_dir():
            raise ManifestSourceError(
                f"--manifests {str(directory)!r}: no such directory")
        self._directory = directory
        self._stop.clear()
        # The first scan happens here so that state is in place when start() returns.
        self.scan()
        self._thread = threading.Thread(target=self._run, name="manifests-source", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def connected(self) -> bool:
        return self._directory is not None and self._directory.is_dir()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.scan()
            except Exception:  # a bad scan must not end the polling thread
                log.exception("manifests: scan of %s failed", self._directory)

    def scan(self, force: bool = False) -> bool:
        """Re-read changed files and deliver what changed. True if anything was delivered.

        The first scan delivers every kind with ``replace()``. Later scans re-read only the
        files whose (mtime, size, inode) changed and deliver each object that was added,
        modified or removed with ``upsert()`` / ``delete()``, so one edited object reaches
        the core as one change however large the directory is. ``force`` re-reads every
        file and upserts every object again.
        """
        assert self._directory is not None, "start() first"
        with self._lock:
            return self._scan(force)

    def _scan(self, force: bool) -> bool:
        assert self._directory is not None
        try:
            paths = manifest_files(self._directory)
        except OSError as exc:
            log.error("manifests: cannot list %s: %s", self._directory, exc)
            return False
        present = set(paths)
        self._failed = {p: sig for p, sig in self._failed.items() if p in present}
        # A file that never parsed changes nothing, so only known files count as removals.
        affected: set[ObjKey] = set()
        for path in [p for p in self._files if p not in present]:
            affected.update(self._forget(path))
        #: the content of every file read in this scan (dropped when the scan ends)
        parsed: dict[Path, dict[ObjKey, JSONObj]] = {}
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue  # removed between listing and stat: gone next scan
            # Taken before reading: a write during the read shows as a change next scan.
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            known = self._files.get(path)
            if not force and (
                    (known is not None and known.signature == signature)
                    or self._failed.get(path) == signature):
                continue
            try:
                objects = index_objects(path, load_file(path))
            except ManifestError as exc:
                if self._failed.get(path) != signature:
                    log.error("manifests: %s (keeping the previous content of this file)", exc)
                self._failed[path] = signature
                continue
            self._failed.pop(path, None)
            parsed[path] = objects
            affected.update(self._forget(path))
            self._files[path] = _File(signature, {key: digest(obj)
                                                  for key, obj in objects.items()})
            for key in objects:
                files = self._defined_in.get(key, ())
                self._defined_in[key] = files = (*files, path)
                if len(files) == 2:
                    log.warning("manifests: %s %s/%s is defined in several files; the one "
                                "in the last path wins", *key)
            affected.update(objects)
        if self._initial:
            self._initial = False
            self._replace_all(parsed)
            return True
        if force:
            affected.update(self._defined_in)
            self._delivered = {k: v for k, v in self._delivered.items()
                               if k not in affected}
        return self._deliver_changes(affected, parsed)

    def _forget(self, path: Path) -> list[ObjKey]:
        """Drop what ``path`` defined; returns those keys."""
        old = self._files.pop(path, None)
        if old is None:
            return []
        for key in old.digests:
            files = tuple(f for f in self._defined_in.get(key, ()) if f != path)
            if files:
                self._defined_in[key] = files
            else:
                self._defined_in.pop(key, None)
        return list(old.digests)

    def _winner(self, key: ObjKey) -> Path | None:
        files = self._defined_in.get(key)
        return max(files) if files else None

    def _wanted(self, key: ObjKey, obj: Mapping[str, Any]) -> bool:
        kind = key[0]
        if not selected(kind, obj):
            return False
        return kind != "Node" or key[2] == self.node_name

    def _content(self, key: ObjKey, path: Path,
                 parsed: dict[Path, dict[ObjKey, JSONObj]]) -> JSONObj | None:
        """The object ``key`` as defined in ``path``, reading the file again if this scan
        did not (a later duplicate went away and an earlier definition wins again). None
        if the file no longer parses: what the core has from it stays."""
        objects = parsed.get(path)
        if objects is None:
            try:
                objects = index_objects(path, load_file(path))
            except ManifestError:
                return None  # logged (once) by the scan that saw the broken version
            parsed[path] = objects
        return objects.get(key)

    def _replace_all(self, parsed: dict[Path, dict[ObjKey, JSONObj]]) -> None:
        by_kind: dict[str, list[JSONObj]] = {kind: [] for kind in KINDS}
        delivered: dict[ObjKey, bytes] = {}
        for key in sorted(self._defined_in):
            path = self._winner(key)
            if path is None:
                continue
            obj = self._content(key, path, parsed)
            if obj is not None and self._wanted(key, obj):
                by_kind[key[0]].append(obj)
                delivered[key] = self._files[path].digests[key]
        self._delivered = delivered
        for kind in KINDS:
            items = by_kind.pop(kind)
            self.events.replace(kind, items)
            del items

    def _deliver_changes(self, affected: set[ObjKey],
                         parsed: dict[Path, dict[ObjKey, JSONObj]]) -> bool:
        upserts: list[tuple[ObjKey, JSONObj]] = []
        deletes: list[ObjKey] = []
        for key in affected:
            path = self._winner(key)
            obj = None
            if path is not None:
                obj = self._content(key, path, parsed)
                if obj is None:
                    continue  # unreadable now: leave the core's copy alone
            if path is not None and obj is not None and self._wanted(key, obj):
                fingerprint = self._files[path].digests[key]
                if self._delivered.get(key) != fingerprint:
                    self._delivered[key] = fingerprint
                    upserts.append((key, obj))
            elif self._delivered.pop(key, None) is not None:
                deletes.append(key)
        order = {kind: i for i, kind in enumerate(KINDS)}
        for key, obj in sorted(upserts, key=lambda item: (order[item[0][0]], item[0])):
            self.events.upsert(key[0], obj)
        for key in sorted(deletes, key=lambda k: (order[k[0]], k)):
            kind, namespace, name = key
            meta = {"name": name, "namespace": namespace} if namespace else {"name": name}
            self.events.delete(kind, {"apiVersion": _API_VERSIONS[kind], "kind": kind,
                                      "metadata": meta})
        return bool(upserts or deletes)
