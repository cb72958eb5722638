"""A small, faithful Kubernetes API server for Services, EndpointSlices and Nodes.

It speaks the list/watch protocol the way kube-apiserver does, so the official client and
kproxy's `KubeSource` can be tested against it without a cluster:

* one global, monotonically increasing ``resourceVersion`` (like etcd's revision) stamped on
  every write, with ``uid`` and ``creationTimestamp``;
* ``?watch=1`` streams JSON lines over chunked HTTP, starting after ``resourceVersion``; a
  version older than the bounded history gets HTTP 200 and an ``ERROR`` event carrying a
  ``Status`` with code 410 ``Expired``, as the real server does;
* ``allowWatchBookmarks``, ``timeoutSeconds``, ``labelSelector`` and ``fieldSelector`` (an
  object that stops matching a watch's selector is sent as ``DELETED``);
* POST/PUT/DELETE so end-to-end tests and demos can drive it over plain HTTP.

Test controls (thread-safe): `ApiServer.create`, `update`, `apply`, `delete`, `compact`,
`set_fault`, `drop_watches`. Run standalone with
``python -m kproxy_core.testing.apiserver --port 6443 --manifests examples/manifests``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import logging
import os
import queue
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import yaml

log = logging.getLogger(__name__)

JSONObj = dict[str, Any]


@attrs.frozen
class ResourceType:
    kind: str
    plural: str
    api_version: str
    namespaced: bool
    #: Fields a fieldSelector may use besides metadata.name/metadata.namespace.
    extra_fields: tuple[str, ...] = ()

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"


RESOURCES: dict[str, ResourceType] = {
    "Service": ResourceType("Service", "services", "v1", True, ("spec.clusterIP", "spec.type")),
    "EndpointSlice": ResourceType(
        "EndpointSlice", "endpointslices", "discovery.k8s.io/v1", True, ("addressType",)
    ),
    "Node": ResourceType("Node", "nodes", "v1", False, ("spec.unschedulable",)),
}


class ApiError(Exception):
    """An API failure, rendered as a ``Status`` object with an HTTP code."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message

    def status(self) -> JSONObj:
        return status_object(self.code, self.reason, self.message)


def status_object(code: int, reason: str, message: str) -> JSONObj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


# --------------------------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------------------------

_LABEL_KEY = r"[A-Za-z0-9](?:[-A-Za-z0-9_./]*[A-Za-z0-9])?"
_SET_RE = re.compile(rf"^\s*({_LABEL_KEY})\s+(in|notin)\s+\((.*)\)\s*$")
_CMP_RE = re.compile(rf"^\s*({_LABEL_KEY})\s*(==|=|!=)\s*([-A-Za-z0-9_.]*)\s*$")
_EXISTS_RE = re.compile(rf"^\s*(!?)\s*({_LABEL_KEY})\s*$")

LabelPredicate = Callable[[Mapping[str, str]], bool]


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses (``a in (x,y),b`` has two requirements)."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _label_requirement(text: str) -> LabelPredicate:
    if m := _SET_RE.match(text):
        key, op = m.group(1), m.group(2)
        values = frozenset(v.strip() for v in m.group(3).split(","))
        if op == "in":
            return lambda labels: key in labels and labels[key] in values
        return lambda labels: labels.get(key) not in values
    if m := _CMP_RE.match(text):
        key, op, value = m.group(1), m.group(2), m.group(3)
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: key in labels and labels[key] == value
    if m := _EXISTS_RE.match(text):
        negate, key = m.group(1) == "!", m.group(2)
        if negate:
            return lambda labels: key not in labels
        return lambda labels: key in labels
    raise ApiError(400, "BadRequest", f"unable to parse requirement: {text.strip()!r}")


