"""detectLocalMode decided once in the core, per family."""

from __future__ import annotations

import pytest

from kproxy_core.localtraffic import LocalTraffic, LocalTrafficDetector


class Config:
    def __init__(self, **values: object) -> None:
        self.values = values

    def get(self, path: str) -> object:
        return self.values.get(path)


DUAL = ("10.244.0.0/16", "fd00:10::/56")


@pytest.mark.parametrize(("values", "family", "pod_cidrs", "expected"), [
    ({"clusterCIDR": DUAL}, 4, (), LocalTraffic(cidr="10.244.0.0/16")),
    ({"clusterCIDR": DUAL}, 6, (), LocalTraffic(cidr="fd00:10::/56")),
    ({"clusterCIDR": "10.244.0.0/16"}, 6, (), LocalTraffic()),
    ({}, 4, (), LocalTraffic()),
    ({"detectLocalMode": "NodeCIDR", "clusterCIDR": DUAL}, 4, ("10.244.1.0/24",),
     LocalTraffic(cidr="10.244.1.0/24")),
    ({"detectLocalMode": "NodeCIDR"}, 4, (), LocalTraffic()),
    ({"detectLocalMode": "BridgeInterface", "detectLocal.bridgeInterface": "cbr0"}, 4, (),
     LocalTraffic(interface="cbr0")),
    ({"detectLocalMode": "InterfaceNamePrefix", "detectLocal.interfaceNamePrefix": "veth"},
     6, (), LocalTraffic(interface="veth", prefix=True)),
])
def test_local_traffic_per_mode_and_family(values: dict[str, object], family: int,
                                           pod_cidrs: tuple[str, ...],
                                           expected: LocalTraffic) -> None:
    assert LocalTrafficDetector(Config(**values)).for_family(family, pod_cidrs) == expected


def test_unknown_mode_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"detectLocalMode must be one of .* not 'Magic'"):
        LocalTrafficDetector(Config(detectLocalMode="Magic"))
