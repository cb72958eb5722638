"""The test kit's BackendHost: a backend kept alive in a namespace child across calls."""

from __future__ import annotations

import subprocess

import pytest

from kproxy_core.backend import Backend, SyncRequest, SyncResult
from kproxy_core.testing.backendhost import BackendHost, host_in_new_netns
from kproxy_core.testing.conformance import EP1, EP2, service_port
from kproxy_core.testing.netns import NetNS, Sandbox

pytestmark = pytest.mark.root


class Recorder(Backend):
    name = "recorder"

    def __init__(self) -> None:  # no context needed for this test
        self.requests: list[SyncRequest] = []

    def sync(self, request: SyncRequest) -> SyncResult:
        if request.view.node_name == "boom":
            raise RuntimeError("injected")
        self.requests.append(request)
        return SyncResult(objects_written=len(request.changed))


def test_state_survives_calls_and_changes_are_computed_like_the_core() -> None:
    a1 = service_port("a", "10.96.0.1", 80, [EP1])
    a2 = service_port("a", "10.96.0.1", 80, [EP1, EP2])
    b = service_port("b", "10.96.0.2", 80, [EP2])
    with Sandbox() as sandbox:
        host = BackendHost(sandbox.netns("host").name, Recorder, ops={
            "seen": lambda backend, _: [sorted(map(str, r.changed))
                                        for r in backend.requests],  # type: ignore[attr-defined]
        })
        try:
            assert host.sync(a1, b, full=True).objects_written == 2
            assert host.sync(a2, b).objects_written == 1
            assert host.sync(b).objects_written == 1
            assert host.call("seen") == [[str(a1.key), str(b.key)], [str(a1.key)],
                                         [str(a1.key)]]
            assert host.run("ip", "-o", "link", "show", "lo").startswith("1: lo")
            host.node_name = "boom"
            with pytest.raises(RuntimeError, match="injected"):
                host.sync(b)
        finally:
            host.close()


def test_host_in_new_netns_removes_the_namespace_and_the_child() -> None:
    seen: dict[str, str] = {}

    def make(node: NetNS) -> BackendHost:
        seen["netns"] = node.name
        return BackendHost(node.name, Recorder)

    with host_in_new_netns(make) as host:
        assert host.run("ip", "netns", "identify").strip() == seen["netns"]
        assert seen["netns"] in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                               text=True, check=True).stdout
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             check=True).stdout
    assert seen["netns"] not in listing