def parse_label_selector(selector: str) -> LabelPredicate:
    """A predicate over a label map for a Kubernetes label selector string.

    Supports ``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``;
    raises `ApiError` 400 for anything else, as the apiserver does.
    """
    if not selector.strip():
        return lambda labels: True
    requirements = [_label_requirement(part) for part in _split_top_level(selector)]
    return lambda labels: all(req(labels) for req in requirements)


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_field_selector(
    selector: str, resource: ResourceType
) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate over an object for a fieldSelector (``path=v``, ``path==v``, ``path!=v``).

    Only the fields the apiserver supports for the resource are accepted.
    """
    if not selector.strip():
        return lambda obj: True
    allowed = {"metadata.name", "metadata.namespace", *resource.extra_fields}
    terms: list[tuple[str, bool, str]] = []
    for part in selector.split(","):
        m = re.match(r"^\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {part.strip()!r}")
        field, op, value = m.group(1), m.group(2), m.group(3)
        if field not in allowed:
            raise ApiError(
                400, "BadRequest", f'field label not supported: "{field}" for {resource.kind}'
            )
        terms.append((field, op == "!=", value))

    def matches(obj: Mapping[str, Any]) -> bool:
        return all(
            (_field_value(obj, f) != v) if neg else (_field_value(obj, f) == v)
            for f, neg, v in terms
        )

    return matches


@attrs.frozen
class Selector:
    labels: LabelPredicate
    fields: Callable[[Mapping[str, Any]], bool]
    namespace: str | None = None

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels(meta.get("labels") or {}) and self.fields(obj)


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------


@attrs.frozen
class WatchEvent:
    rv: int
    kind: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: JSONObj
    prev: JSONObj | None


@attrs.define
class Faults:
    """Failure injection. ``refuse``: the port is closed (connection refused);
    ``http_500``: every API request answers 500; ``delay``: seconds slept before each list
    response and before each watch event."""

    refuse: bool = False
    http_500: bool = False
    delay: float = 0.0


class _Watch:
    """One open watch stream, fed by the store under its lock."""

    def __init__(self, kind: str, selector: Selector, conn: socket.socket) -> None:
        self.kind = kind
        self.selector = selector
        self.conn = conn
        self.queue: queue.SimpleQueue[WatchEvent | None] = queue.SimpleQueue()
        self.dropped = False

    def drop(self) -> None:
        self.dropped = True
        self.queue.put(None)
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(resource: ResourceType, obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ApiError(422, "Invalid", f"{resource.kind}: metadata.name: Required value")
    return (meta.get("namespace", "") if resource.namespaced else "", name)


class ApiServer:
    """The fake apiserver. ``start()`` returns the base URL (``http://127.0.0.1:PORT``).

    ``history`` bounds how many events are kept for watches to resume from; a watch or a list
    with an older ``resourceVersion`` gets 410 Expired. ``bookmark_interval`` is how often a
    watch with ``allowWatchBookmarks=true`` gets a BOOKMARK (the real server: about a minute).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        history: int = 1000,
        bookmark_interval: float = 1.0,
    ) -> None:
        self.host = host
        self.port = port
        self.bookmark_interval = bookmark_interval
        self._lock = threading.Lock()
        self._rv = 1
        self._objects: dict[str, dict[tuple[str, str], JSONObj]] = {k: {} for k in RESOURCES}
        self._history: deque[WatchEvent] = deque(maxlen=history)
        #: Watches may start at any RV >= this one.
        self._oldest_rv = 1
        self._watches: set[_Watch] = set()
        self._faults = Faults()
        self._http: ThreadingHTTPServer | None = None
        self._netns_fd: int | None = None
        self._thread: threading.Thread | None = None
        #: Recent requests as (method, path, query); for tests that check what a client asked.
        self.requests: deque[tuple[str, str, dict[str, str]]] = deque(maxlen=10000)

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        with self._lock:
            refusing = self._faults.refuse
        if not refusing:
            self._listen()
        elif self.port == 0:
            # Refusing from the start still needs a fixed port for the client to retry.
            with socket.socket() as probe:
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
        return self.url

    def _listen(self) -> None:
        if self._http is not None:
            return
        if self._netns_fd is None:
            # Remember the network namespace of the first bind, so that listening again after
            # set_fault(refuse=False) happens there even when called from another thread.
            try:
                self._netns_fd = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass
        elif os.fstat(self._netns_fd).st_ino != os.stat(_THREAD_NETNS).st_ino:
            _in_netns_thread(self._netns_fd, self._bind)
            return
        self._bind()

    def _bind(self) -> None:
        server = _HTTPServer((self.host, self.port), _Handler)
        server.api = self
        self.port = server.server_address[1]
        self._http = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"apiserver:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def _close_listener(self) -> None:
        server, thread = self._http, self._thread
        self._http = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    def stop(self) -> None:
        self._close_listener()
        self.drop_watches()
        if self._netns_fd is not None:
            os.close(self._netns_fd)
            self._netns_fd = None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: str | Path) -> Path:
        """Write a kubeconfig pointing at this server (no credentials, plain HTTP)."""
        path = Path(path)
        data = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        # Written aside and renamed: a reader polling for the file never sees half of it.
        partial = path.with_name(path.name + ".partial")
        partial.write_text(yaml.safe_dump(data))
        partial.replace(path)
        return path

    # ---- faults ----------------------------------------------------------------------------

    def set_fault(
        self,
        *,
        refuse: bool | None = None,
        http_500: bool | None = None,
        delay: float | None = None,
    ) -> None:
        """Change the injected faults; arguments left as None keep their current value.

        ``refuse=True`` closes the listening socket (and every watch); ``refuse=False``
        listens again on the same port.
        """
        with self._lock:
            if http_500 is not None:
                self._faults.http_500 = http_500
            if delay is not None:
                self._faults.delay = delay
            if refuse is not None:
                self._faults.refuse = refuse
        if refuse is True:
            self._close_listener()
            self.drop_watches()
        elif refuse is False and self.port:
            self._listen()

    @property
    def faults(self) -> Faults:
        with self._lock:
            return attrs.evolve(self._faults)

    def drop_watches(self) -> None:
        """Cut every open watch stream now (the client sees a broken connection)."""
        with self._lock:
            watches = list(self._watches)
            self._watches.clear()
        for watch in watches:
            watch.drop()

    def watch_count(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(1 for w in self._watches if kind is None or w.kind == kind)

    # ---- store -----------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def _resource(self, kind: str) -> ResourceType:
        try:
            return RESOURCES[kind]
        except KeyError:
            raise ValueError(
                f"unsupported kind {kind!r}; expected one of {sorted(RESOURCES)}"
            ) from None

    def _normalize(self, resource: ResourceType, obj: Mapping[str, Any]) -> JSONObj:
        if not isinstance(obj, Mapping):
            raise ApiError(400, "BadRequest", f"{resource.kind} must be a JSON object")
        new = copy.deepcopy(dict(obj))
        if new.get("kind", resource.kind) != resource.kind:
            raise ApiError(400, "BadRequest", f"kind {new['kind']!r} sent to {resource.plural}")
        new["kind"] = resource.kind
        new["apiVersion"] = resource.api_version
        meta = new.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if resource.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        return new

    def _record(self, kind: str, type_: str, obj: JSONObj, prev: JSONObj | None) -> None:
        """Append an event and feed watches. Caller holds the lock and has bumped _rv."""
        event = WatchEvent(self._rv, kind, type_, obj, prev)
        if len(self._history) == self._history.maxlen:
            self._oldest_rv = self._history[0].rv
        self._history.append(event)
        for watch in self._watches:
            if watch.kind == kind:
                watch.queue.put(event)

    def create(self, kind: str, obj: Mapping[str, Any]) -> JSONObj:
        """Add an object; returns the stored copy. Raises `ApiError` 409 if it exists."""
        resource = self._resource(kind)
        new = self._normalize(resource, obj)
        key = _key(resource, new)
        with self._lock:
            if key in self._objects[kind]:
                raise ApiError(409, "AlreadyExists", f'{resource.plural} "{key[1]}" already exists')
            self._rv += 1
            meta = new["metadata"]
            meta["resourceVersion"] = str(self._rv)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            self._objects[kind][key] = new
            self._record(kind, "ADDED", new, None)
            return copy.deepcopy(new)

    def update(self, kind: str, obj: Mapping[str, Any], *, check_version: bool = False) -> JSONObj:
        """Replace an object. With ``check_version`` a stale ``metadata.resourceVersion`` is a
        409 Conflict (optimistic concurrency, as for PUT)."""
        resource = self._resource(kind)
        new = self._normalize(resource, obj)
        key = _key(resource, new)
        with self._lock:
            old = self._objects[kind].get(key)
            if old is None:
                raise ApiError(404, "NotFound", f'{resource.plural} "{key[1]}" not found')
            sent_rv = new["metadata"].get("resourceVersion")
            if check_version and sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {resource.plural} "{key[1]}": the object '
                    "has been modified; please apply your changes to the latest version and "
                    "try again",
                )
            self._rv += 1
            meta = new["metadata"]
            meta["resourceVersion"] = str(self._rv)
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            self._objects[kind][key] = new
            self._record(kind, "MODIFIED", new, old)
            return copy.deepcopy(new)

    def apply(self, kind: str, obj: Mapping[str, Any]) -> JSONObj:
        """Create or update."""
        resource = self._resource(kind)
        key = _key(resource, self._normalize(resource, obj))
        with self._lock:
            exists = key in self._objects[kind]
        return self.update(kind, obj) if exists else self.create(kind, obj)

    def delete(self, kind: str, obj: Mapping[str, Any]) -> JSONObj:
        """Delete the object named by ``obj`` (its metadata.namespace/name)."""
        resource = self._resource(kind)
        key = _key(resource, self._normalize(resource, obj))
        with self._lock:
            old = self._objects[kind].pop(key, None)
            if old is None:
                raise ApiError(404, "NotFound", f'{resource.plural} "{key[1]}" not found')
            self._rv += 1
            gone = copy.deepcopy(old)
            # The apiserver reports a deletion at the deletion's revision.
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._record(kind, "DELETED", gone, None)
            return copy.deepcopy(gone)

    def get(self, kind: str, namespace: str, name: str) -> JSONObj | None:
        resource = self._resource(kind)
        with self._lock:
            obj = self._objects[kind].get((namespace if resource.namespaced else "", name))
            return copy.deepcopy(obj) if obj is not None else None

    def compact(self) -> None:
        """Forget the event history: watches from any RV before now get 410 Expired."""
        with self._lock:
            self._history.clear()
            self._oldest_rv = self._rv

    def list_objects(
        self, kind: str, selector: Selector | None = None
    ) -> tuple[int, list[JSONObj]]:
        with self._lock:
            items = [
                copy.deepcopy(o)
                for o in self._objects[kind].values()
                if selector is None or selector.matches(o)
            ]
            return self._rv, items

    # ---- watch plumbing --------------------------------------------------------------------

    def _open_watch(
        self, kind: str, selector: Selector, since: int | None, conn: socket.socket
    ) -> tuple[_Watch, list[JSONObj]]:
        """Register a watch; returns it with the events to replay first (rendered)."""
        watch = _Watch(kind, selector, conn)
        with self._lock:
            if self._faults.refuse or self._http is None:
                # A request accepted just before the port closed must not outlive it.
                raise _Gone()
            if since is None:
                # No RV (or "0"): synthetic ADDED for the current state, then live.
                replay = [
                    {"type": "ADDED", "object": copy.deepcopy(o)}
                    for o in self._objects[kind].values()
                    if selector.matches(o)
                ]
            else:
                if since < self._oldest_rv:
                    raise _Expired(f"too old resource version: {since} ({self._oldest_rv})")
                replay = []
                for event in self._history:
                    if event.kind == kind and event.rv > since:
                        rendered = render_event(event, selector)
                        if rendered is not None:
                            replay.append(rendered)
            self._watches.add(watch)
        return watch, replay

    def _close_watch(self, watch: _Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def _bookmark_rv(self, watch: _Watch) -> int | None:
        """The RV for a bookmark, or None if events are still queued (they must go first)."""
        with self._lock:
            return None if not watch.queue.empty() else self._rv


class _Expired(Exception):
    pass


class _Gone(Exception):
    """The server went down while this request was in flight: cut the connection."""


_THREAD_NETNS = "/proc/thread-self/ns/net"
_CLONE_NEWNET = 0x40000000


def _in_netns_thread(netns_fd: int, func: Callable[[], None]) -> None:
    """Run ``func`` in a helper thread that first joins the network namespace ``netns_fd``
    (setns(2) moves only the calling thread, so the caller stays where it is)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.setns(netns_fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
            func()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="apiserver-bind")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def render_event(event: WatchEvent, selector: Selector) -> JSONObj | None:
    """The event a watcher with ``selector`` sees, or None. An object moving out of the
    selector is DELETED (its previous state at the new RV), one moving in is ADDED."""
    now = selector.matches(event.obj)
    if event.type == "MODIFIED" and event.prev is not None:
        before = selector.matches(event.prev)
        if now and before:
            return {"type": "MODIFIED", "object": copy.deepcopy(event.obj)}
        if now:
            return {"type": "ADDED", "object": copy.deepcopy(event.obj)}
        if before:
            gone = copy.deepcopy(event.prev)
            gone["metadata"]["resourceVersion"] = str(event.rv)
            return {"type": "DELETED", "object": gone}
        return None
    return {"type": event.type, "object": copy.deepcopy(event.obj)} if now else None


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: ApiServer


_PATH_RE = re.compile(
    r"^(?P<prefix>/api/v1|/apis/discovery\.k8s\.io/v1)"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?/?$"
)
_BY_PLURAL = {(r.prefix, r.plural): r for r in RESOURCES.values()}


def _discovery(path: str) -> JSONObj | None:
    if path == "/version":
        return {
            "major": "1",
            "minor": "33",
            "gitVersion": "v1.33.0-kproxy-fake",
            "platform": "linux/amd64",
        }
    if path == "/api":
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        }
    if path == "/apis":
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": "discovery.k8s.io",
                    "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
                    "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"},
                }
            ],
        }
    for prefix, group_version in (
        ("/api/v1", "v1"),
        ("/apis/discovery.k8s.io/v1", "discovery.k8s.io/v1"),
    ):
        if path == prefix:
            return {
                "kind": "APIResourceList",
                "groupVersion": group_version,
                "resources": [
                    {
                        "name": r.plural,
                        "singularName": r.kind.lower(),
                        "namespaced": r.namespaced,
                        "kind": r.kind,
                        "verbs": ["create", "delete", "get", "list", "update", "watch"],
                    }
                    for r in RESOURCES.values()
                    if r.prefix == prefix
                ],
            }
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("apiserver %s: " + format, self.address_string(), *args)

    # ---- responses -------------------------------------------------------------------------

    def _send_json(self, code: int, body: JSONObj) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: ApiError) -> None:
        self._send_json(err.code, err.status())

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"request body is not JSON: {exc}") from exc

    # ---- dispatch --------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        api.requests.append((method, url.path, query))
        try:
            if url.path in ("/healthz", "/readyz", "/livez"):
                data = b"ok"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            faults = api.faults
            if faults.http_500:
                raise ApiError(500, "InternalError", "Internal error occurred: injected fault")
            if method == "GET" and (doc := _discovery(url.path)) is not None:
                self._send_json(200, doc)
                return
            m = _PATH_RE.match(url.path)
            resource = _BY_PLURAL.get((m.group("prefix"), m.group("plural"))) if m else None
            if m is None or resource is None or (m.group("ns") and not resource.namespaced):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            ns, name = m.group("ns"), m.group("name")
            if method == "GET" and name is None:
                self._collection(api, resource, ns, query, faults)
            elif method == "GET":
                obj = api.get(resource.kind, ns or "", name)
                if obj is None:
                    raise ApiError(404, "NotFound", f'{resource.plural} "{name}" not found')
                self._send_json(200, obj)
            elif method == "POST" and name is None:
                self._send_json(201, api.create(resource.kind, self._body_for(resource, ns)))
            elif method == "PUT" and name is not None:
                body = self._body_for(resource, ns, name)
                self._send_json(200, api.update(resource.kind, body, check_version=True))
            elif method == "DELETE" and name is not None:
                meta: JSONObj = {"name": name}
                if ns:
                    meta["namespace"] = ns
                self._send_json(200, api.delete(resource.kind, {"metadata": meta}))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {url.path}")
        except ApiError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            log.debug("apiserver: client went away: %s", exc)
            self.close_connection = True

    def _body_for(self, resource: ResourceType, ns: str | None, name: str | None = None) -> JSONObj:
        body = self._read_body()
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", f"{resource.kind} must be a JSON object")
        meta = body.setdefault("metadata", {})
        if ns:
            if meta.get("namespace", ns) != ns:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the "
                    "namespace sent on the request",
                )
            meta["namespace"] = ns
        if name is not None and meta.get("name", name) != name:
            raise ApiError(
                400, "BadRequest", "the name of the object does not match the name on the URL"
            )
        if name is not None:
            meta["name"] = name
        return body

    def _collection(
        self,
        api: ApiServer,
        resource: ResourceType,
        ns: str | None,
        query: dict[str, str],
        faults: Faults,
    ) -> None:
        selector = Selector(
            parse_label_selector(query.get("labelSelector", "")),
            parse_field_selector(query.get("fieldSelector", ""), resource),
            ns,
        )
        rv_text = query.get("resourceVersion", "")
        if rv_text not in ("", "0") and not rv_text.isdigit():
            raise ApiError(400, "BadRequest", f"invalid resource version: {rv_text!r}")
        since = int(rv_text) if rv_text not in ("", "0") else None
        if query.get("watch") in ("1", "true", "True"):
            self._watch(api, resource, selector, since, query, faults)
            return
        if faults.delay:
            time.sleep(faults.delay)
        current, items = api.list_objects(resource.kind, selector)
        match = query.get("resourceVersionMatch", "")
        if since is not None:
            if match == "Exact" and since != current:
                # Only the newest snapshot is kept, so older exact reads are expired.
                raise ApiError(410, "Expired", f"too old resource version: {since} ({current})")
            if since > current:
                raise ApiError(
                    504, "Timeout", f"Too large resource version: {since}, current: {current}"
                )
        elif match:
            raise ApiError(
                422,
                "Invalid",
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            )
        for item in items:
            # List items carry no kind/apiVersion on the real server either.
            item.pop("kind", None)
            item.pop("apiVersion", None)
        self._send_json(
            200,
            {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(current)},
                "items": items,
            },
        )

    def _watch(
        self,
        api: ApiServer,
        resource: ResourceType,
        selector: Selector,
        since: int | None,
        query: dict[str, str],
        faults: Faults,
    ) -> None:
        timeout_text = query.get("timeoutSeconds", "")
        deadline = time.monotonic() + float(timeout_text) if timeout_text else None
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true", "True")
        try:
            watch, replay = api._open_watch(resource.kind, selector, since, self.connection)
        except _Gone:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        except _Expired as exc:
            self._start_stream()
            self._chunk({"type": "ERROR", "object": status_object(410, "Expired", str(exc))})
            self._end_stream()
            return
        try:
            self._start_stream()
            for event in replay:
                self._emit(event, faults.delay)
            next_bookmark = time.monotonic() + api.bookmark_interval
            while not watch.dropped:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                wait = next_bookmark - now if bookmarks else 1.0
                if deadline is not None:
                    wait = min(wait, deadline - now)
                try:
                    item = watch.queue.get(timeout=max(wait, 0.0))
                except queue.Empty:
                    if bookmarks and time.monotonic() >= next_bookmark:
                        rv = api._bookmark_rv(watch)
                        if rv is not None:
                            self._chunk(
                                {
                                    "type": "BOOKMARK",
                                    "object": {
                                        "kind": resource.kind,
                                        "apiVersion": resource.api_version,
                                        "metadata": {"resourceVersion": str(rv)},
                                    },
                                }
                            )
                        next_bookmark = time.monotonic() + api.bookmark_interval
                    continue
                if item is None:
                    break
                rendered = render_event(item, selector)
                if rendered is not None:
                    self._emit(rendered, api.faults.delay)
            if not watch.dropped:
                self._end_stream()
        finally:
            api._close_watch(watch)
            self.close_connection = True

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _emit(self, event: JSONObj, delay: float) -> None:
        if delay:
            time.sleep(delay)
        self._chunk(event)

    def _chunk(self, event: JSONObj) -> None:
        data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


# --------------------------------------------------------------------------------------------
# Standalone
# --------------------------------------------------------------------------------------------


def load_manifests(api: ApiServer, directory: str | Path) -> int:
    """Create every Service, EndpointSlice and Node found under ``directory``."""
    from kproxy_core.sources.manifests import load_directory

    count = 0
    for kind, objs in load_directory(Path(directory)).items():
        for obj in objs:
            api.apply(kind, obj)
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kproxy_core.testing.apiserver",
        description="Run kproxy's fake Kubernetes API server (Services, EndpointSlices, Nodes).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6443)
    parser.add_argument("--manifests", help="directory of YAML/JSON objects to load at start")
    parser.add_argument("--kubeconfig", help="write a kubeconfig for this server to this path")
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api = ApiServer(host=args.host, port=args.port, bookmark_interval=args.bookmark_interval)
    if args.manifests:
        count = load_manifests(api, args.manifests)
        log.info("loaded %d objects from %s", count, args.manifests)
    url = api.start()
    if args.kubeconfig:
        api.write_kubeconfig(args.kubeconfig)
    log.info("fake apiserver listening on %s", url)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        api.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
