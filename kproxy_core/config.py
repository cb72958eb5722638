"""The effective configuration: upstream kube-proxy's flags and ``KubeProxyConfiguration``
(``kubeproxy.config.k8s.io/v1alpha1``), plus whatever options installed modes declare.

Precedence is defaults < config file (``--config``) < flags given on the command line.
Like upstream's v1alpha1 defaulting, a zero value in the file (``syncPeriod: 0s``, ``qps: 0``,
``masqueradeBit: null``...) means "use the default": kubeadm writes its ConfigMap that way, and
it must parse unchanged. Every problem is one `ConfigError` line naming the field or flag.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import logging
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import yaml

from kproxy_core import featuregates
from kproxy_core.options import (
    BOOLEAN,
    DURATION,
    INTEGER,
    OPTIONAL_INTEGER,
    STRING,
    STRING_LIST,
    Kind,
    Option,
    OptionError,
    OptionRegistry,
    format_duration,
)

log = logging.getLogger(__name__)

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
#: ``mode: ""`` means this, as upstream on Linux.
DEFAULT_MODE = "iptables"
HEALTHZ_PORT = 10256
METRICS_PORT = 10249


class ConfigError(ValueError):
    """One line, starting with ``invalid configuration:``; the CLI prints it and exits 2."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"invalid configuration: {field}: {message}" if field else
                         f"invalid configuration: {message}")


# --------------------------------------------------------------------------------------------
# Kinds the generic options module does not have
# --------------------------------------------------------------------------------------------


