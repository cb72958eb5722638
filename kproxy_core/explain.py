"""``kproxy explain``: what a Service means on this node, what the active mode programmed for
it, and where a hypothetical packet would go.

The running proxy serves the report as JSON on its metrics server (``/debug/services/NS/NAME``
and ``/debug/services`` for the summary); the ``kproxy explain`` command fetches and prints it,
so it always describes the live process and the live kernel state. Everything here is
read-only.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from kproxy_core.backend import Backend
from kproxy_core.model import Endpoint, NodeView, ResolvedServicePort

DEBUG_PREFIX = "/debug/services"


class ExplainError(LookupError):
    pass


def parse_target(target: str) -> tuple[str, str, str | None]:
    """``NS/NAME[:PORT]`` (``NAME`` alone means namespace ``default``)."""
    namespace, _, rest = target.rpartition("/")
    name, _, port = rest.partition(":")
    if not name:
        raise ExplainError(f"expected NAMESPACE/SERVICE[:PORT], got {target!r}")
    return namespace or "default", name, port or None


def find_ports(view: NodeView, namespace: str, name: str,
               port: str | None = None) -> list[ResolvedServicePort]:
    found = [
        sp for key, sp in view.services.items()
        if key.name.namespace == namespace and key.name.name == name
        and (port is None or key.name.port == port or str(sp.port) == port)
    ]
    return sorted(found, key=lambda sp: sp.key)


def _endpoint(ep: Endpoint) -> dict[str, Any]:
    return {
        "address": ep.address,
        "node": ep.node_name,
        "zone": ep.zone,
        "local": ep.is_local,
        "ready": ep.ready,
        "serving": ep.serving,
        "terminating": ep.terminating,
    }


def _destinations(sp: ResolvedServicePort, node_ips: Sequence[str]) -> list[tuple[str, str, int]]:
    """(label, ip, port) of every address the service port answers on."""
    out = [("clusterIP", sp.cluster_ip, sp.port)]
    out += [("externalIP", ip, sp.port) for ip in sp.external_ips]
    out += [("loadBalancerIP", ip, sp.port) for ip in sp.load_balancer_ips]
    if sp.node_port:
        family_ips = [ip for ip in node_ips if (":" in ip) == (sp.family == 6)]
        out += [("nodePort", ip, sp.node_port) for ip in family_ips[:1]]
    return out


def explain_port(sp: ResolvedServicePort, view: NodeView, backend: Backend | None,
                 from_ip: str | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "servicePort": str(sp.name),
        "family": f"IPv{sp.family}",
        "protocol": sp.protocol,
        "clusterIP": sp.cluster_ip,
        "port": sp.port,
        "nodePort": sp.node_port or None,
        "externalIPs": list(sp.external_ips),
        "loadBalancerIPs": list(sp.load_balancer_ips),
        "loadBalancerSourceRanges": list(sp.load_balancer_source_ranges),
        "externalTrafficPolicy": "Local" if sp.external_policy_local else "Cluster",
        "internalTrafficPolicy": "Local" if sp.internal_policy_local else "Cluster",
        "sessionAffinityTimeoutSeconds": sp.session_affinity_timeout,
        "healthCheckNodePort": sp.health_check_node_port or None,
        "hasAnyEndpoints": sp.has_any_endpoints,
        "internalEndpoints": [_endpoint(ep) for ep in sp.internal_endpoints],
        "externalEndpoints": ([_endpoint(ep) for ep in sp.external_endpoints]
                              if sp.is_external_facing else None),
        "excludedEndpoints": [{"address": ep.address, "node": ep.node_name, "reason": why}
                              for ep, why in sp.excluded_endpoints],
        "summary": summarize(sp),
    }
    if backend is not None:
        try:
            report["programmed"] = dict(backend.describe(sp.key))
        except Exception as exc:  # explain must never take the proxy down
            report["programmed"] = {"error": f"{type(exc).__name__}: {exc}"}
        if from_ip:
            report["verdicts"] = [
                {"destination": f"{label} {ip}:{port}", **_trace(backend, from_ip, sp, ip, port,
                                                                 view)}
                for label, ip, port in _destinations(sp, view.node_ips)
            ]
    return report


def _trace(backend: Backend, from_ip: str, sp: ResolvedServicePort, ip: str, port: int,
           view: NodeView) -> dict[str, Any]:
    local = from_ip in view.node_ips or from_ip in ("127.0.0.1", "::1")
    try:
        result = backend.trace(source_ip=from_ip, protocol=sp.protocol, dest_ip=ip,
                               dest_port=port, local_source=local)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if result is None:
        return {"verdict": None, "note": f"the {backend.name} mode cannot trace packets"}
    return dict(result)


def summarize(sp: ResolvedServicePort) -> str:
    """One sentence an operator can act on."""
    if not sp.has_any_endpoints:
        return "no usable endpoint anywhere in the cluster: traffic is rejected"
    parts = []
    internal = sp.internal_endpoints
    if not internal:
        parts.append("ClusterIP traffic is dropped (internalTrafficPolicy Local and no "
                      "endpoint on this node)")
    else:
        parts.append(f"ClusterIP traffic goes to {len(internal)} endpoint(s)")
    if sp.is_external_facing:
        external = sp.external_endpoints
        if not external:
            parts.append("external traffic is dropped (externalTrafficPolicy Local and no "
                         "endpoint on this node)")
        else:
            parts.append(f"external traffic goes to {len(external)} endpoint(s)"
                         + (" without SNAT" if sp.external_policy_local else ""))
    if any(ep.terminating for ep in (*sp.cluster_endpoints, *sp.local_endpoints)):
        parts.append("only terminating endpoints are left: using them as a fallback")
    return "; ".join(parts)


def explain_service(view: NodeView, backend: Backend | None, target: str,
                    from_ip: str | None = None) -> dict[str, Any]:
    namespace, name, port = parse_target(target)
    ports = find_ports(view, namespace, name, port)
    if not ports:
        known = sorted({f"{k.name.namespace}/{k.name.name}" for k in view.services
                        if k.name.name == name or k.name.namespace == namespace})[:10]
        hint = f"; similar: {', '.join(known)}" if known else ""
        raise ExplainError(f"service {namespace}/{name}{':' + port if port else ''} is not "
                           f"proxied on this node (headless, ExternalName, ignored by "
                           f"service-proxy-name, or unknown){hint}")
    return {
        "service": f"{namespace}/{name}",
        "node": view.node_name,
        "mode": backend.name if backend is not None else None,
        "ports": [explain_port(sp, view, backend, from_ip) for sp in ports],
    }


def explain_all(view: NodeView, backend: Backend | None) -> dict[str, Any]:
    problems: list[dict[str, str]] = []
    for key, sp in sorted(view.services.items()):
        if not sp.has_any_endpoints:
            problems.append({"servicePort": str(key), "problem": "no endpoints (rejected)"})
        elif sp.internal_policy_local and not sp.local_endpoints:
            problems.append({"servicePort": str(key),
                             "problem": "internalTrafficPolicy Local, no local endpoint"})
        elif sp.external_policy_local and sp.is_external_facing and not sp.local_endpoints:
            problems.append({"servicePort": str(key),
                             "problem": "externalTrafficPolicy Local, no local endpoint"})
    drift: list[str] = []
    if backend is not None:
        try:
            drift = list(backend.audit(view))
        except Exception as exc:
            drift = [f"audit failed: {type(exc).__name__}: {exc}"]
    return {
        "node": view.node_name,
        "mode": backend.name if backend is not None else None,
        "servicePorts": len(view.services),
        "problems": problems,
        "drift": drift,
    }


def debug_handler(get_view: Any, backend: Backend | None) -> Any:
    """A metrics-server handler for ``/debug/services`` and ``/debug/services/NS/NAME``."""

    def handle(path: str) -> tuple[int, str, bytes]:
        parsed = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(parsed.query)
        rest = parsed.path[len(DEBUG_PREFIX):].strip("/")
        view = get_view()
        try:
            if not rest:
                body: dict[str, Any] = explain_all(view, backend)
            else:
                from_ip = query["from"][0] if query.get("from") else None
                body = explain_service(view, backend, urllib.parse.unquote(rest), from_ip)
        except ExplainError as exc:
            return 404, "application/json", json.dumps({"error": str(exc)}).encode()
        return 200, "application/json", json.dumps(body, indent=1).encode()

    return handle


# -- the command ---------------------------------------------------------------------------------


def fetch(metrics_address: str, target: str | None, from_ip: str | None) -> dict[str, Any]:
    path = DEBUG_PREFIX + ("/" + urllib.parse.quote(target) if target else "")
    if from_ip:
        path += "?" + urllib.parse.urlencode({"from": from_ip})
    url = f"http://{metrics_address}{path}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}").get("error", exc.reason)
        raise ExplainError(str(detail)) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ExplainError(
            f"cannot reach kproxy's metrics server at {metrics_address} ({exc}); is kproxy "
            "running on this node, and is --metrics-bind-address the same?"
        ) from None


def render_text(report: Mapping[str, Any]) -> str:
    lines: list[str] = []
    if "problems" in report:
        lines.append(f"node {report['node']}, mode {report['mode']}: "
                     f"{report['servicePorts']} service ports")
        if not report["problems"] and not report["drift"]:
            lines.append("no problems found")
        for problem in report["problems"]:
            lines.append(f"  {problem['servicePort']}: {problem['problem']}")
        for drift in report["drift"]:
            lines.append(f"  drift: {drift}")
        return "\n".join(lines)
    lines.append(f"{report['service']} on node {report['node']} (mode {report['mode']})")
    for port in report["ports"]:
        lines.append(f"\n{port['servicePort']}/{port['protocol'].lower()} {port['family']}: "
                     f"{port['clusterIP']}:{port['port']}"
                     + (f", nodePort {port['nodePort']}" if port["nodePort"] else "")
                     + "".join(f", externalIP {ip}" for ip in port["externalIPs"])
                     + "".join(f", LB {ip}" for ip in port["loadBalancerIPs"]))
        lines.append(f"  {port['summary']}")
        lines.append(f"  policies: external {port['externalTrafficPolicy']}, internal "
                     f"{port['internalTrafficPolicy']}"
                     + (f", affinity ClientIP {port['sessionAffinityTimeoutSeconds']}s"
                        if port["sessionAffinityTimeoutSeconds"] else ""))
        for label, key in (("internal", "internalEndpoints"), ("external", "externalEndpoints")):
            endpoints = port.get(key)
            if endpoints is None:
                continue
            lines.append(f"  {label} endpoints ({len(endpoints)}):")
            for ep in endpoints:
                flags = ", ".join(f for f in ("local" if ep["local"] else f"node {ep['node']}",
                                              "terminating" if ep["terminating"] else "") if f)
                lines.append(f"    {ep['address']}  ({flags})")
        for ep in port["excludedEndpoints"]:
            lines.append(f"  not used: {ep['address']} ({ep['reason']})")
        programmed = port.get("programmed") or {}
        if programmed:
            lines.append("  programmed:")
            lines.extend(f"    {line}" for line in _render_programmed(programmed))
        for verdict in port.get("verdicts", []):
            if "error" in verdict or verdict.get("verdict") is None:
                lines.append(f"  packet to {verdict['destination']}: "
                             f"{verdict.get('error') or verdict.get('note')}")
                continue
            endpoints = ", ".join(verdict.get("endpoints") or []) or "-"
            lines.append(f"  packet to {verdict['destination']}: {verdict['verdict']}, "
                         f"endpoints {endpoints}"
                         + (", masqueraded" if verdict.get("masquerade") else ""))
    return "\n".join(lines)


def _render_programmed(programmed: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    tables = programmed.get("tables")
    if isinstance(tables, Mapping):
        for table, chains in tables.items():
            for chain, rules in chains.items():
                out.append(f"{table} {chain}:")
                for rule in rules:
                    if isinstance(rule, Mapping):
                        out.append(f"  [{rule.get('packets', 0)} pkts {rule.get('bytes', 0)} B] "
                                   f"{rule.get('rule')}")
                    else:
                        out.append(f"  {rule}")
        rest = {k: v for k, v in programmed.items() if k not in ("tables",)}
    else:
        rest = dict(programmed)
    out.extend(f"{key}: {json.dumps(value)}" for key, value in rest.items())
    return out
