"""Found by the ipvs e2e run in the VM: on a node with IPv6 (every e2e topology), each full
sync of the ipvs mode failed with ``cannot list ipset KUBE-6-LOAD-BALANCER-SOURCE-CIDR:
(22, 'Invalid argument')`` and nothing was programmed. ipset names have at most 31
characters; upstream (pkg/proxy/ipvs ipset.go, NewIPSet) cuts the ``KUBE-6-`` names to 31.
Needs ipset only, not IPVS, so it runs on the host where the e2e traffic tests skip ipvs."""

from __future__ import annotations

import pytest

from kproxy_core.testing.netns import Sandbox

rules = pytest.importorskip("kproxy_ipvs.rules", reason="kproxy-ipvs is not installed")

#: The kernel's IPSET_MAXNAMELEN is 32 with the terminating NUL.
MAX_SET_NAME = 31


def _names() -> list[str]:
    return [rules.set_name(spec.name, family) for spec in rules.SETS for family in (4, 6)]


def test_ipvs_set_names_fit_ipset() -> None:
    too_long = [name for name in _names() if len(name) > MAX_SET_NAME]
    assert not too_long, f"longer than {MAX_SET_NAME} characters: {too_long}"


@pytest.mark.root
def test_ipvs_sets_can_be_created_in_the_kernel() -> None:
    with Sandbox() as sb:
        ns = sb.netns("ipvs-sets")
        for spec in rules.SETS:
            for family in (4, 6):
                name = rules.set_name(spec.name, family)
                argv = ["ipset", "create", name, spec.type]
                if spec.type != "bitmap:port":
                    argv += ["family", "inet6" if family == 6 else "inet"]
                else:
                    argv += ["range", "0-65535"]
                proc = ns.run(argv, check=False)
                assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr.strip()}"