def _parse_float(value: object) -> float:
    if isinstance(value, bool):
        raise OptionError(f"expected a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise OptionError(f"expected a number, got {value!r}")


def _parse_cidr_csv(value: object) -> tuple[str, ...]:
    # clusterCIDR is one string in the file ("10.0.0.0/16,fd00::/48"), unlike other lists.
    if value is None:
        return ()
    if not isinstance(value, str):
        raise OptionError(f"expected a comma-separated string of CIDRs, got {value!r}")
    cidrs = tuple(part.strip() for part in value.split(",") if part.strip())
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise OptionError(
                f"{cidr!r} is not a valid CIDR block (e.g. 10.100.0.0/16 or fde4:8dba:82e1::/48)"
            ) from None
    return cidrs


def _parse_feature_gates(value: object) -> dict[str, bool]:
    # Known upstream gates only, as component-base; see kproxy_core.featuregates.
    return featuregates.parse(value)


def _parse_any(value: object) -> Any:
    return value


def _parse_flush_frequency(value: object) -> Any:
    # component-base's TimeOrMetaDuration: an integer of nanoseconds or a duration string.
    if value is None or value == "":
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    DURATION.parse(value)
    return value


FLOAT = Kind("number", _parse_float, lambda v: int(v) if float(v).is_integer() else v)
CIDR_CSV = Kind("comma-separated CIDRs", _parse_cidr_csv, lambda v: ",".join(v))
FEATURE_GATES = Kind("key=bool pairs", _parse_feature_gates, dict)
RAW = Kind("value", _parse_any)
FLUSH_FREQUENCY = Kind("duration", _parse_flush_frequency)


# --------------------------------------------------------------------------------------------
# Checks (upstream pkg/proxy/apis/config/validation)
# --------------------------------------------------------------------------------------------


def _in_range(low: int, high: int) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and not low <= value <= high:
            raise OptionError(f"must be within the range [{low}, {high}], got {value}")

    return check


def _non_negative(value: Any) -> None:
    if value is not None and value < 0:
        raise OptionError(f"must be greater than or equal to 0, got {_show(value)}")


def _positive(value: Any) -> None:
    if value <= 0:
        raise OptionError(f"must be greater than 0, got {_show(value)}")


def _show(value: Any) -> str:
    return format_duration(value) if isinstance(value, float) else str(value)


def _ip(value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise OptionError(
            f"{value!r} is not a valid textual representation of an IP address"
        ) from None


def split_host_port(value: str) -> tuple[str, int]:
    """``"1.2.3.4:80"`` or ``"[::1]:80"`` to (host, port); raises OptionError."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
    if not match:
        raise OptionError(f"must be IP:port, got {value!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    return host, port


def _host_port(value: str) -> None:
    if value == "":
        return  # disabled
    host, port = split_host_port(value)
    _ip(host)
    if not 1 <= port <= 65535:
        raise OptionError(f"must be a valid port (1-65535), got {port}")


_NODE_PORT_KEYWORDS = ("primary", "localhost", "all")


def _node_port_addresses(value: tuple[str, ...]) -> None:
    for item in value:
        if item in _NODE_PORT_KEYWORDS:
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise OptionError(
                f"{item!r} is neither a CIDR nor one of {', '.join(_NODE_PORT_KEYWORDS)}"
            ) from None
        if "/" not in item:
            raise OptionError(f"{item!r} must be a CIDR (e.g. 10.0.0.0/8), not a bare IP")


def _port_range(value: str) -> None:
    if value in ("", "0-0"):
        return
    match = re.fullmatch(r"(\d+)(?:([-+])(\d+))?", value.strip())
    if not match:
        raise OptionError(f"must be a valid port range (e.g. 300-2000), got {value!r}")
    base = int(match.group(1))
    end = base if match.group(2) is None else (
        int(match.group(3)) if match.group(2) == "-" else base + int(match.group(3)))
    if not (0 <= base <= 65535 and base <= end <= 65535):
        raise OptionError(f"must be a valid port range (e.g. 300-2000), got {value!r}")


def _hidden_metrics_version(value: str) -> None:
    if value and not re.fullmatch(r"\d+\.\d+", value):
        raise OptionError(f"must be <major>.<minor> like '1.16', got {value!r}")


def _cluster_cidrs(value: tuple[str, ...]) -> None:
    if len(value) > 2:
        raise OptionError(
            "only one CIDR allowed or a valid DualStack CIDR "
            "(e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)"
        )
    if len(value) == 2:
        families = {ipaddress.ip_network(c, strict=False).version for c in value}
        if families != {4, 6}:
            raise OptionError(
                "must be a valid DualStack CIDR (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)"
            )


# --------------------------------------------------------------------------------------------
# The core options
# --------------------------------------------------------------------------------------------

_IGNORED_WITH_CONFIG = " This parameter is ignored if a config file is specified by --config."
_DURATION_EXAMPLE = "(e.g. '5s', '1m', '2h22m')"

DETECT_LOCAL_MODES = ("", "ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")


def _o(path: str, flag: str | None, kind: Kind, default: Any, help: str, **kw: Any) -> Option:
    return Option(path=path, flag=flag, kind=kind, default=default, help=help, **kw)


CORE_OPTIONS: list[Option] = [
    # -- flag-only (not in the file) ---------------------------------------------------------
    _o("config", "--config", STRING, "", "The path to the configuration file.", in_file=False),
    _o("writeConfigTo", "--write-config-to", STRING, "",
       "If set, write the default configuration values to this file and exit.", in_file=False),
    _o("cleanup", "--cleanup", BOOLEAN, False,
       "If true cleanup iptables and ipvs rules and exit.", in_file=False),
    _o("initOnly", "--init-only", BOOLEAN, False,
       "If true, perform any initialization steps that must be done with full root privileges, "
       "and then exit. After doing this, you can run kube-proxy again with only the "
       "CAP_NET_ADMIN capability.", in_file=False),
    _o("master", "--master", STRING, "",
       "The address of the Kubernetes API server (overrides any value in kubeconfig)",
       in_file=False),
    _o("version", "--version", BOOLEAN, False, "Print version information and quit.",
       in_file=False),
    _o("healthzPort", "--healthz-port", OPTIONAL_INTEGER, None,
       "DEPRECATED: use --healthz-bind-address. The port to bind the health check server. "
       "Use 0 to disable.", in_file=False),
    _o("metricsPort", "--metrics-port", OPTIONAL_INTEGER, None,
       "DEPRECATED: use --metrics-bind-address. The port to bind the metrics server. "
       "Use 0 to disable.", in_file=False),
    # -- KubeProxyConfiguration -------------------------------------------------------------
    _o("featureGates", "--feature-gates", FEATURE_GATES, {},
       "A set of key=value pairs that describe feature gates for alpha/experimental features."
       + _IGNORED_WITH_CONFIG),
    _o("clientConnection.kubeconfig", "--kubeconfig", STRING, "",
       "Path to kubeconfig file with authorization information (the master location can be "
       "overridden by the master flag)."),
    _o("clientConnection.acceptContentTypes", None, STRING, "",
       "Accept header sent by clients to the apiserver."),
    _o("clientConnection.contentType", "--kube-api-content-type", STRING,
       "application/vnd.kubernetes.protobuf", "Content type of requests sent to apiserver."),
    _o("clientConnection.qps", "--kube-api-qps", FLOAT, 5.0,
       "QPS to use while talking with kubernetes apiserver", check=_non_negative),
    _o("clientConnection.burst", "--kube-api-burst", INTEGER, 10,
       "Burst to use while talking with kubernetes apiserver", check=_non_negative),
    _o("logging.format", "--logging-format", STRING, "text",
       "Sets the log format (kproxy: text or json).", choices=("text", "json")),
    _o("logging.verbosity", "--v", INTEGER, 0, "number for the log level verbosity",
       check=_non_negative),
    _o("logging.flushFrequency", None, FLUSH_FREQUENCY, "5s",
       "Maximum time between log flushes (accepted and kept; kproxy flushes every line)."),
    _o("logging.vmodule", None, RAW, None, "Per-file verbosity (accepted and kept)."),
    _o("logging.options", None, RAW, None, "Format options (accepted and kept)."),
    _o("hostnameOverride", "--hostname-override", STRING, "",
       "If non-empty, will be used as the name of the Node that kube-proxy is running on. If "
       "unset, the node name is assumed to be the same as the node's hostname."),
    _o("bindAddress", "--bind-address", STRING, "0.0.0.0",
       "Overrides kube-proxy's idea of what its node's primary IP is. Note that the name is a "
       "historical artifact, and kube-proxy does not actually bind any sockets to this IP."
       + _IGNORED_WITH_CONFIG, check=_ip),
    _o("healthzBindAddress", "--healthz-bind-address", STRING, f"0.0.0.0:{HEALTHZ_PORT}",
       "The IP address and port for the health check server to serve on, defaulting to "
       f"\"0.0.0.0:{HEALTHZ_PORT}\". Set empty to disable.", check=_host_port),
    _o("metricsBindAddress", "--metrics-bind-address", STRING, f"127.0.0.1:{METRICS_PORT}",
       "The IP address and port for the metrics server to serve on, defaulting to "
       f"\"127.0.0.1:{METRICS_PORT}\". (Set to \"0.0.0.0:{METRICS_PORT}\" / "
       f"\"[::]:{METRICS_PORT}\" to bind on all interfaces.) Set empty to disable.",
       check=_host_port),
    _o("bindAddressHardFail", "--bind-address-hard-fail", BOOLEAN, False,
       "If true kube-proxy will treat failure to bind to a port as fatal and exit"),
    _o("enableProfiling", "--profiling", BOOLEAN, False,
       "If true enables profiling via web interface on /debug/pprof handler (accepted; kproxy "
       "has no pprof)." + _IGNORED_WITH_CONFIG),
    _o("showHiddenMetricsForVersion", "--show-hidden-metrics-for-version", STRING, "",
       "The previous version for which you want to show hidden metrics, as <major>.<minor>.",
       check=_hidden_metrics_version),
    _o("mode", "--proxy-mode", STRING, "",
       "Which proxy mode to use (any installed kproxy mode; blank means iptables)."
       + _IGNORED_WITH_CONFIG),
    _o("iptables.masqueradeBit", "--iptables-masquerade-bit", INTEGER, 14,
       "If using the iptables or ipvs proxy mode, the bit of the fwmark space to mark packets "
       "requiring SNAT with.  Must be within the range [0, 31].", check=_in_range(0, 31)),
    _o("iptables.masqueradeAll", "--masquerade-all", BOOLEAN, False,
       "SNAT all traffic sent via Service cluster IPs. This may be required with some CNI "
       "plugins."),
    _o("iptables.localhostNodePorts", "--iptables-localhost-nodeports", BOOLEAN, True,
       "If false, kube-proxy will disable the legacy behavior of allowing NodePort services to "
       "be accessed via localhost. (Applies only to iptables mode and IPv4.)"),
    _o("iptables.snatNodeInternalIP", None, BOOLEAN, False,
       "SNAT service traffic using the node's InternalIP instead of the egress interface "
       "address (accepted; not implemented by kproxy)."),
    _o("iptables.syncPeriod", "--iptables-sync-period", DURATION, 30.0,
       f"An interval {_DURATION_EXAMPLE} indicating how frequently various re-synchronizing "
       "and cleanup operations are performed. Must be greater than 0.", check=_positive),
    _o("iptables.minSyncPeriod", "--iptables-min-sync-period", DURATION, 1.0,
       f"The minimum period between iptables rule resyncs {_DURATION_EXAMPLE}. A value of 0 "
       "means every Service or EndpointSlice change will result in an immediate iptables "
       "resync.", check=_non_negative),
    _o("detectLocalMode", "--detect-local-mode", STRING, "",
       "Mode to use to detect local traffic (ClusterCIDR, NodeCIDR, BridgeInterface or "
       "InterfaceNamePrefix; blank means ClusterCIDR)." + _IGNORED_WITH_CONFIG,
       choices=DETECT_LOCAL_MODES),
    _o("detectLocal.bridgeInterface", "--pod-bridge-interface", STRING, "",
       "A bridge interface name. When --detect-local-mode is set to BridgeInterface, "
       "kube-proxy will consider traffic to be local if it originates from this bridge."),
    _o("detectLocal.interfaceNamePrefix", "--pod-interface-name-prefix", STRING, "",
       "An interface name prefix. When --detect-local-mode is set to InterfaceNamePrefix, "
       "kube-proxy will consider traffic to be local if it originates from any interface "
       "whose name begins with this prefix."),
    _o("clusterCIDR", "--cluster-cidr", CIDR_CSV, (),
       "The CIDR range of the pods in the cluster. (For dual-stack clusters, this can be a "
       "comma-separated dual-stack pair of CIDR ranges.). When --detect-local-mode is set to "
       "ClusterCIDR, kube-proxy will consider traffic to be local if its source IP is in this "
       "range. (Otherwise it is not used.)" + _IGNORED_WITH_CONFIG, check=_cluster_cidrs),
    _o("nodePortAddresses", "--nodeport-addresses", STRING_LIST, (),
       "A list of CIDR ranges that contain valid node IPs, or alternatively, the single string "
       "'primary'. If set to a list of CIDRs, connections to NodePort services will only be "
       "accepted on node IPs in one of the indicated ranges. If unset, NodePort connections "
       "will be accepted on all local IPs." + _IGNORED_WITH_CONFIG,
       check=_node_port_addresses),
    _o("oomScoreAdj", "--oom-score-adj", INTEGER, -999,
       "The oom-score-adj value for kube-proxy process. Values must be within the range "
       "[-1000, 1000]." + _IGNORED_WITH_CONFIG, check=_in_range(-1000, 1000)),
    _o("conntrack.maxPerCore", "--conntrack-max-per-core", INTEGER, 32768,
       "Maximum number of NAT connections to track per CPU core (0 to leave the limit as-is "
       "and ignore conntrack-min).", check=_non_negative),
    _o("conntrack.min", "--conntrack-min", INTEGER, 131072,
       "Minimum number of conntrack entries to allocate, regardless of "
       "conntrack-max-per-core (set conntrack-max-per-core=0 to leave the limit as-is).",
       check=_non_negative),
    _o("conntrack.tcpEstablishedTimeout", "--conntrack-tcp-timeout-established", DURATION,
       86400.0, "Idle timeout for established TCP connections (0 to leave as-is)",
       check=_non_negative),
    _o("conntrack.tcpCloseWaitTimeout", "--conntrack-tcp-timeout-close-wait", DURATION, 3600.0,
       "NAT timeout for TCP connections in the CLOSE_WAIT state", check=_non_negative),
    _o("conntrack.tcpBeLiberal", "--conntrack-tcp-be-liberal", BOOLEAN, False,
       "Enable liberal mode for tracking TCP packets by setting nf_conntrack_tcp_be_liberal "
       "to 1"),
    _o("conntrack.udpTimeout", "--conntrack-udp-timeout", DURATION, 0.0,
       "Idle timeout for UNREPLIED UDP connections (0 to leave as-is)", check=_non_negative),
    _o("conntrack.udpStreamTimeout", "--conntrack-udp-timeout-stream", DURATION, 0.0,
       "Idle timeout for ASSURED UDP connections (0 to leave as-is)", check=_non_negative),
    _o("configSyncPeriod", "--config-sync-period", DURATION, 900.0,
       "How often configuration from the apiserver is refreshed.  Must be greater than 0.",
       check=_positive),
    _o("portRange", None, STRING, "",
       "Previously used to configure the userspace proxy, now unused.", check=_port_range),
    _o("winkernel.networkName", None, STRING, "", "Windows only; accepted and ignored."),
    _o("winkernel.sourceVip", None, STRING, "", "Windows only; accepted and ignored."),
    _o("winkernel.enableDSR", None, BOOLEAN, False, "Windows only; accepted and ignored."),
    _o("winkernel.rootHnsEndpointName", None, STRING, "", "Windows only; accepted and ignored."),
    _o("winkernel.forwardHealthCheckVip", None, BOOLEAN, False,
       "Windows only; accepted and ignored."),
    _o("windowsRunAsService", None, BOOLEAN, False, "Windows only; accepted and ignored."),
    # -- kproxy extensions --------------------------------------------------------------------
    _o("manifests", "--manifests", STRING, "",
       "kproxy: read Services and EndpointSlices from YAML files in this directory (re-read on "
       "change) instead of the Kubernetes API."),
]

#: Extra spellings of flags: upstream's klog short form and kproxy's shorter log flag.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "--v": ("-v",),
    "--logging-format": ("--log-format",),
}

#: Names other code may use for a path (the CLI reads ``v`` and ``logFormat``).
PATH_ALIASES: dict[str, str] = {
    "v": "logging.verbosity",
    "logFormat": "logging.format",
}

#: Fields upstream marshals with ``omitempty`` (or kproxy extensions), left out of the file
#: while they hold their default, so a default ``--write-config-to`` is upstream-readable.
OMIT_WHEN_DEFAULT = frozenset(
    {"featureGates", "windowsRunAsService", "manifests", "logging.vmodule", "logging.options"}
)

#: Fields where upstream's v1alpha1 defaulting replaces a zero value ("", 0, 0s) or null.
_ZERO_MEANS_DEFAULT = frozenset(
    {
        "bindAddress",
        "healthzBindAddress",
        "metricsBindAddress",
        "iptables.syncPeriod",
        "iptables.minSyncPeriod",
        "configSyncPeriod",
        "clientConnection.contentType",
        "clientConnection.qps",
        "clientConnection.burst",
        "logging.format",
        "logging.flushFrequency",
    }
)



def _zero_means_default(path: str) -> bool:
    # Upstream defaults every mode's syncPeriod (ipvs, nftables) when zero, and nftables'
    # minSyncPeriod; ipvs.minSyncPeriod keeps 0.
    return (path in _ZERO_MEANS_DEFAULT or path.endswith(".syncPeriod")
            or path == "nftables.minSyncPeriod")


#: Sections of upstream's file that belong to modes; when no installed plugin declares them
#: they are accepted (field names checked) and written back unchanged.
UPSTREAM_MODE_SECTIONS: dict[str, frozenset[str]] = {
    "ipvs": frozenset(
        {"syncPeriod", "minSyncPeriod", "scheduler", "excludeCIDRs", "strictARP", "tcpTimeout",
         "tcpFinTimeout", "udpTimeout"}
    ),
    "nftables": frozenset({"masqueradeBit", "masqueradeAll", "syncPeriod", "minSyncPeriod"}),
}

#: Fields older upstream releases wrote (old ConfigMaps still carry them): ignored, warned.
RETIRED_FIELDS = frozenset({"udpIdleTimeout", "resourceContainer"})


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


class Config:
    """The effective configuration (implements `kproxy_core.backend.ConfigView`)."""

    def __init__(
        self,
        options: OptionRegistry,
        values: Mapping[str, Any],
        *,
        sources: Mapping[str, str] | None = None,
        passthrough: Mapping[str, Any] | None = None,
        warnings: Sequence[str] = (),
    ) -> None:
        self.options = options
        self._values = dict(values)
        self._sources = dict(sources or {})
        #: Upstream sections no installed plugin declares (e.g. ``ipvs`` without kproxy-ipvs).
        self.passthrough: dict[str, Any] = dict(passthrough or {})
        #: Non-fatal findings while loading (retired fields...), for the CLI to log.
        self.warnings: tuple[str, ...] = tuple(warnings)

    # -- ConfigView ----------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        path = PATH_ALIASES.get(path, path)
        try:
            return self._values[path]
        except KeyError:
            raise KeyError(f"no option {path!r} is declared (is its plugin installed?)") from None

    def source(self, path: str) -> str:
        """Where a value came from: ``"default"``, ``"file"`` or ``"flag"``."""
        path = PATH_ALIASES.get(path, path)
        self.get(path)
        return self._sources.get(path, "default")

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and PATH_ALIASES.get(path, path) in self._values

    def __eq__(self, other: object) -> bool:
        # Flag-only settings (--config, --cleanup...) describe the invocation, not the
        # configuration, so they do not take part.
        if not isinstance(other, Config):
            return NotImplemented
        return self._file_values() == other._file_values() and (
            self.passthrough == other.passthrough)

    def _file_values(self) -> dict[str, Any]:
        return {o.path: self._values[o.path] for o in self.options if o.in_file}

    __hash__ = None  # type: ignore[assignment]

    def values(self) -> dict[str, Any]:
        return dict(self._values)

    # -- the file form -------------------------------------------------------------------------

    def as_file_dict(self) -> dict[str, Any]:
        """A complete ``KubeProxyConfiguration`` (for ``--write-config-to`` and ``/configz``):
        nested like upstream, durations in Go form, keys sorted as upstream marshals them."""
        result: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND}
        for option in self.options:
            if not option.in_file:
                continue
            value = self._values[option.path]
            if option.path in OMIT_WHEN_DEFAULT and value in (option.default, None, {}, ()):
                continue
            _set_nested(result, option.path, _dump(option, value))
        for section, content in self.passthrough.items():
            result.setdefault(section, content)
        ordered: dict[str, Any] = _sorted(result)
        return ordered

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_file_dict(), default_flow_style=False, sort_keys=True)

    # -- typed accessors for what the core reads often ---------------------------------------

    @property
    def mode(self) -> str:
        """The effective proxy mode (blank means iptables)."""
        return str(self._values.get("mode") or "") or DEFAULT_MODE

    @property
    def node_name(self) -> str:
        """``hostnameOverride`` or the host name, lower-cased (upstream's GetHostname)."""
        name = str(self._values.get("hostnameOverride") or "").strip()
        return (name or socket.gethostname()).strip().lower()

    @property
    def bind_address(self) -> str:
        return str(self._values["bindAddress"])

    @property
    def healthz_bind_address(self) -> str:
        """``host:port``; empty when disabled."""
        return str(self._values["healthzBindAddress"])

    @property
    def metrics_bind_address(self) -> str:
        """``host:port``; empty when disabled."""
        return str(self._values["metricsBindAddress"])

    @property
    def bind_address_hard_fail(self) -> bool:
        return bool(self._values["bindAddressHardFail"])

    def _mode_setting(self, name: str) -> float:
        # Each mode has its own section upstream (ipvs.syncPeriod...); iptables.* is the
        # fallback for modes without one (userspace writes iptables rules too).
        own = f"{self.mode}.{name}"
        value = self._values.get(own)
        return float(value if value is not None else self._values[f"iptables.{name}"])

    @property
    def sync_period(self) -> float:
        return self._mode_setting("syncPeriod")

    @property
    def min_sync_period(self) -> float:
        return self._mode_setting("minSyncPeriod")

    @property
    def health_timeout(self) -> float:
        """/healthz turns 503 when a queued change waits longer than this (2 x sync period)."""
        return 2 * self.sync_period

    @property
    def config_sync_period(self) -> float:
        return float(self._values["configSyncPeriod"])

    @property
    def masquerade_bit(self) -> int:
        return int(self._values["iptables.masqueradeBit"])

    @property
    def masquerade_all(self) -> bool:
        return bool(self._values["iptables.masqueradeAll"])

    @property
    def cluster_cidrs(self) -> tuple[str, ...]:
        return tuple(self._values["clusterCIDR"])

    @property
    def detect_local_mode(self) -> str:
        """The effective mode (blank means ClusterCIDR, as upstream)."""
        return str(self._values["detectLocalMode"]) or "ClusterCIDR"

    @property
    def node_port_addresses(self) -> tuple[str, ...]:
        return tuple(self._values["nodePortAddresses"])

    @property
    def feature_gates(self) -> dict[str, bool]:
        return dict(self._values["featureGates"])

    @property
    def verbosity(self) -> int:
        return int(self._values["logging.verbosity"])

    @property
    def log_format(self) -> str:
        return str(self._values["logging.format"])

    @property
    def kubeconfig(self) -> str:
        return str(self._values["clientConnection.kubeconfig"])

    @property
    def master(self) -> str:
        return str(self._values["master"])


def _dump(option: Option, value: Any) -> Any:
    if value is None:
        return None
    dumped = option.kind.dump(value)
    # Go marshals an empty (nil) slice as null, as upstream's files show.
    return None if isinstance(dumped, list) and not dumped else dumped


def _set_nested(target: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    return value


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=40, width=100)


def build_parser(options: OptionRegistry, modes: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A parser with one flag per option that has one. Values stay raw strings; only flags
    given on the command line appear in the result (so they can win over the file)."""
    parser = argparse.ArgumentParser(
        prog="kproxy",
        description="kube-proxy rebuilt in Python: same flags and config file, pluggable modes.",
        formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    core = parser.add_argument_group("kube-proxy options")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in sorted(options, key=lambda o: (o.owner or "", o.flag or "")):
        if option.flag is None:
            continue
        if option.owner is None:
            group = core
        else:
            group = groups.get(option.owner) or parser.add_argument_group(
                f"{option.owner} mode options"
            )
            groups[option.owner] = group
        help_text = option.help
        if option.path == "mode" and modes:
            help_text += f" Installed modes: {', '.join(modes)}."
        if option.kind is BOOLEAN:
            default = "true" if option.default else "false"
            group.add_argument(
                option.flag, *FLAG_ALIASES.get(option.flag, ()), dest=option.path, nargs="?",
                const="true", metavar="true|false", help=f"{help_text} (default {default})",
            )
        else:
            group.add_argument(
                option.flag, *FLAG_ALIASES.get(option.flag, ()), dest=option.path,
                metavar=_metavar(option), help=_with_default(option, help_text),
            )
    return parser


def _metavar(option: Option) -> str:
    if option.choices:
        return "{" + ",".join(c for c in option.choices if c) + "}"
    return {"duration": "DURATION", "integer": "INT", "number": "FLOAT", "string list": "LIST",
            "comma-separated CIDRs": "CIDRS", "key=bool pairs": "KEY=BOOL"}.get(
        option.kind.name, option.kind.name.split()[0].upper()
    )


def _with_default(option: Option, text: str) -> str:
    default = option.default
    if default in (None, "", (), {}):
        return text.replace("%", "%%")
    shown = format_duration(default) if option.kind is DURATION else (
        ",".join(default) if isinstance(default, tuple) else default)
    return f"{text} (default {shown})".replace("%", "%%")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    options: OptionRegistry | None = None,
    *,
    modes: Sequence[str] | None = None,
) -> Config:
    """Merge defaults, the ``--config`` file and explicit flags, then validate.

    ``args`` is what `build_parser` returned, or a mapping keyed by config path
    (``"iptables.syncPeriod"``) or flag name with or without dashes (``"proxy-mode"``), whose
    values are raw strings or already-typed values. ``options`` defaults to what the
    installed plugins declare. With ``modes`` the mode must be one of them.
    Raises `ConfigError`.
    """
    if options is None:
        from kproxy_core.plugins import KproxyPluginManager

        options = KproxyPluginManager().options()
    flags = _flag_values(args, options)
    values: dict[str, Any] = {o.path: _copy_default(o.default) for o in options}
    sources: dict[str, str] = {}
    warnings: list[str] = []
    passthrough: dict[str, Any] = {}

    config_file = flags.get("config")
    if config_file:
        path = str(config_file)
        document = read_config_file(path)
        file_values, passthrough, file_warnings = _parse_document(document, options)
        warnings.extend(file_warnings)
        for option_path, raw in file_values.items():
            option = options.get(option_path)
            assert option is not None
            if (option.kind is DURATION and isinstance(raw, int | float)
                    and not isinstance(raw, bool) and raw != 0):
                # Go's decoder rejects a bare number for a duration; so do we (is 30 seconds
                # or nanoseconds?). Python callers may pass numbers as seconds; files may not.
                raise ConfigError(option_path,
                                  f"expected a duration like '30s' or '1m0s', got {raw!r}")
            value = _parse(option, raw, option_path)
            if _zero_means_default(option_path) and value in ("", 0, 0.0):
                continue
            if value is None and option.default is not None:
                continue
            values[option_path] = value
            sources[option_path] = "file"
        for key in ("healthzBindAddress", "metricsBindAddress"):
            values[key] = _append_port_if_needed(
                values[key], HEALTHZ_PORT if key.startswith("healthz") else METRICS_PORT)

    for option_path, raw in flags.items():
        option = options.get(option_path)
        assert option is not None
        values[option_path] = _parse(option, raw, option.flag or option_path)
        sources[option_path] = "flag"

    _apply_flag_fixups(values, flags, config_file is not None and config_file != "")
    warnings.extend(featuregates.notes(values.get("featureGates") or {}))
    _apply_bind_family_defaults(values, sources)
    config = Config(options, values, sources=sources, passthrough=passthrough,
                    warnings=warnings)
    _validate(config, options, modes)
    return config


def _copy_default(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


def _flag_values(
    args: argparse.Namespace | Mapping[str, Any] | None, options: OptionRegistry
) -> dict[str, Any]:
    if args is None:
        return {}
    raw = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    result: dict[str, Any] = {}
    for key, value in raw.items():
        option = options.get(PATH_ALIASES.get(key, key))
        if option is None:
            flag = key if key.startswith("-") else f"--{key}"
            option = options.by_flag(flag)
            if option is None:
                for canonical, aliases in FLAG_ALIASES.items():
                    if flag in aliases:
                        option = options.by_flag(canonical)
        if option is None:
            raise ConfigError(key, _unknown_message(key, [o.path for o in options]))
        result[option.path] = value
    return result


def read_config_file(path: str) -> Mapping[str, Any]:
    """Read a YAML or JSON ``KubeProxyConfiguration`` and check apiVersion and kind."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("--config", f"{path} is not valid YAML or JSON{where}: {problem}"
                          ) from None
    if len(documents) != 1:
        raise ConfigError("--config", f"{path} must hold exactly one document, "
                                      f"found {len(documents)}")
    document = documents[0]
    if not isinstance(document, Mapping):
        raise ConfigError("--config", f"{path} must hold a mapping, got {type(document).__name__}")
    api_version = document.get("apiVersion")
    if api_version != API_VERSION:
        raise ConfigError("apiVersion", f"expected {API_VERSION!r}, got {api_version!r}")
    kind = document.get("kind")
    if kind != KIND:
        raise ConfigError("kind", f"expected {KIND!r}, got {kind!r}")
    return document


def _parse_document(
    document: Mapping[str, Any], options: OptionRegistry
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Flatten the file into {path: raw value}; unknown fields are errors."""
    known = {option.path for option in options if option.in_file}
    sections = {path.split(".")[0] for path in known if "." in path}
    values: dict[str, Any] = {}
    passthrough: dict[str, Any] = {}
    warnings: list[str] = []

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, raw in node.items():
            if not isinstance(key, str):
                raise ConfigError(prefix or "(top level)", f"field names must be strings, "
                                                             f"got {key!r}")
            path = f"{prefix}{key}"
            if not prefix and key in ("apiVersion", "kind"):
                continue
            if path in known:
                values[path] = raw
            elif path in sections or any(p.startswith(path + ".") for p in known):
                if raw is None:
                    continue
                if not isinstance(raw, Mapping):
                    raise ConfigError(path, f"expected a mapping, got {raw!r}")
                walk(raw, path + ".")
            elif not prefix and key in UPSTREAM_MODE_SECTIONS:
                _check_passthrough(key, raw)
                passthrough[key] = raw
            elif not prefix and key in RETIRED_FIELDS:
                warnings.append(f"{key}: retired upstream field, ignored")
            else:
                raise ConfigError(path, _unknown_message(path, sorted(known | sections)))

    walk(document, "")
    return values, passthrough, warnings


def _check_passthrough(section: str, raw: Any) -> None:
    if raw is None:
        return
    if not isinstance(raw, Mapping):
        raise ConfigError(section, f"expected a mapping, got {raw!r}")
    for key in raw:
        if key not in UPSTREAM_MODE_SECTIONS[section]:
            raise ConfigError(
                f"{section}.{key}",
                _unknown_message(f"{section}.{key}",
                                 [f"{section}.{f}" for f in UPSTREAM_MODE_SECTIONS[section]]),
            )


def _unknown_message(path: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(path, list(known), n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown field{hint}"


def _parse(option: Option, raw: Any, where: str) -> Any:
    if raw is None and option.kind in (STRING, BOOLEAN, INTEGER, DURATION, FLOAT):
        return None  # null in the file: keep the default (the caller skips it)
    try:
        # Kind and choices now; `check` runs in _validate, after defaulting and port fix-ups.
        value = option.kind.parse(raw)
        if option.choices is not None and value not in option.choices:
            raise OptionError(
                f"{value!r} is not one of {', '.join(map(repr, option.choices))}")
    except OptionError as exc:
        raise ConfigError(where, str(exc)) from None
    return value


def _append_port_if_needed(address: str, port: int) -> str:
    """Upstream's AppendPortIfNeeded: a bare IP gets the default port."""
    if not address:
        return address
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _apply_flag_fixups(values: dict[str, Any], flags: Mapping[str, Any], has_file: bool) -> None:
    host = values.get("hostnameOverride")
    if "hostnameOverride" in flags and isinstance(host, str):
        # Upstream trims and lower-cases the flag (the file value is used as written).
        if not host.strip():
            raise ConfigError("--hostname-override", "empty hostname-override is invalid")
        values["hostnameOverride"] = host.strip().lower()
    for key, port_key in (("healthzBindAddress", "healthzPort"),
                          ("metricsBindAddress", "metricsPort")):
        port = values.get(port_key)
        if port is None or has_file:
            continue  # upstream applies the deprecated port flags only without --config
        if port == 0:
            values[key] = ""
        elif values[key]:
            host_part = split_host_port(values[key])[0] if ":" in values[key] else values[key]
            values[key] = _append_port_if_needed(host_part, port)


def _apply_bind_family_defaults(values: dict[str, Any], sources: Mapping[str, str]) -> None:
    # Upstream defaults the servers to the IPv6 wildcard/loopback when bindAddress is IPv6.
    try:
        v6 = ipaddress.ip_address(values["bindAddress"]).version == 6
    except ValueError:
        return
    if not v6:
        return
    if "healthzBindAddress" not in sources:
        values["healthzBindAddress"] = f"[::]:{HEALTHZ_PORT}"
    if "metricsBindAddress" not in sources:
        values["metricsBindAddress"] = f"[::1]:{METRICS_PORT}"


def _validate(config: Config, options: OptionRegistry, modes: Sequence[str] | None) -> None:
    values = config.values()
    for option in options:
        if option.check is not None and values.get(option.path) is not None:
            try:
                option.check(values[option.path])
            except ValueError as exc:  # OptionError, or a plugin's check raising ValueError
                raise ConfigError(_where(config, option), str(exc)) from None
    # Every mode section with a sync period follows upstream's rule minSync <= sync.
    for option in options:
        if option.path.endswith(".minSyncPeriod"):
            section = option.path.rsplit(".", 1)[0]
            sync = values.get(f"{section}.syncPeriod")
            minimum = values.get(option.path)
            if sync is not None and minimum is not None and minimum > sync:
                sync_option = options.get(f"{section}.syncPeriod")
                if config.source(option.path) == "flag" and (
                    sync_option is None or config.source(sync_option.path) != "flag"
                ):
                    raise ConfigError(
                        _where(config, option),
                        f"must be less than or equal to {section}.syncPeriod "
                        f"({format_duration(sync)}), got {format_duration(minimum)}",
                    )
                raise ConfigError(
                    _where(config, sync_option or option),
                    f"must be greater than or equal to {section}.minSyncPeriod "
                    f"({format_duration(minimum)}), got {format_duration(sync)}",
                )
    detect = values["detectLocalMode"]
    if detect == "BridgeInterface" and not values["detectLocal.bridgeInterface"]:
        raise ConfigError("detectLocal.bridgeInterface",
                          "must be set when detectLocalMode is BridgeInterface")
    if detect == "InterfaceNamePrefix" and not values["detectLocal.interfaceNamePrefix"]:
        raise ConfigError("detectLocal.interfaceNamePrefix",
                          "must be set when detectLocalMode is InterfaceNamePrefix")
    if modes is not None and config.mode not in modes:
        raise ConfigError(
            _where(config, options.get("mode")),
            f"{config.mode!r} is not an installed proxy mode (installed: "
            f"{', '.join(modes) or 'none'})",
        )


def _where(config: Config, option: Option | None) -> str:
    if option is None:
        return ""
    if config.source(option.path) == "flag" and option.flag:
        return option.flag
    return option.path


def write_config(config: Config, path: str) -> None:
    """``--write-config-to``: the effective configuration as YAML (JSON if ``path`` ends in
    ``.json``)."""
    data = config.as_file_dict()
    text = (json.dumps(data, indent=2) + "\n" if path.endswith(".json")
            else yaml.safe_dump(data, default_flow_style=False, sort_keys=True))
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise ConfigError("--write-config-to", f"cannot write {path}: {exc.strerror or exc}"
                          ) from None
