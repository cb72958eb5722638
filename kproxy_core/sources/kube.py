"""State from the Kubernetes API: list then watch Services, EndpointSlices and this Node.

Configuration and transport (kubeconfig, in-cluster service account, TLS, auth) come from the
official client; responses are read raw (``_preload_content=False``) and decoded with
``json``, because the client's generated model objects cost too much memory at 10k Services.

Each kind has a watcher thread doing what client-go's reflector does:

* list (``resourceVersion=0`` first, like the reflector) → ``events.replace``;
* watch from the list's ``resourceVersion`` with bookmarks, tracking the RV of every event
  including BOOKMARKs, so a broken stream resumes where it stopped without a relist;
* on a network error resume the watch with jittered exponential backoff (nothing is deleted
  while disconnected: the last good state stays programmed);
* on 410 Expired relist (a consistent read) and continue;
* every ``configSyncPeriod`` (if > 0) relist from the API server's cache, so state that
  drifted for any reason converges.

Selectors are upstream's (cmd/kube-proxy/app/server.go): Services
``!service.kubernetes.io/service-proxy-name`` with ``spec.clusterIP!=None``; EndpointSlices
``!service.kubernetes.io/headless``; Node ``metadata.name=<node>``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from kproxy_core.backend import ConfigView, Source, SourceEvents

log = logging.getLogger(__name__)

# The config loaders are untyped; these names give them the signatures used here.
_load_kube_config: Callable[..., None] = k8s_config.load_kube_config
_load_incluster_config: Callable[..., None] = k8s_config.load_incluster_config

SERVICE_LABEL_SELECTOR = "!service.kubernetes.io/service-proxy-name"
SERVICE_FIELD_SELECTOR = "spec.clusterIP!=None"
ENDPOINT_SLICE_LABEL_SELECTOR = "!service.kubernetes.io/headless"


class KubeSourceError(RuntimeError):
    """The API client cannot be configured (bad kubeconfig, not in a cluster...)."""


class RateLimiter:
    """Token bucket like client-go's (``qps`` sustained, ``burst`` at once); qps <= 0 means
    no limit. Shared by the watchers so reconnect storms respect ``clientConnection.qps``."""

    def __init__(self, qps: float, burst: int) -> None:
        self.qps = float(qps)
        self.burst = max(1, int(burst))
        self._tokens = float(self.burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for a token; False if ``stop`` was set meanwhile."""
        if self.qps <= 0:
            return not stop.is_set()
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.qps)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return not stop.is_set()
                wait = (1 - self._tokens) / self.qps
            if stop.wait(wait):
                return False


@attrs.frozen
class WatchSpec:
    kind: str
    #: A generated list function of the official client (e.g.
    #: ``CoreV1Api.list_service_for_all_namespaces``).
    call: Callable[..., Any]
    label_selector: str = ""
    field_selector: str = ""


class _Expired(Exception):
    """The watch's resourceVersion is gone from the server's history (410)."""


class _WatchFailed(Exception):
    pass


