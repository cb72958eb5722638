"""The typed interfaces on the hot path: proxy modes (backends), load-balancing algorithms and
state sources.

pluggy is for discovery, options, registration, observation and cleanup; once a mode is chosen
the core talks to exactly one `Backend` object through plain method calls, so the sync loop
has no hook dispatch and mypy checks every call.

A complete mode, as a sketch (see ``docs/writing-a-plugin.md`` for a working template)::

    class EchoBackend(Backend):
        name = "echo"

        def sync(self, request: SyncRequest) -> SyncResult:
            for key in request.changed:
                port = request.view.services.get(key)   # None: the port is gone
                ...render `port` into the dataplane...
            return SyncResult(objects_written=len(request.changed))

    @hookimpl
    def kproxy_register_modes(register: ModeRegistry) -> None:
        register.add(ModeSpec("echo", lambda: EchoBackend, help="prints what it would program"))
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs

from kproxy_core.model import Endpoint, NodeView, ResolvedServicePort, ServicePortKey

if TYPE_CHECKING:
    from kproxy_core.metrics import Metrics
    from kproxy_core.plugins import KproxyPluginManager


class BackendUnavailable(RuntimeError):
    """This host cannot run the mode (missing kernel module, binary, capability...).

    The message is shown to the operator as is: name what is missing and how to get it.
    """


class SyncError(RuntimeError):
    """A sync failed; the core retries with backoff and asks for a full sync next time."""


class ConfigView(Protocol):
    """Read access to the effective configuration (flags merged over the config file)."""

    def get(self, path: str) -> Any:
        """The parsed value of an option by its config path, e.g. ``"ipvs.scheduler"``.
        Raises KeyError for a path no installed plugin declares."""
        ...


def config_value(config: ConfigView, path: str, default: Any) -> Any:
    """``config.get(path)``, or ``default`` when the path is not declared (a mode run against
    a small test config) or unset."""
    try:
        value = config.get(path)
    except (KeyError, LookupError, AttributeError):
        return default
    return default if value is None else value


def as_list(value: object) -> list[str]:
    """A list of strings from a config value: a tuple/list, or a comma-separated string."""
    if not value:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, Sequence):
        return [str(v).strip() for v in value if str(v).strip()]
    raise ValueError(f"expected a list of strings, got {value!r}")


@attrs.frozen
class SyncRequest:
    """What a backend is asked to program.

    ``view`` is the complete node-local state. ``changed`` holds every key added, removed or
    modified since this backend's last *successful* sync (the core keeps accumulating across
    failures). With ``full`` set the backend must rewrite everything it owns and remove what
    is not in ``view``: the first sync, after a failure, on request, and periodically (every
    sync period when the backend's ``periodic_full_sync`` says so, else hourly).
    """

    view: NodeView
    changed: frozenset[ServicePortKey]
    full: bool
    #: Per changed key, the previous value (None if it was added): lets a backend delete
    #: exactly what it created without reading kernel state back.
    previous: Mapping[ServicePortKey, ResolvedServicePort | None] = attrs.field(factory=dict)


@attrs.frozen
class SyncResult:
    """Numbers a backend reports about one sync (logged, shown by metrics and ``explain``)."""

    #: Kernel objects written or deleted (rules, virtual servers, set entries, listeners...).
    objects_written: int = 0
    #: Free-form counters, e.g. ``{"nat_rules": 1234}``; exported as gauges by the core.
    counters: Mapping[str, int] = attrs.field(factory=dict)
    #: Seconds spent in external commands (iptables-restore, nft...), for the "Python side" ratio.
    external_seconds: float = 0.0


@attrs.frozen
class BackendContext:
    """Everything the core hands a backend at construction."""

    config: ConfigView
    node_name: str
    logger: logging.Logger
    #: The plugin manager, for the load-balancer registry and observation hooks.
    plugins: KproxyPluginManager
    #: IP families this node proxies (from the node's addresses / cluster CIDRs).
    families: tuple[int, ...] = (4, 6)
    #: The process's metrics (`kproxy_core.metrics.Metrics`): upstream's mode-specific
    #: metrics live there, and ``metrics.registry`` is a prometheus-client registry a mode can
    #: register its own collectors in (served on /metrics). None when not serving metrics.
    metrics: Metrics | None = None
    #: Ask the core for a sync soon, from any thread (a backend's own monitor found the
    #: dataplane damaged). Whether it is full is the backend's answer to ``needs_full_sync``.
    #: None when the backend runs outside the core's sync loop (tests, embedders' own loops).
    request_sync: Callable[[], None] | None = None


class Backend(abc.ABC):
    """One proxy mode's dataplane. Instantiated once per process by the core.

    Contract: ``sync`` is called from one thread only; it must leave the dataplane either as
    requested or raise `SyncError` (the core then retries with ``full=True``). Rules stay in
    place when the process exits: ``close`` stops threads and sockets, it never removes rules
    (``--cleanup`` does that through the ``kproxy_cleanup`` hook).
    """

    #: The ``--proxy-mode`` value.
    name: ClassVar[str]
    #: Whether the core should delete stale UDP conntrack entries after syncs. Kernel NAT modes
    #: need it; a userspace proxy terminates connections itself and does not.
    needs_conntrack_cleanup: ClassVar[bool] = True
    #: Linux capabilities the mode needs (checked at start-up with one clear message).
    required_capabilities: ClassVar[tuple[str, ...]] = ("CAP_NET_ADMIN",)
    #: Whether the periodic sync (every sync period with no change) is a full one. True
    #: reconciles everything every period, as upstream's IPVS proxier does; a mode whose
    #: partial sync is cheap and repairs what matters (upstream's iptables and nftables
    #: proxiers) sets False: its periodic syncs are then partial and a full sync runs only
    #: when needed (start-up, failure, node change, `needs_full_sync`) or once the last one
    #: is older than `kproxy_core.agent.FULL_SYNC_PERIOD` (1 h, as upstream).
    periodic_full_sync: ClassVar[bool] = True
    #: Config paths of (sync period, min sync period) that drive this mode's sync loop, as
    #: upstream where each mode has its own section (``ipvs.syncPeriod``...).
    sync_period_options: ClassVar[tuple[str, str]] = (
        "iptables.syncPeriod",
        "iptables.minSyncPeriod",
    )

    def __init__(self, context: BackendContext) -> None:
        self.context = context

    @classmethod
    def check_supported(cls, context: BackendContext) -> None:
        """Raise `BackendUnavailable` if this host cannot run the mode (before ``__init__``)."""
        return None

    @abc.abstractmethod
    def sync(self, request: SyncRequest) -> SyncResult:
        """Program the dataplane for ``request`` (see `SyncRequest`)."""

    def needs_full_sync(self) -> bool:
        """True if someone else disturbed the dataplane (e.g. the canary chain vanished)."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work; keep programmed state."""

    def describe(self, key: ServicePortKey) -> Mapping[str, Any]:
        """What this backend programmed for ``key`` right now, read from the kernel, for
        ``kproxy explain``. The default says nothing."""
        return {}

    def trace(
        self, *, source_ip: str, protocol: str, dest_ip: str, dest_port: int,
        local_source: bool = False,
    ) -> Mapping[str, Any] | None:
        """Where the first packet of a hypothetical connection would go, evaluated against the
        live kernel state (read-only), for ``kproxy explain --from``: a mapping with at least
        ``verdict`` (ACCEPT/DROP/REJECT), ``endpoints`` (list of "ip:port") and
        ``masquerade`` (bool). None if the mode cannot tell."""
        return None

    def audit(self, view: NodeView) -> list[str]:
        """Differences between ``view`` (what was last synced) and the kernel: stale or
        missing objects, one line each, for ``kproxy explain --all``. Read-only."""
        return []


@attrs.frozen
class ModeSpec:
    """A registered proxy mode. ``load`` imports the backend class lazily, so that listing and
    ``--help`` never import native libraries (python-iptables, pyroute2)."""

    name: str
    load: Callable[[], type[Backend]]
    help: str = ""
    #: Distribution that registered it (filled in by the registry for ``kproxy plugins``).
    distribution: str = ""


# --------------------------------------------------------------------------------------------
# Load-balancing algorithms (used by userspace; IPVS maps them to kernel schedulers)
# --------------------------------------------------------------------------------------------


class Picker(abc.ABC):
    """Chooses endpoints for new connections of one service port."""

    @abc.abstractmethod
    def pick(self, client_ip: str, exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
        """The endpoint for a new connection from ``client_ip``; ``exclude`` lists endpoints
        that already failed for this connection. None when nothing is left."""

    def connection_opened(self, endpoint: Endpoint) -> None:  # noqa: B027 - optional hook
        """A connection to ``endpoint`` was established."""

    def connection_closed(self, endpoint: Endpoint) -> None:  # noqa: B027 - optional hook
        """A connection to ``endpoint`` ended."""


@attrs.frozen
class AlgorithmSpec:
    """A registered load-balancing algorithm.

    ``create(endpoints)`` builds a `Picker` for one service port's endpoint set; it is called
    again whenever the set changes. ``ipvs_scheduler`` names the equivalent IPVS scheduler
    (``"rr"``, ``"lc"``...) or None if the kernel has none.
    """

    name: str
    create: Callable[[Sequence[Endpoint]], Picker]
    help: str = ""
    ipvs_scheduler: str | None = None
    distribution: str = ""


# --------------------------------------------------------------------------------------------
# Sources of API state
# --------------------------------------------------------------------------------------------


class SourceEvents(Protocol):
    """Where a source delivers raw API objects (JSON-shaped mappings). The core parses and
    validates them; a source does no interpretation."""

    def replace(self, kind: str, objects: Sequence[Mapping[str, Any]]) -> None:
        """The complete current list of ``kind`` (initial list or relist)."""
        ...

    def upsert(self, kind: str, obj: Mapping[str, Any]) -> None:
        """An object of ``kind`` was added or modified."""
        ...

    def delete(self, kind: str, obj: Mapping[str, Any]) -> None:
        """An object of ``kind`` was deleted."""
        ...


class Source(abc.ABC):
    """Feeds Services, EndpointSlices and this Node into the core.

    ``kind`` values are ``"Service"``, ``"EndpointSlice"`` and ``"Node"``
    (`kproxy_core.model.ObjectKind` values).
    """

    name: ClassVar[str]

    def __init__(self, config: ConfigView, node_name: str, events: SourceEvents) -> None:
        self.config = config
        self.node_name = node_name
        self.events = events

    @abc.abstractmethod
    def start(self) -> None:
        """Start delivering (in background threads); return at once."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop delivering and join threads."""

    def connected(self) -> bool:
        """Whether the source currently has a live connection (for logs and /healthz)."""
        return True


@attrs.frozen
class SourceSpec:
    name: str
    load: Callable[[], type[Source]]
    help: str = ""
    distribution: str = ""
