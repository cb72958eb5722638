"""State from a directory of YAML/JSON manifests instead of an API server.

For demos, tests and nodes without API access: every ``*.yaml``, ``*.yml`` and ``*.json``
under ``--manifests`` is read (multi-document YAML, ``List`` kinds flattened) and the Services,
EndpointSlices and this node's Node are delivered with ``replace()``. The directory is polled
for changes; each change re-delivers all three kinds and the core works out what changed.

The same filters as the watch selectors kube-proxy uses are applied (Services labelled
``service.kubernetes.io/service-proxy-name`` or headless, EndpointSlices labelled
``service.kubernetes.io/headless``), so a manifest set means the same thing here as when
loaded into an API server.
"""

from __future__ import annotations

import copy
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
            docs = list(yaml.safe_load_all(text))
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
    obj = copy.deepcopy(obj)
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = obj["metadata"] = {}
    if kind != "Node":
        # As kubectl does for namespace-less manifests.
        meta.setdefault("namespace", "default")
    return obj


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


class ManifestSource(Source):
    """Delivers the objects of a manifest directory; see the module docstring."""

    name = "manifests"

    def __init__(self, config: ConfigView, node_name: str, events: SourceEvents) -> None:
        super().__init__(config, node_name, events)
        #: Seconds between directory scans.
        self.poll_interval = 1.0
        self._directory: Path | None = None
        #: path -> (stat signature, objects last parsed successfully)
        self._files: dict[Path, tuple[tuple[int, int, int], list[JSONObj]]] = {}
        #: path -> signature whose parse failed (so the error is logged once per change)
        self._failed: dict[Path, tuple[int, int, int]] = {}
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
        """Re-read changed files; deliver all kinds if anything changed. True if delivered."""
        assert self._directory is not None, "start() first"
        try:
            paths = manifest_files(self._directory)
        except OSError as exc:
            log.error("manifests: cannot list %s: %s", self._directory, exc)
            return False
        present = set(paths)
        # A file that never parsed changes nothing, so only known files count as removals.
        changed = force or bool(set(self._files) - present)
        self._failed = {p: sig for p, sig in self._failed.items() if p in present}
        current: dict[Path, tuple[tuple[int, int, int], list[JSONObj]]] = {}
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue  # removed between listing and stat: gone next scan
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            known = self._files.get(path)
            if known is not None and known[0] == signature:
                current[path] = known
                continue
            if self._failed.get(path) == signature:
                if known is not None:
                    current[path] = known
                continue
            try:
                objects = load_file(path)
            except ManifestError as exc:
                self._failed[path] = signature
                log.error("manifests: %s (keeping the previous content of this file)", exc)
                if known is not None:
                    current[path] = known
                continue
            self._failed.pop(path, None)
            current[path] = (signature, objects)
            changed = True
        self._files = current
        if not changed:
            return False
        self._deliver()
        return True

    def _deliver(self) -> None:
        objects = [(str(path), obj) for path, (_, objs) in sorted(self._files.items())
                   for obj in objs]
        grouped = group_objects(objects)
        for kind in KINDS:
            items = [o for o in grouped[kind] if selected(kind, o)]
            if kind == "Node":
                items = [o for o in items if o["metadata"].get("name") == self.node_name]
            self.events.replace(kind, items)