def _lines(resp: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """Lines of a streaming response as the bytes arrive (not in 64 KiB blocks)."""
    chunks: Iterator[bytes]
    if resp.chunked:
        chunks = resp.stream(None)
    else:
        chunks = iter(lambda: resp.read1(65536), b"")
    pending = b""
    for chunk in chunks:
        pending += chunk
        if b"\n" in pending:
            *complete, pending = pending.split(b"\n")
            yield from complete
    if pending.strip():
        yield pending


class _Watcher:
    """List+watch of one kind in its own thread."""

    def __init__(self, source: KubeSource, spec: WatchSpec) -> None:
        self.source = source
        self.spec = spec
        self.kind = spec.kind
        #: Last resourceVersion seen (list, event or bookmark); "" before the first list.
        self.resource_version = ""
        self.connected = False
        #: Lists done (initial + relists), for tests and logs.
        self.lists = 0
        self.watches = 0
        self._resp: urllib3.BaseHTTPResponse | None = None
        self._resp_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"kube-watch-{spec.kind}",
                                       daemon=True)

    # ---- stop support ----------------------------------------------------------------------

    def _hold(self, resp: urllib3.BaseHTTPResponse | None) -> None:
        with self._resp_lock:
            self._resp = resp
        if resp is not None and self.source._stop.is_set():
            self.interrupt()

    def interrupt(self) -> None:
        """Unblock a read in progress (called from ``stop()``)."""
        with self._resp_lock:
            resp = self._resp
        if resp is not None and isinstance(resp, urllib3.HTTPResponse):
            try:
                resp.shutdown()
            except (OSError, RuntimeError, ValueError):
                # Already finished or released to the pool: nothing is blocked on it.
                pass

    # ---- main loop -------------------------------------------------------------------------

    def _run(self) -> None:
        src = self.source
        stop = src._stop
        need_list = True
        list_rv = "0"  # the reflector's first list is served from the apiserver's cache
        failures = 0
        next_resync = math.inf
        while not stop.is_set():
            try:
                if need_list:
                    self._list(list_rv)
                    need_list = False
                    failures = 0
                    if src.sync_period > 0:
                        next_resync = time.monotonic() + src.sync_period
                self._watch(next_resync)
                if time.monotonic() >= next_resync:
                    log.debug("kube: periodic resync of %s", self.kind)
                    need_list, list_rv = True, "0"
                continue
            except _Expired as exc:
                log.info("kube: %s watch expired (%s); relisting", self.kind, exc)
                need_list, list_rv = True, ""
                continue
            except ApiException as exc:
                if exc.status == 410:
                    need_list, list_rv = True, ""
                    continue
                error = f"HTTP {exc.status} {exc.reason}: {(exc.body or '').strip()[:200]}"
            except (urllib3.exceptions.HTTPError, OSError, ValueError, _WatchFailed) as exc:
                error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                # A failing events callback must not end the watcher: relist to resync.
                log.exception("kube: %s: delivering events failed; relisting", self.kind)
                error = f"{type(exc).__name__}: {exc}"
                need_list, list_rv = True, ""
            finally:
                self._hold(None)
            if stop.is_set():
                break
            self.connected = False
            failures += 1
            delay = src.backoff(failures)
            (log.warning if failures == 1 else log.debug)(
                "kube: %s list/watch failed (%s); retrying in %.1fs (attempt %d)",
                self.kind, error, delay, failures)
            stop.wait(delay)
        self.connected = False

    def _request(self, **params: Any) -> urllib3.BaseHTTPResponse:
        src = self.source
        if not src._limiter.acquire(src._stop):
            raise _WatchFailed("stopping")
        if self.spec.label_selector:
            params["label_selector"] = self.spec.label_selector
        if self.spec.field_selector:
            params["field_selector"] = self.spec.field_selector
        resp: urllib3.BaseHTTPResponse = self.spec.call(
            _preload_content=False, _headers={"Accept": "application/json"}, **params)
        self._hold(resp)
        return resp

    def _list(self, resource_version: str) -> None:
        src = self.source
        params: dict[str, Any] = {"_request_timeout": (src.connect_timeout, src.list_timeout)}
        if resource_version:
            params["resource_version"] = resource_version
        resp = self._request(**params)
        try:
            body = json.loads(resp.read())
        finally:
            self._hold(None)
            resp.release_conn()
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise _WatchFailed(f"{self.kind} list response is not a list object")
        self.connected = True
        self.lists += 1
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion", ""))
        log.debug("kube: listed %d %s at RV %s", len(body["items"]), self.kind,
                  self.resource_version)
        src.events.replace(self.kind, body["items"])

    def _watch(self, resync_at: float) -> None:
        src = self.source
        timeout = src.watch_timeout()
        if resync_at < math.inf:
            timeout = max(1, min(timeout, math.ceil(resync_at - time.monotonic())))
        resp = self._request(
            watch=True, allow_watch_bookmarks=True, resource_version=self.resource_version,
            timeout_seconds=int(timeout),
            _request_timeout=(src.connect_timeout, src.read_timeout))
        self.connected = True
        self.watches += 1
        try:
            for line in _lines(resp):
                if line.strip():
                    self._event(json.loads(line))
        finally:
            resp.close()
            resp.release_conn()

    def _event(self, event: Any) -> None:
        if not isinstance(event, dict):
            raise _WatchFailed(f"watch event is not an object: {event!r:.200}")
        type_ = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise _WatchFailed(f"watch event without object: {event!r:.200}")
        if type_ == "ERROR":
            if obj.get("code") == 410:
                raise _Expired(str(obj.get("message", "410 Gone")))
            raise _WatchFailed(f"watch error {obj.get('code')}: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        events = self.source.events
        if type_ in ("ADDED", "MODIFIED"):
            events.upsert(self.kind, obj)
        elif type_ == "DELETED":
            events.delete(self.kind, obj)
        elif type_ != "BOOKMARK":
            log.warning("kube: ignoring %s watch event of unknown type %r", self.kind, type_)
            return
        if rv:
            self.resource_version = str(rv)


class KubeSource(Source):
    """Services, EndpointSlices and this Node from the API server; see the module docstring.

    The timing attributes may be changed between construction and ``start()`` (tests make
    them short).
    """

    name = "kube"

    def __init__(self, config: ConfigView, node_name: str, events: SourceEvents) -> None:
        super().__init__(config, node_name, events)
        self.connect_timeout = 10.0
        #: Socket read timeout of a list request.
        self.list_timeout = 60.0
        #: Socket read timeout of a watch: longer than the server's bookmark interval (about
        #: a minute), so silence this long means the server or the path to it is dead.
        self.read_timeout = 75.0
        #: Server-side watch duration, randomised like client-go's (5-10 minutes), so that
        #: many nodes do not reconnect at the same moment.
        self.watch_timeout_range = (300.0, 600.0)
        self.backoff_initial = 0.8
        self.backoff_cap = 30.0
        self.sync_period = float(config.get("configSyncPeriod") or 0)
        self._stop = threading.Event()
        self._limiter = RateLimiter(float(config.get("clientConnection.qps") or 0),
                                    int(config.get("clientConnection.burst") or 1))
        self._api: k8s_client.ApiClient | None = None
        self.watchers: dict[str, _Watcher] = {}

    # ---- timing ----------------------------------------------------------------------------

    def backoff(self, failures: int) -> float:
        """Delay before retry number ``failures`` (1-based): doubling, capped, jittered to
        between half and all of the step so that nodes spread out."""
        step = min(self.backoff_cap, self.backoff_initial * 2.0 ** min(failures - 1, 32))
        return step * random.uniform(0.5, 1.0)

    def watch_timeout(self) -> float:
        low, high = self.watch_timeout_range
        return float(random.uniform(low, high))

    # ---- client ----------------------------------------------------------------------------

    def _make_client(self) -> k8s_client.ApiClient:
        kubeconfig = str(self.config.get("clientConnection.kubeconfig") or "")
        master = str(self.config.get("master") or "")
        cfg = k8s_client.Configuration()
        try:
            if kubeconfig:
                _load_kube_config(config_file=kubeconfig, client_configuration=cfg,
                                  persist_config=False)
            elif not master:
                log.info("kube: neither kubeconfig file nor master URL was specified, "
                         "falling back to in-cluster config")
                _load_incluster_config(client_configuration=cfg)
        except Exception as exc:
            what = f"kubeconfig {kubeconfig!r}" if kubeconfig else "in-cluster config"
            raise KubeSourceError(f"cannot load {what}: {exc}") from exc
        if master:
            cfg.host = master.rstrip("/")
        # Retries are this source's job (backoff, resume); urllib3's would hide outages.
        cfg.retries = False
        content_type = str(self.config.get("clientConnection.contentType") or "")
        if content_type and "json" not in content_type:
            log.debug("kube: clientConnection.contentType %r is not supported; using JSON",
                      content_type)
        api = k8s_client.ApiClient(cfg)
        api.user_agent = "kproxy"
        return api

    def specs(self, api: k8s_client.ApiClient) -> list[WatchSpec]:
        core = k8s_client.CoreV1Api(api)
        discovery = k8s_client.DiscoveryV1Api(api)
        specs = [
            WatchSpec("Service", core.list_service_for_all_namespaces,
                      SERVICE_LABEL_SELECTOR, SERVICE_FIELD_SELECTOR),
            WatchSpec("EndpointSlice", discovery.list_endpoint_slice_for_all_namespaces,
                      ENDPOINT_SLICE_LABEL_SELECTOR),
        ]
        if self.node_name:
            specs.append(WatchSpec("Node", core.list_node,
                                   field_selector=f"metadata.name={self.node_name}"))
        return specs

    # ---- Source ----------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._api = self._make_client()
        self.watchers = {spec.kind: _Watcher(self, spec) for spec in self.specs(self._api)}
        for watcher in self.watchers.values():
            watcher.thread.start()

    def stop(self) -> None:
        self._stop.set()
        for watcher in self.watchers.values():
            watcher.interrupt()
        for watcher in self.watchers.values():
            watcher.thread.join(timeout=self.connect_timeout + 5)
            if watcher.thread.is_alive():
                log.warning("kube: %s watcher did not stop in time", watcher.kind)
        if self._api is not None:
            close: Callable[[], None] = self._api.close
            close()
            self._api = None

    def connected(self) -> bool:
        return bool(self.watchers) and all(w.connected for w in self.watchers.values())
