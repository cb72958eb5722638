"""The namespace sandbox itself: both address families route between nodes (root)."""

from __future__ import annotations

import os
import sys

import pytest

from kproxy_core.testing.netns import ClusterSandbox

pytestmark = pytest.mark.root


@pytest.mark.parametrize("ipv6", [False, True])
def test_pods_on_two_nodes_reach_each_other(ipv6: bool) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it creates network namespaces")
    with ClusterSandbox(local_pods=1, remote_pods=1, ipv6=ipv6) as sb:
        local, remote = sb.pods
        assert (local.ip6 is not None) == ipv6
        sb.start_echo(remote, udp_port=None)
        targets = [remote.ip] + ([remote.ip6] if remote.ip6 else [])
        for target in targets:
            reply = local.ns.run([sys.executable, "-m", "kproxy_core.testing.echo", "tcp",
                                  target, "8080"]).stdout.split()
            # The echo server answers with its name and the peer it saw: no NAT in between.
            assert reply[:2] == [remote.name, local.ip6 if ":" in target else local.ip], reply
