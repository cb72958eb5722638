"""The nftables mode passes the core's conformance suite, each scenario in a fresh network
namespace, read back from the kernel with ``nft -j list table``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
from nft_helpers import read_dataplane

from kproxy_core.backend import Backend
from kproxy_core.testing.conformance import BackendConformance, Dataplane
from kproxy_core.testing.innetns import in_netns
from kproxy_core.testing.netns import Sandbox

T = TypeVar("T")


@pytest.mark.root
class TestNftablesConformance(BackendConformance):
    mode = "nftables"
    config_overrides = {"clusterCIDR": ("10.244.0.0/16",)}

    def isolated(self, func: Callable[[], T]) -> T:
        with Sandbox() as sandbox:
            ns = sandbox.netns("nftconf")
            return in_netns(ns.name, func)

    def dataplane(self, backend: Backend) -> Dataplane:
        return read_dataplane((4,))
