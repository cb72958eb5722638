"""`kproxy explain` for every mode, against the live process and the live kernel state: the
running kproxy's /debug/services report (what the explain command prints) names the chosen
endpoints and what the mode programmed, and `--all` reports no drift after a sync."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import pytest
from e2e_harness import METRICS, Cluster, fresh_ip, fresh_node_port

from kproxy_core.demo import endpoint_slice_obj, service_obj, svc_port

pytestmark = pytest.mark.root


def _report(cluster: Cluster, path: str) -> dict[str, object]:
    code, body = cluster.http(f"http://{METRICS}/debug/services{path}")
    assert code == 200, body
    return dict(json.loads(body))


def test_explain_reports_model_and_programmed_state(cluster: Cluster) -> None:
    ip, node_port = fresh_ip(), fresh_node_port()
    cluster.apply(
        service_obj("explained", ip, [svc_port(80, node_port=node_port)], type="NodePort"),
        endpoint_slice_obj("explained", cluster.eps("pod-1-2", "pod-2-2")
                           + cluster.eps("pod-1-3", ready=False)))
    pod = cluster.pod("pod-1-3")
    cluster.wait_answered_by(pod, ip, 80, {"pod-1-2", "pod-2-2"}, count=12)

    query = "?" + urllib.parse.urlencode({"from": pod.ip})
    report = _report(cluster, "/default/explained" + query)
    assert report["mode"] == cluster.mode
    ports = report["ports"]
    assert isinstance(ports, list) and len(ports) == 1, ports
    port: dict[str, Any] = ports[0]
    assert {ep["address"] for ep in port["internalEndpoints"]} == {"10.244.1.2:8080",
                                                                   "10.244.2.2:8080"}
    assert {(ep["address"], ep["reason"]) for ep in port["excludedEndpoints"]} == {
        ("10.244.1.3:8080", "not ready")}
    programmed = port["programmed"]
    assert programmed and "error" not in programmed, programmed
    # Each mode reads its own kernel objects back; the report must mention the service's
    # endpoints somewhere in them (DNAT targets, real servers, listener backends...).
    text = json.dumps(programmed)
    assert "10.244.1.2" in text and "10.244.2.2" in text, programmed
    for verdict in port.get("verdicts", []):
        assert "error" not in verdict, verdict

    summary = _report(cluster, "")
    assert summary["mode"] == cluster.mode
    assert summary["drift"] == [], summary["drift"]
