"""Helpers the modes share for reading settings and splitting addresses by family."""

from __future__ import annotations

import pytest

from kproxy_core.backend import as_list, config_value
from kproxy_core.model import of_family


class Config:
    def get(self, path: str) -> object:
        values = {"clusterCIDR": ("10.244.0.0/16",), "unset": None}
        if path not in values:
            raise KeyError(path)
        return values[path]


def test_config_value_falls_back_for_undeclared_or_unset_paths() -> None:
    assert config_value(Config(), "clusterCIDR", ()) == ("10.244.0.0/16",)
    assert config_value(Config(), "unset", "d") == "d"
    assert config_value(Config(), "ipvs.scheduler", "rr") == "rr"


@pytest.mark.parametrize(("value", "expected"), [
    (None, []), ("", []), ("a, b,,c", ["a", "b", "c"]), (("x", " y "), ["x", "y"]),
])
def test_as_list(value: object, expected: list[str]) -> None:
    assert as_list(value) == expected


def test_as_list_rejects_other_types() -> None:
    with pytest.raises(ValueError, match="expected a list of strings"):
        as_list(42)


def test_of_family_keeps_order_and_drops_invalid() -> None:
    values = ["10.0.0.0/8", "fd00::/64", "bogus", "10.99.0.1", "::1"]
    assert of_family(values, 4) == ["10.0.0.0/8", "10.99.0.1"]
    assert of_family(values, 6) == ["fd00::/64", "::1"]
