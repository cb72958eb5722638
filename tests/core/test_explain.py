"""explain's report from a resolved view and a backend (no kernel: a fake backend)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import attrs
import pytest

from kproxy_core import explain
from kproxy_core.backend import Backend, BackendContext, SyncRequest, SyncResult
from kproxy_core.model import Endpoint, NodeView, ServicePortKey
from kproxy_core.plugins import KproxyPluginManager
from kproxy_core.testing.conformance import endpoint, node_view, service_port

REMOTE = endpoint("10.244.2.2")
LOCAL = endpoint("10.244.1.3", local=True)
NOT_READY = Endpoint("10.244.2.9", 8080, False, False, False, False, "node-b")


class FakeBackend(Backend):
    name = "fake"

    def sync(self, request: SyncRequest) -> SyncResult:
        return SyncResult()

    def describe(self, key: ServicePortKey) -> Mapping[str, Any]:
        return {"tables": {"nat": {"KUBE-SVC-X": [{"rule": "-A KUBE-SVC-X -j KUBE-SEP-Y",
                                                   "packets": 3, "bytes": 180}]}}}

    def trace(self, *, source_ip: str, protocol: str, dest_ip: str, dest_port: int,
              local_source: bool = False) -> Mapping[str, Any] | None:
        return {"verdict": "ACCEPT", "endpoints": ["10.244.2.2:8080"],
                "masquerade": local_source}

    def audit(self, view: NodeView) -> list[str]:
        return ["IPv4 nat chain KUBE-SVC-OLD is programmed but no service owns it"]


def _backend() -> FakeBackend:
    plugins = KproxyPluginManager(load_entrypoints=False)
    return FakeBackend(BackendContext(config=None, node_name="node-a",  # type: ignore[arg-type]
                                      logger=logging.getLogger("t"), plugins=plugins))


def _view() -> NodeView:
    web = service_port("web", "10.96.0.10", 80, [REMOTE, LOCAL], node_port=30080,
                       external_policy_local=True)
    empty = service_port("empty", "10.96.0.11", 80, [])
    return node_view(web, empty)


@pytest.mark.parametrize(("target", "expected"), [
    ("default/web", ("default", "web", None)),
    ("web", ("default", "web", None)),
    ("kube-system/dns:53", ("kube-system", "dns", "53")),
])
def test_parse_target(target: str, expected: tuple[str, str, str | None]) -> None:
    assert explain.parse_target(target) == expected


def test_parse_target_rejects_empty_name() -> None:
    with pytest.raises(explain.ExplainError, match="NAMESPACE/SERVICE"):
        explain.parse_target("default/")


def test_report_has_model_programmed_state_and_verdicts() -> None:
    report = explain.explain_service(_view(), _backend(), "default/web", from_ip="10.99.0.100")
    (port,) = report["ports"]
    assert port["externalTrafficPolicy"] == "Local"
    assert [ep["address"] for ep in port["internalEndpoints"]] == ["10.244.1.3:8080",
                                                                    "10.244.2.2:8080"]
    assert [ep["address"] for ep in port["externalEndpoints"]] == ["10.244.1.3:8080"]
    assert port["programmed"]["tables"]["nat"]["KUBE-SVC-X"][0]["packets"] == 3
    destinations = [v["destination"] for v in port["verdicts"]]
    assert destinations == ["clusterIP 10.96.0.10:80", "nodePort 10.99.0.1:30080"]
    assert "without SNAT" in port["summary"]
    text = explain.render_text(report)
    assert "[3 pkts 180 B] -A KUBE-SVC-X -j KUBE-SEP-Y" in text
    assert "packet to clusterIP 10.96.0.10:80: ACCEPT, endpoints 10.244.2.2:8080" in text


def test_excluded_endpoints_are_explained() -> None:
    port = service_port("web", "10.96.0.10", 80, [REMOTE])
    port = attrs.evolve(port, excluded_endpoints=((NOT_READY, "not ready"),))
    report = explain.explain_service(node_view(port), None, "default/web")
    assert report["ports"][0]["excludedEndpoints"] == [
        {"address": "10.244.2.9:8080", "node": "node-b", "reason": "not ready"}]
    assert "not used: 10.244.2.9:8080 (not ready)" in explain.render_text(report)


def test_unknown_service_is_an_error_naming_it() -> None:
    with pytest.raises(explain.ExplainError, match="default/nope is not proxied"):
        explain.explain_service(_view(), None, "default/nope")


def test_all_lists_problems_and_drift() -> None:
    report = explain.explain_all(_view(), _backend())
    assert report["problems"] == [
        {"servicePort": str(next(k for k in _view().services if k.name.name == "empty")),
         "problem": "no endpoints (rejected)"}]
    assert report["drift"] == ["IPv4 nat chain KUBE-SVC-OLD is programmed but no service "
                               "owns it"]
    assert "drift: IPv4 nat chain KUBE-SVC-OLD" in explain.render_text(report)


def test_debug_handler_serves_json_and_404() -> None:
    handler = explain.debug_handler(_view, _backend())
    code, content_type, body = handler("/debug/services/default/web?from=10.244.1.3")
    assert code == 200 and content_type == "application/json"
    assert json.loads(body)["ports"][0]["verdicts"][0]["verdict"] == "ACCEPT"
    code, _, body = handler("/debug/services/default/nope")
    assert code == 404 and "not proxied" in json.loads(body)["error"]
    code, _, body = handler("/debug/services")
    assert code == 200 and json.loads(body)["servicePorts"] == 2
